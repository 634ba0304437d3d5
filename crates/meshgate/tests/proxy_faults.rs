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
