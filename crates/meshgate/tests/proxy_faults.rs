//! VirtualService fault injection through a real listener: aborts never reach the upstream,
//! delays hold the request, and both apply to the configured share of requests.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Echo, Proxy, free_port, gateway, raw_get, service_entry};

fn config(port: u16, echo: &Echo) -> String {
    format!(
        r#"{gw}{se}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: faults}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{{uri: {{prefix: /abort-all}}}}]
    fault:
      abort: {{httpStatus: 503, percentage: {{value: 100}}}}
    route: [{{destination: {{host: app.test}}}}]
  - match: [{{uri: {{prefix: /abort-some}}}}]
    fault:
      abort: {{httpStatus: 418, percentage: {{value: 30}}}}
    route: [{{destination: {{host: app.test}}}}]
  - match: [{{uri: {{prefix: /grpc-abort}}}}]
    fault:
      abort: {{grpcStatus: UNAVAILABLE}}
    route: [{{destination: {{host: app.test}}}}]
  - match: [{{uri: {{prefix: /delay-all}}}}]
    fault:
      delay: {{fixedDelay: 150ms}}
    route: [{{destination: {{host: app.test}}}}]
  - match: [{{uri: {{prefix: /delay-some}}}}]
    fault:
      delay: {{fixedDelay: 40ms, percentage: {{value: 50}}}}
    route: [{{destination: {{host: app.test}}}}]
"#,
        gw = gateway("gw", port),
        se = service_entry("app", "app.test", &[(echo.port(), "v1")]),
    )
}

#[test]
fn aborts_and_delays_apply_to_their_share_of_requests() {
    let echo = Echo::start("faulty");
    let port = free_port();
    let proxy = Proxy::start(&config(port, &echo));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    // An abort at 100%: Envoy's reply, and the upstream never sees the request.
    let before = echo.count();
    for _ in 0..20 {
        let (status, _, body) = raw_get(addr, "/abort-all", "app.test").expect("request");
        assert_eq!((status, body.as_str()), (503, "fault filter abort"));
    }
    assert_eq!(echo.count(), before);

    // 30% of 1000: within 3 standard deviations (sqrt(1000 * 0.3 * 0.7) = 14.5).
    let aborted = (0..1000)
        .filter(|_| raw_get(addr, "/abort-some", "app.test").expect("request").0 == 418)
        .count();
    assert!(
        (257..=343).contains(&aborted),
        "{aborted} of 1000 aborted, want about 300"
    );

    // gRPC: HTTP 200 with grpc-status 14 (UNAVAILABLE), trailers-only.
    let (status, headers, _) = raw_get(addr, "/grpc-abort", "app.test").expect("request");
    assert_eq!(status, 200);
    assert!(
        headers.iter().any(|(k, v)| k == "grpc-status" && v == "14"),
        "{headers:?}"
    );

    // A delay at 100% holds every request; at 50%, about half of them.
    let started = Instant::now();
    assert_eq!(raw_get(addr, "/delay-all", "app.test").expect("request").0, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
    let delayed = (0..200)
        .filter(|_| {
            let started = Instant::now();
            assert_eq!(raw_get(addr, "/delay-some", "app.test").expect("request").0, 200);
            started.elapsed() >= Duration::from_millis(40)
        })
        .count();
    // sqrt(200 * 0.5 * 0.5) = 7.1; 3 standard deviations either side of 100.
    assert!(
        (78..=122).contains(&delayed),
        "{delayed} of 200 delayed, want about 100"
    );

    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    let count = |flag: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("meshgate_response_flags_total{{flag=\"{flag}\"}} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("FI"), 20 + aborted as u64 + 1);
    assert_eq!(count("DI"), 1 + delayed as u64);
}

#[test]
fn istio_mirrors_copy_requests_to_the_shadow_cluster() {
    let primary = Echo::start("primary");
    let shadow = Echo::start("shadow");
    let port = free_port();
    let yaml = format!(
        r#"{gw}{p}{s}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: mirrored}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{{uri: {{prefix: /all}}}}]
    route: [{{destination: {{host: primary.test}}}}]
    mirror: {{host: shadow.test}}
  - match: [{{uri: {{prefix: /some}}}}]
    route: [{{destination: {{host: primary.test}}}}]
    mirrors:
    - destination: {{host: shadow.test}}
      percentage: {{value: 30}}
"#,
        gw = gateway("gw", port),
        p = service_entry("primary", "primary.test", &[(primary.port(), "v1")]),
        s = service_entry("shadow", "shadow.test", &[(shadow.port(), "v1")]),
    );
    let _proxy = Proxy::start(&yaml);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    for _ in 0..10 {
        assert_eq!(raw_get(addr, "/all", "shop.test").expect("request").0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shadow.count() < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(shadow.count(), 10, "every request mirrored");
    let before = shadow.count();
    for _ in 0..400 {
        assert_eq!(raw_get(addr, "/some", "shop.test").expect("request").0, 200);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mirrored = shadow.count() - before;
    // sqrt(400 * 0.3 * 0.7) = 9.2; 3 standard deviations either side of 120.
    assert!(
        (92..=148).contains(&mirrored),
        "{mirrored} of 400 mirrored, want about 120"
    );
}

/// A server that records each raw request (head and body) and answers 200.
fn capture_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let record = record.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buf[..n]);
                    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if data.len() < end + 4 + length {
                        continue;
                    }
                    if let Ok(mut seen) = record.lock() {
                        seen.push(String::from_utf8_lossy(&data[..end + 4 + length]).into_owned());
                    }
                    data.drain(..end + 4 + length);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn mirrors_carry_the_request_body_and_never_slow_the_primary() {
    let primary = Echo::start("primary-body");
    let (shadow_port, seen) = capture_server();
    // A mirror that accepts connections and never answers.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hanging_port = hanging.local_addr().expect("addr").port();
    let port = free_port();
    let yaml = format!(
        r#"{gw}{p}{s}{h}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: mirrored}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{{destination: {{host: primary.test}}}}]
    mirrors:
    - destination: {{host: shadow.test}}
    - destination: {{host: hanging.test}}
"#,
        gw = gateway("gw", port),
        p = service_entry("primary", "primary.test", &[(primary.port(), "v1")]),
        s = service_entry("shadow", "shadow.test", &[(shadow_port, "v1")]),
        h = service_entry("hanging", "hanging.test", &[(hanging_port, "v1")]),
    );
    let _proxy = Proxy::start(&yaml);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let started = Instant::now();
    let (status, _, body) = support::raw_request(
        addr,
        "POST /orders HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello-mirror",
    )
    .expect("post");
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the hanging mirror must not delay the primary"
    );
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["body_len"], 12);
    let deadline = Instant::now() + Duration::from_secs(5);
    let copy = loop {
        if let Some(copy) = seen.lock().expect("lock").first().cloned() {
            break copy;
        }
        assert!(Instant::now() < deadline, "the shadow never received the copy");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(copy.starts_with("POST /orders HTTP/1.1\r\n"), "{copy}");
    assert!(copy.to_ascii_lowercase().contains("host: shop.test-shadow"), "{copy}");
    assert!(copy.ends_with("\r\n\r\nhello-mirror"), "{copy}");
    drop(hanging);
}
