//! Istio networking resources → [`crate::Snapshot`].
//!
//! The work is split by concern:
//! - [`types`]: serde structs of the resource `spec`s (strict: unknown fields are errors);
//! - [`unsupported`]: warnings for Istio fields meshgate accepts but does not implement yet;
//! - [`registry`]: services and endpoints (ServiceEntry, WorkloadEntry), DestinationRules,
//!   and the clusters built from them;
//! - [`routes`]: VirtualService HTTP routes → snapshot routes;
//! - [`listeners`]: Gateways and the mesh listener, binding VirtualServices to them.
//!
//! This module classifies the documents, decodes their specs and collects findings.

mod listeners;
mod registry;
mod routes;
pub mod types;
mod unsupported;

use std::collections::HashMap;

use serde::de::DeserializeOwned;

use crate::finding::{Finding, Severity};
use crate::snapshot::Snapshot;
use crate::{CompileOptions, Compiled, Findings, source::Document};

/// API versions of `networking.istio.io` whose schema meshgate reads (they share one schema).
const VERSIONS: &[&str] = &["v1alpha3", "v1beta1", "v1"];
const GROUP: &str = "networking.istio.io";
const KINDS: &[&str] = &[
    "Gateway",
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "WorkloadEntry",
];

/// Collected findings for one compilation.
#[derive(Default)]
pub(crate) struct Diag {
    findings: Vec<Finding>,
}

impl Diag {
    pub(crate) fn error(&mut self, doc: &Document, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, doc, field.into(), message.into());
    }

    pub(crate) fn warn(&mut self, doc: &Document, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, doc, field.into(), message.into());
    }

    fn push(&mut self, severity: Severity, doc: &Document, field: String, message: String) {
        self.findings.push(Finding {
            severity,
            file: doc.file.clone(),
            resource: resource_name(doc),
            field,
            message,
        });
    }

    fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// `Kind namespace/name`, as findings name resources.
pub(crate) fn resource_name(doc: &Document) -> String {
    format!("{} {}/{}", doc.kind, doc.namespace, doc.name)
}

/// A decoded resource with the document it came from.
pub(crate) struct Res<'a, T> {
    pub doc: &'a Document,
    pub spec: T,
}

/// All decoded Istio resources, in document order.
#[derive(Default)]
pub(crate) struct Resources<'a> {
    pub gateways: Vec<Res<'a, types::GatewaySpec>>,
    pub virtual_services: Vec<Res<'a, types::VirtualServiceSpec>>,
    pub destination_rules: Vec<Res<'a, types::DestinationRuleSpec>>,
    pub service_entries: Vec<Res<'a, types::ServiceEntrySpec>>,
    pub workload_entries: Vec<Res<'a, types::WorkloadEntrySpec>>,
}

/// Compiles Istio documents. Documents of other API groups are ignored with a warning; any
/// error fails the compilation, returning every finding (warnings included).
pub fn compile(documents: &[Document], options: &CompileOptions) -> Result<Compiled, Findings> {
    let mut diag = Diag::default();
    let resources = decode_all(documents, &mut diag);
    let mut registry = registry::Registry::build(&resources, &mut diag);
    let compiled_routes = routes::compile_virtual_services(&resources, &mut registry, &mut diag);
    let mut snapshot = Snapshot::default();
    listeners::build(
        &resources,
        &compiled_routes,
        &mut registry,
        options,
        &mut snapshot,
        &mut diag,
    );
    snapshot.clusters = registry.take_clusters();
    if diag.has_errors() {
        return Err(Findings(diag.findings));
    }
    Ok(Compiled {
        snapshot,
        warnings: diag.findings,
    })
}

fn decode_all<'a>(documents: &'a [Document], diag: &mut Diag) -> Resources<'a> {
    let mut resources = Resources::default();
    let mut seen: HashMap<(String, String, String), &Document> = HashMap::new();
    for doc in documents {
        let (group, version) = match doc.api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", doc.api_version.as_str()),
        };
        if group != GROUP || !VERSIONS.contains(&version) || !KINDS.contains(&doc.kind.as_str()) {
            if group == "istio.io" || group.ends_with(".istio.io") {
                let what = if group == GROUP && KINDS.contains(&doc.kind.as_str()) {
                    format!(
                        "unsupported apiVersion {} for kind {} (use one of {GROUP}/{})",
                        doc.api_version,
                        doc.kind,
                        VERSIONS.join(", ")
                    )
                } else {
                    format!(
                        "unknown or unsupported Istio kind {} of apiVersion {}",
                        doc.kind, doc.api_version
                    )
                };
                diag.error(doc, "", what);
            } else {
                diag.warn(
                    doc,
                    "",
                    format!(
                        "ignored: kind {} of apiVersion {} is not supported yet",
                        doc.kind, doc.api_version
                    ),
                );
            }
            continue;
        }
        let key = (doc.kind.clone(), doc.namespace.clone(), doc.name.clone());
        if let Some(first) = seen.get(&key) {
            diag.error(
                doc,
                "metadata.name",
                format!(
                    "duplicate {}: also defined in {} (document {}); this one (document {} of {}) is ignored",
                    resource_name(doc),
                    first.file.display(),
                    first.index,
                    doc.index,
                    doc.file.display()
                ),
            );
            continue;
        }
        seen.insert(key, doc);
        unsupported::report(doc, diag);
        match doc.kind.as_str() {
            "Gateway" => decode(doc, diag).map(|spec| resources.gateways.push(Res { doc, spec })),
            "VirtualService" => decode(doc, diag).map(|spec| resources.virtual_services.push(Res { doc, spec })),
            "DestinationRule" => decode(doc, diag).map(|spec| resources.destination_rules.push(Res { doc, spec })),
            "ServiceEntry" => decode(doc, diag).map(|spec| resources.service_entries.push(Res { doc, spec })),
            _ => decode(doc, diag).map(|spec| resources.workload_entries.push(Res { doc, spec })),
        };
    }
    resources
}

/// Decodes `body.spec`, reporting the failing field's path on error.
fn decode<T: DeserializeOwned>(doc: &Document, diag: &mut Diag) -> Option<T> {
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let spec = doc.body.get("spec").filter(|v| !v.is_null()).unwrap_or(&empty);
    match serde_path_to_error::deserialize::<_, T>(spec) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                "spec".to_string()
            } else {
                format!("spec.{path}")
            };
            diag.error(doc, field, e.into_inner().to_string());
            None
        }
    }
}

/// Joins a field path and a child (`spec.http[0]` + `route` → `spec.http[0].route`).
pub(crate) fn at(base: &str, child: impl std::fmt::Display) -> String {
    format!("{base}.{child}")
}
