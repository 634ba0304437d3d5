//! Routing through a real meshgate process: Istio match rules, weights, rewrites, redirects,
//! direct responses, header edits and forwarding headers.

mod support;

use support::*;

struct Shop {
    v1: Echo,
    v2: Echo,
    other: Echo,
    port: u16,
    _proxy: Proxy,
}

fn shop() -> Shop {
    let v1 = Echo::start("v1");
    let v2 = Echo::start("v2");
    let other = Echo::start("other");
    let port = free_port();
    let yaml = format!(
        r#"{gateway}{shop}{other_se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: shop
spec:
  host: shop.test
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: shop
spec:
  hosts:
  - "*"
  gateways:
  - gw
  http:
  - name: exact
    match:
    - uri:
        exact: /exact
    route:
    - destination:
        host: other.test
  - name: regex
    match:
    - uri:
        regex: "/items/[0-9]+"
    route:
    - destination:
        host: other.test
  - name: beta
    match:
    - headers:
        x-user-group:
          exact: beta
    - headers:
        x-region:
          regex: "us-.*"
    route:
    - destination:
        host: shop.test
        subset: v2
  - name: cookie
    match:
    - headers:
        cookie:
          regex: ".*experiment=new-ui.*"
    route:
    - destination:
        host: shop.test
        subset: v2
  - name: query
    match:
    - queryParams:
        debug:
          exact: "1"
    route:
    - destination:
        host: other.test
  - name: method
    match:
    - method:
        exact: POST
      uri:
        prefix: /orders
    route:
    - destination:
        host: other.test
  - name: authority
    match:
    - authority:
        exact: special.example.com
    route:
    - destination:
        host: other.test
  - name: rewrite
    match:
    - uri:
        prefix: /old-api/
    rewrite:
      uri: /api/
      authority: rewritten.internal
    route:
    - destination:
        host: other.test
  - name: regex-rewrite
    match:
    - uri:
        prefix: /v1/users/
    rewrite:
      uriRegexRewrite:
        match: "^/v1/users/([^/]+)/profile$"
        rewrite: "/profiles/\\1"
    route:
    - destination:
        host: other.test
  - name: headers
    match:
    - uri:
        prefix: /headers
    headers:
      request:
        set:
          x-set: route
        add:
          x-added: one
        remove:
        - x-remove-me
      response:
        set:
          x-resp-set: yes-set
        remove:
        - x-upstream-only
    route:
    - destination:
        host: other.test
      headers:
        request:
          set:
            x-destination: other
  - name: redirect
    match:
    - uri:
        exact: /moved
    redirect:
      uri: /new-home
      redirectCode: 308
  - name: redirect-authority
    match:
    - uri:
        exact: /elsewhere
    redirect:
      authority: other.example.com
      scheme: https
  - name: teapot
    match:
    - uri:
        exact: /teapot
    directResponse:
      status: 418
      body:
        string: "short and stout"
  - name: canary
    route:
    - destination:
        host: shop.test
        subset: v1
      weight: 90
    - destination:
        host: shop.test
        subset: v2
      weight: 10
"#,
        gateway = gateway("gw", port),
        shop = service_entry("shop", "shop.test", &[(v1.port(), "v1"), (v2.port(), "v2")]),
        other_se = service_entry("other", "other.test", &[(other.port(), "v1")]),
    );
    let proxy = Proxy::start(&yaml);
    Shop {
        v1,
        v2,
        other,
        port,
        _proxy: proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_match_rules_route_in_order() {
    let s = shop();
    let c = client(false);
    let p = s.port;
    let cases: Vec<(http::Request<_>, &str)> = vec![
        (get(p, "/exact", "shop.test", &[]), "other"),
        (get(p, "/exact/not", "shop.test", &[]), "v1|v2"),
        (get(p, "/items/42", "shop.test", &[]), "other"),
        (get(p, "/items/abc", "shop.test", &[]), "v1|v2"),
        (get(p, "/", "shop.test", &[("x-user-group", "beta")]), "v2"),
        (get(p, "/", "shop.test", &[("x-region", "us-east")]), "v2"),
        (get(p, "/", "shop.test", &[("x-region", "eu-west")]), "v1|v2"),
        (
            get(p, "/", "shop.test", &[("cookie", "a=b; experiment=new-ui; c=d")]),
            "v2",
        ),
        (get(p, "/?debug=1", "shop.test", &[]), "other"),
        (get(p, "/?debug=0", "shop.test", &[]), "v1|v2"),
        (get(p, "/", "special.example.com", &[]), "other"),
    ];
    for (req, want) in cases {
        let desc = format!("{} {:?}", req.uri(), req.headers());
        for _ in 0..5 {
            let req2 = clone_get(&req);
            let reply = send(&c, req2).await.expect("request");
            assert_eq!(reply.status, 200, "{desc}");
            let got = reply.served_by();
            if want.contains('|') {
                // The canary route: must not be the `other` service.
                assert!(got == "v1" || got == "v2", "{desc}: served by {got}");
            } else {
                assert_eq!(got, want, "{desc}");
            }
        }
    }
    let post = http::Request::post(format!("http://127.0.0.1:{p}/orders"))
        .header("host", "shop.test")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .expect("request");
    assert_eq!(send(&c, post).await.expect("post").served_by(), "other");
    assert_ne!(
        send(&c, get(p, "/orders", "shop.test", &[]))
            .await
            .expect("get")
            .served_by(),
        "other"
    );
    drop(s.other);
}

fn clone_get(
    req: &http::Request<http_body_util::Full<bytes::Bytes>>,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut b = http::Request::builder().method(req.method()).uri(req.uri().clone());
    for (k, v) in req.headers() {
        b = b.header(k, v);
    }
    b.body(http_body_util::Full::new(bytes::Bytes::new())).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_canary_splits_90_10() {
    let s = shop();
    let c = client(false);
    let n = 1000;
    for _ in 0..n {
        let reply = send(&c, get(s.port, "/", "shop.test", &[])).await.expect("request");
        assert_eq!(reply.status, 200);
    }
    let (v1, v2) = (s.v1.count(), s.v2.count());
    assert_eq!(v1 + v2, n);
    // Binomial(1000, 0.1): mean 100, sd 9.5; 55..=145 is more than 4.5 sd either side.
    assert!((55..=145).contains(&v2), "v1={v1} v2={v2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_redirects_direct_responses_and_header_edits() {
    let s = shop();
    let c = client(false);
    let p = s.port;

    let r = send(&c, get(p, "/old-api/list?x=1", "shop.test", &[]))
        .await
        .expect("rewrite");
    let j = r.json();
    assert_eq!(j["uri"], "/api/list?x=1");
    assert_eq!(j["headers"]["host"], "rewritten.internal");

    let r = send(&c, get(p, "/v1/users/ann/profile", "shop.test", &[]))
        .await
        .expect("regex rewrite");
    assert_eq!(r.json()["path"], "/profiles/ann");

    let r = send(
        &c,
        get(
            p,
            "/headers",
            "shop.test",
            &[("x-remove-me", "1"), ("x-added", "zero"), ("x-set", "client")],
        ),
    )
    .await
    .expect("headers");
    let j = r.json();
    assert_eq!(j["headers"]["x-set"], "route");
    assert_eq!(j["headers"]["x-added"], "zero,one");
    assert_eq!(j["headers"]["x-destination"], "other");
    assert!(j["headers"].get("x-remove-me").is_none(), "{j}");
    assert_eq!(r.header("x-resp-set"), Some("yes-set"));
    assert_eq!(r.header("x-upstream-only"), None);

    let r = send(&c, get(p, "/moved?keep=1", "shop.test", &[]))
        .await
        .expect("redirect");
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("http://shop.test/new-home?keep=1"));

    let r = send(&c, get(p, "/elsewhere", "shop.test", &[]))
        .await
        .expect("redirect");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://other.example.com/elsewhere"));

    let r = send(&c, get(p, "/teapot", "shop.test", &[])).await.expect("direct");
    assert_eq!(r.status, 418);
    assert_eq!(r.body, "short and stout");
    assert_eq!(
        s.other.count() + s.v1.count() + s.v2.count(),
        3,
        "local replies never reach an upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_follow_envoy() {
    let s = shop();
    let c = client(false);
    let r = send(
        &c,
        get(
            s.port,
            "/exact",
            "shop.test",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-request-id", "client-chosen"),
                ("connection", "x-hop"),
                ("x-hop", "secret"),
                ("keep-alive", "timeout=5"),
                ("x-forwarded-proto", "https"),
            ],
        ),
    )
    .await
    .expect("request");
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    let id = h["x-request-id"].as_str().expect("request id");
    assert_ne!(
        id, "client-chosen",
        "an edge proxy regenerates x-request-id, as Envoy does"
    );
    assert_eq!(id.len(), 36);
    assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none(), "{h}");
    assert_eq!(h["host"], "shop.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_and_path_get_404_and_dead_upstream_503() {
    let port = free_port();
    let dead = free_port();
    let yaml = format!(
        r#"{gw}{se}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: only
spec:
  hosts: ["only.test"]
  gateways: ["gw"]
  http:
  - match:
    - uri:
        prefix: /api
    route:
    - destination:
        host: dead.test
"#,
        gw = gateway("gw", port),
        se = service_entry("dead", "dead.test", &[(dead, "v1")]),
    );
    let proxy = Proxy::start(&yaml);
    let c = client(false);
    assert_eq!(
        send(&c, get(port, "/api", "nobody.test", &[]))
            .await
            .expect("req")
            .status,
        404
    );
    assert_eq!(
        send(&c, get(port, "/other", "only.test", &[]))
            .await
            .expect("req")
            .status,
        404
    );
    let r = send(&c, get(port, "/api", "only.test", &[])).await.expect("req");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("connection failure"), "{}", r.body);
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.contains("meshgate_no_route_total{listener=\"0.0.0.0_"),
        "{metrics}"
    );
    assert!(metrics.contains("code=\"503\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_header_is_sticky() {
    let eps: Vec<Echo> = (0..3).map(|i| Echo::start(&format!("e{i}"))).collect();
    let port = free_port();
    let endpoints: Vec<(u16, &str)> = eps.iter().map(|e| (e.port(), "v1")).collect();
    let yaml = format!(
        r#"{gw}{se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: sticky
spec:
  host: sticky.test
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: sticky
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: sticky.test
"#,
        gw = gateway("gw", port),
        se = service_entry("sticky", "sticky.test", &endpoints),
    );
    let _proxy = Proxy::start(&yaml);
    let c = client(false);
    let mut owners = std::collections::BTreeSet::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let first = send(&c, get(port, "/", "x", &[("x-user", &user)]))
            .await
            .expect("req")
            .served_by();
        for _ in 0..4 {
            assert_eq!(
                send(&c, get(port, "/", "x", &[("x-user", &user)]))
                    .await
                    .expect("req")
                    .served_by(),
                first
            );
        }
        owners.insert(first);
    }
    assert!(owners.len() >= 2, "30 users all hashed to {owners:?}");
}

/// Two cookie-less `GET /shop` on one HTTP/1.1 connection (a pooled client may open another):
/// each response's `Set-Cookie` and the echo upstream that served it.
async fn two_on_one_connection(port: u16) -> [(Option<String>, String); 2] {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut replies = Vec::new();
    for _ in 0..2 {
        sender.ready().await.expect("connection ready");
        let req = http::Request::get("/shop")
            .header("host", "x")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let reply = (header("set-cookie"), header("x-echo-name").unwrap_or_default());
        resp.into_body().collect().await.expect("body");
        replies.push(reply);
    }
    let second = replies.pop().expect("two replies");
    let first = replies.pop().expect("two replies");
    [first, second]
}

/// Istio `httpCookie` with a `ttl`, as Envoy does it: a request without the cookie gets one
/// (`name="<16 hex>"; Max-Age; Path; attributes; HttpOnly`, one value per connection) and
/// lands on the endpoint that value hashes to; requests that send it back stay there, quoted
/// or not. Without `ttl` the cookie is only read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_cookie_is_generated_and_sticky() {
    let eps: Vec<Echo> = (0..3).map(|i| Echo::start(&format!("e{i}"))).collect();
    let port = free_port();
    let endpoints: Vec<(u16, &str)> = eps.iter().map(|e| (e.port(), "v1")).collect();
    let yaml = format!(
        r#"{gw}{se}{se2}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: sticky
spec:
  host: sticky.test
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: session
          path: /shop
          ttl: 3600s
          attributes:
          - name: SameSite
            value: Strict
          - name: Secure
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: read-only
spec:
  host: read-only.test
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: session
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: sticky
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - match:
    - uri:
        prefix: /read-only
    route:
    - destination:
        host: read-only.test
  - route:
    - destination:
        host: sticky.test
"#,
        gw = gateway("gw", port),
        se = service_entry("sticky", "sticky.test", &endpoints),
        se2 = service_entry("read-only", "read-only.test", &endpoints),
    );
    let _proxy = Proxy::start(&yaml);
    let mut owners = std::collections::BTreeSet::new();
    for _ in 0..12 {
        // A new connection, so a new cookie value; its second cookie-less request gets the same
        // cookie and endpoint.
        let [(set_cookie, served), again] = two_on_one_connection(port).await;
        let set_cookie = set_cookie.expect("a generated cookie");
        assert_eq!(again, (Some(set_cookie.clone()), served.clone()));
        let (pair, attributes) = set_cookie.split_once(';').expect("attributes");
        assert_eq!(
            attributes,
            " Max-Age=3600; Path=/shop; SameSite=Strict; Secure; HttpOnly"
        );
        let quoted = pair.strip_prefix("session=").expect("cookie name");
        let value = quoted.trim_matches('"');
        assert_eq!(quoted, format!("\"{value}\""), "Envoy quotes the value");
        assert!(
            value.len() == 16 && value.bytes().all(|b| b.is_ascii_hexdigit()),
            "{value}"
        );

        // Sent back, quoted or not, from any connection: the same endpoint, no new cookie.
        for cookie in [format!("session={quoted}"), format!("a=1; session={value}")] {
            let other = client(false);
            let r = send(&other, get(port, "/shop", "x", &[("cookie", &cookie)]))
                .await
                .expect("req");
            assert_eq!(r.served_by(), served, "{cookie}");
            assert_eq!(r.header("set-cookie"), None);
        }
        owners.insert(served);
    }
    assert!(owners.len() >= 2, "12 connections' cookies all hashed to {owners:?}");

    // An empty cookie counts as none, as in Envoy: a new one is made.
    let c = client(false);
    let r = send(&c, get(port, "/shop", "x", &[("cookie", "session=\"\"")]))
        .await
        .expect("req");
    assert!(
        r.header("set-cookie").is_some_and(|v| v.starts_with("session=\"")),
        "{:?}",
        r.headers
    );

    // Without ttl: no cookie is made, and requests are balanced as usual.
    let c = client(false);
    let r = send(&c, get(port, "/read-only", "x", &[])).await.expect("req");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("set-cookie"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_service_entries_and_workload_entries_supply_endpoints() {
    let by_name = Echo::start("by-name");
    let workload = Echo::start("workload");
    let port = free_port();
    let yaml = format!(
        r#"{gw}apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: by-name
spec:
  hosts: ["by-name.test"]
  resolution: DNS
  ports:
  - number: 80
    name: http
    protocol: HTTP
  endpoints:
  - address: localhost
    ports:
      http: {by_name_port}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm-1
spec:
  address: 127.0.0.1
  ports:
    http: {workload_port}
  labels:
    app: legacy
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: legacy
spec:
  hosts: ["legacy.test"]
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  workloadSelector:
    labels:
      app: legacy
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: vs
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - match:
    - uri:
        prefix: /legacy
    route:
    - destination:
        host: legacy.test
  - route:
    - destination:
        host: by-name.test
"#,
        gw = gateway("gw", port),
        by_name_port = by_name.port(),
        workload_port = workload.port(),
    );
    let _proxy = Proxy::start(&yaml);
    let c = client(false);
    assert_eq!(
        send(&c, get(port, "/", "x", &[])).await.expect("dns").served_by(),
        "by-name"
    );
    assert_eq!(
        send(&c, get(port, "/legacy", "x", &[]))
            .await
            .expect("workload")
            .served_by(),
        "workload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_cors_policy_answers_allowed_preflights_and_forwards_the_others() {
    let echo = Echo::start("app");
    let port = free_port();
    let yaml = format!(
        r#"{gateway}{se}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - corsPolicy:
      allowOrigins:
      - exact: https://shop.example.com
      - regex: "https://.*\\.partner\\.example"
      allowMethods: [GET, POST]
      allowHeaders: [X-Token]
      exposeHeaders: [X-Trace]
      maxAge: 24h
      allowCredentials: true
    route:
    - destination: {{host: app.test}}
"#,
        gateway = gateway("gw", port),
        se = service_entry("app", "app.test", &[(echo.port(), "v1")]),
    );
    let _proxy = Proxy::start(&yaml);
    let c = client(false);
    let preflight = |origin: &str| {
        let mut req = get(
            port,
            "/api",
            "app.test",
            &[("origin", origin), ("access-control-request-method", "POST")],
        );
        *req.method_mut() = http::Method::OPTIONS;
        req
    };
    // An allowed origin's preflight is answered by the proxy.
    let r = send(&c, preflight("https://a.partner.example"))
        .await
        .expect("preflight");
    assert_eq!(r.status, 200);
    assert_eq!(r.served_by(), "", "answered without the upstream");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://a.partner.example")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(r.header("access-control-allow-headers"), Some("x-token"));
    assert_eq!(r.header("access-control-max-age"), Some("86400"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    // Another origin's preflight goes to the upstream (Istio's unmatchedPreflights: FORWARD).
    let r = send(&c, preflight("https://evil.example")).await.expect("preflight");
    assert_eq!(r.served_by(), "app");
    assert_eq!(r.header("access-control-allow-origin"), None);
    // Actual requests: headers for allowed origins only.
    let r = send(
        &c,
        get(port, "/api", "app.test", &[("origin", "https://shop.example.com")]),
    )
    .await
    .expect("request");
    assert_eq!(r.served_by(), "app");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example.com")
    );
    assert_eq!(r.header("access-control-expose-headers"), Some("x-trace"));
    let r = send(
        &c,
        get(port, "/api", "app.test", &[("origin", "https://shop.example.com.evil")]),
    )
    .await
    .expect("request");
    assert_eq!(r.header("access-control-allow-origin"), None);
}
