//! Access logs and response flags, through real listeners and upstreams.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Echo, Proxy, free_port, gateway, raw_get, scratch_dir, service_entry};

/// Routes: `/ok` to a live echo, `/dead` to a port nothing listens on (Istio's default
/// retries apply), `/slow` with a 200 ms timeout; any other path has no route.
fn config(port: u16, echo: &Echo, dead_port: u16) -> String {
    format!(
        r#"{gw}{live}{dead}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - name: ok
    match: [{{uri: {{exact: /ok}}}}]
    route: [{{destination: {{host: live.test}}}}]
  - name: dead
    match: [{{uri: {{exact: /dead}}}}]
    route: [{{destination: {{host: dead.test}}}}]
  - name: slow
    match: [{{uri: {{prefix: /delay}}}}]
    timeout: 200ms
    route: [{{destination: {{host: live.test}}}}]
"#,
        gw = gateway("gw", port),
        live = service_entry("live", "live.test", &[(echo.port(), "v1")]),
        dead = service_entry("dead", "dead.test", &[(dead_port, "v1")]),
    )
}

fn wait_for_lines(path: &std::path::Path, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn access_log_lines_carry_envoy_fields_and_response_flags() {
    let echo = Echo::start("live");
    let port = free_port();
    let dead_port = free_port();
    let dir = scratch_dir("access-log");
    let log = dir.join("access.log");
    let proxy = Proxy::start_with(
        &config(port, &echo, dead_port),
        &["--access-log", log.to_str().expect("utf-8 path")],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    assert_eq!(raw_get(addr, "/ok?x=1", "shop.test").expect("ok").0, 200);
    assert_eq!(raw_get(addr, "/nowhere", "shop.test").expect("nr").0, 404);
    assert_eq!(raw_get(addr, "/dead", "shop.test").expect("dead").0, 503);
    assert_eq!(raw_get(addr, "/delay/1000", "shop.test").expect("slow").0, 504);

    let lines = wait_for_lines(&log, 4);
    assert_eq!(lines.len(), 4, "{lines:?}");
    let ok = &lines[0];
    assert!(
        ok.starts_with('[') && ok.contains("] \"GET /ok?x=1 HTTP/1.1\" 200 - 0 "),
        "{ok}"
    );
    assert!(
        ok.contains(&format!("\"shop.test\" \"127.0.0.1:{}\"", echo.port())),
        "{ok}"
    );
    assert!(ok.contains("outbound|80||live.test default/shop.ok"), "{ok}");
    // The edge generated the x-request-id the upstream saw; the log shows it.
    let request_id = ok.split('"').nth(7).expect("request id field");
    assert_eq!(request_id.len(), 36, "{ok}");
    assert!(lines[1].contains("\"GET /nowhere HTTP/1.1\" 404 NR "), "{}", lines[1]);
    // Istio's default policy retried the refused connection twice, then gave up.
    assert!(lines[2].contains("\" 503 UF,URX "), "{}", lines[2]);
    assert!(lines[3].contains("\" 504 UT "), "{}", lines[3]);

    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    for (flag, count) in [("NR", 1), ("UF", 1), ("URX", 1), ("UT", 1), ("UH", 0)] {
        let line = format!("meshgate_response_flags_total{{flag=\"{flag}\"}} {count}");
        assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    }
}

#[test]
fn json_access_log_to_stdout() {
    let echo = Echo::start("live-json");
    let port = free_port();
    let proxy = Proxy::start_with(
        &config(port, &echo, free_port()),
        &["--access-log", "-", "--access-log-format", "json"],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    assert_eq!(raw_get(addr, "/ok", "shop.test").expect("ok").0, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let text = proxy.log_text();
        if let Some(line) = text.lines().find(|l| l.starts_with('{') && l.contains("\"/ok\"")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no JSON access log line in:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let entry: serde_json::Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(entry["response_code"], 200);
    assert_eq!(entry["response_flags"], "-");
    assert_eq!(entry["route_name"], "default/shop.ok");
    assert_eq!(entry["upstream_host"], format!("127.0.0.1:{}", echo.port()));
}

/// Sends a request with `send` to a route whose upstream answers after 150 ms (under the
/// 200 ms route timeout), hangs up 50 ms after starting, and checks the access log shows the
/// request (`request_line`) with status 0 and Envoy's `DC` flag.
fn client_leaving_is_logged_with_dc(name: &str, send: impl FnOnce(&mut std::net::TcpStream), request_line: &str) {
    let echo = Echo::start("slow");
    let port = free_port();
    let log = scratch_dir(name).join("access.log");
    let proxy = Proxy::start_with(
        &config(port, &echo, free_port()),
        &["--access-log", log.to_str().expect("utf-8 path")],
    );
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    send(&mut stream);
    drop(stream);
    let lines = wait_for_lines(&log, 1);
    assert!(
        lines
            .first()
            .is_some_and(|l| l.contains(&format!("\"{request_line}\" 0 DC "))),
        "{lines:?}"
    );
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.contains("meshgate_response_flags_total{flag=\"DC\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_client_leaving_before_its_response_is_logged_with_dc() {
    use std::io::Write;
    client_leaving_is_logged_with_dc(
        "access-log-dc",
        |stream| {
            stream
                .write_all(b"GET /delay/150 HTTP/1.1\r\nHost: shop.test\r\n\r\n")
                .expect("write");
            std::thread::sleep(Duration::from_millis(50));
        },
        "GET /delay/150 HTTP/1.1",
    );
}

/// The body follows its head separately, so it is streamed to the upstream rather than read
/// with the head; the client leaves once it is sent.
#[test]
fn a_client_leaving_after_sending_its_body_is_logged_with_dc() {
    use std::io::Write;
    client_leaving_is_logged_with_dc(
        "access-log-dc-body",
        |stream| {
            stream
                .write_all(b"POST /delay/150 HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\n")
                .expect("write");
            std::thread::sleep(Duration::from_millis(20));
            stream.write_all(b"hello").expect("body");
            std::thread::sleep(Duration::from_millis(30));
        },
        "POST /delay/150 HTTP/1.1",
    );
}
