//! The suite's data (`cases.json`, `backends.json`; README §3, §6) and the echo backends that
//! stand behind its Services.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use meshgate_model::source::Document;
use serde::Deserialize;
use serde_json::Value;

use crate::config::endpoint_slice;
use crate::echo::Echo;

#[derive(Deserialize, Clone)]
pub struct Case {
    pub id: String,
    pub test: String,
    pub name: String,
    pub kind: String,
    pub manifest: String,
    pub feature: Feature,
    #[serde(default)]
    pub step: u32,
    #[serde(default)]
    pub before_step: Vec<Deletion>,
    pub gateway: GatewayTarget,
    pub request: CaseRequest,
    pub expect: Expect,
    #[serde(default)]
    pub mirror: Option<MirrorCheck>,
    #[serde(default)]
    pub precheck: Option<Precheck>,
    #[serde(default)]
    pub distribution: Option<Distribution>,
    #[serde(default)]
    pub repeat: Option<Repeat>,
    #[serde(default)]
    pub websocket: Option<WebSocketCheck>,
}

#[derive(Deserialize, Clone)]
pub struct Feature {
    pub level: String,
    pub name: String,
    pub required: Vec<String>,
}

#[derive(Deserialize, Clone)]
pub struct GatewayTarget {
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

#[derive(Deserialize, Clone)]
pub struct CaseRequest {
    pub scheme: String,
    pub protocol: String,
    pub method: String,
    pub host: Option<String>,
    pub path: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub echo_set_response_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub tls: Option<CaseTls>,
}

#[derive(Deserialize, Clone)]
pub struct CaseTls {
    pub server_name: String,
}

#[derive(Deserialize, Clone)]
pub struct Expect {
    pub status_any_of: Vec<u16>,
    pub backend: Option<String>,
    pub namespace: Option<String>,
    pub method_seen_by_backend: Option<String>,
    pub path_seen_by_backend: Option<String>,
    pub host_seen_by_backend: Option<String>,
    #[serde(default)]
    pub request_headers_seen_by_backend: BTreeMap<String, String>,
    #[serde(default)]
    pub absent_request_headers: Vec<String>,
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub response_headers_any_of: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub absent_response_headers: Vec<String>,
    #[serde(default)]
    pub ignore_whitespace_in_response_headers: bool,
    pub redirect: Option<ExpectedRedirect>,
}

#[derive(Deserialize, Clone)]
pub struct ExpectedRedirect {
    pub scheme: String,
    pub host: Option<String>,
    pub port: Option<Value>,
    pub path: String,
}

#[derive(Deserialize, Clone)]
pub struct MirrorCheck {
    pub mirrored_to: Vec<MirrorTarget>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub total_requests: Option<usize>,
    #[serde(default)]
    pub concurrency: Option<usize>,
    #[serde(default)]
    pub max_attempts: Option<usize>,
    #[serde(default)]
    pub pause_between_attempts_seconds: Option<u64>,
}

#[derive(Deserialize, Clone)]
pub struct MirrorTarget {
    pub backend: String,
    pub namespace: String,
    #[serde(default)]
    pub min_count: Option<f64>,
    #[serde(default)]
    pub max_count: Option<f64>,
}

#[derive(Deserialize, Clone)]
pub struct Precheck {
    pub request: CaseRequest,
    pub expect: Expect,
}

#[derive(Deserialize, Clone)]
pub struct Distribution {
    pub expected_weights: BTreeMap<String, f64>,
    pub total_requests: usize,
    pub concurrency: usize,
    pub tolerance: f64,
    pub max_attempts: usize,
}

#[derive(Deserialize, Clone)]
pub struct Repeat {
    pub count: usize,
    pub header: String,
}

#[derive(Deserialize, Clone)]
pub struct WebSocketCheck {
    pub messages: Vec<WebSocketMessage>,
}

#[derive(Deserialize, Clone)]
pub struct WebSocketMessage {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub send: Option<String>,
    #[serde(default)]
    pub send_hex: Option<String>,
}

/// A `before_step` action: delete one object from the configuration.
#[derive(Deserialize, Clone)]
pub struct Deletion {
    pub action: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Deletion {
    pub fn matches(&self, doc: &Document) -> bool {
        self.action == "delete" && doc.kind == self.kind && doc.namespace == self.namespace && doc.name == self.name
    }
}

pub fn load_cases(suite: &Path) -> anyhow::Result<Vec<Case>> {
    let path = suite.join("cases.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

#[derive(Deserialize)]
struct BackendService {
    service: String,
    namespace: String,
    pod_name_prefix: String,
    kind: String,
    ports: Vec<BackendPort>,
}

#[derive(Deserialize)]
struct BackendPort {
    name: Option<String>,
    #[serde(rename = "targetPort")]
    target_port: u16,
}

/// echo-basic's two listeners, chosen by a Service port's `targetPort`.
const HTTP_ECHO_PORT: u16 = 3000;
const H2C_ECHO_PORT: u16 = 3001;

/// The running echo identities and the Services that lead to them.
pub struct Backends {
    /// `(namespace, pod name prefix)` → the echo serving that identity.
    identities: BTreeMap<(String, String), Arc<Echo>>,
    services: Vec<ServiceBackend>,
}

struct ServiceBackend {
    namespace: String,
    name: String,
    identity: (String, String),
    ports: Vec<(Option<String>, u16)>,
}

impl Backends {
    /// Starts one echo per identity of the `http-echo` Services of `backends.json`.
    pub async fn start(suite: &Path) -> anyhow::Result<Backends> {
        let path = suite.join("backends.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let listed: Vec<BackendService> =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let mut backends = Backends {
            identities: BTreeMap::new(),
            services: Vec::new(),
        };
        for service in listed.into_iter().filter(|s| s.kind == "http-echo") {
            let identity = (service.namespace.clone(), service.pod_name_prefix.clone());
            if !backends.identities.contains_key(&identity) {
                let echo = Echo::start(&identity.0, &identity.1).await?;
                backends.identities.insert(identity.clone(), echo);
            }
            let echo = &backends.identities[&identity];
            let ports = service
                .ports
                .iter()
                .filter_map(|p| match p.target_port {
                    HTTP_ECHO_PORT => Some((p.name.clone(), echo.http_addr.port())),
                    H2C_ECHO_PORT => Some((p.name.clone(), echo.h2c_addr.port())),
                    _ => None,
                })
                .collect();
            backends.services.push(ServiceBackend {
                namespace: service.namespace,
                name: service.service,
                identity,
                ports,
            });
        }
        Ok(backends)
    }

    pub fn serves(&self, namespace: &str, service: &str) -> bool {
        self.services
            .iter()
            .any(|s| s.namespace == namespace && s.name == service)
    }

    pub fn endpoint_slices(&self) -> Vec<Value> {
        self.services
            .iter()
            .map(|s| endpoint_slice(&s.namespace, &s.name, &s.ports))
            .collect()
    }

    /// The echo whose pods are named `backend-…` in `namespace` (a case's mirror target).
    pub fn echo(&self, namespace: &str, backend: &str) -> Option<&Arc<Echo>> {
        self.identities
            .get(&(namespace.to_string(), backend.to_string()))
            .or_else(|| {
                self.services
                    .iter()
                    .find(|s| s.namespace == namespace && s.name == backend)
                    .and_then(|s| self.identities.get(&s.identity))
            })
    }
}
