//! Gateway API resources served by a real meshgate process: GatewayClass, Gateway, HTTPRoute,
//! Service + EndpointSlice as the registry.

mod support;

use support::*;

fn service(name: &str, port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: apps}}
spec:
  ports:
  - {{name: http, port: 8080, targetPort: 3000}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: apps
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, port: {port}}}
endpoints:
- addresses: ["127.0.0.1"]
---
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_matches_rewrites_redirects_and_answers_500_for_missing_backends() {
    let one = Echo::start("one");
    let two = Echo::start("two");
    let port = free_port();
    let yaml = format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: meshgate}}
spec:
  controllerName: meshgate.io/gateway-controller
---
apiVersion: v1
kind: Namespace
metadata: {{name: apps}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: apps}}
spec:
  gatewayClassName: meshgate
  listeners:
  - name: http
    port: {port}
    protocol: HTTP
---
{one_svc}{two_svc}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  hostnames: ["shop.example.com"]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {{type: ReplacePrefixMatch, replacePrefixMatch: /api}}
    backendRefs: [{{name: two, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}
        statusCode: 302
  - matches: [{{path: {{type: Exact, value: /broken}}}}]
    backendRefs: [{{name: nonexistent, port: 8080}}]
  - backendRefs: [{{name: one, port: 8080}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: no-rules, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  hostnames: ["empty.example.com"]
"#,
        one_svc = service("one", one.port()),
        two_svc = service("two", two.port()),
    );
    let _proxy = Proxy::start(&yaml);
    let c = client(false);
    let r = send(&c, get(port, "/v2/items?x=1", "shop.example.com", &[]))
        .await
        .expect("rewrite");
    assert_eq!(r.served_by(), "two");
    assert_eq!(r.json()["uri"], "/api/items?x=1");
    // PathPrefix is segment-aware: /v2x is not under /v2.
    assert_eq!(
        send(&c, get(port, "/v2x", "shop.example.com", &[]))
            .await
            .expect("req")
            .served_by(),
        "one"
    );
    let r = send(&c, get(port, "/old/page", "shop.example.com", &[]))
        .await
        .expect("redirect");
    assert_eq!(r.status, 302);
    // No port in the filter: the listener's port is kept (omitted only for 80 with http).
    assert_eq!(
        r.header("location"),
        Some(format!("http://shop.example.com:{port}/new/page").as_str())
    );
    assert_eq!(
        send(&c, get(port, "/broken", "shop.example.com", &[]))
            .await
            .expect("req")
            .status,
        500
    );
    // Omitted rules default to one catch-all rule with no backends (the CRD's default): 500.
    assert_eq!(
        send(&c, get(port, "/any/path", "empty.example.com", &[]))
            .await
            .expect("req")
            .status,
        500
    );
    assert_eq!(
        send(&c, get(port, "/", "other.example.com", &[]))
            .await
            .expect("req")
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mirror_copies_traffic_without_touching_the_response() {
    let primary = Echo::start("primary");
    let shadow = Echo::start("shadow");
    let port = free_port();
    let yaml = format!(
        r#"{edge}{p}{s}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mirrored, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {{name: shadow, port: 8080}}
    backendRefs: [{{name: primary, port: 8080}}]
"#,
        edge = edge_gateway(port),
        p = service("primary", primary.port()),
        s = service("shadow", shadow.port()),
    );
    let _proxy = Proxy::start(&yaml);
    let c = client(false);
    for _ in 0..20 {
        let r = send(&c, get(port, "/", "any", &[])).await.expect("req");
        assert_eq!((r.status, r.served_by()), (200, "primary".to_string()));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while shadow.count() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "mirror saw {} of 20",
            shadow.count()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(primary.count(), 20);
    assert_eq!(shadow.count(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_and_allowed_origins_get_headers() {
    let app = Echo::start("app");
    let port = free_port();
    let yaml = format!(
        r#"{edge}{svc}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: api, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://www.foo.com", "https://*.bar.com"]
        allowMethods: [GET, POST]
        allowHeaders: [x-token]
        exposeHeaders: [x-echo-name]
        maxAge: 600
    backendRefs: [{{name: app, port: 8080}}]
"#,
        edge = edge_gateway(port),
        svc = service("app", app.port()),
    );
    let _proxy = Proxy::start(&yaml);
    let c = client(false);
    let preflight = http::Request::builder()
        .method("OPTIONS")
        .uri(format!("http://127.0.0.1:{port}/items"))
        .header("origin", "https://a.bar.com")
        .header("access-control-request-method", "POST")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let r = send(&c, preflight).await.expect("preflight");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://a.bar.com"));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-echo-name"),
        "Gateway API lists exposed headers on the preflight too"
    );
    assert_eq!(app.count(), 0, "a preflight is never forwarded");

    let r = send(&c, get(port, "/items", "x", &[("origin", "https://www.foo.com")]))
        .await
        .expect("cors get");
    assert_eq!(r.served_by(), "app");
    assert_eq!(r.header("access-control-allow-origin"), Some("https://www.foo.com"));
    assert_eq!(r.header("access-control-expose-headers"), Some("x-echo-name"));
    let r = send(&c, get(port, "/items", "x", &[("origin", "https://evil.example")]))
        .await
        .expect("bad origin");
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[test]
fn controller_name_selects_the_gateway_classes_served() {
    let app = Echo::start("app");
    let port = free_port();
    let yaml = format!(
        r#"{gateway}{svc}apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - backendRefs: [{{name: app, port: 8080}}]
"#,
        gateway = edge_gateway(port).replace("meshgate.io/gateway-controller", "example.com/edge-controller"),
        svc = service("app", app.port()),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let proxy = Proxy::start_with(&yaml, &["--controller-name", "example.com/edge-controller"]);
    assert_eq!(raw_get(addr, "/", "app.test").expect("served").0, 200);
    drop(proxy);

    // With the default controller name, that class belongs to someone else: nothing listens.
    let _proxy = Proxy::start(&yaml);
    assert!(
        raw_get(addr, "/", "app.test").is_err(),
        "the Gateway must not be served"
    );
}

/// A gRPC-shaped call (HTTP/2 POST, `application/grpc`) for `path` over h2c.
fn grpc_call(port: u16, path: &str, headers: &[(&str, &str)]) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut b = http::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(http_body_util::Full::new(bytes::Bytes::from_static(b"\0\0\0\0\0")))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcroute_routes_by_service_method_and_header_over_http2() {
    let users = Echo::start("users");
    let orders = Echo::start("orders");
    let fallback = Echo::start("fallback");
    let port = free_port();
    let yaml = format!(
        r#"{gateway}{users_svc}{orders_svc}{fallback_svc}apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: shop-grpc, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - matches:
    - method: {{service: shop.Users, method: Get}}
    backendRefs: [{{name: users, port: 8080}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: x-route, value: users-get}}]
  - matches:
    - method: {{service: shop.Orders}}
      headers: [{{name: x-tenant, value: big}}]
    backendRefs: [{{name: orders, port: 8080}}]
  - matches:
    - method: {{type: RegularExpression, service: "shop\\..*", method: "List.*"}}
    backendRefs: [{{name: fallback, port: 8080}}]
"#,
        gateway = edge_gateway(port),
        users_svc = service("users", users.port()),
        orders_svc = service("orders", orders.port()),
        fallback_svc = service("fallback", fallback.port()),
    );
    let _proxy = Proxy::start(&yaml);
    let c = client(true);
    let r = send(&c, grpc_call(port, "/shop.Users/Get", &[])).await.expect("call");
    assert_eq!((r.status, r.served_by().as_str()), (200, "users"), "{}", r.body);
    assert_eq!(r.header("x-route"), Some("users-get"));
    // The backend is spoken to in HTTP/2, whatever the Service port says.
    assert_eq!(r.json()["version"], "HTTP/2.0", "{}", r.body);
    assert_eq!(r.json()["path"], "/shop.Users/Get");

    let r = send(&c, grpc_call(port, "/shop.Orders/Create", &[("x-tenant", "big")]))
        .await
        .expect("call");
    assert_eq!(r.served_by(), "orders");
    // Without the header the Orders rule does not match, and no other rule takes Create.
    let r = send(&c, grpc_call(port, "/shop.Orders/Create", &[]))
        .await
        .expect("call");
    assert_eq!(r.status, 404);
    let r = send(&c, grpc_call(port, "/shop.Orders/ListAll", &[]))
        .await
        .expect("call");
    assert_eq!(r.served_by(), "fallback");
    // An exact method match is exact: another method of the service is not routed to users.
    let r = send(&c, grpc_call(port, "/shop.Users/Delete", &[]))
        .await
        .expect("call");
    assert_eq!(r.status, 404);
}

#[test]
fn grpcroute_errors_name_the_field() {
    let dir = scratch_dir("grpcroute-errors");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"{gateway}apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: bad, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - matches:
    - method: {{service: "not a service"}}
    filters:
    - type: URLRewrite
      urlRewrite: {{hostname: x.example.com}}
"#,
            gateway = edge_gateway(free_port()),
        ),
    )
    .expect("write");
    let (code, out) = analyze(&config);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("spec.rules[0].matches[0].method.service"), "{out}");
    assert!(out.contains("spec.rules[0].filters[0].type"), "{out}");
}
