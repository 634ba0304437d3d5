//! End-to-end: Istio YAML → snapshot, and one test per validation error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderMap;
use meshgate_model::matcher::RequestInfo;
use meshgate_model::snapshot::{
    CookieKey, Discovery, HashKey, LoadBalancer, RetryOn, RetryPolicy, RouteAction, Snapshot, TryFailure,
    UpstreamProtocol,
};
use meshgate_model::{CompileOptions, Compiled, Finding, Findings, Severity, compile, source};

fn load_at(file: &Path, yaml: &str) -> Result<Compiled, Findings> {
    let docs = source::parse_str(file, yaml)?;
    compile(&docs, &CompileOptions::default())
}

fn load(yaml: &str) -> Result<Compiled, Findings> {
    load_at(Path::new("test.yaml"), yaml)
}

fn ok(yaml: &str) -> Compiled {
    match load(yaml) {
        Ok(c) => c,
        Err(f) => panic!("unexpected findings:\n{f}"),
    }
}

fn errors(yaml: &str) -> Vec<Finding> {
    match load(yaml) {
        Ok(_) => panic!("expected errors"),
        Err(f) => f.errors().cloned().collect(),
    }
}

/// Looks up a request on the listener for `port`; returns the route name and the clusters
/// with their weights.
fn route(
    snap: &Snapshot,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(String, Vec<(String, u32)>)> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let req = RequestInfo {
        host,
        authority: host,
        path,
        query,
        method: "GET",
        scheme: "http",
        port,
        headers: &map,
        sni: None,
    };
    let listener = snap.listeners.iter().find(|l| l.port == port)?;
    let m = listener.routes.find(&req)?;
    let clusters = match &m.route.action {
        RouteAction::Forward(f) => f
            .destinations
            .iter()
            .map(|d| (snap.clusters[d.cluster].name.clone(), d.weight))
            .collect(),
        _ => Vec::new(),
    };
    Some((m.route.name.clone(), clusters))
}

const GATEWAY: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
"#;

const REVIEWS: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v1}}
  - {address: 10.0.0.3, labels: {version: v2}, ports: {http: 9999}, weight: 3}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpCookie: {name: user}}
"#;

fn canary() -> String {
    format!(
        r#"{GATEWAY}
---
{REVIEWS}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - name: jason
    match:
    - headers:
        end-user: {{exact: jason}}
    - headers:
        X-Tenant: {{regex: "gold|platinum"}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - match:
    - headers:
        cookie: {{regex: ".*experiment=new-ui.*"}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - match:
    - uri: {{prefix: /api}}
    timeout: 1.5s
    route:
    - destination: {{host: reviews, subset: v1}}
      weight: 90
    - destination: {{host: reviews, subset: v2}}
      weight: 10
  - route:
    - destination: {{host: reviews}}
      weight: 30
"#
    )
}

#[test]
fn canary_with_subsets_and_header_routing() {
    let c = ok(&canary());
    let snap = &c.snapshot;
    assert_eq!(snap.listeners.len(), 1);
    assert_eq!(snap.listeners[0].name, "0.0.0.0_8080");
    let v1 = "outbound|9080|v1|reviews.default.svc.cluster.local".to_string();
    let v2 = "outbound|9080|v2|reviews.default.svc.cluster.local".to_string();
    let all = "outbound|9080||reviews.default.svc.cluster.local".to_string();

    let (name, dests) = route(snap, 8080, "shop.example.com", "/api/x", &[]).unwrap();
    assert_eq!(name, "default/reviews[2]");
    assert_eq!(dests, vec![(v1.clone(), 90), (v2.clone(), 10)]);
    let (name, dests) = route(snap, 8080, "a.com", "/", &[("end-user", "jason")]).unwrap();
    assert_eq!(name, "default/reviews.jason");
    assert_eq!(dests, vec![(v2.clone(), 100)]);
    let (name, _) = route(snap, 8080, "a.com", "/", &[("x-tenant", "gold")]).unwrap();
    assert_eq!(name, "default/reviews.jason");
    let (name, _) = route(snap, 8080, "a.com", "/", &[("cookie", "a=1; experiment=new-ui; b=2")]).unwrap();
    assert_eq!(name, "default/reviews[1]");
    // A lone destination takes all traffic whatever its weight says.
    let (name, dests) = route(snap, 8080, "a.com", "/other", &[("x-tenant", "silver")]).unwrap();
    assert_eq!(name, "default/reviews[3]");
    assert_eq!(dests, vec![(all.clone(), 100)]);

    // Clusters: deduplicated, subset endpoints filtered, endpoint ports and weights.
    assert_eq!(snap.clusters.len(), 3);
    let c1 = &snap.clusters[snap.cluster_by_name(&v1).unwrap()];
    assert_eq!(
        c1.endpoints.iter().map(|e| e.address.as_str()).collect::<Vec<_>>(),
        ["10.0.0.1", "10.0.0.2"]
    );
    assert_eq!(c1.discovery, Discovery::Static);
    let c2 = &snap.clusters[snap.cluster_by_name(&v2).unwrap()];
    assert_eq!(
        (c2.endpoints.len(), c2.endpoints[0].port, c2.endpoints[0].weight),
        (1, 9999, 3)
    );
    let c_all = &snap.clusters[snap.cluster_by_name(&all).unwrap()];
    assert_eq!(c_all.endpoints.len(), 3);
    // LB precedence: subset > port level > top level.
    assert_eq!(
        c2.load_balancer,
        LoadBalancer::ConsistentHash(HashKey::Cookie(CookieKey::read_only("user")))
    );
    assert_eq!(c1.load_balancer, LoadBalancer::Random);
    assert_eq!(c_all.load_balancer, LoadBalancer::Random);
    assert_eq!(c1.protocol, UpstreamProtocol::Http1);

    // Timeout and total weight.
    let l = &snap.listeners[0].routes;
    let vh = &l.virtual_hosts[0];
    match &vh.routes[2].action {
        RouteAction::Forward(f) => {
            assert_eq!(f.total_weight, 100);
            assert_eq!(f.timeout, Some(std::time::Duration::from_millis(1500)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn host_binding_redirects_rewrites_and_direct_responses() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*/*.example.com", "./local.test"]
    tls: {httpsRedirect: yes}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: other}
spec:
  selector: {app: not-me}
  servers:
  - port: {number: 81, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: apps}
spec:
  hosts: [www.example.com, local.test, other.org]
  gateways: [edge/gw]
  http:
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {prefix: /health}, queryParams: {full: {}}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - match: [{uri: {regex: "/u/([0-9]+)"}}]
    rewrite:
      uriRegexRewrite: {match: "/u/([0-9]+)", rewrite: '/users/\1'}
    route: [{destination: {host: users.example.internal, port: {number: 8080}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: local, namespace: edge}
spec:
  hosts: [local.test]
  gateways: [gw]
  http:
  - directResponse: {status: 204}
"#;
    let c = ok(yaml);
    let snap = &c.snapshot;
    // The gateway with a non-matching selector is not served.
    assert_eq!(snap.listeners.len(), 1);
    let table = &snap.listeners[0].routes;
    // `local.test` is restricted to VirtualServices of namespace `edge`; other.org has no overlap.
    assert!(table.virtual_host("other.org").is_none());
    let www = table.virtual_host("www.example.com").unwrap();
    assert!(www.https_redirect);
    assert_eq!(www.routes.len(), 3);
    let local = table.virtual_host("local.test").unwrap();
    assert_eq!(local.routes.len(), 1);
    assert_eq!(local.routes[0].name, "edge/local[0]");
    match &www.routes[0].action {
        RouteAction::Redirect(r) => assert_eq!((r.path.as_deref(), r.status), (Some("/new"), 302)),
        other => panic!("{other:?}"),
    }
    match &www.routes[1].action {
        RouteAction::DirectResponse(d) => assert_eq!(&d.body[..], b"hello"),
        other => panic!("{other:?}"),
    }
    match &www.routes[2].action {
        RouteAction::Forward(f) => match f.rewrite.as_ref().and_then(|r| r.path.as_ref()) {
            Some(meshgate_model::snapshot::PathRewrite::Regex { pattern, substitution }) => {
                assert_eq!(pattern.replace("/u/42", substitution.as_str()), "/users/42");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let (name, dests) = route(snap, 80, "www.example.com", "/u/7", &[]).unwrap();
    assert_eq!(name, "apps/web[2]");
    assert_eq!(dests[0].0, "outbound|8080||users.example.internal");
    assert!(c.warnings.iter().any(|w| {
        w.message
            .contains("no ServiceEntry defines host users.example.internal")
    }));
    let cluster = &snap.clusters[0];
    assert_eq!(cluster.discovery, Discovery::Dns);
    assert_eq!(cluster.endpoints[0].address, "users.example.internal");
}

#[test]
fn host_intersection() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.a.com"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: ["*", "b.a.com", "*.a.com", "B.Other.com"]
  gateways: [gw]
  http:
  - directResponse: {status: 200}
"#;
    let c = ok(yaml);
    let vh = &c.snapshot.listeners[0].routes.virtual_hosts[0];
    assert_eq!(vh.domains, ["*.a.com", "b.a.com"]);
}

#[test]
fn mesh_listener_and_grpc_protocol() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: prod}
spec:
  hosts: [ratings.prod.svc.cluster.local]
  ports: [{number: 50051, name: grpc-api, protocol: TCP}]
  resolution: STATIC
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-1, namespace: prod}
spec: {address: 10.1.0.1, labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: prod}
spec: {address: 10.1.0.9, labels: {app: other}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [api.ext.com]
  ports: [{number: 443, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: prod}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings}}]
"#;
    let docs = source::parse_str(Path::new("m.yaml"), yaml).unwrap();
    let options = CompileOptions {
        mesh_port: Some(15001),
        ..CompileOptions::default()
    };
    let c = compile(&docs, &options).unwrap();
    let snap = &c.snapshot;
    let mesh = snap.listeners.iter().find(|l| l.port == 15001).unwrap();
    assert_eq!(mesh.name, "0.0.0.0_15001");
    for host in [
        "ratings",
        "ratings.prod",
        "ratings.prod.svc",
        "ratings.prod.svc.cluster.local",
    ] {
        let vh = mesh.routes.virtual_host(host).unwrap();
        assert_eq!(vh.routes[0].name, "prod/ratings[0]");
    }
    let (_, dests) = route(snap, 15001, "ratings.prod", "/", &[]).unwrap();
    let cluster = &snap.clusters[snap.cluster_by_name(&dests[0].0).unwrap()];
    assert_eq!(cluster.protocol, UpstreamProtocol::Http2);
    assert_eq!(cluster.endpoints.len(), 1);
    assert_eq!(cluster.endpoints[0].address, "10.1.0.1");
    assert_eq!(cluster.endpoints[0].port, 50051);
    assert_eq!(cluster.load_balancer, LoadBalancer::LeastRequest);
    // Default route for a service no VirtualService claims; DNS endpoint is the host itself.
    let (name, dests) = route(snap, 15001, "api.ext.com", "/", &[]).unwrap();
    assert_eq!(name, "default/api.ext.com");
    let ext = &snap.clusters[snap.cluster_by_name(&dests[0].0).unwrap()];
    assert_eq!(ext.discovery, Discovery::Dns);
    assert_eq!(
        (ext.endpoints[0].address.as_str(), ext.endpoints[0].port),
        ("api.ext.com", 443)
    );
    // Unsupported fields are warned, not dropped silently.
    assert!(c.warnings.iter().all(|w| w.severity == Severity::Warning));
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshgate-istio-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const HTTPS: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, serverCertificate: certs/a.pem, privateKey: certs/a.key}
  - port: {number: 443, name: https-b, protocol: HTTPS}
    hosts: [b.example.com]
    tls: {mode: SIMPLE, serverCertificate: certs/b.pem, privateKey: certs/a.key}
"#;

#[test]
fn tls_certificates_are_loaded_relative_to_the_yaml_file() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    std::fs::write(dir.join("certs/a.pem"), pem).unwrap();
    std::fs::write(dir.join("certs/b.pem"), pem).unwrap();
    std::fs::write(
        dir.join("certs/a.key"),
        b"-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let c = load_at(&dir.join("gw.yaml"), HTTPS).unwrap();
    let tls = c.snapshot.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.alpn, ["h2", "http/1.1"]);
    assert_eq!(tls.certificates.len(), 2);
    assert_eq!(tls.certificates[1].sni_hosts, ["b.example.com"]);
    assert_eq!(tls.certificates[0].cert_pem, pem);

    std::fs::remove_file(dir.join("certs/b.pem")).unwrap();
    let err = load_at(&dir.join("gw.yaml"), HTTPS).unwrap_err();
    let e: Vec<_> = err.errors().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].file, dir.join("gw.yaml"));
    assert_eq!(e[0].resource, "Gateway default/gw");
    assert_eq!(e[0].field, "spec.servers[1].tls.serverCertificate");
    assert!(e[0].message.contains("b.pem"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn error_malformed_yaml() {
    let err = load("kind: [\n").unwrap_err();
    assert_eq!(err.0[0].file, Path::new("test.yaml"));
    assert!(err.0[0].message.contains("malformed YAML"));
}

#[test]
fn error_unknown_istio_kind_and_warning_for_other_groups() {
    let e = errors(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    );
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].resource, "Sidecar default/s");
    let c = ok("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
    assert!(
        c.warnings[0]
            .message
            .contains("ignored: kind Deployment of apiVersion apps/v1 is not supported yet")
    );
}

#[test]
fn error_duplicate_names() {
    let docs = [
        source::parse_str(Path::new("a.yaml"), GATEWAY).unwrap(),
        source::parse_str(Path::new("b.yaml"), GATEWAY).unwrap(),
    ]
    .concat();
    let err = compile(&docs, &CompileOptions::default()).unwrap_err();
    let e: Vec<_> = err.errors().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].file, Path::new("b.yaml"));
    assert!(e[0].message.contains("a.yaml"), "{}", e[0].message);
}

fn vs_with(http: &str) -> String {
    format!(
        "{REVIEWS}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

#[test]
fn error_invalid_regex() {
    let e = errors(&vs_with(
        "  - match: [{uri: {regex: \"(unclosed\"}}]\n    route: [{destination: {host: reviews}}]\n",
    ));
    assert_eq!(e[0].resource, "VirtualService default/vs");
    assert_eq!(e[0].field, "spec.http[0].match[0].uri.regex");
    assert!(e[0].message.contains("unclosed"), "{}", e[0].message);
}

#[test]
fn error_weights_not_100() {
    let e = errors(&vs_with(
        "  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 60}\n    - {destination: {host: reviews, subset: v2}, weight: 30}\n",
    ));
    assert_eq!(e[0].field, "spec.http[0].route");
    assert!(e[0].message.contains("90"));
}

#[test]
fn error_undefined_subset() {
    let e = errors(&vs_with("  - route: [{destination: {host: reviews, subset: v3}}]\n"));
    assert_eq!(e[0].field, "spec.http[0].route[0].destination.subset");
}

#[test]
fn error_unknown_field_has_its_path() {
    let e = errors(&vs_with("  - route: [{destination: {hostt: reviews}}]\n"));
    assert_eq!(e[0].field, "spec.http[0].route[0].destination.hostt");
    assert!(e[0].message.contains("hostt"));
}

#[test]
fn error_several_actions_and_missing_hosts() {
    let e = errors(&vs_with("  - redirect: {uri: /x}\n    directResponse: {status: 200}\n"));
    assert_eq!(e[0].field, "spec.http[0]");
    let e =
        errors("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  http: []\n");
    assert_eq!(e[0].field, "spec.hosts");
}

#[test]
fn error_query_prefix_and_duplicate_subset() {
    let e = errors(&vs_with(
        "  - match: [{queryParams: {a: {prefix: x}}}]\n    route: [{destination: {host: reviews}}]\n",
    ));
    assert_eq!(e[0].field, "spec.http[0].match[0].queryParams.a.prefix");
    let e = errors(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: x\n  subsets: [{name: a}, {name: a}]\n",
    );
    assert_eq!(e[0].field, "spec.subsets[1].name");
}

#[test]
fn unsupported_fields_are_warnings_with_paths() {
    let c = ok(&vs_with(
        "  - retries: {attempts: 3}\n    corsPolicy: {allowOrigins: [{exact: \"https://a.example\"}]}\n    match: [{uri: {prefix: /}, statPrefix: reviews}]\n    route: [{destination: {host: reviews}}]\n",
    ));
    let fields: Vec<&str> = c.warnings.iter().map(|w| w.field.as_str()).collect();
    assert!(
        !fields
            .iter()
            .any(|f| f.ends_with("retries") || f.ends_with("corsPolicy")),
        "retries and corsPolicy are implemented: {fields:?}"
    );
    assert!(fields.contains(&"spec.http[0].match[0].statPrefix"), "{fields:?}");
}

/// The retry policy of the only route of a VirtualService bound to the gateway.
fn retry_of(http: &str) -> Option<RetryPolicy> {
    let c = ok(&format!(
        "{GATEWAY}\n---\n{}",
        vs_with(http).replace("hosts: [reviews]\n", "hosts: [\"*\"]\n  gateways: [bookinfo-gateway]\n")
    ));
    match &c.snapshot.listeners[0].routes.virtual_hosts[0].routes[0].action {
        RouteAction::Forward(f) => f.retry.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn retries_default_to_istios_policy() {
    let policy = retry_of("  - route: [{destination: {host: reviews}}]\n").expect("default policy");
    assert_eq!(policy.num_retries, 2);
    assert_eq!(
        policy.retry_on,
        RetryOn::CONNECT_FAILURE
            | RetryOn::REFUSED_STREAM
            | RetryOn::GRPC_UNAVAILABLE
            | RetryOn::GRPC_CANCELLED
            | RetryOn::RETRIABLE_STATUS_CODES
    );
    assert_eq!(policy.retriable_status_codes, [503]);
    assert_eq!(policy.per_try_timeout, None);
    assert_eq!(policy.backoff_base, Duration::from_millis(25));
    assert_eq!(policy.backoff_max, Duration::from_millis(250));
    assert!(policy.avoid_previous_hosts);
    assert!(policy.retries_response(503, None) && !policy.retries_response(500, None));
    assert!(policy.retries_response(200, Some(14)) && !policy.retries_response(200, Some(13)));
    assert!(policy.retries_failure(TryFailure::ConnectFailure));
    assert!(!policy.retries_failure(TryFailure::Reset));
    assert!(!policy.retries_failure(TryFailure::PerTryTimeout));
}

#[test]
fn retries_compile_attempts_timeouts_conditions_and_codes() {
    let policy = retry_of(
        "  - retries: {attempts: 4, perTryTimeout: 250ms, retryOn: \"gateway-error,409, retriable-4xx\", backoff: 10ms, retryRemoteLocalities: true}\n    route: [{destination: {host: reviews}}]\n",
    )
    .expect("policy");
    assert_eq!(policy.num_retries, 4);
    assert_eq!(policy.per_try_timeout, Some(Duration::from_millis(250)));
    assert_eq!(
        policy.retry_on,
        RetryOn::GATEWAY_ERROR | RetryOn::RETRIABLE_4XX | RetryOn::RETRIABLE_STATUS_CODES
    );
    assert_eq!(policy.retriable_status_codes, [409]);
    assert_eq!(policy.backoff_base, Duration::from_millis(10));
    assert_eq!(policy.backoff_max, Duration::from_millis(100));
    assert!(policy.retries_response(502, None) && !policy.retries_response(500, None));
    assert!(policy.retries_failure(TryFailure::PerTryTimeout) && policy.retries_failure(TryFailure::Reset));

    // Attempts without retryOn keep Istio's default conditions.
    let policy = retry_of("  - retries: {attempts: 1}\n    route: [{destination: {host: reviews}}]\n").expect("policy");
    assert_eq!(policy.num_retries, 1);
    assert_eq!(policy.retriable_status_codes, [503]);
    // A bare status code implies retriable-status-codes and replaces the default 503.
    let policy =
        retry_of("  - retries: {attempts: 2, retryOn: \"500\"}\n    route: [{destination: {host: reviews}}]\n")
            .expect("policy");
    assert_eq!(policy.retry_on, RetryOn::RETRIABLE_STATUS_CODES);
    assert_eq!(policy.retriable_status_codes, [500]);
    let policy = retry_of(
        "  - retries: {attempts: 2, retryIgnorePreviousHosts: false}\n    route: [{destination: {host: reviews}}]\n",
    )
    .expect("policy");
    assert!(!policy.avoid_previous_hosts);
}

#[test]
fn zero_attempts_disable_retries() {
    assert_eq!(
        retry_of("  - retries: {attempts: 0}\n    route: [{destination: {host: reviews}}]\n"),
        None
    );
    let c = ok(&vs_with(
        "  - retries: {attempts: 0, perTryTimeout: 1s}\n    route: [{destination: {host: reviews}}]\n",
    ));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.field == "spec.http[0].retries" && w.message.contains("attempts is 0")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn error_bad_retry_values_name_their_fields() {
    for (retries, field, text) in [
        ("{attempts: -1}", "spec.http[0].retries.attempts", "between 0"),
        (
            "{attempts: 2, perTryTimeout: \"10\"}",
            "spec.http[0].retries.perTryTimeout",
            "missing unit",
        ),
        (
            "{attempts: 2, perTryTimeout: 100us}",
            "spec.http[0].retries.perTryTimeout",
            "minimum of 1ms",
        ),
        (
            "{attempts: 2, retryOn: \"5xx,sometimes\"}",
            "spec.http[0].retries.retryOn",
            "\"sometimes\" is not a retry condition",
        ),
        (
            "{attempts: 2, retryOn: \"600\"}",
            "spec.http[0].retries.retryOn",
            "not an HTTP status code",
        ),
        (
            "{attempts: 2, retryOn: \"retriable-headers\"}",
            "spec.http[0].retries.retryOn",
            "not supported",
        ),
        (
            "{attempts: 2, backoff: fast}",
            "spec.http[0].retries.backoff",
            "duration",
        ),
        ("{attempts: 2, tries: 3}", "spec.http[0].retries.tries", "unknown field"),
    ] {
        let e = errors(&vs_with(&format!(
            "  - retries: {retries}\n    route: [{{destination: {{host: reviews}}}}]\n"
        )));
        assert_eq!(e.len(), 1, "{retries}: {e:?}");
        assert_eq!(e[0].field, field, "{retries}");
        assert!(e[0].message.contains(text), "{retries}: {}", e[0].message);
    }
}

#[test]
fn error_mixed_tls_and_plain_on_one_port() {
    let e = errors(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 80, name: a, protocol: HTTP}\n    hosts: ['*']\n  - port: {number: 80, name: b, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: SIMPLE, serverCertificate: /nonexistent/c.pem, privateKey: /nonexistent/k.pem}\n",
    );
    assert!(e.iter().any(|f| f.field == "spec.servers[1].tls.serverCertificate"));
}

#[test]
fn zero_timeout_disables_it() {
    let c = ok(&format!(
        "{GATEWAY}\n---\n{}",
        vs_with("  - timeout: 0s\n    route: [{destination: {host: reviews}}]\n")
            .replace("hosts: [reviews]\n", "hosts: [\"*\"]\n  gateways: [bookinfo-gateway]\n")
    ));
    let route = &c.snapshot.listeners[0].routes.virtual_hosts[0].routes[0];
    match &route.action {
        RouteAction::Forward(f) => assert_eq!(f.timeout, None),
        other => panic!("{other:?}"),
    }
}

#[test]
fn source_restricted_alternatives_never_match() {
    let yaml = format!(
        "{GATEWAY}\n---\n{}",
        vs_with(
            "  - match: [{sourceLabels: {app: admin}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - match: [{sourceLabels: {app: admin}}, {uri: {prefix: /open}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n",
        )
        .replace("hosts: [reviews]\n", "hosts: [\"*\"]\n  gateways: [bookinfo-gateway]\n")
    );
    let c = ok(&yaml);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.field == "spec.http[0].match[0].sourceLabels"),
        "{:?}",
        c.warnings
    );
    // Without the restriction the first rule would catch every request; instead it is left out.
    let (name, _) = route(&c.snapshot, 8080, "any", "/", &[]).expect("route");
    assert_eq!(name, "default/vs[2]");
    let (name, _) = route(&c.snapshot, 8080, "any", "/open/x", &[]).expect("route");
    assert_eq!(name, "default/vs[1]");
}

#[test]
fn rules_that_can_never_match_are_warnings() {
    let c = ok(r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.example.com]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews.example.com]
  http:
  - match:
    - uri: {prefix: /api}
    route: [{destination: {host: reviews.example.com}}]
  - match:
    - uri: {prefix: /api/v2}
      headers: {end-user: {exact: jason}}
    route: [{destination: {host: reviews.example.com}}]
  - match:
    - uri: {prefix: /api/v2}
    - uri: {prefix: /web}
    route: [{destination: {host: reviews.example.com}}]
  - match:
    - headers: {end-user: {exact: jason}}
    route: [{destination: {host: reviews.example.com}}]
  - route: [{destination: {host: reviews.example.com}}]
  - match:
    - uri: {exact: /late}
    route: [{destination: {host: reviews.example.com}}]
"#);
    let shadowed: Vec<(&str, &str)> = c
        .warnings
        .iter()
        .filter(|w| w.message.contains("never matches"))
        .map(|w| (w.field.as_str(), w.message.as_str()))
        .collect();
    assert_eq!(shadowed.len(), 2, "{shadowed:?}");
    assert_eq!(shadowed[0].0, "spec.http[1]");
    assert!(shadowed[0].1.contains("spec.http[0]"), "{shadowed:?}");
    // http[2] has an alternative (/web) http[0] does not cover; http[3] needs a header http[0]
    // does not ask for: both can match.
    assert_eq!(shadowed[1].0, "spec.http[5]");
    assert!(shadowed[1].1.contains("spec.http[4]"), "{shadowed:?}");
}

#[test]
fn two_mesh_virtual_services_for_one_host_conflict() {
    let vs = |name: &str, path: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [ratings.example.com]\n  http:\n  - match: [{{uri: {{prefix: {path}}}}}]\n    route: [{{destination: {{host: ratings.example.com}}}}]\n---\n"
        )
    };
    let c = ok(&format!("{}{}", vs("first", "/a"), vs("second", "/b")));
    let conflicts: Vec<&Finding> = c.warnings.iter().filter(|w| w.message.contains("IST0109")).collect();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].resource, "VirtualService default/second");
    assert_eq!(conflicts[0].field, "spec.hosts[0]");
    assert!(conflicts[0].message.contains("VirtualService default/first"));
}

const POOLED: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: http-alt, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 2s}
      http: {http1MaxPendingRequests: 3, maxRetries: 4}
    portLevelSettings:
    - port: {number: 81}
      connectionPool:
        http: {http2MaxRequests: 20}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool:
        http: {maxRequestsPerConnection: 1, idleTimeout: 5s}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /a}}]
    route: [{destination: {host: ratings, port: {number: 80}}}]
  - match: [{uri: {prefix: /b}}]
    route: [{destination: {host: ratings, port: {number: 81}}}]
  - route: [{destination: {host: ratings, port: {number: 80}, subset: v1}}]
"#;

#[test]
fn connection_pool_settings_follow_istio_precedence() {
    use meshgate_model::snapshot::ConnectionPoolSettings;
    let c = ok(POOLED);
    let pool = |name: &str| {
        c.snapshot
            .clusters
            .iter()
            .find(|cl| cl.name == name)
            .unwrap_or_else(|| panic!("cluster {name}"))
            .pool
    };
    let rule = pool("outbound|80||ratings");
    assert_eq!(rule.max_connections, 10);
    assert_eq!(rule.connect_timeout, Duration::from_secs(2));
    assert_eq!(rule.max_pending_requests, 3);
    assert_eq!(rule.max_retries, 4);
    assert_eq!(rule.max_requests, u32::MAX);
    // Port-level and subset connectionPool objects replace the rule's whole connectionPool.
    let port = pool("outbound|81||ratings");
    assert_eq!(port.max_requests, 20);
    assert_eq!(port.max_connections, u32::MAX);
    let subset = pool("outbound|80|v1|ratings");
    assert_eq!(subset.max_requests_per_connection, 1);
    assert_eq!(subset.idle_timeout, Duration::from_secs(5));
    assert_eq!(
        subset.max_pending_requests,
        ConnectionPoolSettings::ISTIO_DEFAULT.max_pending_requests
    );
    let warned: Vec<&str> = c.warnings.iter().map(|w| w.field.as_str()).collect();
    assert!(
        !warned.iter().any(|f| f.contains("connectionPool")),
        "supported fields are not warned about: {warned:?}"
    );
}

#[test]
fn error_bad_connection_pool_values_have_paths() {
    let yaml = POOLED
        .replace("maxConnections: 10", "maxConnections: -1")
        .replace("idleTimeout: 5s", "idleTimeout: soon");
    let e = errors(&yaml);
    let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
    assert!(
        fields.contains(&"spec.trafficPolicy.connectionPool.tcp.maxConnections"),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.subsets[0].trafficPolicy.connectionPool.http.idleTimeout"),
        "{fields:?}"
    );
    let unsupported = ok(&POOLED.replace("connectTimeout: 2s", "connectTimeout: 2s, idleTimeout: 1h"));
    assert!(
        unsupported
            .warnings
            .iter()
            .any(|w| w.field == "spec.trafficPolicy.connectionPool.tcp.idleTimeout"),
        "tcp.idleTimeout is warned about"
    );
}

#[test]
fn fault_injection_is_compiled_and_bad_values_are_errors() {
    let vs = |fault: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: f}}\nspec:\n  hosts: [a.example.com]\n  http:\n  - fault: {fault}\n    route: [{{destination: {{host: a.example.com}}}}]\n"
        )
    };
    let c = ok(&vs(
        "{delay: {fixedDelay: 2s, percentage: {value: 12.5}}, abort: {httpStatus: 503, percentage: {value: 10}}}",
    ));
    assert!(
        !c.warnings.iter().any(|w| w.field.contains("fault")),
        "fault is supported: {:?}",
        c.warnings
    );
    let cases = [
        ("{abort: {httpStatus: 99}}", "spec.http[0].fault.abort.httpStatus"),
        (
            "{abort: {httpStatus: 503, percentage: {value: 150}}}",
            "spec.http[0].fault.abort.percentage.value",
        ),
        (
            "{abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}}",
            "spec.http[0].fault.abort",
        ),
        ("{abort: {grpcStatus: NOPE}}", "spec.http[0].fault.abort.grpcStatus"),
        ("{delay: {fixedDelay: soon}}", "spec.http[0].fault.delay.fixedDelay"),
        ("{delay: {percent: 50}}", "spec.http[0].fault.delay.fixedDelay"),
    ];
    for (fault, field) in cases {
        let e = errors(&vs(fault));
        assert!(e.iter().any(|f| f.field == field), "{fault}: {e:?}");
    }
}

#[test]
fn health_check_annotation_is_read_and_checked() {
    let dr = |annotation: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: r\n  annotations:\n    meshgate.io/health-check: '{annotation}'\nspec:\n  host: reviews.example.com\n"
        )
    };
    ok(&dr(r#"{"path": "/healthz", "interval": "2s"}"#));
    for bad in [
        r#"{"path": "/x", "interval": "soon"}"#,
        r#"{"unhealthyThreshold": 0}"#,
        r#"{"pathz": "/"}"#,
    ] {
        let e = errors(&dr(bad));
        assert!(
            e.iter()
                .any(|f| f.field == "metadata.annotations.meshgate.io/health-check"),
            "{bad}: {e:?}"
        );
    }
}

/// A ServiceEntry `api.test` on port 80 and a DestinationRule for it with `policy` (YAML).
fn tls_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api}}\nspec:\n  hosts: [api.test]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 127.0.0.1}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api}}\nspec:\n  host: api.test\n{policy}---\n{}",
        vs_with("  - route: [{destination: {host: api.test}}]\n").replace("hosts: [reviews]\n", "hosts: [api.test]\n")
    )
}

#[test]
fn upstream_tls_is_read_with_port_level_precedence_and_files_relative_to_the_yaml() {
    let dir = temp_dir();
    std::fs::write(
        dir.join("ca.pem"),
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let c = load_at(
        &dir.join("dr.yaml"),
        &tls_rule(
            "  trafficPolicy:\n    tls: {mode: SIMPLE, sni: top.test}\n    portLevelSettings:\n    - port: {number: 80}\n      tls: {mode: SIMPLE, caCertificates: ca.pem, subjectAltNames: [api.test]}\n",
        ),
    )
    .unwrap_or_else(|f| panic!("{f}"));
    let cluster = c
        .snapshot
        .clusters
        .iter()
        .find(|c| c.service == "api.test")
        .expect("cluster");
    let tls = cluster.tls.as_ref().expect("tls");
    assert_eq!(tls.sni, None, "the port's settings replace the rule's whole");
    assert_eq!(tls.subject_alt_names, ["api.test"]);
    assert_eq!(tls.ca_certificates.as_ref().unwrap().path, dir.join("ca.pem"));
    assert!(tls.client_certificate.is_none());

    // Without its own, the ServiceEntry's subjectAltNames are checked (URI SANs left out).
    let c = ok(&tls_rule("  trafficPolicy:\n    tls: {mode: SIMPLE}\n").replace(
        "  resolution: STATIC\n",
        "  resolution: STATIC\n  subjectAltNames: [\"spiffe://cluster.local/ns/x/sa/y\", api.internal]\n",
    ));
    let cluster = c
        .snapshot
        .clusters
        .iter()
        .find(|c| c.service == "api.test")
        .expect("cluster");
    assert_eq!(cluster.tls.as_ref().expect("tls").subject_alt_names, ["api.internal"]);

    let plain = ok(&tls_rule("  trafficPolicy:\n    tls: {mode: DISABLE}\n"));
    assert!(plain.snapshot.clusters.iter().all(|c| c.tls.is_none()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn upstream_tls_problems_are_errors_or_warnings_with_their_paths() {
    let e = errors(&tls_rule(
        "  trafficPolicy:\n    tls: {mode: MUTUAL, privateKey: k.pem}\n",
    ));
    let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
    assert!(
        fields.contains(&"spec.trafficPolicy.tls.clientCertificate"),
        "{fields:?}"
    );
    assert!(fields.contains(&"spec.trafficPolicy.tls.privateKey"), "{fields:?}");

    let e = errors(&tls_rule(
        "  trafficPolicy:\n    tls: {mode: SIMPLE, credentialName: api-secret}\n",
    ));
    assert_eq!(e[0].field, "spec.trafficPolicy.tls.credentialName");
    let e = errors(&tls_rule(
        "  trafficPolicy:\n    tls: {mode: SIMPLE, subjectAltNames: [\"*.example.com\"]}\n",
    ));
    assert_eq!(e[0].field, "spec.trafficPolicy.tls.subjectAltNames[0]");
    let e = errors(&tls_rule(
        "  trafficPolicy:\n    tls: {mode: SIMPLE, sni: \"bad name\"}\n",
    ));
    assert_eq!(e[0].field, "spec.trafficPolicy.tls.sni");
    let e = errors(&tls_rule("  trafficPolicy:\n    tls: {mode: STRICT}\n"));
    assert_eq!(e[0].field, "spec.trafficPolicy.tls.mode");
    let e = errors(&tls_rule("  trafficPolicy:\n    tls: {mode: SIMPLE, verify: true}\n"));
    assert!(e[0].field.starts_with("spec.trafficPolicy.tls"), "{}", e[0].field);

    // Istio mTLS needs the mesh CA: a warning, and the cluster stays plain text.
    let c = ok(&tls_rule(
        "  subsets:\n  - name: v1\n    trafficPolicy:\n      tls: {mode: ISTIO_MUTUAL}\n",
    ));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.field == "spec.subsets[0].trafficPolicy.tls.mode"),
        "{:?}",
        c.warnings
    );
    assert!(c.snapshot.clusters.iter().all(|c| c.tls.is_none()));
}

#[test]
fn http_cookie_problems_are_errors_and_a_missing_ttl_is_a_warning() {
    let dr = |cookie: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: x\n  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        httpCookie: {cookie}\n"
        )
    };
    let e = errors(&dr(
        "{name: \"a b\", ttl: 10s, path: \"/a;b\", attributes: [{name: \"Same Site\", value: \"x;y\"}]}",
    ));
    let fields: Vec<&str> = e.iter().map(|f| f.field.as_str()).collect();
    let base = "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie";
    for field in ["name", "path", "attributes[0].name", "attributes[0].value"] {
        assert!(
            fields.contains(&format!("{base}.{field}").as_str()),
            "{field}: {fields:?}"
        );
    }
    let e = errors(&dr("{name: s, ttl: soon}"));
    assert_eq!(e[0].field, format!("{base}.ttl"));

    let c = ok(&dr("{name: s}"));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.field == format!("{base}.ttl") && w.message.contains("only reads")),
        "{:?}",
        c.warnings
    );
    let c = ok(&dr("{name: s, ttl: 0s, path: /, attributes: [{name: Secure}]}"));
    assert!(
        c.warnings.iter().all(|w| !w.field.contains("httpCookie")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn certificate_settings_on_a_plain_text_server_are_warnings() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
    tls: {httpsRedirect: true, credentialName: shop-cert}
"#;
    let c = ok(yaml);
    assert!(c.snapshot.listeners[0].tls.is_none());
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = &c.warnings[0];
    assert_eq!(w.field, "spec.servers[0].tls.credentialName");
    assert!(
        w.message.contains("credentialName has no effect on a HTTP server"),
        "{}",
        w.message
    );
}

#[test]
fn tls_protocol_versions_are_checked() {
    let gateway = |tls: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: ["*"]
    tls: {{mode: SIMPLE, serverCertificate: /nonexistent.crt, privateKey: /nonexistent.key, {tls}}}
"#
        )
    };
    for (tls, field, message) in [
        (
            "minProtocolVersion: TLSV1_3, maxProtocolVersion: TLSV1_2",
            "spec.servers[0].tls.minProtocolVersion",
            "above maxProtocolVersion",
        ),
        (
            "maxProtocolVersion: TLSV1_1",
            "spec.servers[0].tls.maxProtocolVersion",
            "leaves no version",
        ),
        (
            "minProtocolVersion: SSLV3",
            "spec.servers[0].tls.minProtocolVersion",
            "unknown TLS version",
        ),
    ] {
        let found = errors(&gateway(tls));
        assert!(
            found.iter().any(|f| f.field == field && f.message.contains(message)),
            "{tls}: {found:?}"
        );
    }
}

#[test]
fn mutual_tls_needs_ca_certificates() {
    let found = errors(
        r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: MUTUAL, serverCertificate: /nonexistent.crt, privateKey: /nonexistent.key}
"#,
    );
    assert!(
        found
            .iter()
            .any(|f| f.field == "spec.servers[0].tls.caCertificates" && f.message.contains("required")),
        "{found:?}"
    );
}

#[test]
fn https_servers_sharing_a_port_must_share_their_tls_settings() {
    let dir = std::env::temp_dir().join(format!("meshgate-model-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    for name in ["a.crt", "a.key", "ca.crt"] {
        std::fs::write(dir.join(name), pem).expect("write");
    }
    let server = |name: &str, tls: &str| {
        format!(
            "  - port: {{number: 443, name: {name}, protocol: HTTPS}}\n    hosts: [\"{name}.test\"]\n    tls: {{mode: SIMPLE, serverCertificate: a.crt, privateKey: a.key{tls}}}\n"
        )
    };
    for (second, field) in [
        (
            server("b", ", minProtocolVersion: TLSV1_3"),
            "spec.servers[1].tls.minProtocolVersion",
        ),
        (
            server("b", ", caCertificates: ca.crt").replace("SIMPLE", "MUTUAL"),
            "spec.servers[1].tls.mode",
        ),
    ] {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{}{second}",
            server("a", "")
        );
        let found = match load_at(&dir.join("gw.yaml"), &yaml) {
            Ok(_) => panic!("expected an error for {second}"),
            Err(f) => f.errors().cloned().collect::<Vec<_>>(),
        };
        assert!(
            found.iter().any(|f| f.field == field && f.message.contains("port 443")),
            "{second}: {found:?}"
        );
    }
}
