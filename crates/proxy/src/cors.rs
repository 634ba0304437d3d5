//! CORS (Gateway API `CORS` filter, Istio `corsPolicy`, Kong's `cors` plugin): preflights
//! answered by the proxy, response headers added for allowed origins. A disallowed origin gets
//! no CORS header, so the browser blocks it; with Istio, its preflight goes to the upstream.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use meshgate_model::snapshot::CorsPolicy;

use crate::body::{self, ResponseBody};

/// True when `origin` (`scheme://host[:port]`) is allowed by the policy.
pub fn origin_allowed(policy: &CorsPolicy, origin: &str) -> bool {
    // As Envoy: a matcher that matches the literal `*` (Istio's usual `exact: "*"`) allows
    // every origin.
    if policy
        .origin_matches
        .iter()
        .any(|m| m.matches("*") || m.matches(origin))
    {
        return true;
    }
    policy.allow_origins.iter().any(|allowed| {
        if allowed == "*" {
            return true;
        }
        let (Some((a_scheme, a_rest)), Some((o_scheme, o_rest))) =
            (allowed.split_once("://"), origin.split_once("://"))
        else {
            return false;
        };
        if !a_scheme.eq_ignore_ascii_case(o_scheme) {
            return false;
        }
        match a_rest.strip_prefix("*.") {
            Some(suffix) => {
                let (o_host, o_port) = split_port(o_rest);
                let (s_host, s_port) = split_port(suffix);
                o_port == s_port
                    && o_host.len() > s_host.len() + 1
                    && o_host
                        .to_ascii_lowercase()
                        .ends_with(&format!(".{}", s_host.to_ascii_lowercase()))
            }
            None => a_rest.eq_ignore_ascii_case(o_rest),
        }
    })
}

fn split_port(hostport: &str) -> (&str, Option<&str>) {
    match hostport.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (hostport, None),
    }
}

/// The proxy's answer to a preflight request, or `None` when `req` is not a preflight.
pub fn preflight<B>(policy: &CorsPolicy, req: &Request<B>) -> Option<Response<ResponseBody>> {
    let origin = req.headers().get(header::ORIGIN)?;
    let requested_method = req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    if req.method() != Method::OPTIONS {
        return None;
    }
    let allowed = origin.to_str().is_ok_and(|o| origin_allowed(policy, o));
    if !allowed && policy.forward_unmatched_preflights {
        // Istio's `unmatchedPreflights: FORWARD`: the upstream answers it.
        return None;
    }
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::OK;
    if !allowed {
        return Some(resp);
    }
    let headers = resp.headers_mut();
    allow_origin(policy, origin, headers);
    let any_method = policy.allow_methods.iter().any(|m| m == "*");
    let methods = if any_method {
        if policy.allow_credentials {
            requested_method.to_str().unwrap_or("").to_string()
        } else {
            "*".to_string()
        }
    } else {
        policy.allow_methods.join(", ")
    };
    if !methods.is_empty() {
        insert(headers, header::ACCESS_CONTROL_ALLOW_METHODS, &methods);
    }
    let any_header = policy.allow_headers.iter().any(|h| h == "*");
    let requested_headers = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let allow_headers = if any_header {
        if policy.allow_credentials {
            requested_headers.to_string()
        } else {
            "*".to_string()
        }
    } else {
        policy.allow_headers.join(", ")
    };
    if !allow_headers.is_empty() {
        insert(headers, header::ACCESS_CONTROL_ALLOW_HEADERS, &allow_headers);
    }
    if let Some(max_age) = policy.max_age {
        insert(headers, header::ACCESS_CONTROL_MAX_AGE, &max_age.to_string());
    }
    // Gateway API's CORS filter also lists the exposed headers on the preflight answer (its
    // conformance suite checks it); browsers ignore the header there, so it costs nothing.
    insert_expose_headers(policy, headers);
    Some(resp)
}

/// Adds the CORS response headers for an allowed origin to a (non-preflight) response.
pub fn decorate(policy: &CorsPolicy, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    let Some(origin) = origin else { return };
    if !origin.to_str().is_ok_and(|o| origin_allowed(policy, o)) {
        return;
    }
    allow_origin(policy, origin, headers);
    insert_expose_headers(policy, headers);
}

fn insert_expose_headers(policy: &CorsPolicy, headers: &mut HeaderMap) {
    if !policy.expose_headers.is_empty() {
        insert(
            headers,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            &policy.expose_headers.join(", "),
        );
    }
}

fn allow_origin(policy: &CorsPolicy, origin: &HeaderValue, headers: &mut HeaderMap) {
    let wildcard = policy.allow_origins.iter().any(|o| o == "*") && !policy.allow_credentials;
    if wildcard {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    } else {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    if policy.allow_credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

fn insert(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str]) -> CorsPolicy {
        CorsPolicy {
            allow_origins: origins.iter().map(|s| s.to_string()).collect(),
            max_age: Some(5),
            ..Default::default()
        }
    }

    #[test]
    fn origins_match_exactly_or_by_wildcard_subdomain() {
        let p = policy(&["https://www.foo.com", "https://*.bar.com:8443"]);
        assert!(origin_allowed(&p, "https://www.foo.com"));
        assert!(!origin_allowed(&p, "http://www.foo.com"));
        assert!(origin_allowed(&p, "https://a.b.bar.com:8443"));
        assert!(!origin_allowed(&p, "https://bar.com:8443"));
        assert!(!origin_allowed(&p, "https://a.bar.com"));
        assert!(origin_allowed(&policy(&["*"]), "https://anything.example"));
    }

    #[test]
    fn an_istio_matcher_of_the_literal_star_allows_every_origin() {
        let mut p = policy(&[]);
        p.origin_matches = vec![meshgate_model::matcher::StringMatch::Exact("*".to_string())];
        assert!(origin_allowed(&p, "https://anything.example"));
        p.origin_matches = vec![meshgate_model::matcher::StringMatch::Exact(
            "https://a.example".to_string(),
        )];
        assert!(origin_allowed(&p, "https://a.example"));
        assert!(!origin_allowed(&p, "https://b.example"));
    }
}
