//! Kong declarative configuration (decK `_format_version` "3.0" and "2.1") as serde types.
//!
//! Unknown fields are errors, as everywhere in meshgate. Fields Kong has that meshgate does not
//! implement yet are typed as raw values and reported as warnings by `super`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KongConfig {
    #[serde(rename = "_format_version")]
    pub format_version: String,
    #[serde(rename = "_transform", default)]
    pub transform: Option<bool>,
    #[serde(rename = "_workspace", default)]
    pub workspace: Option<String>,
    #[serde(rename = "_info", default)]
    pub info: Option<Value>,
    #[serde(rename = "_konnect", default)]
    pub konnect: Option<Value>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Top-level routes name their service with `service`.
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Top-level targets name their upstream with `upstream`.
    #[serde(default)]
    pub targets: Vec<Target>,
    #[serde(default)]
    pub plugins: Vec<Plugin>,
    #[serde(default)]
    pub consumers: Vec<Value>,
    #[serde(default)]
    pub consumer_groups: Option<Value>,
    #[serde(default)]
    pub certificates: Option<Value>,
    #[serde(default)]
    pub ca_certificates: Option<Value>,
    #[serde(default)]
    pub snis: Option<Value>,
    #[serde(default)]
    pub vaults: Option<Value>,
    #[serde(default)]
    pub keys: Option<Value>,
    #[serde(default)]
    pub key_sets: Option<Value>,
    #[serde(default)]
    pub filter_chains: Option<Value>,
    #[serde(default)]
    pub parameters: Option<Value>,
    // decK's own consumer credential lists at the top level.
    #[serde(default)]
    pub keyauth_credentials: Option<Value>,
    #[serde(default)]
    pub basicauth_credentials: Option<Value>,
    #[serde(default)]
    pub jwt_secrets: Option<Value>,
    #[serde(default)]
    pub acls: Option<Value>,
    #[serde(default)]
    pub hmacauth_credentials: Option<Value>,
    #[serde(default)]
    pub oauth2_credentials: Option<Value>,
    #[serde(default)]
    pub mtls_auth_credentials: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: Option<String>,
    pub id: Option<String>,
    /// Shorthand for protocol, host, port and path.
    pub url: Option<String>,
    pub protocol: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    /// Kong's default: 5.
    pub retries: Option<u32>,
    /// Milliseconds; Kong's default: 60000.
    pub connect_timeout: Option<u64>,
    pub read_timeout: Option<u64>,
    pub write_timeout: Option<u64>,
    pub enabled: Option<bool>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub plugins: Vec<Plugin>,
    pub created_at: Option<Value>,
    pub updated_at: Option<Value>,
    pub tls_verify: Option<Value>,
    pub tls_verify_depth: Option<Value>,
    pub ca_certificates: Option<Value>,
    pub client_certificate: Option<Value>,
}

/// A route's service reference: a name or id, or `{name: ..}` / `{id: ..}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ServiceRef {
    Name(String),
    Object {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        id: Option<String>,
    },
}

impl ServiceRef {
    pub fn key(&self) -> Option<&str> {
        match self {
            ServiceRef::Name(n) => Some(n),
            ServiceRef::Object { name, id } => name.as_deref().or(id.as_deref()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Option<String>,
    pub id: Option<String>,
    pub service: Option<ServiceRef>,
    /// Kong's default: `[http, https]`.
    pub protocols: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub hosts: Option<Vec<String>>,
    /// Prefixes, or regular expressions starting with `~`.
    pub paths: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    /// Kong's default: true.
    pub strip_path: Option<bool>,
    /// Kong's default: false.
    pub preserve_host: Option<bool>,
    pub regex_priority: Option<u64>,
    /// `v0` (Kong 3's default) or `v1`.
    pub path_handling: Option<String>,
    pub https_redirect_status_code: Option<u16>,
    pub request_buffering: Option<bool>,
    pub response_buffering: Option<bool>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub plugins: Vec<Plugin>,
    pub created_at: Option<Value>,
    pub updated_at: Option<Value>,
    pub snis: Option<Value>,
    pub sources: Option<Value>,
    pub destinations: Option<Value>,
    pub expression: Option<Value>,
    pub priority: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    pub id: Option<String>,
    /// `round-robin` (default), `least-connections`, `consistent-hashing`, `latency`.
    pub algorithm: Option<String>,
    /// `none` (default), `consumer`, `ip`, `header`, `cookie`, `path`, `query_arg`,
    /// `uri_capture`.
    pub hash_on: Option<String>,
    pub hash_on_header: Option<String>,
    pub hash_on_cookie: Option<String>,
    pub hash_on_cookie_path: Option<String>,
    pub hash_on_query_arg: Option<String>,
    pub hash_on_uri_capture: Option<String>,
    pub hash_fallback: Option<String>,
    pub hash_fallback_header: Option<String>,
    pub hash_fallback_query_arg: Option<String>,
    pub hash_fallback_uri_capture: Option<String>,
    pub host_header: Option<String>,
    pub slots: Option<u32>,
    pub healthchecks: Option<Value>,
    pub client_certificate: Option<Value>,
    pub use_srv_name: Option<bool>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub targets: Vec<Target>,
    pub created_at: Option<Value>,
    pub updated_at: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `host` or `host:port` (Kong's default port: 8000).
    pub target: String,
    /// Kong's default: 100; 0 disables the target.
    pub weight: Option<u32>,
    pub id: Option<String>,
    /// For top-level targets: the upstream's name or id.
    pub upstream: Option<ServiceRef>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub created_at: Option<Value>,
    pub updated_at: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    pub name: String,
    pub id: Option<String>,
    pub instance_name: Option<String>,
    pub config: Option<Value>,
    pub enabled: Option<bool>,
    pub protocols: Option<Vec<String>>,
    pub service: Option<ServiceRef>,
    pub route: Option<ServiceRef>,
    pub consumer: Option<ServiceRef>,
    pub consumer_group: Option<ServiceRef>,
    pub ordering: Option<Value>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub created_at: Option<Value>,
    pub updated_at: Option<Value>,
}
