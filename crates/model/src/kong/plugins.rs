//! Kong plugins meshgate implements, compiled from decK `plugins` entries into the chain a
//! route runs, in Kong's priority order (highest first).
//!
//! Scoping follows Kong: for each plugin name, the instance on the route wins over the one on
//! its service, which wins over a global one. Consumer-scoped instances are not supported yet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// A route's plugins, highest priority first.
#[derive(Debug, Default)]
pub struct PluginChain {
    pub plugins: Vec<Plugin>,
    /// For consumers with plugins scoped to them: the whole chain (this one with their
    /// instances in place of or beside the route's), which a request continues with once an
    /// auth plugin has identified the consumer. Keyed by index in [`Consumers::list`].
    pub by_consumer: HashMap<usize, Arc<PluginChain>>,
}

impl PluginChain {
    /// The chain that applies to a request by `consumer` (this one when none is scoped).
    pub fn for_consumer(&self, consumer: Option<usize>) -> &PluginChain {
        consumer
            .and_then(|c| self.by_consumer.get(&c))
            .map_or(self, |chain| chain.as_ref())
    }
}

#[derive(Debug)]
pub enum Plugin {
    CorrelationId(CorrelationId),
    KeyAuth(KeyAuth),
    BasicAuth(BasicAuth),
    Jwt(Jwt),
    RequestSizeLimiting(RequestSizeLimiting),
    RequestTransformer(Transformer),
    ResponseTransformer(Transformer),
    IpRestriction(IpRestriction),
    Acl(Acl),
    RateLimiting(RateLimiting),
    RequestTermination(RequestTermination),
    /// Answered by the route's CORS handling, not the chain (see `super::ChainContext`).
    Cors(crate::snapshot::CorsPolicy),
    FileLog(FileLog),
    HttpLog(HttpLog),
    ProxyCache(ProxyCache),
}

/// proxy-cache with the `memory` strategy: whole responses kept per request key.
#[derive(Debug)]
pub struct ProxyCache {
    pub request_methods: Vec<String>,
    pub response_codes: Vec<u16>,
    /// Media types (without parameters) that may be cached.
    pub content_types: Vec<String>,
    pub ttl: std::time::Duration,
    /// Request headers and query parameters that are part of the key.
    pub vary_headers: Vec<String>,
    pub vary_query_params: Vec<String>,
    /// Per-instance key prefix, so routes sharing a cache do not collide.
    pub instance: String,
}

/// file-log: one JSON object per request (Kong's basic log serializer) appended to `path`.
#[derive(Debug)]
pub struct FileLog {
    pub path: std::path::PathBuf,
}

/// http-log: the same JSON object sent to `endpoint` after each request.
#[derive(Debug)]
pub struct HttpLog {
    /// `http://host:port/path` (HTTPS endpoints are refused when the config loads).
    pub endpoint: String,
    pub method: String,
    pub content_type: String,
    pub timeout_ms: u64,
    /// Extra headers sent with each log request.
    pub headers: Vec<(String, String)>,
}

impl Plugin {
    /// Kong's plugin priorities (`PRIORITY` of each handler).
    pub fn priority(&self) -> i32 {
        match self {
            Plugin::CorrelationId(_) => 100_001,
            Plugin::KeyAuth(_) => 1250,
            Plugin::BasicAuth(_) => 1100,
            Plugin::Jwt(_) => 1450,
            Plugin::RequestSizeLimiting(_) => 951,
            Plugin::RequestTransformer(_) => 801,
            Plugin::ResponseTransformer(_) => 800,
            Plugin::IpRestriction(_) => 990,
            Plugin::Acl(_) => 950,
            Plugin::RateLimiting(_) => 910,
            Plugin::RequestTermination(_) => 2,
            Plugin::Cors(_) => 2000,
            Plugin::HttpLog(_) => 12,
            Plugin::ProxyCache(_) => 100,
            Plugin::FileLog(_) => 9,
        }
    }
}

/// Consumers of one decK file, shared by the plugins that identify or check them. Its
/// `Debug` output leaves credentials out, so they never reach a log.
#[derive(Default)]
pub struct Consumers {
    pub list: Vec<Consumer>,
    /// key-auth key → (consumer index, credential id).
    pub keys: HashMap<String, (usize, String)>,
    /// basic-auth username → (consumer index, credential id, password).
    pub basic: HashMap<String, (usize, String, String)>,
    /// jwt credential `key` (matched against the `key_claim_name` claim) → secret.
    pub jwt: HashMap<String, JwtSecret>,
}

/// A consumer's `jwt_secrets` entry, its key material checked when the config loads.
#[derive(Clone)]
pub struct JwtSecret {
    pub consumer: usize,
    pub id: String,
    /// `HS256`, `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, `ES256` or `ES384`.
    pub algorithm: String,
    /// HS*: the shared secret as written.
    pub secret: Vec<u8>,
    /// RS*: the PKCS#1 `RSAPublicKey`; ES*: the uncompressed curve point, both taken from the
    /// `rsa_public_key` PEM (SubjectPublicKeyInfo).
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for Consumers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumers")
            .field("list", &self.list)
            .field("keys", &self.keys.len())
            .field("basic", &self.basic.len())
            .field("jwt", &self.jwt.len())
            .finish()
    }
}

impl Consumers {
    /// The consumer whose id or username is `reference`.
    pub fn find(&self, reference: &str) -> Option<usize> {
        self.list
            .iter()
            .position(|c| c.id == reference || c.username.as_deref() == Some(reference))
    }
}

#[derive(Debug, Clone)]
pub struct Consumer {
    /// The decK `id`, or one derived from the username so headers always carry an id.
    pub id: String,
    pub username: Option<String>,
    pub custom_id: Option<String>,
    /// ACL groups.
    pub groups: Vec<String>,
}

#[derive(Debug)]
pub struct KeyAuth {
    pub key_names: Vec<String>,
    pub key_in_header: bool,
    pub key_in_query: bool,
    pub hide_credentials: bool,
    pub run_on_preflight: bool,
    /// The consumer requests without a valid key run as (index into `consumers`).
    pub anonymous: Option<usize>,
    /// `WWW-Authenticate: Key realm="<realm>"` on a missing key.
    pub realm: String,
    pub consumers: Arc<Consumers>,
}

#[derive(Debug)]
pub struct Jwt {
    pub uri_param_names: Vec<String>,
    pub cookie_names: Vec<String>,
    /// Lower-cased; their `Bearer` tokens are read.
    pub header_names: Vec<String>,
    /// `exp` and/or `nbf`.
    pub claims_to_verify: Vec<String>,
    pub key_claim_name: String,
    pub secret_is_base64: bool,
    pub anonymous: Option<usize>,
    pub run_on_preflight: bool,
    /// Seconds; 0 means no maximum.
    pub maximum_expiration: u64,
    pub consumers: Arc<Consumers>,
}

#[derive(Debug)]
pub struct BasicAuth {
    pub hide_credentials: bool,
    pub anonymous: Option<usize>,
    pub realm: String,
    pub consumers: Arc<Consumers>,
}

#[derive(Debug)]
pub struct RequestSizeLimiting {
    /// The largest body accepted, in bytes.
    pub limit: u64,
    pub require_content_length: bool,
}

/// request-transformer / response-transformer on headers (and, for requests, the query
/// string): Kong applies remove, rename, replace, add, append in that order.
#[derive(Debug, Default)]
pub struct Transformer {
    pub headers: TransformOps,
    pub querystring: TransformOps,
    /// request-transformer `replace.uri`.
    pub uri: Option<String>,
    /// request-transformer `http_method`.
    pub method: Option<String>,
}

#[derive(Debug, Default)]
pub struct TransformOps {
    pub remove: Vec<String>,
    pub rename: Vec<(String, String)>,
    pub replace: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub append: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct IpRestriction {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub status: u16,
    pub message: String,
}

#[derive(Debug)]
pub struct Acl {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub hide_groups_header: bool,
    pub consumers: Arc<Consumers>,
}

#[derive(Debug)]
pub struct RateLimiting {
    /// Counters are kept per plugin instance and route (as Kong keys them by route and
    /// service): the instance's id, or its field path in the file, stable across reloads
    /// and nodes.
    pub instance: String,
    /// `(window, limit)`, shortest window first.
    pub limits: Vec<(Window, u64)>,
    pub limit_by: LimitBy,
    pub hide_client_headers: bool,
    pub error_code: u16,
    pub error_message: String,
    /// `None`: counters in this process (Kong's `local`); `Some`: in Redis, shared by every
    /// meshgate (and Kong) node using that Redis.
    pub redis: Option<RedisTarget>,
    /// With Redis unreachable: let requests through (true) or answer 500 (false).
    pub fault_tolerant: bool,
}

/// Where the `redis` policy keeps its counters (`Debug` leaves the password out).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub database: u32,
    /// Milliseconds allowed for each exchange with Redis.
    pub timeout_ms: u64,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
    Month,
    Year,
}

impl Window {
    pub const ALL: [(Window, &'static str); 6] = [
        (Window::Second, "second"),
        (Window::Minute, "minute"),
        (Window::Hour, "hour"),
        (Window::Day, "day"),
        (Window::Month, "month"),
        (Window::Year, "year"),
    ];

    /// The window's length in seconds (a month is 30 days and a year 365, as Kong's).
    pub fn seconds(self) -> u64 {
        match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3600,
            Window::Day => 86_400,
            Window::Month => 2_592_000,
            Window::Year => 31_536_000,
        }
    }

    /// `Minute` as Kong capitalises it in `X-RateLimit-Limit-Minute`.
    pub fn header_suffix(self) -> &'static str {
        match self {
            Window::Second => "Second",
            Window::Minute => "Minute",
            Window::Hour => "Hour",
            Window::Day => "Day",
            Window::Month => "Month",
            Window::Year => "Year",
        }
    }
}

/// Whom a rate limit counts; every kind falls back to the client IP when its value is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitBy {
    Consumer,
    Credential,
    Ip,
    Service(String),
    Header(String),
    Path(String),
}

#[derive(Debug)]
pub struct RequestTermination {
    pub status: u16,
    /// A JSON `{"message": ...}` body, or `body` with `content_type` as given.
    pub message: Option<String>,
    pub body: Option<String>,
    pub content_type: Option<String>,
}

#[derive(Debug)]
pub struct CorrelationId {
    pub header_name: String,
    /// `uuid`, `uuid#counter` or `tracker`.
    pub generator: String,
    pub echo_downstream: bool,
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub address: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..{max}"))?,
            None => max,
        };
        Ok(IpNet { address, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

// --- decK config schemas (Kong's field names and defaults) ---
//
// Fields Kong has that meshgate accepts without acting on them stay in the schemas, so that
// unknown fields remain errors; hence `dead_code` is allowed on them.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyAuthConfig {
    #[serde(default = "default_key_names")]
    pub key_names: Vec<String>,
    #[serde(default = "yes")]
    pub key_in_header: bool,
    #[serde(default = "yes")]
    pub key_in_query: bool,
    #[serde(default)]
    pub key_in_body: bool,
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(default = "yes")]
    pub run_on_preflight: bool,
    #[serde(default)]
    pub anonymous: Option<String>,
    #[serde(default)]
    pub realm: Option<String>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtConfig {
    #[serde(default = "default_jwt_params")]
    pub uri_param_names: Vec<String>,
    #[serde(default)]
    pub cookie_names: Vec<String>,
    #[serde(default = "default_jwt_headers")]
    pub header_names: Vec<String>,
    #[serde(default)]
    pub claims_to_verify: Vec<String>,
    #[serde(default = "default_key_claim")]
    pub key_claim_name: String,
    #[serde(default)]
    pub secret_is_base64: bool,
    #[serde(default)]
    pub anonymous: Option<String>,
    #[serde(default = "yes")]
    pub run_on_preflight: bool,
    #[serde(default)]
    pub maximum_expiration: u64,
    pub realm: Option<String>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BasicAuthConfig {
    #[serde(default)]
    pub hide_credentials: bool,
    #[serde(default)]
    pub anonymous: Option<String>,
    #[serde(default)]
    pub realm: Option<String>,
    #[serde(default)]
    pub brute_force_protection: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestSizeLimitingConfig {
    #[serde(default = "default_payload_size")]
    pub allowed_payload_size: u64,
    #[serde(default = "default_size_unit")]
    pub size_unit: String,
    #[serde(default)]
    pub require_content_length: bool,
}

/// `remove`/`rename`/`replace`/`add`/`append` of request- and response-transformer.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct TransformSection {
    #[serde(default)]
    pub headers: Vec<String>,
    #[serde(default)]
    pub querystring: Vec<String>,
    #[serde(default)]
    pub body: Vec<String>,
    #[serde(default)]
    pub json: Vec<String>,
    #[serde(default)]
    pub json_types: Vec<String>,
    pub uri: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TransformerConfig {
    pub http_method: Option<String>,
    #[serde(default)]
    pub remove: TransformSection,
    #[serde(default)]
    pub rename: TransformSection,
    #[serde(default)]
    pub replace: TransformSection,
    #[serde(default)]
    pub add: TransformSection,
    #[serde(default)]
    pub append: TransformSection,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CorsConfig {
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub headers: Vec<String>,
    #[serde(default)]
    pub exposed_headers: Vec<String>,
    #[serde(default)]
    pub credentials: bool,
    pub max_age: Option<u32>,
    #[serde(default)]
    pub preflight_continue: bool,
    #[serde(default)]
    pub private_network: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IpRestrictionConfig {
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    #[serde(default)]
    pub deny: Option<Vec<String>>,
    #[serde(default = "forbidden")]
    pub status: u16,
    #[serde(default)]
    pub message: Option<String>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AclConfig {
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    #[serde(default)]
    pub deny: Option<Vec<String>>,
    #[serde(default)]
    pub hide_groups_header: bool,
    #[serde(default)]
    pub always_use_authenticated_groups: bool,
    #[serde(default)]
    pub include_consumer_groups: bool,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitingConfig {
    pub second: Option<u64>,
    pub minute: Option<u64>,
    pub hour: Option<u64>,
    pub day: Option<u64>,
    pub month: Option<u64>,
    pub year: Option<u64>,
    #[serde(default = "default_limit_by")]
    pub limit_by: String,
    pub header_name: Option<String>,
    pub path: Option<String>,
    #[serde(default = "default_policy")]
    pub policy: String,
    #[serde(default = "yes")]
    pub fault_tolerant: bool,
    #[serde(default)]
    pub hide_client_headers: bool,
    #[serde(default = "too_many_requests")]
    pub error_code: u16,
    #[serde(default = "default_rate_message")]
    pub error_message: String,
    pub sync_rate: Option<f64>,
    /// Kong 3.7+: the Redis settings grouped.
    pub redis: Option<RedisConfig>,
    // Kong's older flat Redis settings.
    pub redis_host: Option<Value>,
    pub redis_port: Option<Value>,
    pub redis_password: Option<Value>,
    pub redis_username: Option<Value>,
    pub redis_ssl: Option<Value>,
    pub redis_ssl_verify: Option<Value>,
    pub redis_server_name: Option<Value>,
    pub redis_timeout: Option<Value>,
    pub redis_database: Option<Value>,
}

#[allow(dead_code)]
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisConfig {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub database: Option<u32>,
    pub timeout: Option<u64>,
    pub connect_timeout: Option<u64>,
    pub send_timeout: Option<u64>,
    pub read_timeout: Option<u64>,
    pub ssl: Option<bool>,
    pub ssl_verify: Option<bool>,
    pub server_name: Option<String>,
    pub sentinel_master: Option<Value>,
    pub sentinel_role: Option<Value>,
    pub sentinel_nodes: Option<Value>,
    pub sentinel_username: Option<Value>,
    pub sentinel_password: Option<Value>,
    pub cluster_nodes: Option<Value>,
    pub cluster_max_redirections: Option<Value>,
    pub connection_is_proxied: Option<Value>,
    pub keepalive_pool_size: Option<Value>,
    pub keepalive_backlog: Option<Value>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProxyCacheConfig {
    #[serde(default = "default_cache_codes")]
    pub response_code: Vec<u16>,
    #[serde(default = "default_cache_methods")]
    pub request_method: Vec<String>,
    #[serde(default = "default_cache_types")]
    pub content_type: Vec<String>,
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: u64,
    #[serde(default = "default_strategy")]
    pub strategy: String,
    #[serde(default)]
    pub cache_control: bool,
    #[serde(default)]
    pub ignore_uri_case: bool,
    pub storage_ttl: Option<u64>,
    pub memory: Option<Value>,
    #[serde(default)]
    pub vary_headers: Vec<String>,
    #[serde(default)]
    pub vary_query_params: Vec<String>,
    #[serde(default)]
    pub response_headers: Option<Value>,
}

fn default_cache_codes() -> Vec<u16> {
    vec![200, 301, 404]
}
fn default_cache_methods() -> Vec<String> {
    vec!["GET".to_string(), "HEAD".to_string()]
}
fn default_cache_types() -> Vec<String> {
    vec!["text/plain".to_string(), "application/json".to_string()]
}
fn default_cache_ttl() -> u64 {
    300
}
fn default_strategy() -> String {
    "memory".to_string()
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileLogConfig {
    pub path: String,
    #[serde(default)]
    pub reopen: bool,
    pub custom_fields_by_lua: Option<Value>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpLogConfig {
    pub http_endpoint: String,
    #[serde(default = "default_post")]
    pub method: String,
    #[serde(default = "default_json")]
    pub content_type: String,
    #[serde(default = "default_log_timeout")]
    pub timeout: u64,
    pub keepalive: Option<u64>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub queue: Option<Value>,
    pub queue_size: Option<Value>,
    pub flush_timeout: Option<Value>,
    pub retry_count: Option<Value>,
    pub custom_fields_by_lua: Option<Value>,
}

fn default_post() -> String {
    "POST".to_string()
}
fn default_json() -> String {
    "application/json".to_string()
}
fn default_log_timeout() -> u64 {
    10_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestTerminationConfig {
    #[serde(default = "service_unavailable")]
    pub status_code: u16,
    pub message: Option<String>,
    pub body: Option<String>,
    pub content_type: Option<String>,
    #[serde(default)]
    pub echo: bool,
    pub trigger: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CorrelationIdConfig {
    #[serde(default = "default_correlation_header")]
    pub header_name: String,
    #[serde(default = "default_generator")]
    pub generator: String,
    #[serde(default)]
    pub echo_downstream: bool,
}

fn default_jwt_params() -> Vec<String> {
    vec!["jwt".to_string()]
}
fn default_jwt_headers() -> Vec<String> {
    vec!["authorization".to_string()]
}
fn default_key_claim() -> String {
    "iss".to_string()
}
fn default_payload_size() -> u64 {
    128
}
fn default_size_unit() -> String {
    "megabytes".to_string()
}
fn yes() -> bool {
    true
}
fn default_key_names() -> Vec<String> {
    vec!["apikey".to_string()]
}
fn forbidden() -> u16 {
    403
}
fn too_many_requests() -> u16 {
    429
}
fn service_unavailable() -> u16 {
    503
}
fn default_limit_by() -> String {
    "consumer".to_string()
}
fn default_policy() -> String {
    "local".to_string()
}
fn default_rate_message() -> String {
    "API rate limit exceeded".to_string()
}
fn default_correlation_header() -> String {
    "Kong-Request-ID".to_string()
}
fn default_generator() -> String {
    "uuid#counter".to_string()
}

/// The key inside a PEM `PUBLIC KEY` (SubjectPublicKeyInfo): the contents of its BIT
/// STRING, which is the PKCS#1 `RSAPublicKey` for RSA and the curve point for EC keys.
pub fn public_key_from_pem(pem: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    if !pem.contains("BEGIN PUBLIC KEY") {
        return Err("expected a PEM block BEGIN PUBLIC KEY".to_string());
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("bad base64 in the PEM block: {e}"))?;
    // SEQUENCE { SEQUENCE { algorithm }, BIT STRING { 0, key } }
    let (outer, _) = der_element(&der, 0x30).ok_or("not a DER SEQUENCE")?;
    let (_, rest) = der_element(outer, 0x30).ok_or("no AlgorithmIdentifier")?;
    let (bits, _) = der_element(rest, 0x03).ok_or("no BIT STRING")?;
    match bits.split_first() {
        Some((0, key)) if !key.is_empty() => Ok(key.to_vec()),
        _ => Err("malformed BIT STRING".to_string()),
    }
}

/// The contents of the DER element at the start of `input` with tag `tag`, and what follows.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let count = usize::from(len0 & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (&rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_pem_yields_the_key() {
        // A P-256 key: the fixed SPKI prefix, then the 65-byte uncompressed point.
        let mut der = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
            0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        der.push(0x04);
        der.extend([7u8; 64]);
        use base64::Engine;
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        let key = public_key_from_pem(&pem).unwrap();
        assert_eq!(key.len(), 65);
        assert_eq!(key[0], 4);
        assert!(public_key_from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----").is_err());
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped v6 clients");
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(IpNet::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("banana").is_err());
    }
}
