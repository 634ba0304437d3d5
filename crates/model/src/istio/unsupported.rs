//! Warnings for Istio fields that meshgate accepts but does not implement yet.
//!
//! Silently dropping a fault injection or a mirror would make the proxy behave
//! differently from what the user reads in their YAML, so every such field present in a
//! resource is reported with its exact path. The lists are patterns over the JSON body:
//! `a[]` walks every element of array `a`.

use serde_json::Value;

use super::Diag;
use crate::source::Document;

const VIRTUAL_SERVICE: &[&str] = &["exportTo", "tcp", "tls", "http[].delegate", "http[].match[].statPrefix"];

const GATEWAY: &[&str] = &[
    "servers[].bind",
    "servers[].defaultEndpoint",
    "servers[].tls.caCrl",
    "servers[].tls.subjectAltNames",
    "servers[].tls.verifyCertificateSpki",
    "servers[].tls.verifyCertificateHash",
    "servers[].tls.cipherSuites",
];

const SERVICE_ENTRY: &[&str] = &[
    "addresses",
    "endpoints[].network",
    "endpoints[].locality",
    "endpoints[].serviceAccount",
];

const WORKLOAD_ENTRY: &[&str] = &["network", "locality", "serviceAccount"];

const DESTINATION_RULE: &[&str] = &["exportTo", "workloadSelector"];

/// Unsupported parts of a `TrafficPolicy` (also of its `portLevelSettings[]` entries and of
/// subsets' policies).
const TRAFFIC_POLICY: &[&str] = &[
    "tunnel",
    "proxyProtocol",
    "retryBudget",
    // Applies to TCP proxying, which meshgate does not do.
    "connectionPool.tcp.idleTimeout",
    // One HTTP/2 connection per endpoint and worker; the upstream's SETTINGS limit its streams.
    "connectionPool.http.maxConcurrentStreams",
    "loadBalancer.localityLbSetting",
    "loadBalancer.warmupDurationSecs",
    "loadBalancer.warmup",
    "loadBalancer.consistentHash.ringHash",
    "loadBalancer.consistentHash.maglev",
    "loadBalancer.consistentHash.minimumRingSize",
];

/// Reports every unsupported field present in `doc`'s spec as a warning.
pub(crate) fn report(doc: &Document, diag: &mut Diag) {
    let Some(spec) = doc.body.get("spec") else {
        return;
    };
    let mut found = Vec::new();
    let mut check = |patterns: &[&str], prefix: &str| {
        for p in patterns {
            let full = if prefix.is_empty() {
                p.to_string()
            } else {
                format!("{prefix}.{p}")
            };
            let segments: Vec<&str> = full.split('.').collect();
            walk(spec, &segments, "spec".to_string(), &mut found);
        }
    };
    match doc.kind.as_str() {
        "VirtualService" => check(VIRTUAL_SERVICE, ""),
        "Gateway" => check(GATEWAY, ""),
        "ServiceEntry" => check(SERVICE_ENTRY, ""),
        "WorkloadEntry" => check(WORKLOAD_ENTRY, ""),
        "DestinationRule" => {
            check(DESTINATION_RULE, "");
            for prefix in [
                "trafficPolicy",
                "trafficPolicy.portLevelSettings[]",
                "subsets[].trafficPolicy",
                "subsets[].trafficPolicy.portLevelSettings[]",
            ] {
                check(TRAFFIC_POLICY, prefix);
            }
        }
        _ => {}
    }
    found.sort();
    for field in found {
        diag.warn(doc, field, "not supported yet, ignored");
    }
}

pub(crate) fn walk(value: &Value, segments: &[&str], path: String, found: &mut Vec<String>) {
    let Some((first, rest)) = segments.split_first() else {
        if !value.is_null() {
            found.push(path);
        }
        return;
    };
    if let Some(key) = first.strip_suffix("[]") {
        if let Some(Value::Array(items)) = value.get(key) {
            for (i, item) in items.iter().enumerate() {
                walk(item, rest, format!("{path}.{key}[{i}]"), found);
            }
        }
    } else if let Some(child) = value.get(*first) {
        walk(child, rest, format!("{path}.{first}"), found);
    }
}
