//! meshgate's configuration model.
//!
//! Users bring YAML they already have (Istio today; Gateway API, Kong and Flagger later).
//! This crate reads it ([`source`]), validates it into [`Finding`]s that name file, resource
//! and field, and compiles it into one format-independent [`snapshot::Snapshot`] that the data
//! plane serves. It is pure: no sockets, no async runtime, so every rule can be tested alone.

pub mod duration;
pub mod finding;
pub mod istio;
pub mod matcher;
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
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            gateway_labels: BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]),
            mesh_port: None,
            mesh_address: None,
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

/// Compiles already-read documents.
pub fn compile(documents: &[source::Document], options: &CompileOptions) -> Result<Compiled, Findings> {
    istio::compile(documents, options)
}
