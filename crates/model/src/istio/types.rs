//! Typed `spec`s of the Istio networking resources meshgate reads.
//!
//! Every struct denies unknown fields so a typo (`hostt`) is an error with its path rather
//! than a silently ignored setting. Fields Istio has but meshgate does not implement yet are
//! declared as `Option<Value>`: they are accepted here and reported as warnings by
//! [`super::unsupported`], never dropped silently. Field names and nesting follow the
//! istio.io reference for `networking.istio.io/v1`.

// Unimplemented fields are only checked for presence (through the JSON body), never read.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Label maps. Values written unquoted (`version: 2`) are accepted as their text.
pub type Labels = BTreeMap<String, String>;

/// Label maps whose values may be written unquoted; shared with the Gateway API types.
pub(crate) fn lenient_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Labels>, D::Error> {
    let raw: Option<BTreeMap<String, Value>> = Option::deserialize(d)?;
    let Some(raw) = raw else { return Ok(None) };
    let mut out = Labels::new();
    for (k, v) in raw {
        match crate::source::scalar_to_string(&v) {
            Some(s) => {
                out.insert(k, s);
            }
            None => {
                return Err(serde::de::Error::custom(format!("label {k:?} must be a string")));
            }
        }
    }
    Ok(Some(out))
}

/// Booleans: the source is read with YAML 1.2 booleans, so accept Kubernetes' YAML 1.1
/// spellings (`yes`, `on`, ...) here, where a boolean is what the field means.
pub(crate) fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let raw: Option<Value> = Option::deserialize(d)?;
    match raw {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "on" => Ok(Some(true)),
            "false" | "no" | "n" | "off" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!("expected a boolean, found {s:?}"))),
        },
        Some(other) => Err(serde::de::Error::custom(format!("expected a boolean, found {other}"))),
    }
}

// ---------------------------------------------------------------- Gateway

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default, deserialize_with = "lenient_labels")]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Server {
    pub port: GatewayPort,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub tls: Option<ServerTls>,
    pub name: Option<String>,
    pub bind: Option<Value>,
    pub default_endpoint: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayPort {
    pub number: u16,
    pub protocol: String,
    pub name: Option<String>,
    pub target_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerTls {
    #[serde(default, deserialize_with = "lenient_bool")]
    pub https_redirect: Option<bool>,
    pub mode: Option<String>,
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<Value>,
    pub ca_crl: Option<Value>,
    pub credential_name: Option<String>,
    pub credential_names: Option<Value>,
    pub tls_certificates: Option<Value>,
    pub subject_alt_names: Option<Value>,
    pub verify_certificate_spki: Option<Value>,
    pub verify_certificate_hash: Option<Value>,
    pub min_protocol_version: Option<Value>,
    pub max_protocol_version: Option<Value>,
    pub cipher_suites: Option<Value>,
}

// ---------------------------------------------------------------- VirtualService

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub gateways: Option<Vec<String>>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    pub tcp: Option<Value>,
    pub tls: Option<Value>,
    pub export_to: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<HttpMatchRequest>>,
    pub route: Option<Vec<HttpRouteDestination>>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<String>,
    pub headers: Option<Headers>,
    pub delegate: Option<Value>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<Value>,
    pub mirror: Option<Value>,
    pub mirrors: Option<Value>,
    pub mirror_percentage: Option<Value>,
    pub mirror_percent: Option<Value>,
    pub cors_policy: Option<Value>,
}

/// Istio `HTTPRetry`. Numbers are read as `i64` so a negative or huge value is reported by
/// validation with its field path rather than as a decoding error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    /// Locality-aware retries; meshgate has no localities, so this has no effect.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub retry_remote_localities: Option<bool>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<String>,
}

/// Istio `StringMatch`: a oneof of `exact`, `prefix`, `regex`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatchSpec>,
    pub scheme: Option<StringMatchSpec>,
    pub method: Option<StringMatchSpec>,
    pub authority: Option<StringMatchSpec>,
    pub headers: Option<BTreeMap<String, StringMatchSpec>>,
    pub without_headers: Option<BTreeMap<String, StringMatchSpec>>,
    pub query_params: Option<BTreeMap<String, StringMatchSpec>>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub ignore_uri_case: Option<bool>,
    pub port: Option<u16>,
    pub gateways: Option<Vec<String>>,
    pub source_labels: Option<Value>,
    pub source_namespace: Option<Value>,
    pub stat_prefix: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<u32>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelector {
    pub number: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderOperations {
    pub set: Option<BTreeMap<String, String>>,
    pub add: Option<BTreeMap<String, String>>,
    pub remove: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub derive_port: Option<String>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpDirectResponse {
    pub status: u16,
    pub body: Option<HttpBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

// ---------------------------------------------------------------- DestinationRule

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    pub export_to: Option<Value>,
    pub workload_selector: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub port_level_settings: Option<Vec<PortTrafficPolicy>>,
    pub outlier_detection: Option<Value>,
    pub tls: Option<Value>,
    pub tunnel: Option<Value>,
    pub proxy_protocol: Option<Value>,
    pub retry_budget: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<Value>,
    pub tls: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHash>,
    pub locality_lb_setting: Option<Value>,
    pub warmup_duration_secs: Option<Value>,
    pub warmup: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<Value>,
    pub maglev: Option<Value>,
    pub minimum_ring_size: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<String>,
    #[serde(default)]
    pub attributes: Vec<HttpCookieAttribute>,
}

/// An extra attribute of a generated cookie (`SameSite=Strict`, `Secure`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpCookieAttribute {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

/// `connectionPool.tcp`. Counts are `Value`s (protobuf JSON allows a number or a numeric
/// string), checked with their paths when the policy is compiled.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPool {
    pub max_connections: Option<Value>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Option<TcpKeepaliveSpec>,
    pub max_connection_duration: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpKeepaliveSpec {
    pub probes: Option<Value>,
    pub time: Option<String>,
    pub interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPool {
    pub h2_upgrade_policy: Option<String>,
    pub http1_max_pending_requests: Option<Value>,
    pub http2_max_requests: Option<Value>,
    pub max_requests_per_connection: Option<Value>,
    pub max_retries: Option<Value>,
    pub idle_timeout: Option<String>,
    #[serde(default, deserialize_with = "lenient_bool")]
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default, deserialize_with = "lenient_labels")]
    pub labels: Option<Labels>,
    pub traffic_policy: Option<TrafficPolicy>,
}

// ---------------------------------------------------------------- ServiceEntry / WorkloadEntry

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    pub addresses: Option<Value>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    pub workload_selector: Option<WorkloadSelector>,
    pub export_to: Option<Vec<String>>,
    pub subject_alt_names: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u16,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "lenient_labels")]
    pub labels: Option<Labels>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    pub address: Option<String>,
    pub ports: Option<BTreeMap<String, u16>>,
    #[serde(default, deserialize_with = "lenient_labels")]
    pub labels: Option<Labels>,
    pub weight: Option<u32>,
    pub network: Option<Value>,
    pub locality: Option<Value>,
    pub service_account: Option<Value>,
}
