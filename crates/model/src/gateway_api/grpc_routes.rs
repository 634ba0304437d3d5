//! GRPCRoute → the HTTPRoute it is equivalent to. A gRPC call is an HTTP/2 `POST` to
//! `/<package.Service>/<Method>`, so a method match is a path match: service and method give an
//! exact path, a service alone a path prefix, a method alone (or regular expressions) a path
//! regular expression. Header matches, filters and backends keep their HTTPRoute form, and the
//! route then compiles and attaches to listeners like an HTTPRoute, ordered as the GRPCRoute
//! spec says: more characters of service, then of method, then more header matches; a match
//! without a method comes after every method match. Backends of a GRPCRoute are spoken to in
//! HTTP/2 (see `Ctx::backend`).

use std::sync::LazyLock;

use regex::Regex;

use super::types::{
    GrpcMethodMatch, GrpcRouteMatch, GrpcRouteSpec, HttpPathMatch, HttpRouteFilter, HttpRouteMatch, HttpRouteRule,
    HttpRouteSpec,
};
use crate::diag::{Diag, at};
use crate::source::Document;

/// The filters a GRPCRoute may carry (`GRPCRouteFilterType`).
const FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "ExtensionRef",
];

/// The Gateway API's validation of `method.service` and `method.method` with type `Exact`.
static SERVICE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$").expect("valid regex"));
static METHOD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z_0-9]*$").expect("valid regex"));

/// The HTTPRoute equivalent to `spec`, or `None` after reporting why there is none.
pub(crate) fn to_http_route(doc: &Document, spec: GrpcRouteSpec, diag: &mut Diag) -> Option<HttpRouteSpec> {
    let mut ok = true;
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, rule) in spec.rules.into_iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let mut matches = Vec::with_capacity(rule.matches.len());
        for (j, m) in rule.matches.into_iter().enumerate() {
            match http_match(doc, &format!("{path}.matches[{j}]"), m, diag) {
                Some(m) => matches.push(m),
                None => ok = false,
            }
        }
        ok &= check_filters(doc, &at(&path, "filters"), &rule.filters, diag);
        for (k, backend) in rule.backend_refs.iter().flatten().enumerate() {
            ok &= check_filters(doc, &format!("{path}.backendRefs[{k}].filters"), &backend.filters, diag);
        }
        rules.push(HttpRouteRule {
            name: rule.name,
            matches,
            filters: rule.filters,
            backend_refs: rule.backend_refs,
            timeouts: None,
            retry: None,
            session_persistence: rule.session_persistence,
        });
    }
    ok.then_some(HttpRouteSpec {
        parent_refs: spec.parent_refs,
        hostnames: spec.hostnames,
        rules,
        use_default_gateways: None,
    })
}

fn check_filters(doc: &Document, path: &str, filters: &[HttpRouteFilter], diag: &mut Diag) -> bool {
    let mut ok = true;
    for (i, f) in filters.iter().enumerate() {
        if !FILTERS.contains(&f.kind.as_str()) {
            diag.error(
                doc,
                format!("{path}[{i}].type"),
                format!("{:?} is not a GRPCRoute filter ({})", f.kind, FILTERS.join(", ")),
            );
            ok = false;
        }
    }
    ok
}

fn http_match(doc: &Document, mpath: &str, m: GrpcRouteMatch, diag: &mut Diag) -> Option<HttpRouteMatch> {
    let (path, grpc_method_rank) = match &m.method {
        None => (None, None),
        Some(method) => {
            let chars = |v: &Option<String>| v.as_deref().map_or(0, str::len).min(0xffff);
            let rank = (chars(&method.service) << 16) | chars(&method.method);
            (Some(method_path(doc, &at(mpath, "method"), method, diag)?), Some(rank))
        }
    };
    Some(HttpRouteMatch {
        path,
        headers: m.headers,
        query_params: Vec::new(),
        method: None,
        grpc_method_rank,
    })
}

/// The path match of a method match.
fn method_path(doc: &Document, path: &str, m: &GrpcMethodMatch, diag: &mut Diag) -> Option<HttpPathMatch> {
    let service = m.service.as_deref().filter(|s| !s.is_empty());
    let method = m.method.as_deref().filter(|s| !s.is_empty());
    if service.is_none() && method.is_none() {
        diag.error(doc, path.to_string(), "one of service and method is required");
        return None;
    }
    let kind = m.kind.as_deref().unwrap_or("Exact");
    let (kind, value) = match kind {
        "Exact" => {
            let mut ok = true;
            if let Some(s) = service
                && !SERVICE.is_match(s)
            {
                diag.error(doc, at(path, "service"), format!("{s:?} is not a gRPC service name"));
                ok = false;
            }
            if let Some(m) = method
                && !METHOD.is_match(m)
            {
                diag.error(doc, at(path, "method"), format!("{m:?} is not a gRPC method name"));
                ok = false;
            }
            if !ok {
                return None;
            }
            match (service, method) {
                (Some(s), Some(m)) => ("Exact", format!("/{s}/{m}")),
                (Some(s), None) => ("PathPrefix", format!("/{s}")),
                (None, m) => (
                    "RegularExpression",
                    format!("/[^/]+/{}", regex::escape(m.unwrap_or_default())),
                ),
            }
        }
        "RegularExpression" => {
            let mut ok = true;
            for (field, value) in [("service", service), ("method", method)] {
                if let Some(v) = value
                    && let Err(e) = Regex::new(v)
                {
                    diag.error(doc, at(path, field), format!("invalid regular expression: {e}"));
                    ok = false;
                }
            }
            if !ok {
                return None;
            }
            let part = |v: Option<&str>| v.map_or_else(|| "[^/]+".to_string(), |v| format!("(?:{v})"));
            ("RegularExpression", format!("/{}/{}", part(service), part(method)))
        }
        other => {
            diag.error(
                doc,
                at(path, "type"),
                format!("unknown method match type {other:?} (Exact, RegularExpression)"),
            );
            return None;
        }
    };
    Some(HttpPathMatch {
        kind: Some(kind.to_string()),
        value: Some(value),
    })
}
