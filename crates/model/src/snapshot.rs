//! The compiled, format-independent proxy configuration.
//!
//! Every input format (Istio and the Kubernetes Gateway API today; Kong and others later)
//! compiles into a [`Snapshot`]. The data plane only ever sees this model, never the YAML it
//! came from, so a rule behaves the same whichever format expressed it. A snapshot is
//! immutable: a reload compiles a new one and swaps it in whole.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::matcher::{HeaderMatch, PathMatch, QueryMatch, StringMatch};

/// Index of a [`Cluster`] in [`Snapshot::clusters`].
pub type ClusterId = usize;

/// Everything one proxy needs to serve traffic.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Listeners, at most one per (address, port).
    pub listeners: Vec<Listener>,
    /// Upstream clusters referenced by routes through [`ClusterId`].
    pub clusters: Vec<Cluster>,
}

impl Snapshot {
    /// Finds a cluster by its Envoy-style name (`outbound|PORT|SUBSET|HOST`).
    pub fn cluster_by_name(&self, name: &str) -> Option<ClusterId> {
        self.clusters.iter().position(|c| c.name == name)
    }
}

/// One bound socket and the routes served on it.
#[derive(Debug, Serialize)]
pub struct Listener {
    /// Stable name, e.g. `0.0.0.0_8080`; metrics and config dumps use it.
    pub name: String,
    /// Address to bind; `None` means the proxy's `--bind-address`.
    pub address: Option<IpAddr>,
    pub port: u16,
    /// Present when the listener terminates TLS.
    pub tls: Option<ListenerTls>,
    pub routes: RouteTable,
    /// Whose conventions the proxy's own replies follow on this listener.
    pub flavor: ListenerFlavor,
}

/// The product whose local replies (no route, ...) a listener imitates, so clients written
/// against it keep working.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum ListenerFlavor {
    /// Envoy's (Istio and Gateway API listeners): an empty 404 when no route matches.
    #[default]
    Envoy,
    /// Kong's (the decK proxy listener): JSON `{"message": ...}` bodies.
    Kong,
}

/// TLS termination for a listener: one certificate per SNI host group.
#[derive(Debug, Serialize)]
pub struct ListenerTls {
    /// Certificates in the order the servers were declared; the first whose `sni_hosts`
    /// matches the ClientHello's SNI is used, and the first one when SNI is absent or unknown.
    pub certificates: Vec<TlsCertificate>,
    /// ALPN protocols offered, most preferred first (`h2`, `http/1.1`).
    pub alpn: Vec<String>,
    /// The TLS versions offered.
    pub versions: TlsVersions,
    /// Istio `MUTUAL` / `OPTIONAL_MUTUAL`: client certificates are verified against these CAs.
    pub client_certificates: Option<ClientCertificates>,
}

/// Client certificate verification on a TLS listener.
#[derive(Debug, Clone, Serialize)]
pub struct ClientCertificates {
    /// The CAs a client certificate must chain to (`caCertificates`).
    pub ca: PemFile,
    /// `MUTUAL`: a client without a certificate is refused; `OPTIONAL_MUTUAL`: let in, while a
    /// certificate it presents must still verify.
    pub required: bool,
}

/// The TLS versions a listener offers (Istio `minProtocolVersion` / `maxProtocolVersion`;
/// TLS 1.0 and 1.1 are not offered at all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum TlsVersions {
    /// TLS 1.2 and 1.3, Envoy's defaults for a server.
    #[default]
    Tls12And13,
    Tls12Only,
    Tls13Only,
}

/// A certificate chain and key, already read from disk and validated as PEM.
#[derive(Serialize, Clone)]
pub struct TlsCertificate {
    /// Hosts this certificate serves (`*` for any; `*.example.com` wildcards allowed).
    pub sni_hosts: Vec<String>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    #[serde(skip)]
    pub cert_pem: Vec<u8>,
    #[serde(skip)]
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsCertificate {
    // Hand-written so key material can never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCertificate")
            .field("sni_hosts", &self.sni_hosts)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// Virtual hosts of one listener, indexed for lookup by the request's host.
///
/// Lookup order follows Envoy: an exact domain, then the longest matching wildcard suffix
/// (`*.example.com`), then the catch-all `*`.
#[derive(Debug, Default, Serialize)]
pub struct RouteTable {
    pub virtual_hosts: Vec<VirtualHost>,
    /// Lower-cased exact domain → index into `virtual_hosts`.
    #[serde(skip)]
    pub exact: HashMap<String, usize>,
    /// Wildcard suffixes (e.g. `.example.com` for `*.example.com`) → index into
    /// `virtual_hosts`. Looked up once per dot in the host, longest suffix first, so the cost
    /// does not grow with the number of wildcard domains.
    #[serde(skip)]
    pub suffixes: HashMap<String, usize>,
    /// Index of the virtual host holding `*`.
    #[serde(skip)]
    pub catch_all: Option<usize>,
}

/// A set of domains sharing one ordered list of routes.
#[derive(Debug, Serialize)]
pub struct VirtualHost {
    pub name: String,
    /// Lower-cased domains: exact names, `*.suffix` wildcards, or `*`.
    pub domains: Vec<String>,
    /// Routes in priority order; the first that matches wins.
    pub routes: Vec<Route>,
    /// When set, plain-HTTP requests are redirected to HTTPS (301) before routing
    /// (Istio `Gateway.servers[].tls.httpsRedirect`).
    pub https_redirect: bool,
}

/// One routing rule: conditions and what to do when they hold.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Human-readable name used in metrics and logs, e.g. `default/reviews.http[0]` or the
    /// VirtualService route's `name`.
    pub name: String,
    /// Alternatives (OR). Empty means the route matches every request.
    pub matches: Vec<RequestMatch>,
    pub action: RouteAction,
    /// Header edits applied to the request before it goes upstream.
    pub request_headers: HeaderOps,
    /// Header edits applied to the response before it goes downstream.
    pub response_headers: HeaderOps,
    /// Copies of the request sent to other clusters, fire-and-forget: their responses are
    /// discarded and they never delay or fail the main request (Gateway API `RequestMirror`).
    /// Mirrored requests carry the request as edited by `request_headers`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// CORS handling (Gateway API `CORS` filter): preflights are answered by the proxy,
    /// other requests get the `Access-Control-*` response headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsPolicy>,
    /// Kong plugins this route runs, highest priority first (decK routes only).
    #[serde(skip)]
    pub plugins: Option<std::sync::Arc<crate::kong::plugins::PluginChain>>,
}

/// A request mirror: a copy of a share of the matched requests is sent to `cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mirror {
    pub cluster: ClusterId,
    /// `(numerator, denominator)`: the share of requests mirrored; `(1, 1)` mirrors all of them.
    /// `numerator <= denominator` and `denominator > 0` always hold.
    pub fraction: (u32, u32),
}

/// A CORS policy (Gateway API `HTTPCORSFilter`, see
/// https://gateway-api.sigs.k8s.io/reference/spec/#httpcorsfilter for the full semantics).
///
/// A request carrying `Origin` is a CORS request; an `OPTIONS` request with `Origin` and
/// `Access-Control-Request-Method` is a preflight and must be answered by the proxy itself
/// (status 200 or 204, never forwarded). When the origin is allowed, the response gets
/// `Access-Control-Allow-Origin` (the request's origin, or `*` when `allow_origins` contains
/// `*` and `allow_credentials` is false), plus on preflights `Access-Control-Allow-Methods`,
/// `-Allow-Headers`, `-Max-Age`, and on all responses `-Allow-Credentials: true` (when set)
/// and `-Expose-Headers`. When the origin is not allowed, no CORS header is added.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CorsPolicy {
    /// Allowed origins as written: `scheme://host[:port]`, where host may start with `*.`
    /// (any non-empty label sequence), or the single value `*` for any origin.
    pub allow_origins: Vec<String>,
    /// Allowed methods (upper case as written), or `*` for any.
    pub allow_methods: Vec<String>,
    /// Allowed request headers (lower-cased), or `*` for any.
    pub allow_headers: Vec<String>,
    /// Response headers the browser may read (lower-cased), or `*`.
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    /// `Access-Control-Max-Age` in seconds for preflights (Gateway API's default is 5);
    /// `None`: not sent.
    pub max_age: Option<u32>,
    /// Istio's `allowOrigins`: matchers for the whole `Origin` value (exact, prefix, regex),
    /// besides the patterns of `allow_origins`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub origin_matches: Vec<StringMatch>,
    /// A preflight from an origin not allowed goes to the upstream (Istio's default
    /// `unmatchedPreflights: FORWARD`) rather than being answered without CORS headers.
    pub forward_unmatched_preflights: bool,
}

/// Conditions that must all hold (AND) for a [`RequestMatch`] to match.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    pub method: Option<StringMatch>,
    /// Matched against the request authority (Host / `:authority`), port included if sent.
    pub authority: Option<StringMatch>,
    /// Matched against `http` / `https`.
    pub scheme: Option<StringMatch>,
    /// The listener port the request arrived on.
    pub port: Option<u16>,
    /// Kong route `snis`: on a TLS connection, the server name must be one of these
    /// (lower-case); plain-text requests are not checked, as in Kong. Empty: any.
    pub sni: Vec<String>,
}

/// What a matched route does.
#[derive(Debug, Clone, Serialize)]
pub enum RouteAction {
    Forward(Forward),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

/// Envoy's fault filter as Istio configures it: a delay, then an abort, each for a share of
/// requests.
#[derive(Debug, Clone, Serialize)]
pub struct FaultPolicy {
    pub delay: Option<FaultDelay>,
    /// The abort and the requests per million it applies to.
    pub abort: Option<(FaultAbort, u32)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultDelay {
    pub duration: Duration,
    /// Requests per million that are delayed.
    pub per_million: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FaultAbort {
    /// Answer with this HTTP status.
    Http(u16),
    /// Answer HTTP 200 with this `grpc-status`.
    Grpc(u32),
}

/// Proxy to one of several weighted destinations.
#[derive(Debug, Clone, Serialize)]
pub struct Forward {
    /// Injected delays and aborts (Istio `fault`), applied before the request is routed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultPolicy>,
    pub destinations: Vec<WeightedDestination>,
    /// Sum of `destinations[].weight`; a random number below it picks the destination.
    pub total_weight: u32,
    pub rewrite: Option<Rewrite>,
    /// Overall request timeout; `None` means no timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// Timeout of each request the proxy sends upstream (one try), from sending the request
    /// until the complete response (Gateway API `timeouts.backendRequest`); on expiry the
    /// answer is 504. `None`: only `timeout` applies. Never longer than `timeout` when both
    /// are set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<Duration>,
    /// How failed upstream tries are retried; `None` never retries. Never `Some` with
    /// `num_retries == 0`, so the data plane can skip all retry bookkeeping on `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// Envoy's route `retry_policy`: when a failed try is sent again, how often and how soon.
///
/// A retry goes to another endpoint of the cluster when it has one (Envoy's `previous_hosts`
/// predicate, which Istio sets), waits a jittered exponential backoff first, and is subject to
/// the cluster's retry budget. The route's `timeout` bounds the whole exchange, retries
/// included; `per_try_timeout` bounds each try.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try (Istio and Gateway API `attempts`, Envoy `num_retries`);
    /// always at least 1.
    pub num_retries: u32,
    /// Time allowed for each try until its response headers; `None`: only the route's
    /// `timeout` (and `Forward::backend_timeout`) apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// The failures that are retried.
    pub retry_on: RetryOn,
    /// Response statuses retried under [`RetryOn::RETRIABLE_STATUS_CODES`].
    pub retriable_status_codes: Vec<u16>,
    /// Backoff before retry `n` is random in `[0, (2^n - 1) * backoff_base]`, capped at
    /// `backoff_max` (Envoy's jittered exponential backoff: 25 ms and 250 ms by default).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Retries avoid the endpoints already tried (Envoy's `previous_hosts` predicate). The data
    /// plane ignores it for consistent-hash clusters, as Istio leaves the predicate out there.
    pub avoid_previous_hosts: bool,
    /// Caps retries in flight per cluster so a failing upstream never sees a retry storm;
    /// `None`: only `num_retries` bounds them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// Envoy's `retry_budget`: retries in flight may be `percent` of the cluster's active
/// requests, but at least `min_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryBudget {
    pub percent: u32,
    pub min_concurrency: u32,
}

impl RetryBudget {
    /// Envoy's defaults when a budget is configured without values: 20% and 3.
    pub const ENVOY_DEFAULT: RetryBudget = RetryBudget {
        percent: 20,
        min_concurrency: 3,
    };
}

impl RetryPolicy {
    /// Envoy's default backoff base interval.
    pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

    /// Istio's policy for routes that set no `retries`: 2 retries on connection failures,
    /// refused streams, gRPC `unavailable`/`cancelled` and HTTP 503.
    pub fn istio_default() -> Self {
        RetryPolicy {
            num_retries: 2,
            per_try_timeout: None,
            retry_on: RetryOn::CONNECT_FAILURE
                | RetryOn::REFUSED_STREAM
                | RetryOn::GRPC_UNAVAILABLE
                | RetryOn::GRPC_CANCELLED
                | RetryOn::RETRIABLE_STATUS_CODES,
            retriable_status_codes: vec![503],
            backoff_base: Self::DEFAULT_BACKOFF_BASE,
            backoff_max: Self::DEFAULT_BACKOFF_BASE * 10,
            avoid_previous_hosts: true,
            budget: Some(RetryBudget::ENVOY_DEFAULT),
        }
    }

    /// Whether a response with `status` (and gRPC status `grpc_status`, from a trailers-only
    /// gRPC response) is retried under this policy.
    pub fn retries_response(&self, status: u16, grpc_status: Option<u32>) -> bool {
        let on = self.retry_on;
        (on.contains(RetryOn::SERVER_ERROR) && status >= 500)
            || (on.contains(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504))
            || (on.contains(RetryOn::RETRIABLE_4XX) && status == 409)
            || (on.contains(RetryOn::RETRIABLE_STATUS_CODES) && self.retriable_status_codes.contains(&status))
            || grpc_status.is_some_and(|code| {
                let flag = match code {
                    1 => RetryOn::GRPC_CANCELLED,
                    4 => RetryOn::GRPC_DEADLINE_EXCEEDED,
                    8 => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                    13 => RetryOn::GRPC_INTERNAL,
                    14 => RetryOn::GRPC_UNAVAILABLE,
                    _ => return false,
                };
                on.contains(flag)
            })
    }

    /// Whether a try that failed without a response is retried.
    pub fn retries_failure(&self, failure: TryFailure) -> bool {
        let any_reset = RetryOn::SERVER_ERROR | RetryOn::GATEWAY_ERROR | RetryOn::RESET;
        let also = match failure {
            TryFailure::ConnectFailure => RetryOn::CONNECT_FAILURE | RetryOn::RESET_BEFORE_REQUEST,
            TryFailure::RefusedStream => RetryOn::REFUSED_STREAM,
            TryFailure::Reset | TryFailure::PerTryTimeout => RetryOn::NONE,
        };
        self.retry_on.intersects(any_reset | also)
    }
}

/// How a try ended without a response, as retry conditions distinguish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// No connection could be made; the request was not sent.
    ConnectFailure,
    /// The upstream refused the HTTP/2 stream (`REFUSED_STREAM`): it did not process it.
    RefusedStream,
    /// The connection or stream broke before response headers.
    Reset,
    /// No response headers within the per-try timeout.
    PerTryTimeout,
}

/// A set of retry conditions: Envoy's `retry_on` values, written comma-separated in Istio's
/// `retryOn`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u16);

impl RetryOn {
    pub const NONE: RetryOn = RetryOn(0);
    /// `5xx`: any 5xx response, and every failure without a response (connection failure,
    /// reset, per-try timeout).
    pub const SERVER_ERROR: RetryOn = RetryOn(1);
    /// `gateway-error`: 502, 503, 504, and every failure without a response.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// `reset`: every failure without a response (disconnect, reset, per-try timeout).
    pub const RESET: RetryOn = RetryOn(1 << 2);
    /// `connect-failure`: the connection could not be made.
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    /// `refused-stream`: the upstream reset the HTTP/2 stream with `REFUSED_STREAM`.
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 4);
    /// `retriable-4xx`: 409.
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 5);
    /// `retriable-status-codes`: the statuses in [`RetryPolicy::retriable_status_codes`].
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 6);
    /// `reset-before-request`: failures before the request was sent; here connection failures.
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 7);
    /// gRPC statuses of trailers-only responses: `cancelled` (1).
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 8);
    /// `deadline-exceeded` (4).
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 9);
    /// `internal` (13).
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 10);
    /// `resource-exhausted` (8).
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 11);
    /// `unavailable` (14).
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 12);

    /// Every condition with its Envoy name.
    pub const NAMES: [(&'static str, RetryOn); 13] = [
        ("5xx", Self::SERVER_ERROR),
        ("gateway-error", Self::GATEWAY_ERROR),
        ("reset", Self::RESET),
        ("connect-failure", Self::CONNECT_FAILURE),
        ("refused-stream", Self::REFUSED_STREAM),
        ("retriable-4xx", Self::RETRIABLE_4XX),
        ("retriable-status-codes", Self::RETRIABLE_STATUS_CODES),
        ("reset-before-request", Self::RESET_BEFORE_REQUEST),
        ("cancelled", Self::GRPC_CANCELLED),
        ("deadline-exceeded", Self::GRPC_DEADLINE_EXCEEDED),
        ("internal", Self::GRPC_INTERNAL),
        ("resource-exhausted", Self::GRPC_RESOURCE_EXHAUSTED),
        ("unavailable", Self::GRPC_UNAVAILABLE),
    ];

    /// The condition named `name` (Envoy's spelling), if meshgate implements it.
    pub fn from_name(name: &str) -> Option<RetryOn> {
        Self::NAMES.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    /// Whether every condition of `other` is in `self`.
    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share a condition.
    pub fn intersects(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(_, f)| self.contains(*f))
            .map(|(n, _)| *n)
    }
}

impl std::ops::BitOr for RetryOn {
    type Output = RetryOn;
    fn bitor(self, rhs: RetryOn) -> RetryOn {
        RetryOn(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for RetryOn {
    fn bitor_assign(&mut self, rhs: RetryOn) {
        self.0 |= rhs.0;
    }
}

impl std::fmt::Debug for RetryOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedDestination {
    pub cluster: ClusterId,
    /// Relative weight; 0 receives no traffic.
    pub weight: u32,
    /// The destination names a backend that cannot be used (Gateway API: a Service that does
    /// not exist, a backend of unknown kind, a cross-namespace reference no ReferenceGrant
    /// allows). Requests whose weighted pick lands here must be answered with HTTP 500 by
    /// the proxy itself, never forwarded; `cluster` then points at the empty placeholder
    /// cluster [`INVALID_BACKEND_CLUSTER`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub invalid: bool,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// Name of the endpoint-less cluster that invalid destinations point at
/// ([`WeightedDestination::invalid`]), so a data plane that does not check the flag still
/// fails these requests (with 503) instead of sending them anywhere.
pub const INVALID_BACKEND_CLUSTER: &str = "invalid-backend";

/// Request rewrites applied before forwarding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    /// Replaces the Host / `:authority` sent upstream.
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub enum PathRewrite {
    /// Replace the part matched by a prefix match (or the whole path after an exact or regex
    /// match) with this value, as Istio's `rewrite.uri` does.
    ReplaceMatched(String),
    /// Replace the whole path.
    Full(String),
    /// Regex substitution over the path (`uriRegexRewrite`); `$1`-style captures are allowed.
    Regex {
        #[serde(with = "crate::matcher::regex_serde")]
        pattern: regex::Regex,
        substitution: String,
    },
    /// Kong's: with `strip`, the matched prefix (or `strip_regex`'s match) is removed; the rest
    /// is appended to the service's path (`path_handling` v0 adds a `/` between them when
    /// neither has one; v1, `legacy_concat`, concatenates), one `/` kept where both have one.
    Kong {
        service_path: String,
        strip: bool,
        #[serde(skip_serializing)]
        strip_regex: Option<regex::Regex>,
        legacy_concat: bool,
    },
}

/// An HTTP redirect answered by the proxy itself.
#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    /// Replaces the path; the query string is kept unless this value contains `?`.
    pub path: Option<String>,
    /// Gateway API `ReplacePrefixMatch`: replaces the prefix matched by the route's path
    /// match, exactly as [`PathRewrite::ReplaceMatched`] does for forwarded requests
    /// (segment-aware with `PathMatch::segment_prefix`; the whole path when the match is not a
    /// prefix). Never set together with `path`. The query string is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace_prefix: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<RedirectPort>,
    /// 301 unless configured.
    pub status: u16,
}

#[derive(Debug, Clone, Serialize)]
pub enum RedirectPort {
    Fixed(u16),
    /// Use the scheme's default port (80/443), omitted from the Location.
    FromProtocolDefault,
    /// Keep the port the request arrived on.
    FromRequestPort,
}

/// A fixed response answered by the proxy itself.
#[derive(Debug, Clone, Serialize)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(serialize_with = "crate::matcher::bytes_as_lossy_str")]
    pub body: Bytes,
}

/// Header edits in the order Envoy applies them: remove, then set (overwrite), then add.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HeaderOps {
    /// Lower-cased names.
    pub remove: Vec<String>,
    /// `(lower-cased name, value)` that replace any existing value.
    pub set: Vec<(String, String)>,
    /// `(lower-cased name, value)` appended to existing values.
    pub add: Vec<(String, String)>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// A named group of endpoints and how to balance across them
/// (Envoy's cluster; Istio's service host + port + subset).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// `outbound|PORT|SUBSET|HOST`, as Istio names Envoy clusters.
    pub name: String,
    /// The service host this cluster belongs to.
    pub service: String,
    /// Subset name, empty for the whole service.
    pub subset: String,
    pub port: u16,
    pub protocol: UpstreamProtocol,
    pub load_balancer: LoadBalancer,
    pub discovery: Discovery,
    pub endpoints: Vec<Endpoint>,
    /// Circuit breakers and connection-pool behaviour (Istio `connectionPool`).
    pub pool: ConnectionPoolSettings,
    /// Passive health: endpoints that keep failing are ejected for a while.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierDetection>,
    /// Active health: endpoints are probed, and those failing the probe are not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// TLS to the endpoints (Istio `tls` modes SIMPLE and MUTUAL); `None`: plain text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
}

/// TLS origination to a cluster's endpoints, as Istio's `ClientTLSSettings` configure Envoy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamTls {
    /// `sni`: the server name sent; `None`: the upstream request's Host (Envoy's auto SNI).
    pub sni: Option<String>,
    /// `subjectAltNames`: the server's certificate must be valid for one of these; empty: for
    /// the server name sent.
    pub subject_alt_names: Vec<String>,
    /// `insecureSkipVerify`: the server's certificate is not checked at all.
    pub insecure_skip_verify: bool,
    /// `caCertificates`: the roots to trust; `None`: the system's trusted roots.
    pub ca_certificates: Option<PemFile>,
    /// MUTUAL: the client certificate chain and its private key.
    pub client_certificate: Option<(PemFile, PemFile)>,
}

/// A PEM file, read and checked to hold PEM blocks.
#[derive(Clone, PartialEq, Serialize)]
pub struct PemFile {
    pub path: PathBuf,
    #[serde(skip)]
    pub pem: Vec<u8>,
}

impl std::fmt::Debug for PemFile {
    // Only the path: the contents may be a private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PemFile").field(&self.path).finish()
    }
}

/// Active HTTP health checks (Kong's `healthchecks.active`; for Istio clusters the
/// `meshgate.io/health-check` annotation of the DestinationRule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// The path probed with `GET`.
    #[serde(default = "HealthCheck::default_path")]
    pub path: String,
    #[serde(default = "HealthCheck::default_interval", with = "crate::duration::serde_text")]
    pub interval: Duration,
    #[serde(default = "HealthCheck::default_timeout", with = "crate::duration::serde_text")]
    pub timeout: Duration,
    /// Successes in a row that bring an unhealthy endpoint back.
    #[serde(default = "HealthCheck::default_threshold")]
    pub healthy_threshold: u32,
    /// Failures (bad status, connection failure, timeout) in a row that take it out.
    #[serde(default = "HealthCheck::default_threshold")]
    pub unhealthy_threshold: u32,
    /// Statuses that count as healthy.
    #[serde(default = "HealthCheck::default_statuses")]
    pub healthy_statuses: Vec<u16>,
    /// Probe in plain text even when the cluster originates TLS (Kong's `active.type: http`);
    /// otherwise probes use the cluster's TLS, as Envoy's do. Not settable in the annotation.
    #[serde(skip_deserializing, default)]
    pub plain_text: bool,
}

impl HealthCheck {
    fn default_path() -> String {
        "/".to_string()
    }
    fn default_interval() -> Duration {
        Duration::from_secs(5)
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(1)
    }
    fn default_threshold() -> u32 {
        2
    }
    fn default_statuses() -> Vec<u16> {
        vec![200, 302]
    }
}

/// Istio's `outlierDetection` as Envoy applies it: consecutive failures eject an endpoint
/// for `base_ejection_time` × the number of times it was ejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (and, unless split, connection failures) that eject; 0: off.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and connection failures) that eject; 0: off.
    pub consecutive_gateway: u32,
    /// `splitExternalLocalOriginErrors`: connection failures count only toward
    /// `consecutive_local_origin`.
    pub split_local_origin: bool,
    pub consecutive_local_origin: u32,
    /// How often the ejection multiplier of a healthy endpoint decreases.
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Below this share of available endpoints, ejections are ignored (panic mode).
    pub min_health_percent: u32,
    /// Statuses that count toward `consecutive_5xx` (Kong's passive
    /// `unhealthy.http_statuses`); `None`: every 5xx, as Envoy counts.
    pub failure_statuses: Option<Vec<u16>>,
}

impl OutlierDetection {
    /// Whether a response with `status` counts as a failure of the endpoint.
    pub fn is_failure_status(&self, status: u16) -> bool {
        match &self.failure_statuses {
            Some(statuses) => statuses.contains(&status),
            None => status >= 500,
        }
    }
}

/// Istio's `connectionPool` as the data plane uses it: Envoy's circuit-breaker thresholds
/// (cluster-wide, across workers) and connection lifetimes. Istio's unset values are
/// `u32::MAX` ("unlimited") for every threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConnectionPoolSettings {
    /// `tcp.maxConnections`: connections to the cluster (Envoy `max_connections`).
    pub max_connections: u32,
    /// `tcp.connectTimeout` (Istio default 10 s).
    pub connect_timeout: Duration,
    /// `tcp.tcpKeepalive`: `SO_KEEPALIVE` with these settings; `None` leaves it off.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `tcp.maxConnectionDuration`: a connection older than this takes no new requests.
    pub max_connection_duration: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection
    /// (Envoy `max_pending_requests`).
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: upstream requests in flight (Envoy `max_requests`).
    pub max_requests: u32,
    /// `http.maxRequestsPerConnection`; 0 is unlimited.
    pub max_requests_per_connection: u32,
    /// `http.maxRetries`: retries in flight (Envoy `max_retries`).
    pub max_retries: u32,
    /// `http.idleTimeout`: idle pooled connections are closed after this (Istio default 1 h).
    pub idle_timeout: Duration,
    /// `http.useClientProtocol`: HTTP/2 upstream exactly when the client used HTTP/2.
    pub use_client_protocol: bool,
}

/// `SO_KEEPALIVE` settings; `None` fields keep the operating system's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

impl ConnectionPoolSettings {
    /// Istio's defaults: every threshold at 2^32-1, 10 s connect timeout, 1 h idle timeout.
    pub const ISTIO_DEFAULT: ConnectionPoolSettings = ConnectionPoolSettings {
        max_connections: u32::MAX,
        connect_timeout: Duration::from_secs(10),
        tcp_keepalive: None,
        max_connection_duration: None,
        max_pending_requests: u32::MAX,
        max_requests: u32::MAX,
        max_requests_per_connection: 0,
        max_retries: u32::MAX,
        idle_timeout: Duration::from_secs(3600),
        use_client_protocol: false,
    };
}

impl Default for ConnectionPoolSettings {
    fn default() -> Self {
        Self::ISTIO_DEFAULT
    }
}

/// How endpoints are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Discovery {
    /// Endpoint addresses are IPs.
    Static,
    /// Endpoint addresses are host names, resolved when connecting.
    Dns,
    /// Forward to the address the client asked for (Istio `PASSTHROUGH` load balancing).
    OriginalDestination,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c) — gRPC and HTTP2 ports, or h2UpgradePolicy UPGRADE.
    Http2,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    /// An IP or (with [`Discovery::Dns`]) a host name.
    pub address: String,
    pub port: u16,
    /// Relative weight (default 1).
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    RoundRobin,
    /// Power of two random choices by active requests, as Envoy's LEAST_REQUEST.
    LeastRequest,
    Random,
    /// Sticky selection by a request property (Istio `consistentHash`).
    ConsistentHash(HashKey),
}

impl LoadBalancer {
    /// Whether requests must carry the authenticated consumer for the pick.
    pub fn hashes_on_consumer(&self) -> bool {
        matches!(self, LoadBalancer::ConsistentHash(key) if key.uses_consumer())
    }
}

/// A cookie whose value is the hash key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CookieKey {
    pub name: String,
    /// Set when the proxy gives a request without the cookie a new one, so that the client's
    /// next requests go to the same endpoint (Istio `ttl`; always for Kong).
    pub generate: Option<GeneratedCookie>,
}

impl CookieKey {
    /// A name that can go into `Set-Cookie` as is: an HTTP token (RFC 9110 §5.6.2).
    pub fn is_valid_name(name: &str) -> bool {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    }

    /// Only reads the cookie; without it the request is balanced as if unkeyed.
    pub fn read_only(name: impl Into<String>) -> Self {
        CookieKey {
            name: name.into(),
            generate: None,
        }
    }
}

/// How a missing hash cookie is made and sent back in `Set-Cookie`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GeneratedCookie {
    pub value: GeneratedCookieValue,
    /// What follows `name=value` in `Set-Cookie`, e.g. `; Max-Age=3600; Path=/; HttpOnly`.
    pub attributes: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GeneratedCookieValue {
    /// Envoy's: 16 hex digits derived from the downstream connection's addresses, in double
    /// quotes, so concurrent requests on one connection get the same cookie.
    ConnectionDigest,
    /// Kong's: a random UUID, unquoted.
    Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HashKey {
    /// `httpHeaderName` (lower-cased).
    Header(String),
    /// Istio `httpCookie`, Kong `hash_on: cookie`.
    Cookie(CookieKey),
    /// `useSourceIp`.
    SourceIp,
    /// `httpQueryParameterName`.
    QueryParameter(String),
    /// Kong `path`: nginx's normalised `$uri` of the path the client sent (before any plugin
    /// rewrote it): percent-decoded, `//` merged, dot segments resolved.
    Path,
    /// Kong `query_arg`: the argument's decoded values, sorted and joined with `,`; a bare
    /// `?name` counts as `true` (Kong's `get_uri_args`).
    QueryArgument(String),
    /// Kong `uri_capture`: a named capture group of the route's regex path.
    UriCapture(String),
    /// Kong `consumer`: the id of the consumer the auth plugins identified.
    Consumer,
    /// Kong's `hash_on` then `hash_fallback`: the first of these keys the request has. With
    /// none, the empty string is hashed, so such requests all go to one endpoint, as in Kong.
    FirstPresent(Vec<HashKey>),
}

impl HashKey {
    /// Whether this key (or one of its fallbacks) is the authenticated consumer.
    pub fn uses_consumer(&self) -> bool {
        match self {
            HashKey::Consumer => true,
            HashKey::FirstPresent(keys) => keys.iter().any(HashKey::uses_consumer),
            _ => false,
        }
    }
}
