//! HTTPRoute rules → snapshot [`Route`]s, one per match, each with its precedence key.
//!
//! A route is compiled once (validating it and creating its clusters); `super::listeners`
//! then copies its routes onto every virtual host it serves and orders them by [`Key`].

use std::cmp::Reverse;
use std::time::Duration;

use bytes::Bytes;

use super::types::{
    CorsFilter, HeaderFilter, HttpBackendRef, HttpRouteFilter, HttpRouteMatch, HttpRouteRetry, HttpRouteRule,
    HttpRouteSpec, PathModifier, RedirectFilter, UrlRewriteFilter,
};
use super::{BackendRef, Ctx};
use crate::diag::{Res, at};
use crate::matcher::{HeaderMatch, PathMatch, QueryMatch, StringMatch};
use crate::snapshot::{
    CorsPolicy, DirectResponse, Forward, HeaderOps, Mirror, PathRewrite, Redirect, RedirectPort, RequestMatch, RetryOn,
    RetryPolicy, Rewrite, Route, RouteAction, WeightedDestination,
};
use crate::source::Document;

/// Gateway API precedence of one route match; smaller sorts first (wins).
///
/// Exact path, then the longest prefix, then regular expressions; then a method match, more
/// header matches, more query parameter matches; then the oldest route (creationTimestamp when
/// present, else document order), `namespace/name`; then rule and match order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    path_rank: u8,
    path_len: Reverse<usize>,
    method: Reverse<bool>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    /// `(0, timestamp, 0)` with a creationTimestamp, else `(1, "", document order)`.
    age: (u8, String, usize),
    namespaced_name: String,
    rule: usize,
    index: usize,
}

impl Key {
    /// The index of the rule in `spec.rules`.
    pub(crate) fn rule(&self) -> usize {
        self.rule
    }

    /// The index of the match within its rule.
    pub(crate) fn match_index(&self) -> usize {
        self.index
    }
}

pub(crate) struct Entry {
    pub key: Key,
    pub route: Route,
}

pub(crate) struct CompiledHttpRoute<'a> {
    pub doc: &'a Document,
    /// Lower-cased `spec.hostnames`.
    pub hostnames: Vec<String>,
    pub entries: Vec<Entry>,
}

pub(crate) fn compile_all<'a>(ctx: &mut Ctx<'_, 'a, '_>) -> Vec<CompiledHttpRoute<'a>> {
    let res = ctx.res;
    res.routes
        .iter()
        .enumerate()
        .map(|(seq, r)| compile_route(ctx, seq, r))
        .collect()
}

fn compile_route<'a>(ctx: &mut Ctx<'_, 'a, '_>, seq: usize, r: &Res<'a, HttpRouteSpec>) -> CompiledHttpRoute<'a> {
    let (doc, spec) = (r.doc, &r.spec);
    let mut hostnames = Vec::new();
    for (i, h) in spec.hostnames.iter().enumerate() {
        let h = h.to_ascii_lowercase();
        match super::listeners::check_hostname(&h) {
            Ok(()) => hostnames.push(h),
            Err(e) => ctx.diag.error(doc, format!("spec.hostnames[{i}]"), e),
        }
    }
    let age = super::creation_order(doc, seq);
    let mut entries = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        compile_rule(ctx, doc, i, rule, &age, &mut entries);
    }
    CompiledHttpRoute {
        doc,
        hostnames,
        entries,
    }
}

/// The filters of a rule (or of a backendRef), validated.
#[derive(Default)]
struct Filters<'f> {
    request_headers: HeaderOps,
    response_headers: HeaderOps,
    redirect: Option<(String, &'f RedirectFilter)>,
    rewrite: Option<(String, &'f UrlRewriteFilter)>,
    mirrors: Vec<Mirror>,
    cors: Option<CorsPolicy>,
    /// An extension filter meshgate cannot run: the Gateway API requires HTTP 500.
    unresolved: bool,
}

fn compile_rule(
    ctx: &mut Ctx<'_, '_, '_>,
    doc: &Document,
    i: usize,
    rule: &HttpRouteRule,
    age: &(u8, String, usize),
    entries: &mut Vec<Entry>,
) {
    let path = format!("spec.rules[{i}]");
    let name = match rule.name.as_deref().filter(|n| !n.is_empty()) {
        Some(n) => format!("{}/{}.{n}", doc.namespace, doc.name),
        None => format!("{}/{}[{i}]", doc.namespace, doc.name),
    };
    let mut ok = true;
    let mut filters = compile_filters(ctx, doc, &path, &rule.filters, true, &mut ok);
    let backend_refs = rule.backend_refs.as_deref().unwrap_or(&[]);
    if filters.redirect.is_some() && !backend_refs.is_empty() {
        ctx.diag.error(
            doc,
            at(&path, "backendRefs"),
            "a rule with a RequestRedirect filter must not have backendRefs",
        );
        ok = false;
    }
    // The filters of a lone backend apply to every request of the rule, so they are lifted
    // to the rule; with several backends only header modifiers are implemented per backend.
    let single = backend_refs.len() == 1;
    let mut backend_filters: Vec<Filters<'_>> = backend_refs
        .iter()
        .enumerate()
        .map(|(k, b)| {
            compile_filters(
                ctx,
                doc,
                &format!("{path}.backendRefs[{k}]"),
                &b.filters,
                single,
                &mut ok,
            )
        })
        .collect();
    if let Some(bf) = backend_filters.first_mut().filter(|_| single) {
        let bpath = format!("{path}.backendRefs[0].filters");
        let twice = |what: &str, ctx: &mut Ctx<'_, '_, '_>| {
            ctx.diag.error(
                doc,
                bpath.clone(),
                format!("{what} is set both on the rule and on its backendRef"),
            );
            false
        };
        if bf.redirect.is_some() {
            ok &= filters.redirect.is_none() || twice("RequestRedirect", ctx);
            filters.redirect = bf.redirect.take();
        }
        if bf.rewrite.is_some() {
            ok &= filters.rewrite.is_none() || twice("URLRewrite", ctx);
            filters.rewrite = bf.rewrite.take();
        }
        if bf.cors.is_some() {
            ok &= filters.cors.is_none() || twice("CORS", ctx);
            filters.cors = bf.cors.take();
        }
        filters.mirrors.append(&mut bf.mirrors);
        filters.unresolved |= bf.unresolved;
    }
    if filters.redirect.is_some() && filters.rewrite.is_some() {
        ctx.diag.error(
            doc,
            at(&path, "filters"),
            "RequestRedirect and URLRewrite cannot be used together",
        );
        ok = false;
    }

    // Matches: each becomes its own route so that precedence applies per match.
    let default_match = [HttpRouteMatch::default()];
    let matches: &[HttpRouteMatch] = if rule.matches.is_empty() {
        &default_match
    } else {
        &rule.matches
    };
    let mut compiled = Vec::new();
    for (j, m) in matches.iter().enumerate() {
        let mpath = format!("{path}.matches[{j}]");
        if let Some(c) = compile_match(ctx, doc, &mpath, m) {
            compiled.push(c);
        } else {
            ok = false;
        }
    }
    let prefix_only = |what: &str, modifier: Option<&PathModifier>, fpath: &str, ctx: &mut Ctx<'_, '_, '_>| {
        if modifier.is_some_and(|p| p.kind == "ReplacePrefixMatch")
            && compiled
                .iter()
                .any(|(_, parts): &(RequestMatch, MatchParts)| parts.path_rank != 1)
        {
            ctx.diag.error(
                doc,
                at(fpath, "path"),
                format!("{what} ReplacePrefixMatch needs PathPrefix matches"),
            );
            false
        } else {
            true
        }
    };
    if let Some((fpath, r)) = &filters.redirect {
        ok &= prefix_only("requestRedirect", r.path.as_ref(), fpath, ctx);
    }
    if let Some((fpath, r)) = &filters.rewrite {
        ok &= prefix_only("urlRewrite", r.path.as_ref(), fpath, ctx);
    }

    let action = if filters.unresolved {
        Some(status_500())
    } else if let Some((fpath, r)) = &filters.redirect {
        redirect(ctx, doc, fpath, r)
    } else {
        forward(
            ctx,
            doc,
            &path,
            rule,
            backend_refs,
            backend_filters,
            filters.rewrite.as_ref(),
        )
    };
    let (Some(action), true) = (action, ok) else {
        return;
    };
    for (j, (rm, parts)) in compiled.into_iter().enumerate() {
        entries.push(Entry {
            key: Key {
                path_rank: parts.path_rank,
                path_len: Reverse(parts.path_len),
                method: Reverse(rm.method.is_some()),
                headers: Reverse(rm.headers.len()),
                query: Reverse(rm.query.len()),
                age: age.clone(),
                namespaced_name: format!("{}/{}", doc.namespace, doc.name),
                rule: i,
                index: j,
            },
            route: Route {
                name: name.clone(),
                matches: vec![rm],
                action: action.clone(),
                request_headers: filters.request_headers.clone(),
                response_headers: filters.response_headers.clone(),
                mirrors: filters.mirrors.clone(),
                cors: filters.cors.clone(),
                plugins: None,
            },
        });
    }
}

fn status_500() -> RouteAction {
    RouteAction::DirectResponse(DirectResponse {
        status: 500,
        body: Bytes::new(),
    })
}

struct MatchParts {
    /// 0 exact, 1 prefix, 2 regex.
    path_rank: u8,
    path_len: usize,
}

fn compile_match(
    ctx: &mut Ctx<'_, '_, '_>,
    doc: &Document,
    mpath: &str,
    m: &HttpRouteMatch,
) -> Option<(RequestMatch, MatchParts)> {
    let mut ok = true;
    let mut rm = RequestMatch::default();
    let kind = m.path.as_ref().and_then(|p| p.kind.as_deref()).unwrap_or("PathPrefix");
    let value = m.path.as_ref().and_then(|p| p.value.as_deref()).unwrap_or("/");
    let ppath = at(mpath, "path");
    let mut parts = MatchParts {
        path_rank: 1,
        path_len: 0,
    };
    match kind {
        "Exact" | "PathPrefix" if !value.starts_with('/') => {
            ctx.diag.error(doc, at(&ppath, "value"), "path must start with /");
            ok = false;
        }
        "Exact" => {
            parts = MatchParts {
                path_rank: 0,
                path_len: value.len(),
            };
            rm.path = Some(PathMatch {
                matcher: StringMatch::Exact(value.to_string()),
                ignore_case: false,
                segment_prefix: false,
            });
        }
        "PathPrefix" => {
            // `/foo/` and `/foo` are the same prefix: matching is per path segment.
            let trimmed = value.trim_end_matches('/');
            let prefix = if trimmed.is_empty() { "/" } else { trimmed };
            parts.path_len = prefix.len();
            rm.path = Some(PathMatch {
                matcher: StringMatch::Prefix(prefix.to_string()),
                ignore_case: false,
                segment_prefix: true,
            });
        }
        "RegularExpression" => match StringMatch::regex(value) {
            Ok(matcher) => {
                parts = MatchParts {
                    path_rank: 2,
                    path_len: 0,
                };
                rm.path = Some(PathMatch {
                    matcher,
                    ignore_case: false,
                    segment_prefix: false,
                });
            }
            Err(e) => {
                ctx.diag
                    .error(doc, at(&ppath, "value"), format!("invalid regex {value:?}: {e}"));
                ok = false;
            }
        },
        other => {
            ctx.diag.error(
                doc,
                at(&ppath, "type"),
                format!("unknown path match type {other:?} (Exact, PathPrefix or RegularExpression)"),
            );
            ok = false;
        }
    }
    for (field, list, is_header) in [("headers", &m.headers, true), ("queryParams", &m.query_params, false)] {
        let mut names: Vec<String> = Vec::new();
        for (k, v) in list.iter().enumerate() {
            let vpath = format!("{mpath}.{field}[{k}]");
            let name = if is_header {
                v.name.to_ascii_lowercase()
            } else {
                v.name.clone()
            };
            if names.contains(&name) {
                ctx.diag.warn(
                    doc,
                    at(&vpath, "name"),
                    format!("{} is matched by an earlier entry; only the first one applies", v.name),
                );
                continue;
            }
            names.push(name.clone());
            let matcher = match v.kind.as_deref().unwrap_or("Exact") {
                "Exact" => StringMatch::Exact(v.value.clone()),
                "RegularExpression" => match StringMatch::regex(&v.value) {
                    Ok(m) => m,
                    Err(e) => {
                        ctx.diag
                            .error(doc, at(&vpath, "value"), format!("invalid regex {:?}: {e}", v.value));
                        ok = false;
                        continue;
                    }
                },
                other => {
                    ctx.diag.error(
                        doc,
                        at(&vpath, "type"),
                        format!("unknown match type {other:?} (Exact or RegularExpression)"),
                    );
                    ok = false;
                    continue;
                }
            };
            if is_header {
                rm.headers.push(HeaderMatch {
                    name,
                    matcher: Some(matcher),
                    invert: false,
                });
            } else {
                rm.query.push(QueryMatch {
                    name,
                    matcher: Some(matcher),
                });
            }
        }
    }
    if let Some(method) = &m.method {
        const METHODS: &[&str] = &[
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        if METHODS.contains(&method.as_str()) {
            rm.method = Some(StringMatch::Exact(method.clone()));
        } else {
            ctx.diag.error(
                doc,
                at(mpath, "method"),
                format!("unknown method {method:?} ({})", METHODS.join(", ")),
            );
            ok = false;
        }
    }
    if let Some(rank) = m.grpc_method_rank {
        // GRPCRoute precedence: more characters of service, then of method, then headers.
        parts = MatchParts {
            path_rank: 0,
            path_len: rank,
        };
    }
    ok.then_some((rm, parts))
}

/// Validates filters. `rule_level`: all filter types are implemented (rule filters, or those
/// of a rule's only backendRef); otherwise only header modifiers are (backendRef filters).
fn compile_filters<'f>(
    ctx: &mut Ctx<'_, '_, '_>,
    doc: &Document,
    base: &str,
    list: &'f [HttpRouteFilter],
    rule_level: bool,
    ok: &mut bool,
) -> Filters<'f> {
    let mut out = Filters::default();
    let mut seen: Vec<&str> = Vec::new();
    for (k, f) in list.iter().enumerate() {
        let fpath = format!("{base}.filters[{k}]");
        let configs = [
            (
                "RequestHeaderModifier",
                "requestHeaderModifier",
                f.request_header_modifier.is_some(),
            ),
            (
                "ResponseHeaderModifier",
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestMirror", "requestMirror", f.request_mirror.is_some()),
            ("RequestRedirect", "requestRedirect", f.request_redirect.is_some()),
            ("URLRewrite", "urlRewrite", f.url_rewrite.is_some()),
            ("CORS", "cors", f.cors.is_some()),
            ("ExtensionRef", "extensionRef", f.extension_ref.is_some()),
            ("ExternalAuth", "externalAuth", f.external_auth.is_some()),
        ];
        let Some((_, field, present)) = configs.iter().find(|(t, _, _)| *t == f.kind) else {
            let known: Vec<&str> = configs.iter().map(|(t, _, _)| *t).collect();
            ctx.diag.error(
                doc,
                at(&fpath, "type"),
                format!("unknown filter type {:?} ({})", f.kind, known.join(", ")),
            );
            *ok = false;
            continue;
        };
        if !present {
            ctx.diag.error(
                doc,
                at(&fpath, field),
                format!("{field} is required with type {}", f.kind),
            );
            *ok = false;
            continue;
        }
        if let Some((_, other, _)) = configs.iter().find(|(t, _, p)| *p && *t != f.kind) {
            ctx.diag.error(
                doc,
                at(&fpath, other),
                format!("{other} must not be set with type {}", f.kind),
            );
            *ok = false;
            continue;
        }
        if !matches!(f.kind.as_str(), "RequestMirror" | "ExtensionRef") {
            if seen.contains(&f.kind.as_str()) {
                ctx.diag.error(
                    doc,
                    at(&fpath, "type"),
                    format!("filter {} may appear only once", f.kind),
                );
                *ok = false;
                continue;
            }
            seen.push(f.kind.as_str());
        }
        let implemented_here =
            rule_level || matches!(f.kind.as_str(), "RequestHeaderModifier" | "ResponseHeaderModifier");
        if !implemented_here {
            ctx.diag.warn(
                doc,
                fpath.clone(),
                format!("{} filters on backendRefs are not supported yet, ignored", f.kind),
            );
            continue;
        }
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                if let Some(h) = &f.request_header_modifier {
                    out.request_headers = header_ops(h);
                }
            }
            "ResponseHeaderModifier" => {
                if let Some(h) = &f.response_header_modifier {
                    out.response_headers = header_ops(h);
                }
            }
            "RequestRedirect" => out.redirect = f.request_redirect.as_ref().map(|r| (fpath.clone(), r)),
            "URLRewrite" => out.rewrite = f.url_rewrite.as_ref().map(|r| (fpath.clone(), r)),
            "CORS" => out.cors = f.cors.as_ref().map(cors_policy),
            "RequestMirror" => {
                let Some(m) = &f.request_mirror else { continue };
                let mpath = at(&fpath, "requestMirror");
                let fraction = match (&m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        ctx.diag
                            .error(doc, mpath.clone(), "percent and fraction are mutually exclusive");
                        *ok = false;
                        continue;
                    }
                    (Some(p), None) if *p <= 100 => (*p, 100),
                    (None, Some(fr))
                        if fr.denominator.unwrap_or(100) > 0 && fr.numerator <= fr.denominator.unwrap_or(100) =>
                    {
                        (fr.numerator, fr.denominator.unwrap_or(100))
                    }
                    (None, None) => (1, 1),
                    _ => {
                        ctx.diag.error(
                            doc,
                            mpath.clone(),
                            "the mirrored share must be between 0 and 100% (percent <= 100, 0 < denominator, numerator <= denominator)",
                        );
                        *ok = false;
                        continue;
                    }
                };
                let b = &m.backend_ref;
                let r = BackendRef {
                    group: b.group.as_deref(),
                    kind: b.kind.as_deref(),
                    name: &b.name,
                    namespace: b.namespace.as_deref(),
                    port: b.port,
                };
                let bpath = at(&mpath, "backendRef");
                match ctx.backend(doc, &bpath, &r) {
                    Ok(cluster) => out.mirrors.push(Mirror { cluster, fraction }),
                    Err(reason) => ctx
                        .diag
                        .warn(doc, bpath, format!("{reason}; requests are not mirrored")),
                }
            }
            _ => {
                ctx.diag.warn(
                    doc,
                    fpath.clone(),
                    format!(
                        "{} filters are not supported: requests matching this rule get HTTP 500, as the Gateway API requires for filters that cannot be applied",
                        f.kind
                    ),
                );
                out.unresolved = true;
            }
        }
    }
    out
}

fn header_ops(h: &HeaderFilter) -> HeaderOps {
    HeaderOps {
        remove: h.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        set: h
            .set
            .iter()
            .map(|v| (v.name.to_ascii_lowercase(), v.value.clone()))
            .collect(),
        add: h
            .add
            .iter()
            .map(|v| (v.name.to_ascii_lowercase(), v.value.clone()))
            .collect(),
    }
}

fn cors_policy(c: &CorsFilter) -> CorsPolicy {
    CorsPolicy {
        allow_origins: c.allow_origins.clone(),
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        expose_headers: c.expose_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        max_age: Some(c.max_age.unwrap_or(5)),
        origin_matches: Vec::new(),
        forward_unmatched_preflights: false,
    }
}

fn path_modifier(ctx: &mut Ctx<'_, '_, '_>, doc: &Document, fpath: &str, p: &PathModifier) -> Option<(bool, String)> {
    let ppath = at(fpath, "path");
    match (p.kind.as_str(), &p.replace_full_path, &p.replace_prefix_match) {
        ("ReplaceFullPath", Some(v), None) => Some((true, v.clone())),
        ("ReplacePrefixMatch", None, Some(v)) => Some((false, v.clone())),
        ("ReplaceFullPath" | "ReplacePrefixMatch", _, _) => {
            ctx.diag.error(
                doc,
                ppath,
                format!(
                    "type {} needs exactly its own field (replaceFullPath or replacePrefixMatch)",
                    p.kind
                ),
            );
            None
        }
        (other, _, _) => {
            ctx.diag.error(
                doc,
                at(&ppath, "type"),
                format!("unknown path modifier {other:?} (ReplaceFullPath or ReplacePrefixMatch)"),
            );
            None
        }
    }
}

fn redirect(ctx: &mut Ctx<'_, '_, '_>, doc: &Document, fpath: &str, r: &RedirectFilter) -> Option<RouteAction> {
    let rpath = at(fpath, "requestRedirect");
    let status = r.status_code.unwrap_or(302);
    if !matches!(status, 301 | 302 | 303 | 307 | 308) {
        ctx.diag.error(
            doc,
            at(&rpath, "statusCode"),
            format!("status code {status} is not a redirect (301, 302, 303, 307 or 308)"),
        );
        return None;
    }
    if let Some(s) = &r.scheme
        && !matches!(s.as_str(), "http" | "https")
    {
        ctx.diag.error(
            doc,
            at(&rpath, "scheme"),
            format!("unknown scheme {s:?} (http or https)"),
        );
        return None;
    }
    // No port: the scheme's well-known port when the scheme changes, else the listener's.
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(RedirectPort::Fixed(p)),
        (None, Some(_)) => None,
        (None, None) => Some(RedirectPort::FromRequestPort),
    };
    let (path, replace_prefix) = match &r.path {
        None => (None, None),
        Some(p) => match path_modifier(ctx, doc, &rpath, p)? {
            (true, v) => (Some(v), None),
            (false, v) => (None, Some(v)),
        },
    };
    Some(RouteAction::Redirect(Redirect {
        path,
        replace_prefix,
        authority: r.hostname.clone(),
        scheme: r.scheme.clone(),
        port,
        status,
    }))
}

fn timeout(
    ctx: &mut Ctx<'_, '_, '_>,
    doc: &Document,
    field: String,
    value: Option<&str>,
) -> Result<Option<Duration>, ()> {
    match value.map(crate::duration::parse) {
        None => Ok(None),
        // A zero timeout disables it.
        Some(Ok(d)) if d.is_zero() => Ok(None),
        Some(Ok(d)) => Ok(Some(d)),
        Some(Err(e)) => {
            ctx.diag.error(doc, field, e);
            Err(())
        }
    }
}

/// Retries after the first try when `retry` gives no `attempts` (the spec leaves it to the
/// implementation; Istio and Envoy Gateway use 2).
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// A rule's `retry` (GEP-1731) → [`RetryPolicy`]. `codes` are retriable statuses; failures
/// without a response (connection refused or reset, and a `backendRequest` timeout) are always
/// retried, as the conformance tests expect; `attempts` counts retries after the first try;
/// `backoff` is the base of Envoy's jittered exponential backoff. No `retry`: no retries.
fn retry_policy(
    ctx: &mut Ctx<'_, '_, '_>,
    doc: &Document,
    rule_path: &str,
    retry: Option<&HttpRouteRetry>,
) -> Result<Option<RetryPolicy>, ()> {
    let Some(retry) = retry else { return Ok(None) };
    let path = at(rule_path, "retry");
    let mut ok = true;
    let mut codes = Vec::new();
    for (i, &code) in retry.codes.iter().enumerate() {
        match u16::try_from(code) {
            Ok(c) if (400..=599).contains(&c) => {
                if !codes.contains(&c) {
                    codes.push(c);
                }
            }
            _ => {
                ctx.diag.error(
                    doc,
                    format!("{path}.codes[{i}]"),
                    format!("status code {code} is not between 400 and 599"),
                );
                ok = false;
            }
        }
    }
    let num_retries = match retry.attempts {
        None => DEFAULT_RETRY_ATTEMPTS,
        Some(n) => u32::try_from(n).unwrap_or_else(|_| {
            ctx.diag.error(
                doc,
                at(&path, "attempts"),
                format!("attempts must be between 0 and {}, found {n}", u32::MAX),
            );
            ok = false;
            0
        }),
    };
    let backoff_base = match retry.backoff.as_deref().map(crate::duration::parse) {
        None => RetryPolicy::DEFAULT_BACKOFF_BASE,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            ctx.diag.error(doc, at(&path, "backoff"), e);
            ok = false;
            Duration::ZERO
        }
    };
    if !ok {
        return Err(());
    }
    Ok((num_retries > 0).then(|| RetryPolicy {
        num_retries,
        per_try_timeout: None,
        retry_on: RetryOn::CONNECT_FAILURE | RetryOn::RESET | RetryOn::REFUSED_STREAM | RetryOn::RETRIABLE_STATUS_CODES,
        retriable_status_codes: codes,
        backoff_base,
        backoff_max: backoff_base.saturating_mul(10),
        avoid_previous_hosts: true,
        // Gateway API implementations (Envoy Gateway among them) set no retry budget unless a
        // policy asks for one; its conformance suite sends concurrent retried requests.
        budget: None,
    }))
}

fn forward(
    ctx: &mut Ctx<'_, '_, '_>,
    doc: &Document,
    path: &str,
    rule: &HttpRouteRule,
    refs: &[HttpBackendRef],
    backend_filters: Vec<Filters<'_>>,
    rewrite: Option<&(String, &UrlRewriteFilter)>,
) -> Option<RouteAction> {
    let mut ok = true;
    let t = rule.timeouts.as_ref();
    let tpath = at(path, "timeouts");
    let request_timeout = timeout(ctx, doc, at(&tpath, "request"), t.and_then(|t| t.request.as_deref()));
    let backend_timeout = timeout(
        ctx,
        doc,
        at(&tpath, "backendRequest"),
        t.and_then(|t| t.backend_request.as_deref()),
    );
    let retry = retry_policy(ctx, doc, path, rule.retry.as_ref());
    let (Ok(request_timeout), Ok(backend_timeout), Ok(retry)) = (request_timeout, backend_timeout, retry) else {
        return None;
    };
    if let (Some(r), Some(b)) = (request_timeout, backend_timeout)
        && b > r
    {
        ctx.diag.error(
            doc,
            at(&tpath, "backendRequest"),
            "backendRequest must not be longer than request",
        );
        return None;
    }
    let rewrite = match rewrite {
        None => None,
        Some((fpath, r)) => {
            let rpath = at(fpath, "urlRewrite");
            let path = match &r.path {
                None => None,
                Some(p) => match path_modifier(ctx, doc, &rpath, p) {
                    Some((true, v)) => Some(PathRewrite::Full(v)),
                    Some((false, v)) => Some(PathRewrite::ReplaceMatched(v)),
                    None => {
                        ok = false;
                        None
                    }
                },
            };
            Some(Rewrite {
                path,
                authority: r.hostname.clone(),
            })
        }
    };
    let mut destinations = Vec::new();
    for (k, (b, filters)) in refs.iter().zip(backend_filters).enumerate() {
        let bpath = format!("{path}.backendRefs[{k}]");
        let weight = b.weight.unwrap_or(1);
        if weight > 1_000_000 {
            ctx.diag
                .error(doc, at(&bpath, "weight"), format!("weight {weight} is above 1000000"));
            ok = false;
            continue;
        }
        let r = BackendRef {
            group: b.group.as_deref(),
            kind: b.kind.as_deref(),
            name: &b.name,
            namespace: b.namespace.as_deref(),
            port: b.port,
        };
        let (cluster, invalid) = match ctx.backend(doc, &bpath, &r) {
            Ok(c) => (c, false),
            Err(reason) => {
                ctx.diag.warn(
                    doc,
                    bpath.clone(),
                    format!("invalid backend: {reason}; requests sent to it get HTTP 500"),
                );
                (ctx.invalid_cluster(), true)
            }
        };
        destinations.push(WeightedDestination {
            cluster,
            weight,
            invalid,
            request_headers: filters.request_headers,
            response_headers: filters.response_headers,
        });
    }
    // Each weight is at most 1000000, but their sum must fit the u32 the data plane draws
    // from (the API's 16-backendRefs limit is not checked; 4295 of them would overflow it).
    let sum: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    let total_weight = u32::try_from(sum).unwrap_or_else(|_| {
        ctx.diag.error(
            doc,
            at(path, "backendRefs"),
            format!("the weights sum to {sum}, above {}", u32::MAX),
        );
        ok = false;
        0
    });
    if !ok {
        return None;
    }
    // No backends, all weights zero, or only invalid backends: every request gets 500.
    if destinations.iter().all(|d| d.invalid || d.weight == 0) {
        return Some(status_500());
    }
    Some(RouteAction::Forward(Forward {
        fault: None,
        destinations,
        total_weight,
        rewrite,
        timeout: request_timeout,
        backend_timeout,
        retry,
    }))
}
