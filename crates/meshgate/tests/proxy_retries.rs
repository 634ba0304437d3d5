//! Retries through a real meshgate process: Istio `retries` (and Istio's default policy),
//! Gateway API `retry`, per-try and overall timeouts, endpoint choice on retry, request body
//! replay and the retry budget. Upstreams are echo servers on loopback that fail a chosen
//! number of times per request id (`/retry?uuid=..&succeedAfter=..`).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::*;

/// A request id unique in this test process.
fn uuid(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// An Istio Gateway on `port`, a ServiceEntry `app.test` with `endpoints`, a round-robin
/// DestinationRule, and a VirtualService whose only route (to `app.test`) gets `extra` (route
/// fields indented by four spaces, e.g. `    retries: {attempts: 1}\n`).
fn istio(port: u16, endpoints: &[u16], extra: &str) -> String {
    let endpoints: Vec<(u16, &str)> = endpoints.iter().map(|p| (*p, "v1")).collect();
    format!(
        r#"{gw}{se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app}}
spec:
  host: app.test
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: ["app.test"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: app.test
{extra}"#,
        gw = gateway("gw", port),
        se = service_entry("app", "app.test", &endpoints),
    )
}

/// Sum of a Prometheus metric's samples for the `app.test` cluster.
fn app_metric(proxy: &Proxy, name: &str) -> u64 {
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("app.test"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn get_app(port: u16, path: &str) -> Reply {
    let c = client(false);
    send(&c, get(port, path, "app.test", &[])).await.expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_policy_retries_503_twice_then_returns_the_upstreams_response() {
    let echo = Echo::start("app");
    let port = free_port();
    let proxy = Proxy::start(&istio(port, &[echo.port()], ""));

    let r = get_app(
        port,
        &format!("/retry?uuid={}&succeedAfter=2&responseCode=503", uuid("ok")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(echo.count(), 3, "one try and Istio's default two retries");

    // Exhausted: the third 503 is the answer, as the upstream sent it.
    let r = get_app(
        port,
        &format!("/retry?uuid={}&succeedAfter=3&responseCode=503", uuid("x")),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "failed try");
    assert_eq!(r.served_by(), "app");
    assert_eq!(echo.count(), 6);
    assert_eq!(app_metric(&proxy, "meshgate_upstream_retries_total"), 4);
    assert_eq!(app_metric(&proxy, "meshgate_upstream_retry_successes_total"), 1);
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.contains("code=\"200\"} 1") && metrics.contains("code=\"503\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retriable_statuses_and_zero_attempts_are_not_retried() {
    let echo = Echo::start("app");
    let port = free_port();
    let proxy = Proxy::start(&istio(port, &[echo.port()], ""));
    // Istio's default retries only 503 among statuses.
    let r = get_app(
        port,
        &format!("/retry?uuid={}&succeedAfter=1&responseCode=500", uuid("a")),
    )
    .await;
    assert_eq!((r.status, echo.count()), (500, 1));

    proxy.reload_with(&istio(
        port,
        &[echo.port()],
        "    retries: {attempts: 3, retryOn: gateway-error}\n",
    ));
    let r = get_app(
        port,
        &format!("/retry?uuid={}&succeedAfter=1&responseCode=500", uuid("b")),
    )
    .await;
    assert_eq!((r.status, echo.count()), (500, 2));
    let r = get_app(
        port,
        &format!("/retry?uuid={}&succeedAfter=1&responseCode=502", uuid("c")),
    )
    .await;
    assert_eq!((r.status, echo.count()), (200, 4), "502 is a gateway error");

    proxy.reload_with(&istio(port, &[echo.port()], "    retries: {attempts: 0}\n"));
    let r = get_app(
        port,
        &format!("/retry?uuid={}&succeedAfter=1&responseCode=503", uuid("d")),
    )
    .await;
    assert_eq!((r.status, echo.count()), (503, 5), "attempts 0 disables retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_on_another_endpoint() {
    let echo = Echo::start("live");
    let dead = free_port();
    let port = free_port();
    let proxy = Proxy::start(&istio(port, &[dead, echo.port()], ""));
    for _ in 0..10 {
        let r = get_app(port, "/").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.served_by(), "live");
    }
    assert_eq!(echo.count(), 10);
    // Retries advance the round robin too (as in Envoy), so once a first try has gone to the
    // dead endpoint, every later one does as well; each retry avoids it.
    let refused = app_metric(&proxy, "meshgate_upstream_connect_failures_total");
    assert!((9..=10).contains(&refused), "{refused}");
    assert_eq!(app_metric(&proxy, "meshgate_upstream_retries_total"), refused);

    // Only dead endpoints: three tries, then Envoy's local reply.
    proxy.reload_with(&istio(port, &[dead], ""));
    let before = app_metric(&proxy, "meshgate_upstream_connect_failures_total");
    let r = get_app(port, "/").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("connection failure"), "{}", r.body);
    assert_eq!(
        app_metric(&proxy, "meshgate_upstream_connect_failures_total") - before,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_retried_on_another_endpoint_when_retry_on_has_reset() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    // Istio's default policy does not retry a reset after the request was sent.
    let proxy = Proxy::start(&istio(port, &[a.port(), b.port()], ""));
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get_app(port, "/reset-on/a").await.status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503, 503]);

    proxy.reload_with(&istio(
        port,
        &[a.port(), b.port()],
        "    retries: {attempts: 1, retryOn: reset}\n",
    ));
    let a_before = a.count();
    for _ in 0..6 {
        let r = get_app(port, "/reset-on/a").await;
        assert_eq!((r.status, r.served_by().as_str()), (200, "b"), "{}", r.body);
    }
    // Retries advance the round robin too, so (nearly) every first try lands on a.
    let resets = a.count() - a_before;
    assert!((5..=6).contains(&resets), "{resets}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_is_retried() {
    let echo = Echo::start("app");
    let port = free_port();
    let proxy = Proxy::start(&istio(
        port,
        &[echo.port()],
        "    retries: {attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}\n",
    ));
    let started = Instant::now();
    let r = get_app(
        port,
        &format!(
            "/retry?uuid={}&succeedAfter=1&responseCode=500&delayRetry=1000ms",
            uuid("t")
        ),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(900),
        "{elapsed:?}"
    );
    assert_eq!(app_metric(&proxy, "meshgate_upstream_per_try_timeouts_total"), 1);

    // Every try too slow: the last per-try timeout is answered with 504.
    let r = get_app(port, "/delay/1000").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.body, "upstream request timeout");
    assert_eq!(app_metric(&proxy, "meshgate_upstream_per_try_timeouts_total"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_bounds_all_tries() {
    let echo = Echo::start("app");
    let port = free_port();
    let _proxy = Proxy::start(&istio(
        port,
        &[echo.port()],
        "    timeout: 300ms\n    retries: {attempts: 10, perTryTimeout: 100ms, retryOn: 5xx}\n",
    ));
    let started = Instant::now();
    let r = get_app(port, "/delay/1000").await;
    let elapsed = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.body, "upstream request timeout");
    assert!(
        elapsed >= Duration::from_millis(290) && elapsed < Duration::from_millis(800),
        "{elapsed:?}"
    );
    assert!((2..=4).contains(&echo.count()), "{}", echo.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_replayed_intact_up_to_64_kib() {
    let echo = Echo::start("app");
    let port = free_port();
    let _proxy = Proxy::start(&istio(port, &[echo.port()], ""));
    let c = client(false);
    let post = |path: String, body: Vec<u8>| {
        http::Request::post(format!("http://127.0.0.1:{port}{path}"))
            .header("host", "app.test")
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    };

    let body: Vec<u8> = (0..20_000).map(|i| b'a' + (i % 26) as u8).collect();
    let path = format!("/retry?uuid={}&succeedAfter=2&responseCode=503", uuid("post"));
    let r = send(&c, post(path, body.clone())).await.expect("post");
    assert_eq!(r.status, 200, "{}", r.body);
    let echoed = r.json();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["body_len"], body.len());
    assert_eq!(echoed["body"].as_str().map(str::as_bytes), Some(&body[..]));
    assert_eq!(echo.count(), 3);

    // Over the replay buffer: streamed once, never retried.
    let path = format!("/retry?uuid={}&succeedAfter=1&responseCode=503", uuid("big"));
    let r = send(&c, post(path, vec![b'x'; 100 * 1024])).await.expect("post");
    assert_eq!(r.status, 503);
    assert_eq!(echo.count(), 4);

    // Chunked bodies (no length) are replayed too.
    let path = format!("/retry?uuid={}&succeedAfter=1&responseCode=503", uuid("chunked"));
    let (status, _, text) = raw_request(
        "127.0.0.1:0".parse().map(|_: std::net::SocketAddr| ([127, 0, 0, 1], port).into()).expect("addr"),
        &format!(
            "POST {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ),
    )
    .expect("chunked post");
    assert_eq!(status, 200, "{text}");
    let echoed: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(echoed["body"], "hello world");
    assert_eq!(echo.count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_concurrent_retries() {
    let echo = Echo::start("app");
    let port = free_port();
    let proxy = Proxy::start(&istio(
        port,
        &[echo.port()],
        "    retries: {attempts: 5, retryOn: \"503\"}\n",
    ));
    const REQUESTS: usize = 30;
    let c = client(false);
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let c = c.clone();
        let path = format!(
            "/retry?uuid={}&succeedAfter=100&responseCode=503&delayRetry=200ms",
            uuid("load")
        );
        tasks.push(tokio::spawn(async move {
            send(&c, get(port, &path, "app.test", &[]))
                .await
                .expect("request")
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 503);
    }
    let sent = echo.count();
    let retries = app_metric(&proxy, "meshgate_upstream_retries_total") as usize;
    let overflows = app_metric(&proxy, "meshgate_upstream_retry_overflows_total");
    // Without a budget: 30 × 6 = 180 tries. With at most max(3, 20 % of 30) = 6 retries in
    // flight, each at least 200 ms long, far fewer.
    eprintln!("{REQUESTS} requests: {sent} tries, {retries} retries, {overflows} retries refused by the budget");
    assert_eq!(sent, REQUESTS + retries);
    assert!(retries <= 30, "{retries} retries");
    assert!(overflows >= 20, "{overflows} overflows");
    assert_eq!(app_metric(&proxy, "meshgate_upstream_retries_active"), 0);
}

/// The Gateway API conformance routes of HTTPRouteRetry, HTTPRouteRetryConnectionError and
/// HTTPRouteRetryWithTimeouts (same rules, same requests, same expectations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_retry_conformance_cases() {
    let echo = Echo::start("infra-backend-v3");
    let port = free_port();
    let yaml = format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: meshgate}}
spec:
  controllerName: meshgate.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: same-namespace, namespace: infra}}
spec:
  gatewayClassName: meshgate
  listeners:
  - {{name: http, port: {port}, protocol: HTTP}}
---
apiVersion: v1
kind: Service
metadata: {{name: infra-backend-v3, namespace: infra}}
spec:
  ports:
  - {{name: http, port: 8080, targetPort: 3000}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: infra-backend-v3-abc
  namespace: infra
  labels: {{kubernetes.io/service-name: infra-backend-v3}}
addressType: IPv4
ports:
- {{name: http, port: {echo}}}
endpoints:
- addresses: ["127.0.0.1"]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: retries, namespace: infra}}
spec:
  parentRefs: [{{name: same-namespace}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /retry/code-500-attempts-3}}}}]
    retry: {{codes: [500], attempts: 3}}
    backendRefs: [{{name: infra-backend-v3, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /retry/code-all-attempts-2}}}}]
    retry: {{codes: [500, 502, 503, 504], attempts: 2}}
    backendRefs: [{{name: infra-backend-v3, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /retry/no-status-code-attempts-3}}}}]
    retry: {{attempts: 3}}
    backendRefs: [{{name: infra-backend-v3, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /retry/backend-request-timeout-200ms}}}}]
    retry: {{attempts: 2}}
    timeouts: {{backendRequest: 200ms}}
    backendRefs: [{{name: infra-backend-v3, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /retry/request-timeout-200ms}}}}]
    retry: {{codes: [500], attempts: 5}}
    timeouts: {{backendRequest: 200ms, request: 400ms}}
    backendRefs: [{{name: infra-backend-v3, port: 8080}}]
"#,
        echo = echo.port()
    );
    let _proxy = Proxy::start(&yaml);
    let cases: &[(&str, &[u16])] = &[
        // HTTPRouteRetry
        ("/retry/code-500-attempts-3?responseCode=500&succeedAfter=2", &[200]),
        ("/retry/code-500-attempts-3?responseCode=500&succeedAfter=4", &[500]),
        ("/retry/code-500-attempts-3?responseCode=503&succeedAfter=2", &[503]),
        ("/retry/code-all-attempts-2?responseCode=500&succeedAfter=1", &[200]),
        ("/retry/code-all-attempts-2?responseCode=500&succeedAfter=3", &[500]),
        ("/retry/code-all-attempts-2?responseCode=502&succeedAfter=1", &[200]),
        ("/retry/code-all-attempts-2?responseCode=502&succeedAfter=3", &[502]),
        ("/retry/code-all-attempts-2?responseCode=503&succeedAfter=1", &[200]),
        ("/retry/code-all-attempts-2?responseCode=503&succeedAfter=3", &[503]),
        ("/retry/code-all-attempts-2?responseCode=504&succeedAfter=1", &[200]),
        ("/retry/code-all-attempts-2?responseCode=504&succeedAfter=3", &[504]),
        // HTTPRouteRetryConnectionError: the echo resets the connection (SO_LINGER 0).
        ("/retry/no-status-code-attempts-3?succeedAfter=2", &[200]),
        ("/retry/no-status-code-attempts-3?succeedAfter=4", &[500, 503]),
        // HTTPRouteRetryWithTimeouts
        (
            "/retry/backend-request-timeout-200ms?delayRetry=300ms&responseCode=500&succeedAfter=2",
            &[200],
        ),
        (
            "/retry/backend-request-timeout-200ms?delayRetry=300ms&responseCode=500&succeedAfter=3",
            &[504],
        ),
        ("/retry/request-timeout-200ms?responseCode=500&succeedAfter=1", &[200]),
        (
            "/retry/request-timeout-200ms?delayRetry=100ms&responseCode=500&succeedAfter=4",
            &[504],
        ),
    ];
    let c = client(false);
    // As the conformance runner: every case three times, each with a fresh uuid.
    for (path, expected) in cases {
        for _ in 0..3 {
            let path = format!("{path}&uuid={}", uuid("conformance"));
            let r = send(&c, get(port, &path, "gateway.test", &[])).await.expect("request");
            assert!(expected.contains(&r.status), "{path}: {} {}", r.status, r.body);
            if r.status == 200 {
                assert_eq!(r.json()["uri"], path, "the backend saw the request as sent");
            }
        }
    }
}
