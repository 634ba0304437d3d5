//! Chaos: one of three endpoints starts failing; outlier detection ejects it and retries hide
//! the failures from clients; after its ejection time it is probed by real traffic again.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{Echo, Proxy, free_port, gateway, raw_get};

/// An upstream that answers every request 500, counting them.
struct Failing {
    port: u16,
    requests: Arc<AtomicUsize>,
}

impl Failing {
    fn start() -> Failing {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = [0u8; 4096];
                    let mut pending = Vec::new();
                    loop {
                        let Ok(n) = stream.read(&mut buf) else { return };
                        if n == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            counter.fetch_add(1, Ordering::Relaxed);
                            let reply = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";
                            if stream.write_all(reply).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Failing { port, requests }
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

#[test]
fn a_failing_endpoint_is_ejected_and_clients_do_not_notice() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let bad = Failing::start();
    let port = free_port();
    let yaml = format!(
        r#"{gw}{shop}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shop}}
spec:
  host: shop.test
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: 2s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{{destination: {{host: shop.test}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
"#,
        gw = gateway("gw", port),
        shop = shop_service_entry(&[a.port(), b.port(), bad.port]),
    );
    let proxy = Proxy::start(&yaml);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    let ok = (0..1000)
        .filter(|_| raw_get(addr, "/", "shop.test").expect("request").0 == 200)
        .count();
    assert!(ok >= 999, "{ok} of 1000 succeeded, want at least 99.9%");
    // Three consecutive 500s eject the endpoint for 2 s: it sees a handful of requests, not a
    // third of a thousand.
    let seen = bad.count();
    assert!((3..=12).contains(&seen), "the failing endpoint saw {seen} requests");
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("meshgate_upstream_outlier_ejections_total{cluster=\"outbound|80||shop.test\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );

    // After the ejection time (2 s; 4 s if a slow machine made the loop above outlast the first
    // ejection), real traffic probes it again (half-open), and retries hide that from clients.
    let before = bad.count();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bad.count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the ejected endpoint was never probed again"
        );
        assert_eq!(raw_get(addr, "/", "shop.test").expect("request").0, 200);
        std::thread::sleep(Duration::from_millis(20));
    }
    // It fails again, so it is ejected again (for longer): three failures in a row at most
    // reach it before that.
    let after_probe = bad.count();
    let ok = (0..60)
        .filter(|_| raw_get(addr, "/", "shop.test").expect("request").0 == 200)
        .count();
    assert_eq!(ok, 60);
    let probes = bad.count() - after_probe;
    assert!(probes <= 5, "the re-ejected endpoint got {probes} more requests");
}

#[test]
fn killing_an_endpoint_mid_load_hangs_nothing_and_failures_are_retried() {
    let steady = Echo::start("steady");
    let doomed_port = free_port();
    let dir = support::scratch_dir("doomed");
    let mut doomed = KillOnDrop(
        std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &doomed_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 http.server"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", doomed_port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let port = free_port();
    let yaml = format!(
        r#"{gw}{shop}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shop}}
spec:
  host: shop.test
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{{destination: {{host: shop.test}}}}]
    timeout: 2s
    retries: {{attempts: 3, retryOn: "connect-failure,reset,5xx"}}
"#,
        gw = gateway("gw", port),
        shop = shop_service_entry(&[steady.port(), doomed_port]),
    );
    let proxy = Proxy::start(&yaml);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut slowest) = (0usize, 0usize, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    match raw_get(addr, "/", "shop.test") {
                        Ok((200, _, _)) => ok += 1,
                        _ => failed += 1,
                    }
                    slowest = slowest.max(started.elapsed());
                }
                (ok, failed, slowest)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let _ = doomed.0.kill();
    let _ = doomed.0.wait();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
    for client in clients {
        let (o, f, s) = client.join().expect("client");
        ok += o;
        failed += f;
        slowest = slowest.max(s);
    }
    assert!(ok > 100, "only {ok} requests completed");
    // The requests caught by the kill are retried on the other endpoint, within the retry
    // budget; the dead endpoint is ejected after two failures, so at most a handful fail.
    assert!(
        failed * 200 <= ok + failed,
        "{failed} of {} requests failed",
        ok + failed
    );
    assert!(
        slowest < Duration::from_millis(2500),
        "a request took {slowest:?}, past its 2 s timeout"
    );
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{cluster=\"outbound|80||shop.test\"}} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(value("meshgate_upstream_retries_total") > 0, "failures were retried");
    assert_eq!(
        value("meshgate_upstream_outlier_ejections_total"),
        1,
        "the dead endpoint was ejected"
    );
}

#[test]
fn active_health_checks_take_a_dead_endpoint_out_and_bring_it_back() {
    let steady = Echo::start("steady-hc");
    let flaky_port = free_port();
    let dir = support::scratch_dir("flaky-hc");
    std::fs::write(dir.join("healthz"), "ok").expect("healthz file");
    let mut flaky = support::file_server(flaky_port, &dir);
    let port = free_port();
    let yaml = two_endpoint_shop(
        port,
        steady.port(),
        flaky_port,
        r#"{"path": "/healthz", "interval": "200ms", "timeout": "200ms", "healthyThreshold": 1, "unhealthyThreshold": 1}"#,
    );
    let proxy = Proxy::start(&yaml);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let served_by_flaky = |n: usize| {
        (0..n)
            .filter(|_| {
                let (status, _, body) = raw_get(addr, "/", "shop.test").expect("request");
                assert_eq!(status, 200, "{body}");
                !body.starts_with('{')
            })
            .count()
    };
    assert!(served_by_flaky(20) > 0, "both endpoints serve while healthy");

    let _ = flaky.kill();
    let _ = flaky.wait();
    std::thread::sleep(Duration::from_millis(800));
    // No retries are configured: only the health check keeps requests off the dead endpoint.
    assert_eq!(served_by_flaky(40), 0);
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("meshgate_upstream_health_check_failures_total{cluster=\"outbound|80||shop.test\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );

    let mut flaky = support::file_server(flaky_port, &dir);
    std::thread::sleep(Duration::from_millis(800));
    assert!(served_by_flaky(20) > 0, "the endpoint is back once its probe passes");
    let _ = flaky.kill();
    let _ = flaky.wait();
}

#[test]
fn health_checks_added_by_a_reload_start_probing() {
    let steady = Echo::start("steady-reload-hc");
    // Nothing listens on the second endpoint: without health checks (and without retries)
    // some requests go there and fail.
    let dead_port = free_port();
    let port = free_port();
    let config = |health_check: &str| two_endpoint_shop(port, steady.port(), dead_port, health_check);
    let proxy = Proxy::start(&config(""));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let failures = |n: usize| {
        (0..n)
            .filter(|_| raw_get(addr, "/", "shop.test").expect("request").0 != 200)
            .count()
    };
    assert!(failures(10) > 0, "without health checks the dead endpoint gets traffic");

    proxy.reload_with(&config(
        r#"{"path": "/", "interval": "100ms", "timeout": "200ms", "unhealthyThreshold": 1}"#,
    ));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(failures(20), 0, "the reload's health checks took the dead endpoint out");
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("meshgate_upstream_health_check_failures_total{cluster=\"outbound|80||shop.test\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// A gateway on `port` routing `shop.test` round-robin, without retries, to two endpoints on
/// 127.0.0.1; `health_check` is the `meshgate.io/health-check` annotation (none when empty).
fn two_endpoint_shop(port: u16, first: u16, second: u16, health_check: &str) -> String {
    let annotations = if health_check.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n    meshgate.io/health-check: '{health_check}'\n")
    };
    format!(
        r#"{gw}{shop}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: shop
{annotations}spec:
  host: shop.test
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{{destination: {{host: shop.test}}}}]
    retries: {{attempts: 0}}
"#,
        gw = gateway("gw", port),
        shop = shop_service_entry(&[first, second]),
    )
}

/// A ServiceEntry `shop.test` (port 80, STATIC) with one endpoint on 127.0.0.1 per port.
fn shop_service_entry(ports: &[u16]) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("  - {{address: 127.0.0.1, ports: {{http: {p}}}}}\n"))
        .collect();
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shop}}
spec:
  hosts: [shop.test]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
{endpoints}"#
    )
}

/// A child process killed when the test ends, whether it passes or panics early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
