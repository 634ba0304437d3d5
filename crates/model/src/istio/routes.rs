//! VirtualService HTTP routes → snapshot [`Route`]s.
//!
//! Each VirtualService is compiled once, validating everything and creating its clusters;
//! [`super::listeners`] then copies the routes onto every listener it is bound to, keeping
//! only the match alternatives that apply to that gateway.

use crate::diag::decode_value;
use base64::Engine;
use bytes::Bytes;

use super::registry::Registry;
use super::types::{HeaderOperations, Headers, HttpRoute, StringMatchSpec, VirtualServiceSpec};
use super::{Diag, Res, Resources, at};
use crate::matcher::{HeaderMatch, PathMatch, QueryMatch, StringMatch};
use crate::snapshot::{
    CorsPolicy, DirectResponse, Forward, HeaderOps, PathRewrite, Redirect, RedirectPort, RequestMatch, Rewrite, Route,
    RouteAction, WeightedDestination,
};
use crate::source::Document;

/// A gateway a VirtualService names: the `mesh` keyword or `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GatewayRef {
    Mesh,
    Named(String, String),
}

impl GatewayRef {
    /// `name` is relative to the VirtualService's namespace; `ns/name` is absolute.
    fn parse(s: &str, namespace: &str) -> Self {
        match s.split_once('/') {
            _ if s == "mesh" => GatewayRef::Mesh,
            Some((ns, name)) => GatewayRef::Named(ns.to_string(), name.to_string()),
            None => GatewayRef::Named(namespace.to_string(), s.to_string()),
        }
    }
}

pub(crate) struct CompiledRoute {
    route: Route,
    /// Per entry of `route.matches`: the gateways it is restricted to (`None`: the
    /// VirtualService's gateways).
    match_gateways: Vec<Option<Vec<GatewayRef>>>,
}

pub(crate) struct CompiledVs<'a> {
    pub doc: &'a Document,
    /// Lower-cased `spec.hosts`.
    pub hosts: Vec<String>,
    gateways: Vec<GatewayRef>,
    routes: Vec<CompiledRoute>,
}

impl CompiledVs<'_> {
    /// Whether any route of this VirtualService applies on `gateway`.
    pub(crate) fn binds(&self, gateway: &GatewayRef) -> bool {
        self.gateways.contains(gateway)
            || self
                .routes
                .iter()
                .any(|r| r.match_gateways.iter().flatten().any(|g| g.contains(gateway)))
    }

    /// The routes as seen on `gateway`: match alternatives restricted to other gateways are
    /// dropped, and a route left without alternatives is dropped.
    pub(crate) fn routes_for(&self, gateway: &GatewayRef) -> Vec<Route> {
        let top = self.gateways.contains(gateway);
        let mut out = Vec::new();
        for r in &self.routes {
            if r.route.matches.is_empty() {
                if top {
                    out.push(r.route.clone());
                }
                continue;
            }
            let matches: Vec<RequestMatch> = r
                .route
                .matches
                .iter()
                .zip(&r.match_gateways)
                .filter(|(_, g)| match g {
                    None => top,
                    Some(list) => list.contains(gateway),
                })
                .map(|(m, _)| m.clone())
                .collect();
            if !matches.is_empty() {
                let mut route = r.route.clone();
                route.matches = matches;
                out.push(route);
            }
        }
        out
    }
}

pub(crate) fn compile_virtual_services<'a>(
    resources: &Resources<'a>,
    registry: &mut Registry<'_>,
    diag: &mut Diag,
) -> Vec<CompiledVs<'a>> {
    resources
        .virtual_services
        .iter()
        .map(|vs| compile_vs(vs, registry, diag))
        .collect()
}

fn compile_vs<'a>(vs: &Res<'a, VirtualServiceSpec>, registry: &mut Registry<'_>, diag: &mut Diag) -> CompiledVs<'a> {
    let (doc, spec) = (vs.doc, &vs.spec);
    if spec.hosts.is_empty() {
        diag.error(doc, "spec.hosts", "at least one host is required");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        if h.is_empty() {
            diag.error(doc, format!("spec.hosts[{i}]"), "host must not be empty");
        }
    }
    let gateways = match &spec.gateways {
        None => vec![GatewayRef::Mesh],
        Some(list) => list.iter().map(|g| GatewayRef::parse(g, &doc.namespace)).collect(),
    };
    let routes: Vec<(usize, CompiledRoute)> = spec
        .http
        .iter()
        .enumerate()
        .filter_map(|(i, http)| compile_http_route(doc, i, http, registry, diag).map(|r| (i, r)))
        .collect();
    report_shadowed_rules(doc, &routes, diag);
    let routes = routes.into_iter().map(|(_, r)| r).collect();
    CompiledVs {
        doc,
        hosts: spec
            .hosts
            .iter()
            .filter(|h| !h.is_empty())
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        gateways,
        routes,
    }
}

/// The match alternatives of a compiled rule; `covering` leaves out those restricted to some
/// gateways, which cannot cover a rule that applies on more of them.
fn alternatives(route: &CompiledRoute, covering: bool) -> Vec<&crate::snapshot::RequestMatch> {
    route
        .route
        .matches
        .iter()
        .zip(&route.match_gateways)
        .filter(|(_, gateways)| !covering || gateways.is_none())
        .map(|(m, _)| m)
        .collect()
}

/// Warns about `http` rules that can never match because an earlier rule of the same
/// VirtualService takes every request they would match. Alternatives restricted to some
/// gateways never count as covering (they apply on fewer gateways than the later rule).
fn report_shadowed_rules(doc: &Document, routes: &[(usize, CompiledRoute)], diag: &mut Diag) {
    if routes.len() > crate::shadowing::MAX_RULES_CHECKED {
        return;
    }
    for (j, (later_index, later)) in routes.iter().enumerate() {
        let later_matches = alternatives(later, false);
        let covering = routes[..j].iter().find(|(_, earlier)| {
            let earlier_matches = alternatives(earlier, true);
            // A rule whose every alternative is gateway-restricted covers nothing everywhere.
            (!earlier_matches.is_empty() || earlier.route.matches.is_empty())
                && crate::shadowing::rule_covers(&earlier_matches, &later_matches)
        });
        if let Some((earlier_index, _)) = covering {
            diag.warn(
                doc,
                format!("spec.http[{later_index}]"),
                format!(
                    "this rule never matches: spec.http[{earlier_index}] comes first and matches every request it would"
                ),
            );
        }
    }
}

/// A mirror share: `percentage.value` (0–100, default 100) as a fraction of a million.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorPercent {
    value: Option<f64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorPolicy {
    destination: super::types::Destination,
    percentage: Option<MirrorPercent>,
}

/// Istio's `mirror` + `mirrorPercentage` (or the deprecated `mirrorPercent`) and the newer
/// `mirrors` list; `None` after reporting an error.
fn mirrors(
    doc: &Document,
    path: &str,
    http: &HttpRoute,
    registry: &mut Registry<'_>,
    diag: &mut Diag,
) -> Option<Vec<crate::snapshot::Mirror>> {
    let mut out = Vec::new();
    let mut ok = true;
    let mut add = |field: String, destination: &super::types::Destination, percent: Option<f64>, diag: &mut Diag| {
        let value = percent.unwrap_or(100.0);
        if !(0.0..=100.0).contains(&value) || value.is_nan() {
            diag.error(
                doc,
                format!("{field}.percentage"),
                format!("must be 0..100, got {value}"),
            );
            return false;
        }
        if destination.host.is_empty() {
            diag.error(doc, format!("{field}.host"), "host is required");
            return false;
        }
        let port = destination.port.as_ref().and_then(|p| p.number);
        let subset = destination.subset.as_deref().filter(|s| !s.is_empty());
        match registry.cluster(doc, &field, &destination.host, port, subset, diag) {
            Some(cluster) => {
                out.push(crate::snapshot::Mirror {
                    cluster,
                    fraction: ((value * 10_000.0).round() as u32, 1_000_000),
                });
                true
            }
            None => false,
        }
    };
    if let Some(value) = &http.mirror {
        let field = at(path, "mirror");
        let percent = match (&http.mirror_percentage, &http.mirror_percent) {
            (Some(p), _) => decode_value::<MirrorPercent>(doc, p, &at(path, "mirrorPercentage"), diag)
                .map(|p| p.value)
                .unwrap_or(Some(f64::NAN)),
            (None, Some(p)) => p.as_f64(),
            (None, None) => None,
        };
        if let Some(destination) = decode_value::<super::types::Destination>(doc, value, &field, diag) {
            ok &= add(field, &destination, percent, diag);
        } else {
            ok = false;
        }
    }
    if let Some(list) = &http.mirrors {
        let field = at(path, "mirrors");
        match decode_value::<Vec<MirrorPolicy>>(doc, list, &field, diag) {
            Some(policies) => {
                for (i, policy) in policies.iter().enumerate() {
                    let percent = policy.percentage.as_ref().and_then(|p| p.value);
                    ok &= add(format!("{field}[{i}].destination"), &policy.destination, percent, diag);
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn compile_http_route(
    doc: &Document,
    i: usize,
    http: &HttpRoute,
    registry: &mut Registry<'_>,
    diag: &mut Diag,
) -> Option<CompiledRoute> {
    let path = format!("spec.http[{i}]");
    let name = match &http.name {
        Some(n) if !n.is_empty() => format!("{}/{}.{n}", doc.namespace, doc.name),
        _ => format!("{}/{}[{i}]", doc.namespace, doc.name),
    };
    let mut ok = true;
    let mut matches = Vec::new();
    let mut match_gateways = Vec::new();
    let mut skipped_alternatives = 0;
    for (j, m) in http.matches.iter().flatten().enumerate() {
        let mpath = format!("{path}.match[{j}]");
        // Source restrictions narrow a rule to some clients; ignoring them would widen it to
        // every client, so an alternative carrying one is left out until they are supported.
        if let Some(field) = [
            ("sourceLabels", m.source_labels.is_some()),
            ("sourceNamespace", m.source_namespace.is_some()),
        ]
        .iter()
        .find_map(|(f, set)| set.then_some(*f))
        {
            diag.warn(
                doc,
                at(&mpath, field),
                "not supported yet: this match alternative never matches (ignoring it would apply the rule to every client)",
            );
            skipped_alternatives += 1;
            continue;
        }
        let mut rm = RequestMatch::default();
        let mut one = |spec: &Option<StringMatchSpec>, field: &str, ok: &mut bool| -> Option<StringMatch> {
            let spec = spec.as_ref()?;
            match string_match(spec, &at(&mpath, field), false, doc, diag) {
                Ok(m) => m,
                Err(()) => {
                    *ok = false;
                    None
                }
            }
        };
        if let Some(matcher) = one(&m.uri, "uri", &mut ok) {
            rm.path = Some(PathMatch {
                matcher,
                ignore_case: m.ignore_uri_case.unwrap_or(false),
                segment_prefix: false,
            });
        }
        rm.scheme = one(&m.scheme, "scheme", &mut ok);
        rm.method = one(&m.method, "method", &mut ok);
        rm.authority = one(&m.authority, "authority", &mut ok);
        for (field, map, invert) in [
            ("headers", &m.headers, false),
            ("withoutHeaders", &m.without_headers, true),
        ] {
            for (name, spec) in map.iter().flatten() {
                match string_match(spec, &format!("{mpath}.{field}.{name}"), true, doc, diag) {
                    Ok(matcher) => rm.headers.push(HeaderMatch {
                        name: name.to_ascii_lowercase(),
                        matcher,
                        invert,
                    }),
                    Err(()) => ok = false,
                }
            }
        }
        for (name, spec) in m.query_params.iter().flatten() {
            let qpath = format!("{mpath}.queryParams.{name}");
            if spec.prefix.is_some() {
                diag.error(
                    doc,
                    at(&qpath, "prefix"),
                    "query parameters support only exact and regex matches",
                );
                ok = false;
                continue;
            }
            match string_match(spec, &qpath, true, doc, diag) {
                Ok(matcher) => rm.query.push(QueryMatch {
                    name: name.clone(),
                    matcher,
                }),
                Err(()) => ok = false,
            }
        }
        rm.port = m.port;
        matches.push(rm);
        match_gateways.push(
            m.gateways
                .as_ref()
                .map(|gs| gs.iter().map(|g| GatewayRef::parse(g, &doc.namespace)).collect()),
        );
    }

    if matches.is_empty() && skipped_alternatives > 0 {
        return None;
    }

    let actions = [
        http.route.is_some(),
        http.redirect.is_some(),
        http.direct_response.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if actions == 0 {
        if http.delegate.is_none() {
            diag.error(
                doc,
                path.clone(),
                "exactly one of route, redirect or directResponse is required",
            );
        }
        // A delegate-only route was already reported as unsupported; skip it.
        return None;
    }
    if actions > 1 {
        diag.error(
            doc,
            path.clone(),
            "route, redirect and directResponse are mutually exclusive",
        );
        return None;
    }
    let action = if let Some(dests) = &http.route {
        forward(doc, &path, http, dests, registry, diag)
    } else if let Some(r) = &http.redirect {
        if http.rewrite.is_some() {
            diag.error(doc, at(&path, "rewrite"), "rewrite cannot be used with redirect");
        }
        redirect(doc, &path, r, diag)
    } else if let Some(d) = &http.direct_response {
        if http.rewrite.is_some() {
            diag.warn(
                doc,
                at(&path, "rewrite"),
                "rewrite has no effect with directResponse, ignored",
            );
        }
        direct_response(doc, &path, d, diag)
    } else {
        None
    };
    let (request_headers, response_headers) = header_ops(http.headers.as_ref());
    let mirrors = mirrors(doc, &path, http, registry, diag);
    ok &= mirrors.is_some();
    let cors = match &http.cors_policy {
        None => None,
        Some(value) => {
            let cors = cors_policy(doc, &at(&path, "corsPolicy"), value, diag);
            ok &= cors.is_some();
            cors
        }
    };
    match (action, ok) {
        (Some(action), true) => Some(CompiledRoute {
            route: Route {
                name,
                matches,
                action,
                request_headers,
                response_headers,
                mirrors: mirrors.unwrap_or_default(),
                cors,
                plugins: None,
            },
            match_gateways,
        }),
        _ => None,
    }
}

/// Istio's `corsPolicy` (`CorsPolicy` of networking v1), as Envoy's CORS filter applies it: the
/// `Origin` is matched whole against `allowOrigins` (exact, prefix, regex) or the deprecated
/// `allowOrigin` list (`*` for any); an allowed preflight is answered by the proxy, another one
/// goes upstream unless `unmatchedPreflights: IGNORE`; `maxAge` is sent only when set.
fn cors_policy(doc: &Document, path: &str, value: &serde_json::Value, diag: &mut Diag) -> Option<CorsPolicy> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Spec {
        #[serde(default)]
        allow_origins: Vec<StringMatchSpec>,
        #[serde(default)]
        allow_origin: Vec<String>,
        #[serde(default)]
        allow_methods: Vec<String>,
        #[serde(default)]
        allow_headers: Vec<String>,
        #[serde(default)]
        expose_headers: Vec<String>,
        max_age: Option<String>,
        allow_credentials: Option<bool>,
        unmatched_preflights: Option<String>,
    }
    let spec: Spec = decode_value(doc, value, path, diag)?;
    let mut origin_matches = Vec::new();
    for (i, m) in spec.allow_origins.iter().enumerate() {
        match string_match(m, &format!("{path}.allowOrigins[{i}]"), false, doc, diag) {
            Ok(Some(m)) => origin_matches.push(m),
            _ => return None,
        }
    }
    let max_age = match spec.max_age.as_deref().map(crate::duration::parse) {
        None => None,
        Some(Ok(d)) => Some(u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        Some(Err(e)) => {
            diag.error(doc, at(path, "maxAge"), e);
            return None;
        }
    };
    let forward_unmatched_preflights = match spec.unmatched_preflights.as_deref() {
        None | Some("UNSPECIFIED") | Some("FORWARD") => true,
        Some("IGNORE") => false,
        Some(other) => {
            diag.error(
                doc,
                at(path, "unmatchedPreflights"),
                format!("unknown value {other:?} (FORWARD, IGNORE)"),
            );
            return None;
        }
    };
    // The deprecated `allowOrigin` entries are exact origins (`*` for any), not patterns.
    origin_matches.extend(spec.allow_origin.into_iter().map(StringMatch::Exact));
    Some(CorsPolicy {
        allow_origins: Vec::new(),
        allow_methods: spec.allow_methods,
        allow_headers: spec.allow_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        expose_headers: spec.expose_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        allow_credentials: spec.allow_credentials.unwrap_or(false),
        max_age,
        origin_matches,
        forward_unmatched_preflights,
    })
}

/// Converts an Istio `StringMatch`. `empty_is_presence`: for headers and query parameters an
/// empty `{}` means "present with any value".
fn string_match(
    spec: &StringMatchSpec,
    path: &str,
    empty_is_presence: bool,
    doc: &Document,
    diag: &mut Diag,
) -> Result<Option<StringMatch>, ()> {
    match (&spec.exact, &spec.prefix, &spec.regex) {
        (Some(e), None, None) => Ok(Some(StringMatch::Exact(e.clone()))),
        (None, Some(p), None) => Ok(Some(StringMatch::Prefix(p.clone()))),
        (None, None, Some(r)) => match StringMatch::regex(r) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                diag.error(doc, at(path, "regex"), format!("invalid regex {r:?}: {e}"));
                Err(())
            }
        },
        (None, None, None) if empty_is_presence => Ok(None),
        _ => {
            diag.error(doc, path, "exactly one of exact, prefix or regex is required");
            Err(())
        }
    }
}

fn header_ops(headers: Option<&Headers>) -> (HeaderOps, HeaderOps) {
    let convert = |ops: Option<&HeaderOperations>| {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let pairs = |m: &Option<std::collections::BTreeMap<String, String>>| {
            m.iter()
                .flatten()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect::<Vec<_>>()
        };
        HeaderOps {
            remove: ops.remove.iter().flatten().map(|h| h.to_ascii_lowercase()).collect(),
            set: pairs(&ops.set),
            add: pairs(&ops.add),
        }
    };
    match headers {
        None => (HeaderOps::default(), HeaderOps::default()),
        Some(h) => (convert(h.request.as_ref()), convert(h.response.as_ref())),
    }
}

fn forward(
    doc: &Document,
    path: &str,
    http: &HttpRoute,
    dests: &[super::types::HttpRouteDestination],
    registry: &mut Registry<'_>,
    diag: &mut Diag,
) -> Option<RouteAction> {
    let route_path = at(path, "route");
    if dests.is_empty() {
        diag.error(doc, route_path, "at least one destination is required");
        return None;
    }
    let mut ok = true;
    let mut destinations = Vec::new();
    let single = dests.len() == 1;
    let mut sum: u64 = 0;
    for (k, d) in dests.iter().enumerate() {
        let dpath = format!("{route_path}[{k}]");
        // Istio: a lone destination gets all traffic whatever its weight says.
        let weight = if single { 100 } else { d.weight.unwrap_or(0) };
        if weight > 100 {
            diag.error(doc, at(&dpath, "weight"), format!("weight {weight} is above 100"));
            ok = false;
        }
        sum += u64::from(weight);
        let dest = &d.destination;
        if dest.host.is_empty() {
            diag.error(doc, at(&dpath, "destination.host"), "host is required");
            ok = false;
            continue;
        }
        let port = dest.port.as_ref().and_then(|p| p.number);
        let cluster = registry.cluster(
            doc,
            &at(&dpath, "destination"),
            &dest.host,
            port,
            dest.subset.as_deref().filter(|s| !s.is_empty()),
            diag,
        );
        let (request_headers, response_headers) = header_ops(d.headers.as_ref());
        match cluster {
            Some(cluster) => destinations.push(WeightedDestination {
                cluster,
                weight,
                invalid: false,
                request_headers,
                response_headers,
            }),
            None => ok = false,
        }
    }
    if !single && sum != 100 {
        diag.error(
            doc,
            route_path,
            format!("destination weights must sum to 100, they sum to {sum}"),
        );
        ok = false;
    }
    let timeout = match http.timeout.as_deref() {
        None => None,
        Some(t) => match crate::duration::parse(t) {
            // As in Istio and Envoy, a zero timeout disables the timeout.
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(e) => {
                diag.error(doc, at(path, "timeout"), e);
                ok = false;
                None
            }
        },
    };
    let retry = super::retries::policy(doc, path, http.retries.as_ref(), diag);
    ok &= retry.is_ok();
    let fault = super::fault::policy(doc, path, http.fault.as_ref(), diag);
    ok &= fault.is_ok();
    let rewrite = match &http.rewrite {
        None => None,
        Some(rw) => {
            let mut rewrite = Rewrite {
                path: None,
                authority: rw.authority.clone(),
            };
            match (&rw.uri, &rw.uri_regex_rewrite) {
                (Some(_), Some(_)) => {
                    diag.error(
                        doc,
                        at(path, "rewrite"),
                        "uri and uriRegexRewrite are mutually exclusive",
                    );
                    ok = false;
                }
                (Some(uri), None) => rewrite.path = Some(PathRewrite::ReplaceMatched(uri.clone())),
                (None, Some(rr)) => match regex::Regex::new(&rr.pattern) {
                    Ok(pattern) => {
                        rewrite.path = Some(PathRewrite::Regex {
                            pattern,
                            substitution: re2_substitution(&rr.rewrite),
                        })
                    }
                    Err(e) => {
                        diag.error(
                            doc,
                            at(path, "rewrite.uriRegexRewrite.match"),
                            format!("invalid regex: {e}"),
                        );
                        ok = false;
                    }
                },
                (None, None) => {}
            }
            Some(rewrite)
        }
    };
    ok.then(|| {
        RouteAction::Forward(Forward {
            fault: fault.ok().flatten(),
            total_weight: destinations.iter().map(|d| d.weight).sum(),
            destinations,
            rewrite,
            timeout,
            backend_timeout: None,
            retry: retry.ok().flatten(),
        })
    })
}

/// RE2/Envoy substitutions write captures as `\1`; the regex crate wants `${1}`, and a
/// literal `$` must be doubled.
pub(crate) fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn redirect(doc: &Document, path: &str, r: &super::types::HttpRedirect, diag: &mut Diag) -> Option<RouteAction> {
    let rpath = at(path, "redirect");
    let port = match (r.port, r.derive_port.as_deref()) {
        (Some(_), Some(_)) => {
            diag.error(doc, rpath, "port and derivePort are mutually exclusive");
            return None;
        }
        (Some(p), None) => Some(RedirectPort::Fixed(p)),
        (None, Some("FROM_PROTOCOL_DEFAULT")) => Some(RedirectPort::FromProtocolDefault),
        (None, Some("FROM_REQUEST_PORT")) => Some(RedirectPort::FromRequestPort),
        (None, Some(other)) => {
            diag.error(
                doc,
                at(&rpath, "derivePort"),
                format!("unknown derivePort {other:?} (FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT)"),
            );
            return None;
        }
        (None, None) => None,
    };
    let status = r.redirect_code.unwrap_or(301);
    if !matches!(status, 301 | 302 | 303 | 307 | 308) {
        diag.error(
            doc,
            at(&rpath, "redirectCode"),
            format!("redirect code {status} is not a redirect (301, 302, 303, 307 or 308)"),
        );
        return None;
    }
    Some(RouteAction::Redirect(Redirect {
        path: r.uri.clone(),
        replace_prefix: None,
        authority: r.authority.clone(),
        scheme: r.scheme.clone(),
        port,
        status,
    }))
}

fn direct_response(
    doc: &Document,
    path: &str,
    d: &super::types::HttpDirectResponse,
    diag: &mut Diag,
) -> Option<RouteAction> {
    let dpath = at(path, "directResponse");
    if !(100..=599).contains(&d.status) {
        diag.error(
            doc,
            at(&dpath, "status"),
            format!("status {} is not an HTTP status", d.status),
        );
        return None;
    }
    let body = match d.body.as_ref().map(|b| (&b.string, &b.bytes)) {
        None | Some((None, None)) => Bytes::new(),
        Some((Some(s), None)) => Bytes::from(s.clone()),
        Some((None, Some(b))) => match base64::engine::general_purpose::STANDARD.decode(b.trim()) {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                diag.error(doc, at(&dpath, "body.bytes"), format!("invalid base64: {e}"));
                return None;
            }
        },
        Some((Some(_), Some(_))) => {
            diag.error(doc, at(&dpath, "body"), "string and bytes are mutually exclusive");
            return None;
        }
    };
    Some(RouteAction::DirectResponse(DirectResponse { status: d.status, body }))
}
