//! meshgate's configuration model.
//!
//! Users bring YAML they already have (Istio and the Kubernetes Gateway API today; Kong and
//! Flagger later), possibly mixed in one configuration.
//! This crate reads it ([`source`]), validates it into [`Finding`]s that name file, resource
//! and field, and compiles it into one format-independent [`snapshot::Snapshot`] that the data
//! plane serves. It is pure: no sockets, no async runtime, so every rule can be tested alone.

mod diag;
pub mod duration;
pub mod finding;
pub mod gateway_api;
pub mod istio;
pub mod kong;
/// The regex type compiled patterns use, for crates that run them.
pub use regex::Regex;
pub mod matcher;
mod shadowing;
pub mod snapshot;
pub mod source;

pub use finding::{Finding, Findings, Severity};
pub use snapshot::Snapshot;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

/// Settings of the proxy that the compiled snapshot depends on.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The proxy's own labels; Istio Gateways whose `selector` is a subset of them are served.
    pub gateway_labels: BTreeMap<String, String>,
    /// When set, a listener on this port (bound to `mesh_address`, or the proxy's bind address)
    /// serves VirtualServices bound to the `mesh` gateway and a default route to every known
    /// service host: the outbound side of a sidecar.
    pub mesh_port: Option<u16>,
    pub mesh_address: Option<IpAddr>,
    /// Gateway API: Gateways of the GatewayClasses whose `spec.controllerName` equals this
    /// are served; others are left to their controllers.
    pub controller_name: String,
    /// Kong: the addresses of the proxy listener serving decK files (Kong's `proxy_listen`);
    /// empty means port 8000 on the proxy's bind address.
    pub kong_listen: Vec<std::net::SocketAddr>,
    /// Kong: TLS proxy listeners (Kong's `proxy_listen ... ssl`) serving the decK
    /// `certificates` by SNI; empty means port 8443 on the proxy's bind address when the
    /// config has certificates and `kong_listen` is not set either.
    pub kong_listen_tls: Vec<std::net::SocketAddr>,
}

/// The GatewayClass controller name meshgate answers to by default.
pub const DEFAULT_CONTROLLER_NAME: &str = "meshgate.io/gateway-controller";

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            gateway_labels: BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
            mesh_port: None,
            mesh_address: None,
            controller_name: DEFAULT_CONTROLLER_NAME.to_string(),
            kong_listen: Vec::new(),
            kong_listen_tls: Vec::new(),
        }
    }
}

/// A successful compilation: the snapshot plus any warnings worth showing.
#[derive(Debug)]
pub struct Compiled {
    pub snapshot: Snapshot,
    pub warnings: Vec<Finding>,
}

/// Reads every YAML file under `paths` (files or folders, multi-document) and compiles them.
/// Any finding of [`Severity::Error`] fails the whole load, so a bad edit never replaces a
/// good snapshot.
pub fn load(paths: &[PathBuf], options: &CompileOptions) -> Result<Compiled, Findings> {
    let documents = source::read_paths(paths)?;
    compile(&documents, options)
}

/// Compiles already-read documents: every format into one snapshot. Listeners are merged by
/// (address, port) and clusters shared by name, so an Istio VirtualService and an HTTPRoute
/// naming the same service use one cluster. Documents of API groups no format reads are
/// ignored with a warning; any error fails the compilation, returning every finding
/// (warnings included).
pub fn compile(documents: &[source::Document], options: &CompileOptions) -> Result<Compiled, Findings> {
    let mut diag = diag::Diag::default();
    let resources = istio::decode_all(documents, &mut diag);
    let gateway_resources = gateway_api::decode_all(documents, &mut diag);
    let mut registry = istio::registry::Registry::build(&resources, &mut diag);
    let compiled_routes = istio::routes::compile_virtual_services(&resources, &mut registry, &mut diag);
    let mut snapshot = Snapshot::default();
    istio::listeners::build(
        &resources,
        &compiled_routes,
        &mut registry,
        options,
        &mut snapshot,
        &mut diag,
    );
    gateway_api::build(&gateway_resources, &mut registry, options, &mut snapshot, &mut diag);
    kong::build(documents, &mut registry, options, &mut snapshot, &mut diag);
    snapshot.listeners = merge_listeners(std::mem::take(&mut snapshot.listeners), &mut diag);
    snapshot.clusters = registry.take_clusters();
    if diag.has_errors() {
        return Err(Findings(diag.findings));
    }
    Ok(Compiled {
        snapshot,
        warnings: diag.findings,
    })
}

/// Merges listeners that bind the same (address, port): their virtual hosts are served
/// together (a domain claimed twice keeps the first), their certificates concatenated.
fn merge_listeners(listeners: Vec<snapshot::Listener>, diag: &mut diag::Diag) -> Vec<snapshot::Listener> {
    let mut out: Vec<snapshot::Listener> = Vec::new();
    for listener in listeners {
        let Some(existing) = out
            .iter_mut()
            .find(|l| l.address == listener.address && l.port == listener.port)
        else {
            out.push(listener);
            continue;
        };
        if existing.tls.is_some() != listener.tls.is_some() {
            diag.findings.push(Finding {
                severity: Severity::Error,
                file: PathBuf::new(),
                resource: format!("listener {}", existing.name),
                field: String::new(),
                message: format!(
                    "port {} is configured both with and without TLS by different resources (Istio Gateway servers and Gateway API listeners)",
                    listener.port
                ),
            });
            continue;
        }
        if let (Some(tls), Some(more)) = (existing.tls.as_mut(), listener.tls) {
            tls.certificates.extend(more.certificates);
        }
        existing.routes.virtual_hosts.extend(listener.routes.virtual_hosts);
        existing.routes.index();
    }
    out
}
