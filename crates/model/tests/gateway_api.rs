//! End-to-end: Gateway API YAML → snapshot. The conformance manifests of
//! `/work/shared/conformance/gateway-api` are loaded unchanged (base + one test's manifest, the
//! GatewayClass placeholder replaced) and the HTTP cases of `cases.json` are checked against
//! route lookups, plus targeted tests and one test per validation error.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderMap;
use meshgate_model::matcher::{RequestInfo, StringMatch};
use meshgate_model::snapshot::{
    Discovery, Forward, HashKey, Listener, LoadBalancer, PathRewrite, RedirectPort, Route, RouteAction, Snapshot,
    TryFailure, UpstreamProtocol,
};
use meshgate_model::{CompileOptions, Compiled, Finding, Findings, Severity, compile, source};
use serde_json::{Value, json};

const CONFORMANCE: &str = "/work/shared/conformance/gateway-api";
const CLASS: &str = "meshgate-test";

const GATEWAY_CLASS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: meshgate-test}
spec:
  controllerName: meshgate.io/gateway-controller
"#;

/// A stand-in for the TLS Secret the conformance runner creates (the model only checks PEM
/// framing; the data plane parses it).
const TLS_SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: tls-validity-checks-certificate, namespace: gateway-conformance-infra}
type: kubernetes.io/tls
stringData:
  tls.crt: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
  tls.key: "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"
"#;

struct Loaded {
    compiled: Compiled,
    /// Gateway name → the address it was given.
    addresses: HashMap<String, IpAddr>,
}

fn read_manifest(name: &str) -> Vec<source::Document> {
    let path = Path::new(CONFORMANCE).join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text.replace("{GATEWAY_CLASS_NAME}", CLASS);
    source::parse_str(&path, &text).unwrap_or_else(|f| panic!("{f}"))
}

/// Base + `manifest` (+ extra YAML), each Gateway bound to its own loopback address as the
/// conformance runner does, minus the documents `drop` names (`Kind namespace/name`).
fn try_load(manifest: &str, extra: &str, drop: &[String]) -> (Result<Compiled, Findings>, HashMap<String, IpAddr>) {
    let mut docs = source::parse_str(Path::new("class.yaml"), GATEWAY_CLASS).unwrap();
    docs.extend(source::parse_str(Path::new("secret.yaml"), TLS_SECRET).unwrap());
    docs.extend(read_manifest("manifests/base.yaml"));
    if !manifest.is_empty() {
        docs.extend(read_manifest(manifest));
    }
    if !extra.is_empty() {
        docs.extend(source::parse_str(Path::new("extra.yaml"), extra).unwrap_or_else(|f| panic!("{f}")));
    }
    docs.retain(|d| !drop.contains(&format!("{} {}/{}", d.kind, d.namespace, d.name)));
    let mut addresses = HashMap::new();
    for doc in docs
        .iter_mut()
        .filter(|d| d.kind == "Gateway" && d.api_version.starts_with("gateway.networking.k8s.io/"))
    {
        let ip: IpAddr = format!("127.0.0.{}", 10 + addresses.len()).parse().unwrap();
        addresses.insert(doc.name.clone(), ip);
        doc.body["spec"]["addresses"] = json!([{"type": "IPAddress", "value": ip.to_string()}]);
    }
    (compile(&docs, &CompileOptions::default()), addresses)
}

fn load(manifest: &str) -> Loaded {
    load_with(manifest, "", &[])
}

fn load_with(manifest: &str, extra: &str, drop: &[String]) -> Loaded {
    match try_load(manifest, extra, drop) {
        (Ok(compiled), addresses) => Loaded { compiled, addresses },
        (Err(f), _) => panic!("unexpected findings for {manifest}:\n{f}"),
    }
}

fn errors_of(manifest: &str, extra: &str) -> Vec<Finding> {
    match try_load(manifest, extra, &[]) {
        (Ok(_), _) => panic!("expected errors"),
        (Err(f), _) => f.errors().cloned().collect(),
    }
}

/// A request as the conformance client sends it.
struct Req<'a> {
    gateway: &'a str,
    port: u16,
    scheme: &'a str,
    /// `None`: the Gateway address (with the port unless it is the scheme's default).
    host: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    headers: Vec<(String, String)>,
}

fn req<'a>(gateway: &'a str, host: Option<&'a str>, path: &'a str) -> Req<'a> {
    Req {
        gateway,
        port: 80,
        scheme: "http",
        host,
        method: "GET",
        path,
        headers: Vec::new(),
    }
}

impl Loaded {
    fn snapshot(&self) -> &Snapshot {
        &self.compiled.snapshot
    }

    fn cluster(&self, name: &str) -> &meshgate_model::snapshot::Cluster {
        self.snapshot()
            .clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    fn listener(&self, gateway: &str, port: u16) -> Option<&Listener> {
        let ip = self.addresses.get(gateway)?;
        self.snapshot()
            .listeners
            .iter()
            .find(|l| l.address == Some(*ip) && l.port == port)
    }

    /// The matched route and the request's (host without port, authority).
    fn find(&self, r: &Req<'_>) -> Option<(&Route, String, String)> {
        let listener = self.listener(r.gateway, r.port)?;
        let authority = match r.host {
            Some(h) => h.to_string(),
            None => {
                let ip = self.addresses[r.gateway].to_string();
                let default = if r.scheme == "https" { 443 } else { 80 };
                if r.port == default {
                    ip
                } else {
                    format!("{ip}:{}", r.port)
                }
            }
        };
        let host = authority
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h)
            .to_ascii_lowercase();
        let mut headers = HeaderMap::new();
        for (k, v) in &r.headers {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let (path, query) = match r.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (r.path, None),
        };
        let info = RequestInfo {
            host: &host,
            authority: &authority,
            path,
            query,
            method: r.method,
            scheme: r.scheme,
            port: r.port,
            headers: &headers,
            sni: None,
        };
        let m = listener.routes.find(&info)?;
        Some((m.route, host, authority))
    }

    /// Backend Service names (`name.namespace`) of a forwarding route with their weights.
    fn backends(&self, route: &Route) -> Vec<(String, u32, bool)> {
        match &route.action {
            RouteAction::Forward(f) => f
                .destinations
                .iter()
                .map(|d| {
                    let cluster = &self.snapshot().clusters[d.cluster];
                    let host = cluster.service.trim_end_matches(".svc.cluster.local").to_string();
                    (host, d.weight, d.invalid)
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Applies a prefix replacement the way the data plane does.
fn replace_prefix(route: &Route, path: &str, replacement: &str) -> String {
    let Some(StringMatch::Prefix(prefix)) = route.matches.first().and_then(|m| m.path.as_ref()).map(|p| &p.matcher)
    else {
        return replacement.to_string();
    };
    let rest = &path[prefix.len().min(path.len())..];
    let out = if replacement.ends_with('/') && rest.starts_with('/') {
        format!("{replacement}{}", &rest[1..])
    } else {
        format!("{replacement}{rest}")
    };
    if out.is_empty() { "/".to_string() } else { out }
}

/// Checks one `http` case of `cases.json`; returns why it fails.
fn check_case(loaded: &Loaded, case: &Value) -> Result<(), String> {
    let r = &case["request"];
    let e = &case["expect"];
    let gateway = case["gateway"]["name"].as_str().unwrap_or_default();
    let port = case["gateway"]["port"].as_u64().unwrap_or(80) as u16;
    let headers = r["headers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let request = Req {
        gateway,
        port,
        scheme: r["scheme"].as_str().unwrap_or("http"),
        host: r["host"].as_str(),
        method: r["method"].as_str().unwrap_or("GET"),
        path: r["path"].as_str().unwrap_or("/"),
        headers,
    };
    let statuses: Vec<u64> = e["status_any_of"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let found = loaded.find(&request);
    let Some((route, host, authority)) = found else {
        return if statuses.contains(&404) {
            Ok(())
        } else {
            Err(format!("no route, expected {statuses:?}"))
        };
    };
    match &route.action {
        RouteAction::DirectResponse(d) => {
            if statuses.contains(&u64::from(d.status)) {
                Ok(())
            } else {
                Err(format!(
                    "{}: direct response {}, expected {statuses:?}",
                    route.name, d.status
                ))
            }
        }
        RouteAction::Redirect(rd) => {
            if !statuses.contains(&u64::from(rd.status)) {
                return Err(format!("{}: redirect {}, expected {statuses:?}", route.name, rd.status));
            }
            let Some(want) = e["redirect"].as_object() else {
                return Ok(());
            };
            let scheme = rd.scheme.clone().unwrap_or_else(|| request.scheme.to_string());
            let to_host = rd.authority.clone().unwrap_or(host);
            let request_port = authority.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
            let to_port = match &rd.port {
                Some(RedirectPort::Fixed(p)) => Some(*p),
                Some(RedirectPort::FromProtocolDefault) => None,
                Some(RedirectPort::FromRequestPort) => Some(request_port.unwrap_or(port)),
                None if rd.scheme.is_some() => None,
                None => request_port,
            };
            let default = if scheme == "https" { 443 } else { 80 };
            let to_port = to_port.filter(|p| *p != default).map(|p| p.to_string());
            let path = request.path.split('?').next().unwrap_or("/");
            let to_path = match (&rd.path, &rd.replace_prefix) {
                (Some(p), _) => p.clone(),
                (None, Some(p)) => replace_prefix(route, path, p),
                (None, None) => path.to_string(),
            };
            let got = json!({"scheme": scheme, "host": to_host, "port": to_port, "path": to_path});
            for (k, v) in want {
                // A null host means any host; a null port means the scheme's default.
                if (k == "port" || !v.is_null()) && got[k] != *v {
                    return Err(format!("{}: redirect to {got}, expected {want:?}", route.name));
                }
            }
            Ok(())
        }
        RouteAction::Forward(f) => {
            let backends = loaded.backends(route);
            let live: Vec<&(String, u32, bool)> = backends.iter().filter(|b| b.1 > 0).collect();
            if live.iter().all(|b| b.2) {
                return if statuses.contains(&500) {
                    Ok(())
                } else {
                    Err(format!("{}: only invalid backends, expected {statuses:?}", route.name))
                };
            }
            if !statuses.contains(&200) {
                return Err(format!(
                    "{}: forwards to {backends:?}, expected {statuses:?}",
                    route.name
                ));
            }
            if let Some(b) = e["backend"].as_str() {
                let ns = e["namespace"].as_str().unwrap_or_default();
                if !live.iter().all(|(h, _, invalid)| !invalid && *h == format!("{b}.{ns}")) {
                    return Err(format!("{}: forwards to {backends:?}, expected {b}.{ns}", route.name));
                }
            }
            if let Some(want) = e["path_seen_by_backend"].as_str() {
                let (path, query) = match request.path.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (request.path, None),
                };
                let mut seen = match f.rewrite.as_ref().and_then(|r| r.path.as_ref()) {
                    Some(PathRewrite::Full(p)) => p.clone(),
                    Some(PathRewrite::ReplaceMatched(p)) => replace_prefix(route, path, p),
                    _ => path.to_string(),
                };
                if let Some(q) = query {
                    seen = format!("{seen}?{q}");
                }
                if seen != want {
                    return Err(format!("{}: backend sees path {seen}, expected {want}", route.name));
                }
            }
            if let Some(want) = e["host_seen_by_backend"].as_str() {
                let seen = f
                    .rewrite
                    .as_ref()
                    .and_then(|r| r.authority.clone())
                    .unwrap_or(authority);
                if seen != want {
                    return Err(format!("{}: backend sees host {seen}, expected {want}", route.name));
                }
            }
            // Request header edits: route level, then the (single) destination's.
            let mut seen: Vec<(String, String)> = request
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect();
            let ops = [&route.request_headers].into_iter().chain(
                f.destinations
                    .iter()
                    .filter(|d| d.weight > 0)
                    .take(1)
                    .map(|d| &d.request_headers),
            );
            for ops in ops {
                seen.retain(|(k, _)| !ops.remove.contains(k));
                for (k, v) in &ops.set {
                    seen.retain(|(n, _)| n != k);
                    seen.push((k.clone(), v.clone()));
                }
                for (k, v) in &ops.add {
                    seen.push((k.clone(), v.clone()));
                }
            }
            let value = |name: &str| {
                let vals: Vec<&str> = seen
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
                    .collect();
                (!vals.is_empty()).then(|| vals.join(","))
            };
            for (k, v) in e["request_headers_seen_by_backend"].as_object().into_iter().flatten() {
                if value(k).as_deref() != v.as_str() {
                    return Err(format!("{}: header {k} is {:?}, expected {v}", route.name, value(k)));
                }
            }
            for k in e["absent_request_headers"].as_array().into_iter().flatten() {
                let k = k.as_str().unwrap_or_default();
                if value(k).is_some() {
                    return Err(format!("{}: header {k} should be absent", route.name));
                }
            }
            Ok(())
        }
    }
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(CONFORMANCE).join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Conformance tests whose `http` cases are decided by routing alone (no echo behaviour,
/// TLS handshake, retries, timeouts or CORS handling in the data plane).
const ROUTING_TESTS: &[&str] = &[
    "HTTPRoute303Redirect",
    "HTTPRoute307Redirect",
    "HTTPRoute308Redirect",
    "HTTPRouteCrossNamespace",
    "HTTPRouteExactPathMatching",
    "HTTPRouteHTTPSListener",
    "HTTPRouteHeaderMatching",
    "HTTPRouteHostnameIntersection",
    "HTTPRouteInvalidBackendRefUnknownKind",
    "HTTPRouteInvalidCrossNamespaceBackendRef",
    "HTTPRouteInvalidNonExistentBackendRef",
    "HTTPRouteInvalidReferenceGrant",
    "HTTPRouteListenerHostnameMatching",
    "HTTPRouteListenerPortMatching",
    "HTTPRouteMatching",
    "HTTPRouteMatchingAcrossRoutes",
    "HTTPRouteMethodMatching",
    "HTTPRouteMultipleGateways",
    "HTTPRouteNamedRule",
    "HTTPRouteNoBackendRefs",
    "HTTPRoutePartiallyInvalidViaInvalidReferenceGrant",
    "HTTPRoutePathMatchOrder",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteRedirectHostAndStatus",
    "HTTPRouteRedirectPath",
    "HTTPRouteRedirectPort",
    "HTTPRouteRedirectPortAndScheme",
    "HTTPRouteRedirectScheme",
    "HTTPRouteReferenceGrant",
    "HTTPRouteRequestHeaderModifier",
    "HTTPRouteBackendRequestHeaderModifier",
    "HTTPRouteRewriteHost",
    "HTTPRouteRewritePath",
    "HTTPRouteSimpleSameNamespace",
    "HTTPRouteBackendProtocolH2C",
    "HTTPRouteBackendRequestRedirect",
    "HTTPRouteBackendURLRewrite",
    "GatewayHTTPListenerIsolation",
    "ListenerSetHTTPRouting",
    "ListenerSetAllowedRoutesNamespaces",
    "ListenerSetDualParentRefIndependence",
    "ListenerSetGatewayParentSectionNameNotFound",
];

#[test]
fn conformance_http_cases_route_as_expected() {
    let all = cases();
    let mut failures = Vec::new();
    let mut checked = 0;
    for test in ROUTING_TESTS {
        let test_cases: Vec<&Value> = all
            .iter()
            .filter(|c| c["test"] == *test && c["kind"] == "http")
            .collect();
        assert!(!test_cases.is_empty(), "no cases for {test}");
        let manifest = test_cases[0]["manifest"].as_str().unwrap();
        let mut drop: Vec<String> = Vec::new();
        let mut step = -1;
        let mut loaded = None;
        for case in test_cases {
            let case_step = case["step"].as_i64().unwrap_or(0);
            if case_step != step || loaded.is_none() {
                for action in case["before_step"].as_array().into_iter().flatten() {
                    assert_eq!(action["action"], "delete");
                    drop.push(format!(
                        "{} {}/{}",
                        action["kind"].as_str().unwrap(),
                        action["namespace"].as_str().unwrap(),
                        action["name"].as_str().unwrap()
                    ));
                }
                loaded = Some(load_with(manifest, "", &drop));
                step = case_step;
            }
            checked += 1;
            if let Some(Err(why)) = loaded.as_ref().map(|l| check_case(l, case)) {
                failures.push(format!("{}: {}: {why}", case["id"], case["name"]));
            }
        }
    }
    eprintln!("checked {checked} conformance cases");
    assert!(checked > 200, "only {checked} cases checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn weights_are_relative_and_zero_is_kept() {
    let l = load("manifests/httproute-weight.yaml");
    let (route, _, _) = l.find(&req("same-namespace", None, "/")).unwrap();
    assert_eq!(
        l.backends(route),
        [
            ("infra-backend-v1.gateway-conformance-infra".to_string(), 70, false),
            ("infra-backend-v2.gateway-conformance-infra".to_string(), 30, false),
            ("infra-backend-v3.gateway-conformance-infra".to_string(), 0, false),
        ]
    );
    let RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    assert_eq!(f.total_weight, 100);
    assert_eq!(route.name, "gateway-conformance-infra/weighted-backends[0]");
}

#[test]
fn named_rules_name_routes() {
    let l = load("manifests/httproute-named-rule.yaml");
    let (route, _, _) = l.find(&req("same-namespace", None, "/named")).unwrap();
    assert_eq!(route.name, "gateway-conformance-infra/http-named-rules.named-rule");
    let (route, _, _) = l.find(&req("same-namespace", None, "/unnamed")).unwrap();
    assert_eq!(route.name, "gateway-conformance-infra/http-named-rules[1]");
}

#[test]
fn header_modifiers_mirrors_cors_and_timeouts_are_compiled() {
    let l = load("manifests/httproute-request-mirror.yaml");
    let (route, _, _) = l
        .find(&req("same-namespace", None, "/mirror-and-modify-headers"))
        .unwrap();
    assert_eq!(route.mirrors.len(), 1);
    assert_eq!(route.mirrors[0].fraction, (1, 1));
    assert_eq!(
        l.snapshot().clusters[route.mirrors[0].cluster].name,
        "outbound|8080||infra-backend-v2.gateway-conformance-infra.svc.cluster.local"
    );
    assert_eq!(
        route.request_headers.set,
        [("x-header-set".to_string(), "set-overwrites-values".to_string())]
    );
    assert_eq!(route.request_headers.remove, ["x-header-remove"]);

    let l = load("manifests/httproute-request-percentage-mirror.yaml");
    let fractions: Vec<(u32, u32)> = l.snapshot().listeners[0]
        .routes
        .virtual_hosts
        .iter()
        .flat_map(|vh| &vh.routes)
        .flat_map(|r| r.mirrors.iter().map(|m| m.fraction))
        .collect();
    assert!(
        !fractions.is_empty() && fractions.iter().all(|(n, d)| n < d),
        "{fractions:?}"
    );

    let l = load("manifests/httproute-response-header-modifier.yaml");
    let (route, _, _) = l.find(&req("same-namespace", None, "/add")).unwrap();
    assert!(!route.response_headers.add.is_empty());

    let l = load("manifests/httproute-cors.yaml");
    let (route, _, _) = l.find(&req("same-namespace", None, "/cors-1")).unwrap();
    let cors = route.cors.as_ref().unwrap();
    assert_eq!(cors.allow_origins, ["https://www.foo.com", "https://*.bar.com"]);
    assert_eq!(cors.allow_methods, ["GET", "OPTIONS"]);
    assert!(cors.allow_credentials);
    assert_eq!(cors.max_age, Some(3600));
    let (route, _, _) = l.find(&req("same-namespace", None, "/cors-2")).unwrap();
    assert_eq!(route.cors.as_ref().unwrap().max_age, Some(5));

    let l = load("manifests/httproute-timeout-backend-request.yaml");
    let (route, _, _) = l.find(&req("same-namespace", None, "/backend-timeout")).unwrap();
    let RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    assert_eq!(f.backend_timeout, Some(std::time::Duration::from_millis(500)));
    let (route, _, _) = l
        .find(&req("same-namespace", None, "/disable-backend-timeout"))
        .unwrap();
    let RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    assert_eq!(f.backend_timeout, None);

    let l = load("manifests/httproute-timeout-request.yaml");
    let found = l
        .snapshot()
        .listeners
        .iter()
        .flat_map(|li| &li.routes.virtual_hosts)
        .flat_map(|vh| &vh.routes)
        .any(|r| matches!(&r.action, RouteAction::Forward(f) if f.timeout.is_some()));
    assert!(found);
}

#[test]
fn h2c_app_protocol_and_endpoint_slices() {
    let l = load("manifests/httproute-backend-protocol-h2c.yaml");
    let c = l
        .snapshot()
        .clusters
        .iter()
        .find(|c| c.name == "outbound|8081||infra-backend-v1.gateway-conformance-infra.svc.cluster.local")
        .unwrap();
    assert_eq!(c.protocol, UpstreamProtocol::Http2);

    let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: manual-extra
  namespace: gateway-conformance-infra
  labels: {kubernetes.io/service-name: manual-endpointslices}
addressType: IPv4
ports: [{name: first-port, port: 3000, protocol: TCP}]
endpoints:
- addresses: [10.1.0.1]
- addresses: [10.1.0.2]
  conditions: {ready: false}
"#;
    let external = r#"
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: gateway-conformance-infra}
spec:
  type: ExternalName
  externalName: Backend.Example.com
  ports: [{port: 443}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: external, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: Exact, value: /external}}]
    backendRefs: [{name: external, port: 443}]
"#;
    let l = load_with(
        "manifests/httproute-service-types.yaml",
        &format!("{slice}{external}"),
        &[],
    );
    let (route, _, _) = l.find(&req("same-namespace", None, "/external")).unwrap();
    let RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    let c = &l.snapshot().clusters[f.destinations[0].cluster];
    assert_eq!(c.discovery, Discovery::Dns);
    assert_eq!(
        (c.endpoints[0].address.as_str(), c.endpoints[0].port),
        ("backend.example.com", 443)
    );
    let (route, _, _) = l.find(&req("same-namespace", None, "/manual-endpointslices")).unwrap();
    let RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    let c = &l.snapshot().clusters[f.destinations[0].cluster];
    assert_eq!(c.discovery, Discovery::Static);
    assert_eq!(
        c.endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.port))
            .collect::<Vec<_>>(),
        [("10.1.0.1", 3000)]
    );
}

#[test]
fn istio_service_entries_supply_endpoints_and_listeners_merge() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: infra-backend-v1, namespace: gateway-conformance-infra}
spec:
  hosts: [infra-backend-v1.gateway-conformance-infra.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 40001}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8000, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [istio.example.com]
  gateways: [istio-gw]
  http:
  - route: [{destination: {host: infra-backend-v1.gateway-conformance-infra.svc.cluster.local, port: {number: 8080}}}]
"#;
    let l = load_with("manifests/httproute-simple-same-namespace.yaml", extra, &[]);
    let (route, _, _) = l.find(&req("same-namespace", None, "/")).unwrap();
    let RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    let c = &l.snapshot().clusters[f.destinations[0].cluster];
    assert_eq!(c.endpoints[0].address, "127.0.0.1");
    assert_eq!(c.endpoints[0].port, 40001);
    // One cluster shared by the Istio VirtualService and the HTTPRoute.
    let istio = l.snapshot().listeners.iter().find(|li| li.port == 8000).unwrap();
    let vh = istio.routes.virtual_host("istio.example.com").unwrap();
    let RouteAction::Forward(g) = &vh.routes[0].action else {
        panic!()
    };
    assert_eq!(g.destinations[0].cluster, f.destinations[0].cluster);
}

#[test]
fn gateways_without_addresses_share_one_listener_per_port() {
    let yaml = format!(
        "{GATEWAY_CLASS}---\n{}",
        r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {name: a, namespace: web}
spec:
  gatewayClassName: meshgate-test
  listeners:
  - {name: http, port: 8080, protocol: HTTP, hostname: a.example.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: b, namespace: web}
spec:
  gatewayClassName: meshgate-test
  listeners:
  - {name: http, port: 8080, protocol: HTTP, hostname: "*.example.com"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: web}
spec:
  parentRefs: [{name: a}, {name: b}]
  rules:
  - backendRefs: [{name: svc, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: svc, namespace: web}
spec:
  ports: [{port: 80, targetPort: 8080}]
"#
    );
    let docs = source::parse_str(Path::new("t.yaml"), &yaml).unwrap();
    let c = compile(&docs, &CompileOptions::default()).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(c.snapshot.listeners.len(), 1);
    let l = &c.snapshot.listeners[0];
    assert_eq!((l.name.as_str(), l.address, l.port), ("0.0.0.0_8080", None, 8080));
    assert!(l.routes.virtual_host("a.example.com").is_some());
    assert!(l.routes.virtual_host("b.example.com").is_some());
    assert!(l.routes.virtual_host("example.com").is_none());
    assert!(
        c.warnings
            .iter()
            .any(|w| w.message.contains("give each Gateway its own spec.addresses"))
    );
}

#[test]
fn routes_not_allowed_by_a_listener_are_warned_about() {
    // The route lives in gateway-conformance-web-backend, same-namespace only allows its own.
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: stray, namespace: gateway-conformance-web-backend}
spec:
  parentRefs: [{name: same-namespace, namespace: gateway-conformance-infra}]
  rules:
  - matches: [{path: {type: Exact, value: /stray}}]
    backendRefs: [{name: web-backend, port: 8080}]
"#;
    let l = load_with("", extra, &[]);
    assert!(l.find(&req("same-namespace", None, "/stray")).is_none());
    let w = l
        .compiled
        .warnings
        .iter()
        .find(|w| w.resource == "HTTPRoute gateway-conformance-web-backend/stray")
        .unwrap();
    assert_eq!(w.severity, Severity::Warning);
    assert_eq!(w.field, "spec.parentRefs[0]");
    assert!(
        w.message.contains("only allows routes from its own namespace"),
        "{}",
        w.message
    );
}

#[test]
fn https_listener_certificates_come_from_secrets() {
    let l = load("manifests/httproute-https-listener.yaml");
    let listener = l.listener("same-namespace-with-https-listener", 443).unwrap();
    let tls = listener.tls.as_ref().unwrap();
    let sni: Vec<&str> = tls.certificates.iter().map(|c| c.sni_hosts[0].as_str()).collect();
    assert_eq!(
        sni,
        [
            "fourth-example.wildcard.org",
            "second-example.org",
            "*.wildcard.org",
            "*"
        ]
    );
    assert!(tls.certificates[0].cert_pem.starts_with(b"-----BEGIN CERTIFICATE"));
}

#[test]
fn invalid_backends_are_marked_and_point_at_the_placeholder_cluster() {
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mixed, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: Exact, value: /mixed}}]
    backendRefs:
    - {name: infra-backend-v1, port: 8080, weight: 1}
    - {name: nonexistent, port: 8080, weight: 1}
"#;
    let l = load_with("", extra, &[]);
    let (route, _, _) = l.find(&req("same-namespace", None, "/mixed")).unwrap();
    let RouteAction::Forward(f) = &route.action else {
        panic!()
    };
    assert!(!f.destinations[0].invalid);
    assert!(f.destinations[1].invalid);
    assert_eq!(l.snapshot().clusters[f.destinations[1].cluster].name, "invalid-backend");
    assert!(l.snapshot().clusters[f.destinations[1].cluster].endpoints.is_empty());
    assert!(l.compiled.warnings.iter().any(|w| {
        w.field == "spec.rules[0].backendRefs[1]"
            && w.message
                .contains("Service gateway-conformance-infra/nonexistent does not exist")
    }));
}

fn forward_at<'l>(l: &'l Loaded, path: &str) -> &'l Forward {
    let (route, _, _) = l.find(&req("same-namespace", None, path)).expect("route");
    match &route.action {
        RouteAction::Forward(f) => f,
        other => panic!("{other:?}"),
    }
}

#[test]
fn retry_compiles_codes_attempts_and_connection_errors() {
    let l = load("manifests/httproute-retry.yaml");
    let policy = forward_at(&l, "/retry/code-500-attempts-3")
        .retry
        .clone()
        .expect("policy");
    assert_eq!(policy.num_retries, 3);
    assert_eq!(policy.retriable_status_codes, [500]);
    assert!(policy.retries_response(500, None) && !policy.retries_response(503, None));
    assert!(policy.retries_failure(TryFailure::ConnectFailure));
    assert!(policy.retries_failure(TryFailure::Reset));
    assert!(policy.retries_failure(TryFailure::PerTryTimeout));
    assert_eq!(policy.backoff_base, Duration::from_millis(25));
    let policy = forward_at(&l, "/retry/code-all-attempts-2")
        .retry
        .clone()
        .expect("policy");
    assert_eq!(policy.num_retries, 2);
    assert_eq!(policy.retriable_status_codes, [500, 502, 503, 504]);

    let l = load("manifests/httproute-retry-connection-error.yaml");
    let policy = forward_at(&l, "/retry/no-status-code-attempts-3")
        .retry
        .clone()
        .expect("policy");
    assert_eq!(policy.num_retries, 3);
    assert!(policy.retriable_status_codes.is_empty());
    assert!(!policy.retries_response(500, None));

    // backendRequest is the per-try timeout, request the bound on all tries.
    let l = load("manifests/httproute-retry-with-timeouts.yaml");
    let f = forward_at(&l, "/retry/request-timeout-200ms");
    assert_eq!(f.retry.as_ref().map(|p| p.num_retries), Some(5));
    assert_eq!(f.backend_timeout, Some(Duration::from_millis(200)));
    assert_eq!(f.timeout, Some(Duration::from_millis(400)));

    // No retry: no retries (unlike Istio routes, Gateway API routes have no default policy).
    let l = load("manifests/httproute-timeout-backend-request.yaml");
    assert_eq!(forward_at(&l, "/backend-timeout").retry, None);
}

#[test]
fn retry_defaults_backoff_and_zero_attempts() {
    let l = load_with(
        "",
        &route_yaml(
            "  - matches: [{path: {value: /a}}]\n    retry: {codes: [503]}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {value: /b}}]\n    retry: {attempts: 0}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {value: /c}}]\n    retry: {attempts: 1, backoff: 100ms}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
        &[],
    );
    let policy = forward_at(&l, "/a").retry.clone().expect("policy");
    assert_eq!(policy.num_retries, 2, "attempts default to 2");
    assert_eq!(forward_at(&l, "/b").retry, None);
    let policy = forward_at(&l, "/c").retry.clone().expect("policy");
    assert_eq!(policy.backoff_base, Duration::from_millis(100));
    assert_eq!(policy.backoff_max, Duration::from_secs(1));
}

// ---------------------------------------------------------------- errors

#[test]
fn error_bad_retry_values_name_their_fields() {
    let e = errors_of(
        "",
        &route_yaml(
            "  - retry: {codes: [500, 200], attempts: -2, backoff: soon}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
    );
    let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].retry.codes[1]",
            "spec.rules[0].retry.attempts",
            "spec.rules[0].retry.backoff"
        ]
    );
    assert!(e[0].message.contains("between 400 and 599"), "{}", e[0].message);
}

fn route_yaml(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: bad, namespace: gateway-conformance-infra}}\nspec:\n  parentRefs: [{{name: same-namespace}}]\n  rules:\n{rules}"
    )
}

#[test]
fn error_unknown_field_names_file_resource_and_path() {
    let e = errors_of(
        "",
        &route_yaml(
            "  - matches: [{path: {type: Exact, valeu: /x}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].file, PathBuf::from("extra.yaml"));
    assert_eq!(e[0].resource, "HTTPRoute gateway-conformance-infra/bad");
    assert_eq!(e[0].field, "spec.rules[0].matches[0].path.valeu");
    assert!(e[0].message.contains("valeu"), "{}", e[0].message);
}

#[test]
fn error_invalid_regex_filter_type_and_redirect_code() {
    let e = errors_of(
        "",
        &route_yaml(
            "  - matches: [{path: {type: RegularExpression, value: \"/(x\"}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - filters: [{type: Teleport}]\n  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]\n",
        ),
    );
    let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].matches[0].path.value",
            "spec.rules[1].filters[0].type",
            "spec.rules[2].filters[0].requestRedirect.statusCode"
        ]
    );
}

#[test]
fn error_missing_certificate_secret_and_mixed_protocols() {
    let (result, _) = try_load(
        "",
        "",
        &["Secret gateway-conformance-infra/tls-validity-checks-certificate".to_string()],
    );
    let err = result.unwrap_err();
    let e: Vec<&Finding> = err.errors().collect();
    assert_eq!(e.len(), 4);
    assert_eq!(
        e[0].resource,
        "Gateway gateway-conformance-infra/same-namespace-with-https-listener"
    );
    assert_eq!(e[0].field, "spec.listeners[0].tls.certificateRefs[0]");
    assert!(e[0].message.contains("not defined"), "{}", e[0].message);

    let mixed = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: mixed, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: meshgate-test
  addresses: [{value: 127.0.0.99}]
  listeners:
  - {name: a, port: 9000, protocol: HTTP}
  - name: b
    port: 9000
    protocol: HTTPS
    hostname: b.example.com
    tls: {certificateRefs: [{name: tls-validity-checks-certificate}]}
"#;
    let e = errors_of("", mixed);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].field, "spec.listeners[1].protocol");
    assert!(e[0].message.contains("mixes HTTPS and HTTP"));
}

#[test]
fn error_cross_namespace_certificate_without_grant_and_bad_api_version() {
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: elsewhere}
spec:
  gatewayClassName: meshgate-test
  listeners:
  - name: https
    port: 8443
    protocol: HTTPS
    tls: {certificateRefs: [{name: tls-validity-checks-certificate, namespace: gateway-conformance-infra}]}
---
apiVersion: gateway.networking.k8s.io/v9
kind: HTTPRoute
metadata: {name: future, namespace: elsewhere}
spec: {}
"#;
    let e = errors_of("", extra);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(e[0].resource, "HTTPRoute elsewhere/future");
    assert!(e[0].message.contains("unsupported apiVersion"));
    assert_eq!(e[1].resource, "Gateway elsewhere/other");
    assert_eq!(e[1].field, "spec.listeners[0].tls.certificateRefs[0]");
    assert!(e[1].message.contains("no ReferenceGrant"), "{}", e[1].message);
}

#[test]
fn unsupported_fields_are_warnings_with_paths() {
    let l = load("manifests/httproute-retry.yaml");
    assert!(
        !l.compiled.warnings.iter().any(|w| w.field.contains("retry")),
        "retry is implemented: {:?}",
        l.compiled.warnings
    );
    // Deployments and ConfigMaps of base.yaml are ignored with a warning.
    assert!(l.compiled.warnings.iter().any(|w| w.resource.starts_with("Deployment ")
        && w.message.contains("ignored: kind Deployment of apiVersion apps/v1")));
}

#[test]
fn istio_and_gateway_api_listeners_on_one_port_merge() {
    let yaml = format!(
        "{GATEWAY_CLASS}---\n{}",
        r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: [istio.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [istio.example.com]
  gateways: [istio-gw]
  http:
  - directResponse: {status: 204}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: meshgate-test
  listeners:
  - {name: http, port: 8080, protocol: HTTP, hostname: gw.example.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules: [{}]
"#
    );
    let docs = source::parse_str(Path::new("t.yaml"), &yaml).unwrap();
    let c = compile(&docs, &CompileOptions::default()).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(c.snapshot.listeners.len(), 1);
    let routes = &c.snapshot.listeners[0].routes;
    let istio = routes.virtual_host("istio.example.com").unwrap();
    assert!(matches!(&istio.routes[0].action, RouteAction::DirectResponse(d) if d.status == 204));
    // A rule without backendRefs answers 500.
    let gw = routes.virtual_host("gw.example.com").unwrap();
    assert_eq!(gw.routes[0].name, "default/r[0]");
    assert!(matches!(&gw.routes[0].action, RouteAction::DirectResponse(d) if d.status == 500));

    // Another controller's GatewayClass: its Gateways are left alone.
    let options = CompileOptions {
        controller_name: "example.com/other".to_string(),
        ..CompileOptions::default()
    };
    let c = compile(&docs, &options).unwrap_or_else(|f| panic!("{f}"));
    assert!(c.snapshot.listeners[0].routes.virtual_host("gw.example.com").is_none());
}

// ---------------------------------------------------------------- ListenerSets

/// A Gateway `gateway-conformance-infra/shared` with one listener for `gw.example.com` on port
/// 80, a route on it, and `allowed_listeners` as its `spec.allowedListeners` (YAML flow, or "").
fn shared_gateway(allowed_listeners: &str) -> String {
    let allowed = if allowed_listeners.is_empty() {
        String::new()
    } else {
        format!("allowedListeners: {allowed_listeners}")
    };
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: shared, namespace: gateway-conformance-infra}}
spec:
  gatewayClassName: meshgate-test
  {allowed}
  listeners:
  - {{name: web, port: 80, protocol: HTTP, hostname: gw.example.com}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: gw-route, namespace: gateway-conformance-infra}}
spec:
  parentRefs: [{{name: shared}}]
  rules: [{{}}]
"#
    )
}

/// A ListenerSet `namespace/name` of Gateway `shared` with one listener `web` (port 80, or
/// the given YAML), and a route `name-route` in its namespace attached to it.
fn listener_set(namespace: &str, name: &str, listener: &str) -> String {
    let listener = if listener.is_empty() {
        format!("{{name: web, port: 80, protocol: HTTP, hostname: {name}.example.com}}")
    } else {
        listener.to_string()
    };
    format!(
        r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: ListenerSet
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRef: {{name: shared, namespace: gateway-conformance-infra}}
  listeners:
  - {listener}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}-route, namespace: {namespace}}}
spec:
  parentRefs: [{{kind: ListenerSet, group: gateway.networking.k8s.io, name: {name}}}]
  rules: [{{}}]
"#
    )
}

const TEAM_NAMESPACES: &str = r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: team-a, labels: {listeners: allowed}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b}
"#;

/// The name of the route serving `host` on Gateway `shared`, if any.
fn served_by(l: &Loaded, host: &str) -> Option<String> {
    l.find(&req("shared", Some(host), "/"))
        .map(|(route, _, _)| route.name.clone())
}

fn warning<'a>(l: &'a Loaded, resource: &str) -> &'a Finding {
    l.compiled
        .warnings
        .iter()
        .find(|w| w.resource == resource)
        .unwrap_or_else(|| panic!("no warning for {resource}: {:#?}", l.compiled.warnings))
}

#[test]
fn listener_sets_not_allowed_by_their_gateway_are_not_served() {
    // By default a Gateway accepts no ListenerSets.
    let extra = shared_gateway("") + &listener_set("gateway-conformance-infra", "local", "");
    let l = load_with("", &extra, &[]);
    assert_eq!(
        served_by(&l, "gw.example.com").as_deref(),
        Some("gateway-conformance-infra/gw-route[0]")
    );
    assert_eq!(served_by(&l, "local.example.com"), None);
    let w = warning(&l, "ListenerSet gateway-conformance-infra/local");
    assert_eq!(w.severity, Severity::Warning);
    assert_eq!(w.file, PathBuf::from("extra.yaml"));
    assert_eq!(w.field, "spec.parentRef");
    assert!(w.message.contains("accepts no ListenerSets"), "{}", w.message);
    // Routes attached to it say why they are not served.
    let w = warning(&l, "HTTPRoute gateway-conformance-infra/local-route");
    assert_eq!(w.field, "spec.parentRefs[0]");
    assert!(
        w.message
            .contains("ListenerSet gateway-conformance-infra/local is not served: Gateway gateway-conformance-infra/shared accepts no ListenerSets"),
        "{}",
        w.message
    );

    // Same: only ListenerSets of the Gateway's namespace.
    let extra = shared_gateway("{namespaces: {from: Same}}")
        + &listener_set("gateway-conformance-infra", "local", "")
        + &listener_set("team-a", "remote", "")
        + TEAM_NAMESPACES;
    let l = load_with("", &extra, &[]);
    assert_eq!(
        served_by(&l, "local.example.com").as_deref(),
        Some("gateway-conformance-infra/local-route[0]")
    );
    assert_eq!(served_by(&l, "remote.example.com"), None);
    let w = warning(&l, "ListenerSet team-a/remote");
    assert!(
        w.message.contains("only accepts ListenerSets of its own namespace"),
        "{}",
        w.message
    );

    // Selector: ListenerSets of the namespaces whose labels match.
    let extra = shared_gateway("{namespaces: {from: Selector, selector: {matchLabels: {listeners: allowed}}}}")
        + &listener_set("team-a", "selected", "")
        + &listener_set("team-b", "unselected", "")
        + TEAM_NAMESPACES;
    let l = load_with("", &extra, &[]);
    assert_eq!(
        served_by(&l, "selected.example.com").as_deref(),
        Some("team-a/selected-route[0]")
    );
    assert_eq!(served_by(&l, "unselected.example.com"), None);
    let w = warning(&l, "ListenerSet team-b/unselected");
    assert!(w.message.contains("namespace team-b does not match"), "{}", w.message);
}

#[test]
fn listener_sets_without_a_served_parent_gateway_are_warned_about() {
    let extra = shared_gateway("{namespaces: {from: All}}")
        + r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: ListenerSet
metadata: {name: orphan, namespace: team-a}
spec:
  parentRef: {name: nowhere}
  listeners:
  - {name: web, port: 80, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: ListenerSet
metadata: {name: odd-parent, namespace: team-a}
spec:
  parentRef: {kind: Service, group: "", name: shared, namespace: gateway-conformance-infra}
  listeners:
  - {name: web, port: 80, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: team-a}
spec:
  gatewayClassName: another-controller
  listeners:
  - {name: web, port: 80, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: ListenerSet
metadata: {name: of-theirs, namespace: team-a}
spec:
  parentRef: {name: theirs}
  listeners:
  - {name: web, port: 80, protocol: HTTP}
"#;
    let l = load_with("", &extra, &[]);
    let w = warning(&l, "ListenerSet team-a/orphan");
    assert_eq!(w.field, "spec.parentRef.name");
    assert!(
        w.message
            .contains("Gateway team-a/nowhere is not defined; the listeners of this ListenerSet are not served"),
        "{}",
        w.message
    );
    let w = warning(&l, "ListenerSet team-a/odd-parent");
    assert_eq!(w.field, "spec.parentRef");
    assert!(w.message.contains("parent kind Service"), "{}", w.message);
    // The Gateway of another controller, and thus its ListenerSets, are left alone.
    assert!(
        !l.compiled
            .warnings
            .iter()
            .any(|w| w.resource == "ListenerSet team-a/of-theirs")
    );
}

#[test]
fn section_names_not_found_on_the_parent_are_warned_about() {
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: route-to-missing-section, namespace: gateway-conformance-infra}
spec:
  parentRefs:
  - {kind: ListenerSet, name: listenerset-section-name, sectionName: missing}
  rules: [{}]
"#;
    let l = load_with(
        "manifests/listenerset-gateway-parent-section-name-not-found.yaml",
        extra,
        &[],
    );
    // A Gateway parentRef does not reach the listeners of the Gateway's ListenerSets.
    let w = warning(&l, "HTTPRoute gateway-conformance-infra/route-via-gateway");
    assert_eq!(w.field, "spec.parentRefs[0]");
    assert!(
        w.message.contains(
            "not served: Gateway gateway-conformance-infra/gateway-section-name has no listener named ls-only-listener"
        ),
        "{}",
        w.message
    );
    assert!(
        w.message
            .contains("belongs to ListenerSet gateway-conformance-infra/listenerset-section-name"),
        "{}",
        w.message
    );
    let w = warning(&l, "HTTPRoute gateway-conformance-infra/route-to-missing-section");
    assert_eq!(w.field, "spec.parentRefs[0]");
    assert!(
        w.message.contains(
            "not served: ListenerSet gateway-conformance-infra/listenerset-section-name has no listener named missing"
        ),
        "{}",
        w.message
    );
    assert!(
        l.find(&req("gateway-section-name", Some("gw-section.com"), "/badsection"))
            .is_none()
    );
}

#[test]
fn conflicting_listener_set_listeners_lose_to_earlier_ones() {
    // `late` comes first in the files but `early` is older: creation time decides.
    let extra = shared_gateway("{namespaces: {from: All}}")
        + &listener_set(
            "team-a",
            "late",
            "{name: web, port: 80, protocol: HTTP, hostname: shared.example.com}",
        )
        + &listener_set(
            "team-b",
            "early",
            "{name: web, port: 80, protocol: HTTP, hostname: shared.example.com}",
        )
        + &listener_set(
            "team-a",
            "hijack",
            "{name: web, port: 80, protocol: HTTP, hostname: gw.example.com}",
        )
        + &listener_set(
            "gateway-conformance-infra",
            "tls-on-80",
            "{name: web, port: 80, protocol: HTTPS, hostname: tls.example.com, tls: {certificateRefs: [{name: tls-validity-checks-certificate}]}}",
        )
        + TEAM_NAMESPACES;
    let extra = extra
        .replacen(
            "metadata: {name: late, namespace: team-a}",
            "metadata: {name: late, namespace: team-a, creationTimestamp: \"2025-02-01T00:00:00Z\"}",
            1,
        )
        .replacen(
            "metadata: {name: early, namespace: team-b}",
            "metadata: {name: early, namespace: team-b, creationTimestamp: \"2025-01-01T00:00:00Z\"}",
            1,
        );
    let l = load_with("", &extra, &[]);
    assert_eq!(
        served_by(&l, "shared.example.com").as_deref(),
        Some("team-b/early-route[0]")
    );
    assert_eq!(
        served_by(&l, "gw.example.com").as_deref(),
        Some("gateway-conformance-infra/gw-route[0]")
    );
    assert_eq!(served_by(&l, "tls.example.com"), None);
    let w = warning(&l, "ListenerSet team-a/late");
    assert_eq!(w.field, "spec.listeners[0]");
    assert!(
        w.message.contains(
            "hostname shared.example.com on port 80 is already served by listener web of ListenerSet team-b/early"
        ),
        "{}",
        w.message
    );
    let w = warning(&l, "ListenerSet team-a/hijack");
    assert!(
        w.message
            .contains("already served by listener web of Gateway gateway-conformance-infra/shared"),
        "{}",
        w.message
    );
    let w = warning(&l, "ListenerSet gateway-conformance-infra/tls-on-80");
    assert!(
        w.message.contains("port 80 is already served with protocol HTTP"),
        "{}",
        w.message
    );
    // A route of a ListenerSet with no listener left is told so.
    let w = warning(&l, "HTTPRoute team-a/late-route");
    assert!(
        w.message
            .contains("ListenerSet team-a/late has no HTTP or HTTPS listener"),
        "{}",
        w.message
    );
}

#[test]
fn listener_set_certificates_need_their_own_reference_grant() {
    let secure = "{name: secure, port: 443, protocol: HTTPS, hostname: secure.example.com, tls: {certificateRefs: [{name: tls-validity-checks-certificate, namespace: gateway-conformance-infra}]}}";
    let extra =
        shared_gateway("{namespaces: {from: All}}") + &listener_set("team-a", "secure", secure) + TEAM_NAMESPACES;
    let e = errors_of("", &extra);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].resource, "ListenerSet team-a/secure");
    assert_eq!(e[0].field, "spec.listeners[0].tls.certificateRefs[0]");
    assert!(
        e[0].message.contains(
            "no ReferenceGrant in namespace gateway-conformance-infra allows ListenerSets of namespace team-a"
        ),
        "{}",
        e[0].message
    );

    let grant = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: team-a-certificates, namespace: gateway-conformance-infra}
spec:
  from: [{group: gateway.networking.k8s.io, kind: ListenerSet, namespace: team-a}]
  to: [{group: "", kind: Secret}]
"#;
    let l = load_with("", &(extra + grant), &[]);
    let listener = l.listener("shared", 443).unwrap();
    let tls = listener.tls.as_ref().unwrap();
    assert_eq!(tls.certificates[0].sni_hosts, ["secure.example.com"]);
    assert!(listener.routes.virtual_host("secure.example.com").is_some());
}

#[test]
fn experimental_xlistener_sets_are_read() {
    let extra = shared_gateway("{namespaces: {from: Same}}")
        + r#"
---
apiVersion: gateway.networking.x-k8s.io/v1alpha1
kind: XListenerSet
metadata: {name: experimental, namespace: gateway-conformance-infra}
spec:
  parentRef: {name: shared}
  listeners:
  - {name: web, port: 80, protocol: HTTP, hostname: x.example.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: x-route, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{group: gateway.networking.x-k8s.io, kind: XListenerSet, name: experimental}]
  rules: [{}]
---
apiVersion: gateway.networking.x-k8s.io/v1alpha1
kind: XMesh
metadata: {name: mesh}
spec: {}
"#;
    let l = load_with("", &extra, &[]);
    assert_eq!(
        served_by(&l, "x.example.com").as_deref(),
        Some("gateway-conformance-infra/x-route[0]")
    );
    let w = warning(&l, "XMesh default/mesh");
    assert!(w.message.contains("not supported yet"), "{}", w.message);
}

#[test]
fn error_invalid_allowed_listeners() {
    let e = errors_of("", &shared_gateway("{namespaces: {from: Some}}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].resource, "Gateway gateway-conformance-infra/shared");
    assert_eq!(e[0].field, "spec.allowedListeners.namespaces.from");
    assert!(
        e[0].message
            .contains("unknown value \"Some\" (None, Same, All or Selector)"),
        "{}",
        e[0].message
    );
    let e = errors_of("", &shared_gateway("{namespaces: {from: Selector}}"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].field, "spec.allowedListeners.namespaces.selector");
}

#[test]
fn matches_that_never_win_are_warnings() {
    // Two routes with the same match: the older (first in the files, no creationTimestamp)
    // wins, so the newer one's rule never matches. A more specific match still wins by
    // precedence, wherever it is declared.
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: first, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /shop}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: second, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /shop/cart}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /shop}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
"#;
    let l = load_with("", extra, &[]);
    let shadowed: Vec<&Finding> = l
        .compiled
        .warnings
        .iter()
        .filter(|w| w.message.contains("never matches"))
        .collect();
    assert_eq!(shadowed.len(), 1, "{shadowed:?}");
    assert_eq!(shadowed[0].resource, "HTTPRoute gateway-conformance-infra/second");
    assert_eq!(shadowed[0].field, "spec.rules[1]");
    assert!(
        shadowed[0]
            .message
            .contains("HTTPRoute gateway-conformance-infra/first spec.rules[0]"),
        "{}",
        shadowed[0].message
    );
    let (route, _, _) = l.find(&req("same-namespace", None, "/shop/cart/1")).unwrap();
    assert_eq!(route.name, "gateway-conformance-infra/second[0]");
}

#[test]
fn grpcroutes_compile_to_path_matches_and_respect_allowed_kinds() {
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: http-only, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: meshgate-test
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
    allowedRoutes:
      kinds: [{kind: HTTPRoute}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: plain, namespace: gateway-conformance-infra, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: http-only}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /plain}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}, {name: http-only}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Ping}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{method: {method: Pong}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - backendRefs: [{name: infra-backend-v3, port: 8080}]

"#;
    let l = load_with("", extra, &[]);
    let (route, _, _) = l
        .find(&req("same-namespace", None, "/echo.Echo/Ping"))
        .expect("exact method");
    let RouteAction::Forward(f) = &route.action else {
        panic!("{:?}", route.action)
    };
    let cluster = &l.snapshot().clusters[f.destinations[0].cluster];
    assert_eq!(cluster.protocol, UpstreamProtocol::Http2, "gRPC backends speak HTTP/2");
    // A method-only match outranks the rule without matches (the GRPCRoute precedence).
    let cluster_of = |path: &str| {
        let (route, _, _) = l.find(&req("same-namespace", None, path)).expect("route");
        let RouteAction::Forward(f) = &route.action else {
            panic!("{:?}", route.action)
        };
        l.snapshot().clusters[f.destinations[0].cluster].name.clone()
    };
    assert!(cluster_of("/any.Service/Pong").contains("infra-backend-v2"));
    assert!(cluster_of("/any.Service/Other").contains("infra-backend-v3"));
    // The HTTPRoute declared earlier made the cluster first: HTTP/2 still holds for it.
    assert!(cluster_of("/echo.Echo/Ping").contains("infra-backend-v1"));
    // The listener that only takes HTTPRoutes does not serve it, and says so.
    assert!(l.find(&req("http-only", None, "/echo.Echo/Ping")).is_none());
    let w = l
        .compiled
        .warnings
        .iter()
        .find(|w| w.resource == "GRPCRoute gateway-conformance-infra/echo")
        .expect("warning");
    assert!(w.message.contains("does not allow kind GRPCRoute"), "{}", w.message);
}

#[test]
fn a_backend_tls_policy_on_an_istio_cluster_says_it_replaces_the_destination_rule_tls() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: v1, namespace: gateway-conformance-infra}
spec:
  hosts: [infra-backend-v1.gateway-conformance-infra.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: v1, namespace: gateway-conformance-infra}
spec:
  host: infra-backend-v1.gateway-conformance-infra.svc.cluster.local
  trafficPolicy:
    tls: {mode: SIMPLE, insecureSkipVerify: true}
---
apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {name: v1-tls, namespace: gateway-conformance-infra}
spec:
  targetRefs: [{group: "", kind: Service, name: infra-backend-v1}]
  validation: {hostname: v1.example.com, wellKnownCACertificates: System}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: tls-route, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /tls}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
"#;
    let l = load_with("", extra, &[]);
    let (route, _, _) = l.find(&req("same-namespace", None, "/tls")).expect("route");
    let RouteAction::Forward(f) = &route.action else {
        panic!("{:?}", route.action)
    };
    let tls = l.snapshot().clusters[f.destinations[0].cluster]
        .tls
        .as_ref()
        .expect("tls");
    assert_eq!(tls.sni.as_deref(), Some("v1.example.com"));
    assert!(!tls.insecure_skip_verify);
    assert!(
        l.compiled
            .warnings
            .iter()
            .any(|w| w.message.contains("replaces the DestinationRule tls")),
        "{:#?}",
        l.compiled.warnings.iter().map(|w| &w.message).collect::<Vec<_>>()
    );
}

const V1_CLUSTER: &str = "outbound|8080||infra-backend-v1.gateway-conformance-infra.svc.cluster.local";

#[test]
fn destination_rules_set_the_traffic_policy_of_service_backends() {
    // As in Istio, a DestinationRule for a Service's host applies to Gateway API backends fed
    // from its EndpointSlices: the port-level policy first, then the rule's.
    let rule = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: v1-policy, namespace: gateway-conformance-infra}
spec:
  host: infra-backend-v1
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    outlierDetection: {consecutive5xxErrors: 2}
    connectionPool:
      http: {h2UpgradePolicy: UPGRADE}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
"#;
    let l = load_with("manifests/httproute-simple-same-namespace.yaml", rule, &[]);
    let c = l.cluster(V1_CLUSTER);
    assert_eq!(
        c.load_balancer,
        LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()))
    );
    assert_eq!(c.outlier.as_ref().map(|o| o.consecutive_5xx), Some(2));
    assert_eq!(c.protocol, UpstreamProtocol::Http2);
    assert_eq!(c.discovery, Discovery::Static);

    // A rule for another host changes nothing.
    let other = rule.replace("host: infra-backend-v1", "host: infra-backend-v2");
    let l = load_with("manifests/httproute-simple-same-namespace.yaml", &other, &[]);
    let c = l.cluster(V1_CLUSTER);
    assert_eq!(c.load_balancer, LoadBalancer::LeastRequest);
    assert!(c.outlier.is_none());
    assert_eq!(c.protocol, UpstreamProtocol::Http1);

    // PASSTHROUGH cannot apply to a Service backend: a warning, and its endpoints are kept.
    let passthrough = rule.replace(
        "loadBalancer: {consistentHash: {httpHeaderName: x-user}}",
        "loadBalancer: {simple: PASSTHROUGH}",
    );
    let l = load_with("manifests/httproute-simple-same-namespace.yaml", &passthrough, &[]);
    let c = l.cluster(V1_CLUSTER);
    assert_eq!(c.discovery, Discovery::Static);
    assert!(
        l.compiled
            .warnings
            .iter()
            .any(|w| w.message.contains("asks for PASSTHROUGH")),
        "{:?}",
        l.compiled.warnings
    );
}

#[test]
fn null_fields_count_as_not_given() {
    // `rules:` and `hostnames:` with no value: the API server applies the defaults, so the
    // route gets the default catch-all rule, which has no backends (500).
    let extra = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: nulls, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: same-namespace}]
  hostnames:
  rules:
"#;
    let l = load_with("manifests/httproute-simple-same-namespace.yaml", extra, &[]);
    let names: Vec<&str> = l
        .snapshot()
        .listeners
        .iter()
        .flat_map(|li| li.routes.virtual_hosts.iter())
        .flat_map(|vh| vh.routes.iter())
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("gateway-conformance-infra/nulls")),
        "{names:?}"
    );
}

#[test]
fn a_null_label_value_is_still_an_error() {
    // Dropping it would widen the selector: `app: null` is a bad entry, not a field left out.
    let extra = r#"
apiVersion: v1
kind: Namespace
metadata: {name: extra}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: extra}
spec:
  selector: {istio: null}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
"#;
    let errors = errors_of("manifests/httproute-simple-same-namespace.yaml", extra);
    assert!(errors.iter().any(|e| e.field.contains("selector")), "{errors:?}");
}
