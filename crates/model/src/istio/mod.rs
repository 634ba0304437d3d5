//! Istio networking resources → [`crate::Snapshot`].
//!
//! The work is split by concern:
//! - [`types`]: serde structs of the resource `spec`s (strict: unknown fields are errors);
//! - [`unsupported`]: warnings for Istio fields meshgate accepts but does not implement yet;
//! - [`registry`]: services and endpoints (ServiceEntry, WorkloadEntry), DestinationRules,
//!   and the clusters built from them;
//! - [`routes`]: VirtualService HTTP routes → snapshot routes, with [`retries`] for their
//!   retry policies;
//! - [`listeners`]: Gateways and the mesh listener, binding VirtualServices to them.
//!
//! This module classifies the documents and decodes their specs; [`crate::compile`] runs the
//! steps and merges the result with the other formats' into one snapshot.

mod fault;
pub(crate) mod listeners;
mod outlier;
mod pool;
pub(crate) mod registry;
mod retries;
pub(crate) mod routes;
pub mod types;
mod unsupported;
pub(crate) mod upstream_tls;

use std::collections::HashMap;

use serde::de::DeserializeOwned;

pub(crate) use crate::diag::{Diag, Res, at, resource_name};
use crate::source::Document;

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

/// All decoded Istio resources, in document order.
#[derive(Default)]
pub(crate) struct Resources<'a> {
    pub gateways: Vec<Res<'a, types::GatewaySpec>>,
    pub virtual_services: Vec<Res<'a, types::VirtualServiceSpec>>,
    pub destination_rules: Vec<Res<'a, types::DestinationRuleSpec>>,
    pub service_entries: Vec<Res<'a, types::ServiceEntrySpec>>,
    pub workload_entries: Vec<Res<'a, types::WorkloadEntrySpec>>,
}

pub(crate) use unsupported::walk as unsupported_walk;

/// The group of a document's `apiVersion` (`""` for the core group).
pub(crate) fn api_group(doc: &Document) -> &str {
    doc.api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

/// Whether the document belongs to an Istio API group (and is thus this module's to judge).
pub(crate) fn claims(doc: &Document) -> bool {
    let group = api_group(doc);
    group == "istio.io" || group.ends_with(".istio.io")
}

pub(crate) fn decode_all<'a>(documents: &'a [Document], diag: &mut Diag) -> Resources<'a> {
    let mut resources = Resources::default();
    let mut seen: HashMap<(String, String, String), &Document> = HashMap::new();
    for doc in documents {
        let (group, version) = match doc.api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", doc.api_version.as_str()),
        };
        if group != GROUP || !VERSIONS.contains(&version) || !KINDS.contains(&doc.kind.as_str()) {
            if claims(doc) {
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
            } else if !crate::gateway_api::claims(doc) && doc.kind != crate::kong::KIND {
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
            diag.duplicate(doc, first);
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
    crate::diag::decode_value(doc, &crate::diag::without_null_fields(spec), "spec", diag)
}
