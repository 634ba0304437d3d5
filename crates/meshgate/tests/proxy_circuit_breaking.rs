//! Circuit breaking and connection pools through a real meshgate process (one worker):
//! DestinationRule `connectionPool` limits answered with 503 `UO` at once, per-connection
//! request limits and idle timeouts seen by the upstream, connect timeouts against a listener
//! whose backlog is full, concurrent-retry limits, and upstream requests cancelled by a route
//! timeout. Everything runs on loopback and is bounded in time.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

const OVERFLOW_TEXT: &str = "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// An Istio Gateway on `port`, a ServiceEntry `app.test` on `upstream_port`, a DestinationRule
/// with `pool` as its `connectionPool` (indented by six spaces), and a VirtualService whose
/// route gets `extra` (route fields indented by four spaces).
fn istio(port: u16, upstream_port: u16, pool: &str, extra: &str) -> String {
    format!(
        r#"{gw}{se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app}}
spec:
  host: app.test
  trafficPolicy:
    connectionPool:
{pool}---
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
        se = service_entry("app", "app.test", &[(upstream_port, "v1")]),
    )
}

/// Sum of a Prometheus metric's samples whose line contains all of `parts`.
fn metric(proxy: &Proxy, name: &str, parts: &[&str]) -> u64 {
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Sends `n` concurrent GETs for `path`, each on its own client connection; returns
/// (status, body, time to the answer) per request.
async fn burst(port: u16, path: &str, n: usize) -> Vec<(u16, String, Duration)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let c = client(false);
            let start = Instant::now();
            let r = send(&c, get(port, &path, "app.test", &[])).await.expect("request");
            (r.status, r.body, start.elapsed())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

async fn get_app(port: u16, path: &str) -> Reply {
    send(&client(false), get(port, path, "app.test", &[]))
        .await
        .expect("request")
}

/// Checks a burst's outcome: every answer is a success or an immediate overflow; returns the
/// number of successes.
fn successes_and_fast_overflows(results: &[(u16, String, Duration)], slow: Duration) -> usize {
    let mut ok = 0;
    for (status, body, took) in results {
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(body, OVERFLOW_TEXT);
                assert!(
                    *took < slow / 2,
                    "an overflow is answered at once, not after the slow requests: {took:?}"
                );
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_and_connection_limits_overflow_at_once_and_recover() {
    let echo = Echo::start("app");
    let port = free_port();
    let pool = "      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1}\n";
    let proxy = Proxy::start(&istio(port, echo.port(), pool, ""));

    let slow = Duration::from_millis(600);
    // A burst on a cold pool: the first request is pending while its connection opens, so
    // every other one overflows (as in Envoy).
    let results = burst(port, "/delay/600", 8).await;
    let cold = successes_and_fast_overflows(&results, slow);
    eprintln!(
        "burst of 8 slow requests on a cold pool: {cold} served, {} overflowed",
        8 - cold
    );
    assert!((1..=2).contains(&cold), "{cold}");

    // A burst while one request holds the only connection: one more waits as pending and is
    // served when the connection is free; the rest overflow at once.
    let lone = tokio::spawn(async move { get_app(port, "/delay/600").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let results = burst(port, "/delay/600", 6).await;
    assert_eq!(lone.await.expect("task").status, 200);
    let warm = successes_and_fast_overflows(&results, slow);
    eprintln!(
        "burst of 6 behind one in flight: {warm} served after waiting, {} overflowed",
        6 - warm
    );
    assert_eq!(warm, 1, "exactly one pending request");
    let waited = results.iter().find(|r| r.0 == 200).map(|r| r.2).unwrap_or_default();
    assert!(
        waited >= Duration::from_millis(900),
        "it waited for the connection: {waited:?}"
    );

    let overflows = (8 - cold) + (6 - warm);
    assert_eq!(
        echo.count(),
        cold + 1 + warm,
        "overflowed requests never reached the upstream"
    );
    assert_eq!(
        metric(
            &proxy,
            "meshgate_upstream_overflows_total",
            &["app.test", "breaker=\"pending\""]
        ),
        overflows as u64
    );
    assert_eq!(
        metric(&proxy, "meshgate_response_flags_total", &["flag=\"UO\""]),
        overflows as u64
    );
    assert_eq!(
        metric(
            &proxy,
            "meshgate_upstream_overflows_total",
            &["app.test", "breaker=\"connections\""]
        ),
        7 + 6,
        "every request but the first found the cluster at maxConnections, once each"
    );
    assert_eq!(
        metric(&proxy, "meshgate_upstream_connections_total", &["app.test"]),
        1,
        "one upstream connection"
    );

    // Load gone: sequential requests all pass again, on the same connection.
    for _ in 0..5 {
        let r = get_app(port, "/delay/1").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(metric(&proxy, "meshgate_upstream_requests_pending", &["app.test"]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_counts_requests_until_their_response_ends() {
    let echo = Echo::start("app");
    let port = free_port();
    let proxy = Proxy::start(&istio(port, echo.port(), "      http: {http2MaxRequests: 2}\n", ""));

    let slow = Duration::from_millis(600);
    let results = burst(port, "/delay/600", 6).await;
    let ok = successes_and_fast_overflows(&results, slow);
    assert_eq!(ok, 2, "two requests in flight at most");
    assert_eq!(
        metric(
            &proxy,
            "meshgate_upstream_overflows_total",
            &["app.test", "breaker=\"requests\""]
        ),
        4
    );
    let results = burst(port, "/delay/1", 2).await;
    assert!(results.iter().all(|r| r.0 == 200), "recovered: {results:?}");
}

/// An HTTP/1.1 upstream that counts the connections it accepts and sees closed, and answers
/// every request with `ok` (after `/delay/MS`), or never (`/hang`).
struct CountingUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl CountingUpstream {
    fn start() -> CountingUpstream {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let closed = c.clone();
                std::thread::spawn(move || {
                    use std::io::Write;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                            if path == "/hang" {
                                continue;
                            }
                            if let Some(ms) = path.strip_prefix("/delay/") {
                                std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                            }
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                        }
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        CountingUpstream { addr, accepted, closed }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits up to `limit` for `closed() >= n`; how long it took.
    fn wait_closed(&self, n: usize, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.closed() >= n {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_one_uses_a_new_connection_per_request() {
    let upstream = CountingUpstream::start();
    let port = free_port();
    let pool = "      http: {maxRequestsPerConnection: 1}\n";
    let _proxy = Proxy::start(&istio(port, upstream.addr.port(), pool, ""));
    for _ in 0..5 {
        assert_eq!(get_app(port, "/").await.status, 200);
    }
    assert_eq!(upstream.accepted(), 5, "one connection per request");
    assert!(
        upstream.wait_closed(5, Duration::from_secs(2)).is_some(),
        "each closed after its request: {} closed",
        upstream.closed()
    );

    // Without the limit, requests share one connection.
    let upstream = CountingUpstream::start();
    let port = free_port();
    let _proxy = Proxy::start(&istio(port, upstream.addr.port(), "      http: {}\n", ""));
    for _ in 0..5 {
        assert_eq!(get_app(port, "/").await.status, 200);
    }
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_upstream_connections() {
    let upstream = CountingUpstream::start();
    let port = free_port();
    let pool = "      http: {idleTimeout: 300ms}\n";
    let _proxy = Proxy::start(&istio(port, upstream.addr.port(), pool, ""));
    assert_eq!(get_app(port, "/").await.status, 200);
    let went_idle = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(upstream.closed(), 0, "still open before the idle timeout");
    let closed = upstream.wait_closed(1, Duration::from_secs(3));
    let after = went_idle.elapsed();
    eprintln!("idle upstream connection closed {after:?} after its last response");
    assert!(closed.is_some(), "the idle connection was closed");
    assert!(after >= Duration::from_millis(290), "{after:?}");

    // The next request opens a new connection.
    assert_eq!(get_app(port, "/").await.status, 200);
    assert_eq!(upstream.accepted(), 2);
}

/// A loopback listener that never accepts, with its backlog filled so further connection
/// attempts hang (Linux drops SYNs to a listener whose accept queue is full).
struct Blackhole {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _fillers: Vec<std::net::TcpStream>,
}

fn blackhole() -> Blackhole {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => {
                return Blackhole {
                    addr,
                    _listener: listener,
                    _fillers: fillers,
                };
            }
        }
    }
    panic!("the backlog never filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_bounds_connects_to_a_full_backlog() {
    let hole = blackhole();
    let port = free_port();
    let pool = "      tcp: {connectTimeout: 300ms}\n";
    let proxy = Proxy::start(&istio(port, hole.addr.port(), pool, ""));
    let start = Instant::now();
    let r = get_app(port, "/").await;
    let took = start.elapsed();
    eprintln!("connect to a full backlog failed after {took:?}");
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    );
    // Istio's default policy retries connect failures twice: three connects of 300 ms.
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(
        took < Duration::from_secs(3),
        "bounded by the connect timeout: {took:?}"
    );
    assert_eq!(
        metric(&proxy, "meshgate_upstream_connect_failures_total", &["app.test"]),
        3
    );
    assert_eq!(metric(&proxy, "meshgate_response_flags_total", &["flag=\"UF\""]), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_caps_concurrent_retries() {
    let echo = Echo::start("app");
    let port = free_port();
    let pool = "      http: {maxRetries: 1}\n";
    let retries = "    retries: {attempts: 3, retryOn: 5xx}\n";
    let proxy = Proxy::start(&istio(port, echo.port(), pool, retries));

    // Every first and second try fails after 300 ms: the one retry admitted stays in flight
    // while the other requests want theirs.
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(async move {
            let path = format!("/retry?uuid=cap-{i}&succeedAfter=2&responseCode=503&delayRetry=300ms");
            get_app(port, &path).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            200 => ok += 1,
            503 => assert_eq!(r.body, "failed try", "the failed try's own response"),
            other => panic!("unexpected {other}"),
        }
    }
    let refused = metric(
        &proxy,
        "meshgate_upstream_overflows_total",
        &["app.test", "breaker=\"retries\""],
    );
    eprintln!("4 failing requests with maxRetries 1: {ok} recovered by retries, {refused} retries refused");
    assert!(ok >= 1, "the admitted retries succeed");
    assert!(refused >= 2, "{refused}");
    assert_eq!(
        metric(&proxy, "meshgate_response_flags_total", &["flag=\"UO\""]),
        4 - ok as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504_and_closes_the_upstream_connection() {
    let upstream = CountingUpstream::start();
    let port = free_port();
    let timeout = "    timeout: 300ms\n";
    let _proxy = Proxy::start(&istio(port, upstream.addr.port(), "      http: {}\n", timeout));
    let start = Instant::now();
    let r = get_app(port, "/hang").await;
    let took = start.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.body, "upstream request timeout");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(upstream.accepted(), 1);
    let closed = upstream.wait_closed(1, Duration::from_secs(2));
    eprintln!("504 after {took:?}; upstream saw its connection closed {closed:?} later");
    assert!(
        closed.is_some(),
        "the cancelled request's upstream connection was closed"
    );
}

/// Sets its flag when dropped: the upstream handler was cancelled.
struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An HTTP/2 (prior knowledge) upstream whose handler never answers; counts handlers dropped
/// because their stream was reset.
fn hanging_h2_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let cancelled = Arc::new(AtomicUsize::new(0));
    let flag = cancelled.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((stream, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                        let guard = DropFlag(flag.clone());
                        async move {
                            std::future::pending::<()>().await;
                            drop(guard);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Empty::<bytes::Bytes>::new(),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    (addr, cancelled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_resets_the_upstream_http2_stream() {
    let (addr, cancelled) = hanging_h2_upstream();
    let port = free_port();
    let pool = "      http: {h2UpgradePolicy: UPGRADE}\n";
    let _proxy = Proxy::start(&istio(port, addr.port(), pool, "    timeout: 300ms\n"));
    let r = get_app(port, "/hang").await;
    assert_eq!(r.status, 504);
    let start = Instant::now();
    while cancelled.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("upstream HTTP/2 handler cancelled {:?} after the 504", start.elapsed());
    assert_eq!(cancelled.load(Ordering::SeqCst), 1, "the stream was reset upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_client_protocol_follows_the_clients_http_version() {
    let echo = Echo::start("app");
    let port = free_port();
    let pool = "      http: {useClientProtocol: true}\n";
    let _proxy = Proxy::start(&istio(port, echo.port(), pool, ""));
    let r = get_app(port, "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["version"], "HTTP/1.1");

    // HTTP/2 with `:authority: app.test` on a connection of our own.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("http://app.test/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = h2.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["version"], "HTTP/2.0", "HTTP/2 upstream for an HTTP/2 client");
}
