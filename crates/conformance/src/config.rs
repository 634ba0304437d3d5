//! The proxy configuration of one test (README §1–3, §5): the GatewayClass meshgate serves,
//! `manifests/base.yaml` plus the test's manifest unchanged except for the class placeholder,
//! every Gateway given its own loopback address, the TLS Secret the Go suite creates, and
//! EndpointSlices that point each Service at the local echo backend behind it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context;
use meshgate_model::source::{self, Document};
use serde_json::{Value, json};

use crate::suite::{Backends, Deletion};

/// The GatewayClass name substituted for `{GATEWAY_CLASS_NAME}`.
pub const GATEWAY_CLASS: &str = "meshgate";
const CONTROLLER_NAME: &str = "meshgate.io/gateway-controller";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const TLS_SECRET_NAMESPACE: &str = "gateway-conformance-infra";
pub const TLS_SECRET_NAME: &str = "tls-validity-checks-certificate";

/// Gives every distinct Gateway (`namespace/name`) its own loopback address, stable for the
/// whole run: 127.0.1.1, 127.0.1.2, …
#[derive(Default)]
pub struct GatewayAddresses {
    assigned: HashMap<String, Ipv4Addr>,
}

impl GatewayAddresses {
    pub fn address(&mut self, namespace: &str, name: &str) -> Ipv4Addr {
        let next = self.assigned.len() as u32 + 1;
        *self
            .assigned
            .entry(format!("{namespace}/{name}"))
            .or_insert_with(|| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 1, 0)) + next))
    }
}

/// The server certificate of the HTTPS listeners, as PEM.
pub struct TlsMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Builds the YAML text (JSON documents separated by `---`, which YAML reads unchanged).
pub fn render(
    suite: &Path,
    manifest: &str,
    deletions: &[Deletion],
    backends: &Backends,
    tls: &TlsMaterial,
    addresses: &mut GatewayAddresses,
) -> anyhow::Result<String> {
    let mut docs = read_manifest(suite, "manifests/base.yaml")?;
    docs.extend(read_manifest(suite, manifest)?);
    docs.retain(|doc| !deletions.iter().any(|d| d.matches(doc)));
    // The Go suite fills manual EndpointSlices with pod IPs; the runner supplies its own
    // slices for every Service it serves.
    docs.retain(|doc| {
        doc.kind != "EndpointSlice"
            || !doc
                .labels
                .get(SERVICE_NAME_LABEL)
                .is_some_and(|svc| backends.serves(&doc.namespace, svc))
    });
    let mut out: Vec<Value> = vec![
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": GATEWAY_CLASS},
            "spec": {"controllerName": CONTROLLER_NAME},
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": TLS_SECRET_NAME, "namespace": TLS_SECRET_NAMESPACE},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": tls.cert_pem, "tls.key": tls.key_pem},
        }),
    ];
    for mut doc in docs {
        if doc.kind == "Gateway" && doc.api_version.starts_with("gateway.networking.k8s.io/") {
            let ip = addresses.address(&doc.namespace, &doc.name);
            doc.body["spec"]["addresses"] = json!([{"type": "IPAddress", "value": ip.to_string()}]);
        }
        out.push(doc.body);
    }
    out.extend(backends.endpoint_slices());
    let mut text = String::new();
    for doc in out {
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(&doc)?);
        text.push('\n');
    }
    Ok(text)
}

fn read_manifest(suite: &Path, name: &str) -> anyhow::Result<Vec<Document>> {
    let path = suite.join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let text = text.replace("{GATEWAY_CLASS_NAME}", GATEWAY_CLASS);
    source::parse_str(&path, &text).map_err(|findings| anyhow::anyhow!("{}: {findings}", path.display()))
}

/// An EndpointSlice giving `namespace/service` the local `(port name, port)` pairs.
pub fn endpoint_slice(namespace: &str, service: &str, ports: &[(Option<String>, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port)| match name {
            Some(name) => json!({"name": name, "port": port, "protocol": "TCP"}),
            None => json!({"port": port, "protocol": "TCP"}),
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-conformance-runner"),
            "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": ports,
    })
}
