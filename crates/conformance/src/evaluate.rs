//! Judging one attempt, a port of the Go suite's `CompareRoundTrip` (README §7).

use serde_json::Value;

use crate::client::Received;
use crate::suite::Expect;

/// The URL a request was sent to, for resolving a relative `Location`.
pub struct RequestUrl<'a> {
    pub scheme: &'a str,
    /// Host header value, possibly with a port.
    pub host: &'a str,
    pub path: &'a str,
}

/// `Ok` when the attempt passes; otherwise what differed.
pub fn check(expect: &Expect, method: &str, url: &RequestUrl, got: &Received) -> Result<(), String> {
    let status = got.status.as_u16();
    let timeout_codes = [408, 504];
    if timeout_codes.contains(&status) && expect.status_any_of.iter().any(|s| timeout_codes.contains(s)) {
        return Ok(());
    }
    if !expect.status_any_of.contains(&status) {
        return Err(format!(
            "status {status}, want one of {:?}; body: {}",
            expect.status_any_of,
            excerpt(&got.body)
        ));
    }
    if status == 200 || status == 204 {
        return check_echo(expect, method, got);
    }
    if is_redirect(status)
        && let Some(want) = &expect.redirect
    {
        return check_redirect(want, url, got);
    }
    Ok(())
}

fn check_echo(expect: &Expect, method: &str, got: &Received) -> Result<(), String> {
    let is_json = got
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/json");
    let echo: Value = if is_json {
        serde_json::from_slice(&got.body).map_err(|e| format!("echo body is not JSON: {e}"))?
    } else {
        serde_json::json!({"method": method})
    };
    let field = |name: &str| echo.get(name).and_then(Value::as_str).unwrap_or("").to_string();
    let want_path = expect.path_seen_by_backend.as_deref().unwrap_or("");
    if field("path") != want_path {
        return Err(format!("backend saw path {:?}, want {want_path:?}", field("path")));
    }
    let want_namespace = expect.namespace.as_deref().unwrap_or("");
    if field("namespace") != want_namespace {
        return Err(format!(
            "backend namespace {:?}, want {want_namespace:?}",
            field("namespace")
        ));
    }
    let want_method = expect.method_seen_by_backend.as_deref().unwrap_or("");
    if field("method") != want_method {
        return Err(format!(
            "backend saw method {:?}, want {want_method:?}",
            field("method")
        ));
    }
    if let Some(host) = &expect.host_seen_by_backend
        && &field("host") != host
    {
        return Err(format!("backend saw host {:?}, want {host:?}", field("host")));
    }
    let echoed_header = |name: &str| -> Option<String> {
        let headers = echo.get("headers")?.as_object()?;
        let (_, values) = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))?;
        let values: Vec<&str> = values.as_array()?.iter().filter_map(Value::as_str).collect();
        Some(values.join(","))
    };
    for (name, want) in &expect.request_headers_seen_by_backend {
        match echoed_header(name) {
            Some(value) if &value == want => {}
            Some(value) => return Err(format!("backend saw {name}: {value:?}, want {want:?}")),
            None => return Err(format!("backend did not see header {name}, want {want:?}")),
        }
    }
    let normalise = |v: &str| {
        if expect.ignore_whitespace_in_response_headers {
            v.replace(' ', "")
        } else {
            v.to_string()
        }
    };
    for (name, allowed) in &expect.response_headers_any_of {
        let value = response_header(got, name).ok_or_else(|| format!("response lacks header {name}"))?;
        if !allowed.iter().any(|a| normalise(a) == normalise(&value)) {
            return Err(format!("response {name}: {value:?}, want one of {allowed:?}"));
        }
    }
    for (name, want) in &expect.response_headers {
        let value = response_header(got, name).ok_or_else(|| format!("response lacks header {name}"))?;
        if normalise(&value) != normalise(want) {
            return Err(format!("response {name}: {value:?}, want {want:?}"));
        }
    }
    if let Some(name) = expect
        .absent_response_headers
        .iter()
        .find(|n| got.headers.contains_key(n.as_str()))
    {
        return Err(format!("response has header {name}, want it absent"));
    }
    if let Some(name) = expect
        .absent_request_headers
        .iter()
        .find(|n| echoed_header(n).is_some())
    {
        return Err(format!("backend saw header {name}, want it absent"));
    }
    if let Some(backend) = &expect.backend
        && !field("pod").starts_with(backend.as_str())
    {
        return Err(format!("served by pod {:?}, want {backend}", field("pod")));
    }
    Ok(())
}

/// All field lines of a response header joined with `,`.
fn response_header(got: &Received, name: &str) -> Option<String> {
    let values: Vec<String> = got
        .headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 300..=305 | 307 | 308)
}

fn check_redirect(want: &crate::suite::ExpectedRedirect, url: &RequestUrl, got: &Received) -> Result<(), String> {
    let location = got
        .headers
        .get(http::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or("redirect without a Location")?;
    let resolved = resolve_location(url, location).ok_or_else(|| format!("unparseable Location {location:?}"))?;
    if let Some(host) = &want.host
        && &resolved.hostname != host
    {
        return Err(format!(
            "Location {location:?}: host {:?}, want {host:?}",
            resolved.hostname
        ));
    }
    let port_ok = match &want.port {
        Some(port) => {
            let want_port = match port {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            resolved.port == want_port
        }
        None => match resolved.scheme.as_str() {
            "http" => resolved.port.is_empty() || resolved.port == "80",
            "https" => resolved.port.is_empty() || resolved.port == "443",
            _ => true,
        },
    };
    if !port_ok {
        return Err(format!(
            "Location {location:?}: port {:?}, want {:?}",
            resolved.port, want.port
        ));
    }
    if resolved.scheme != want.scheme {
        return Err(format!(
            "Location {location:?}: scheme {:?}, want {:?}",
            resolved.scheme, want.scheme
        ));
    }
    if resolved.path != want.path {
        return Err(format!(
            "Location {location:?}: path {:?}, want {:?}",
            resolved.path, want.path
        ));
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
pub struct Location {
    pub scheme: String,
    pub hostname: String,
    pub port: String,
    pub path: String,
}

/// Resolves `location` against the request URL as Go's `Response.Location()` (RFC 3986 §5)
/// does for the forms redirects use: absolute, scheme-relative, and absolute-path references.
pub fn resolve_location(url: &RequestUrl, location: &str) -> Option<Location> {
    let (scheme, rest) = match location.split_once("://") {
        Some((scheme, rest)) if !scheme.contains('/') => (scheme.to_ascii_lowercase(), rest.to_string()),
        _ => match location.strip_prefix("//") {
            Some(rest) => (url.scheme.to_string(), rest.to_string()),
            None if location.starts_with('/') => (url.scheme.to_string(), format!("{}{location}", url.host)),
            None => {
                let base = url.path.split('?').next().unwrap_or("/");
                let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
                (url.scheme.to_string(), format!("{}{dir}{location}", url.host))
            }
        },
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest.as_str(), ""),
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let (hostname, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, p),
        _ => (authority, ""),
    };
    Some(Location {
        scheme,
        hostname: hostname.trim_start_matches('[').trim_end_matches(']').to_string(),
        port: port.to_string(),
        path: path.to_string(),
    })
}

pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> RequestUrl<'static> {
        RequestUrl {
            scheme: "http",
            host: "127.0.1.1",
            path: "/a/b?x=1",
        }
    }

    #[test]
    fn locations_resolve_like_go() {
        let l = resolve_location(&url(), "https://example.org:8443/p?q").unwrap();
        assert_eq!(
            (l.scheme.as_str(), l.hostname.as_str(), l.port.as_str()),
            ("https", "example.org", "8443")
        );
        assert_eq!(l.path, "/p");
        let l = resolve_location(&url(), "/other").unwrap();
        assert_eq!(
            (l.hostname.as_str(), l.port.as_str(), l.path.as_str()),
            ("127.0.1.1", "", "/other")
        );
        let l = resolve_location(&url(), "c").unwrap();
        assert_eq!(l.path, "/a/c");
        let l = resolve_location(&url(), "//h.example:81/x").unwrap();
        assert_eq!(
            (l.scheme.as_str(), l.hostname.as_str(), l.port.as_str()),
            ("http", "h.example", "81")
        );
    }
}
