//! Request matching: string matchers with Envoy's semantics and the route lookup.
//!
//! Regexes are RE2-style (the `regex` crate) and, as in Envoy's `safe_regex`, must match the
//! whole value: they are compiled anchored (`^(?:...)$`).

use http::HeaderMap;
use regex::Regex;
use serde::Serialize;

use crate::snapshot::{RequestMatch, Route, RouteTable, VirtualHost};

/// How a string value is compared.
#[derive(Debug, Clone, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Full-value match (anchored).
    Regex(#[serde(with = "regex_serde")] Regex),
}

impl StringMatch {
    /// Compiles a full-match regex, returning the `regex` crate's message on bad syntax.
    pub fn regex(pattern: &str) -> Result<Self, String> {
        anchored_regex(pattern).map(StringMatch::Regex)
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }

    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StringMatch::Prefix(p) => {
                value.len() >= p.len() && value.is_char_boundary(p.len()) && value[..p.len()].eq_ignore_ascii_case(p)
            }
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// Compiles `pattern` so that it must match the entire input.
pub fn anchored_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())
}

/// How the request path (without query string) is matched.
#[derive(Debug, Clone, Serialize)]
pub struct PathMatch {
    pub matcher: StringMatch,
    /// Istio `ignoreUriCase`: exact and prefix compare case-insensitively.
    pub ignore_case: bool,
    /// Gateway API `PathPrefix`: the prefix must end at a `/` boundary.
    pub segment_prefix: bool,
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        let hit = if self.ignore_case {
            self.matcher.matches_ignore_case(path)
        } else {
            self.matcher.matches(path)
        };
        if !hit {
            return false;
        }
        match (&self.matcher, self.segment_prefix) {
            (StringMatch::Prefix(p), true) => {
                let p = p.trim_end_matches('/');
                path.len() == p.len() || path.as_bytes().get(p.len()) == Some(&b'/')
            }
            _ => true,
        }
    }
}

/// A header condition. A header with several values is matched against the values joined
/// by `,`, as Envoy does.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    /// Lower-cased header name.
    pub name: String,
    /// `None` matches when the header is present with any value.
    pub matcher: Option<StringMatch>,
    /// Istio `withoutHeaders`: the condition holds when the match fails.
    pub invert: bool,
}

impl HeaderMatch {
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(self.name.as_str()).iter();
        let hit = match values.next() {
            None => false,
            Some(first) => match &self.matcher {
                None => true,
                Some(m) => match values.next() {
                    None => first.to_str().is_ok_and(|v| m.matches(v)),
                    Some(second) => {
                        let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
                        for v in std::iter::once(second).chain(values) {
                            joined.push(',');
                            joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
                        }
                        m.matches(&joined)
                    }
                },
            },
        };
        hit != self.invert
    }
}

/// A query parameter condition, compared against the first occurrence's raw value.
#[derive(Debug, Clone, Serialize)]
pub struct QueryMatch {
    pub name: String,
    /// `None` matches when the parameter is present.
    pub matcher: Option<StringMatch>,
}

impl QueryMatch {
    pub fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else { return false };
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == self.name {
                return self.matcher.as_ref().is_none_or(|m| m.matches(v));
            }
        }
        false
    }
}

/// The parts of a request that routing looks at.
pub struct RequestInfo<'a> {
    /// Lower-cased host without port.
    pub host: &'a str,
    /// The authority as sent (Host header or `:authority`), port included if present.
    pub authority: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    pub scheme: &'a str,
    pub port: u16,
    pub headers: &'a HeaderMap,
    /// The TLS server name the client sent (SNI), if any.
    pub sni: Option<&'a str>,
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        self.port.is_none_or(|p| p == req.port)
            && self.path.as_ref().is_none_or(|m| m.matches(req.path))
            && self.method.as_ref().is_none_or(|m| m.matches(req.method))
            && self.authority.as_ref().is_none_or(|m| m.matches(req.authority))
            && self.scheme.as_ref().is_none_or(|m| m.matches(req.scheme))
            && self.headers.iter().all(|h| h.matches(req.headers))
            && self.query.iter().all(|q| q.matches(req.query))
            && (self.sni.is_empty()
                || req.scheme != "https"
                || req
                    .sni
                    .is_some_and(|sni| self.sni.iter().any(|n| n.eq_ignore_ascii_case(sni))))
    }
}

/// The result of a route lookup.
pub struct RouteMatch<'a> {
    /// Index of `virtual_host` in [`RouteTable::virtual_hosts`].
    pub virtual_host_index: usize,
    /// Index of `route` in [`VirtualHost::routes`].
    pub route_index: usize,
    pub virtual_host: &'a VirtualHost,
    pub route: &'a Route,
    /// The alternative in `route.matches` that matched (`None` when the route has none).
    pub matched: Option<&'a RequestMatch>,
}

impl RouteTable {
    /// Finds the virtual host serving `host` (lower-cased, without port).
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        self.virtual_host_index(host).map(|i| &self.virtual_hosts[i])
    }

    /// Index in `virtual_hosts` of the virtual host serving `host`.
    pub fn virtual_host_index(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        if !self.suffixes.is_empty() {
            // `*.example.com` needs at least one character before `.example.com`, so the
            // candidate suffixes start at each dot after the first character.
            for (i, _) in host.match_indices('.').filter(|(i, _)| *i > 0) {
                if let Some(&vh) = self.suffixes.get(&host[i..]) {
                    return Some(vh);
                }
            }
        }
        self.catch_all
    }

    /// Returns the first route of the request's virtual host whose conditions hold.
    pub fn find<'a>(&'a self, req: &RequestInfo<'_>) -> Option<RouteMatch<'a>> {
        let virtual_host_index = self.virtual_host_index(req.host)?;
        let virtual_host = &self.virtual_hosts[virtual_host_index];
        virtual_host.find(req).map(|(route_index, matched)| RouteMatch {
            virtual_host_index,
            route_index,
            virtual_host,
            route: &virtual_host.routes[route_index],
            matched,
        })
    }

    /// Rebuilds the lookup indexes from `virtual_hosts`; call after filling them.
    /// A domain claimed by two virtual hosts keeps the first.
    pub fn index(&mut self) {
        self.exact.clear();
        self.suffixes.clear();
        self.catch_all = None;
        for (i, vh) in self.virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                if d == "*" {
                    self.catch_all.get_or_insert(i);
                } else if let Some(suffix) = d.strip_prefix('*') {
                    self.suffixes.entry(suffix.to_string()).or_insert(i);
                } else {
                    self.exact.entry(d.clone()).or_insert(i);
                }
            }
        }
    }
}

impl VirtualHost {
    /// Index of the first route whose conditions hold, and the alternative that matched.
    pub fn find<'a>(&'a self, req: &RequestInfo<'_>) -> Option<(usize, Option<&'a RequestMatch>)> {
        for (i, route) in self.routes.iter().enumerate() {
            if route.matches.is_empty() {
                return Some((i, None));
            }
            if let Some(m) = route.matches.iter().find(|m| m.matches(req)) {
                return Some((i, Some(m)));
            }
        }
        None
    }
}

/// Serializes a regex as its pattern string (for `/config_dump`).
pub mod regex_serde {
    pub fn serialize<S: serde::Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str())
    }
}

pub(crate) fn bytes_as_lossy_str<S: serde::Serializer>(b: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}
