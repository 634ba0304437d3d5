//! Operating a real meshgate process: hot reload under load, rejected configs, malformed
//! requests over raw sockets, and the admin listener.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

fn routed_to(port: u16, services: &[(&str, u16)], target: &str, extra_port: Option<u16>) -> String {
    let mut yaml = gateway("gw", port);
    if let Some(p) = extra_port {
        yaml.push_str(&gateway("gw2", p));
    }
    for (name, p) in services {
        yaml.push_str(&service_entry(name, &format!("{name}.test"), &[(*p, "v1")]));
    }
    let gateways = if extra_port.is_some() { "[gw, gw2]" } else { "[gw]" };
    yaml.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: vs
spec:
  hosts: ["*"]
  gateways: {gateways}
  http:
  - route:
    - destination:
        host: {target}.test
"#
    ));
    yaml
}

/// Replaces the config the way editors and Kubernetes ConfigMap mounts do: write, then rename.
fn replace_config(proxy: &Proxy, yaml: &str) {
    let tmp = proxy.config.with_extension("tmp");
    std::fs::write(&tmp, yaml).expect("write");
    std::fs::rename(&tmp, &proxy.config).expect("rename");
}

fn wait_version_above(proxy: &Proxy, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while proxy.config_version() <= version {
        assert!(
            Instant::now() < deadline,
            "reload took over 1 s; log:\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn hundred_reloads_under_concurrent_load_fail_no_request() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let configs = [
        routed_to(port, &services, "a", None),
        routed_to(port, &services, "b", None),
    ];
    let proxy = Proxy::start(&configs[0]);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    let mut loaders = Vec::new();
    for i in 0..6 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        loaders.push(runtime.spawn(async move {
            // Half the clients keep connections alive across reloads; half open new ones.
            let pooled = client(i % 2 == 1);
            while !stop.load(Ordering::Relaxed) {
                let c = if i % 2 == 0 { client(false) } else { pooled.clone() };
                match send(&c, get(port, "/", "any.test", &[])).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("status {}: {}", r.status, r.body)),
                    Err(e) => failures.lock().expect("lock").push(e),
                }
            }
        }));
    }
    for i in 1..=100 {
        let before = proxy.config_version();
        replace_config(&proxy, &configs[i % 2]);
        wait_version_above(&proxy, before);
    }
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        runtime.block_on(l).expect("loader");
    }
    let failures = failures.lock().expect("lock");
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        ok.load(Ordering::Relaxed) > 500,
        "too little load: {}",
        ok.load(Ordering::Relaxed)
    );
    assert!(a.count() > 0 && b.count() > 0);
    assert!(proxy.config_version() >= 101);
}

#[test]
fn in_flight_requests_finish_on_the_config_they_started_with() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let proxy = Proxy::start(&routed_to(port, &services, "a", None));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let slow = std::thread::spawn(move || raw_get(addr, "/delay/1500", "x").expect("slow request"));
    while a.count() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let v = proxy.config_version();
    replace_config(&proxy, &routed_to(port, &services, "b", None));
    wait_version_above(&proxy, v);
    let (_, headers, _) = raw_get(addr, "/", "x").expect("new request");
    assert!(
        headers.iter().any(|(k, v)| k == "x-echo-name" && v == "b"),
        "new requests use the new config"
    );
    let (status, headers, _) = slow.join().expect("join");
    assert_eq!(status, 200);
    assert!(
        headers.iter().any(|(k, v)| k == "x-echo-name" && v == "a"),
        "{headers:?}"
    );
}

#[test]
fn invalid_config_is_rejected_and_the_last_good_one_keeps_serving() {
    let a = Echo::start("a");
    let port = free_port();
    let good = routed_to(port, &[("a", a.port())], "a", None);
    let proxy = Proxy::start(&good);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let version = proxy.config_version();

    let bad_regex = good.replace(
        "  - route:\n",
        "  - match:\n    - uri:\n        regex: \"/(unclosed\"\n    route:\n",
    );
    let bad_configs = [
        ("invalid regex", bad_regex, "spec.http[0].match[0].uri"),
        ("malformed yaml", format!("{good}\n  : : [\n"), "config.yaml"),
        (
            "unknown subset",
            good.replace("host: a.test\n", "host: a.test\n        subset: nope\n"),
            "subset",
        ),
        (
            "bad weights",
            good.replace(
                "        host: a.test\n",
                "        host: a.test\n      weight: 60\n    - destination:\n        host: a.test\n      weight: 30\n",
            ),
            "100",
        ),
    ];
    for (what, yaml, needle) in bad_configs {
        let failures_before = metric(&proxy, "meshgate_config_reload_failures_total");
        replace_config(&proxy, &yaml);
        let deadline = Instant::now() + Duration::from_secs(2);
        while metric(&proxy, "meshgate_config_reload_failures_total") == failures_before {
            assert!(
                Instant::now() < deadline,
                "{what}: no rejection logged:\n{}",
                proxy.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(proxy.config_version(), version, "{what}: version changed");
        let (status, headers, _) = raw_get(addr, "/", "x").expect("request");
        assert_eq!(status, 200, "{what}: last good config stopped serving");
        assert!(headers.iter().any(|(k, v)| k == "x-echo-name" && v == "a"));
        let log = proxy.log_text();
        assert!(log.contains(needle), "{what}: log does not name `{needle}`:\n{log}");
    }
    replace_config(&proxy, &good);
    wait_version_above(&proxy, version);
    assert!(!proxy.log_text().contains("panicked"));
}

/// The echo upstream that answers `GET /` on the proxy's `port`.
fn served_by(port: u16) -> String {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (_, headers, _) = raw_get(addr, "/", "x").expect("request");
    headers
        .into_iter()
        .find_map(|(k, v)| (k == "x-echo-name").then_some(v))
        .unwrap_or_default()
}

fn metric(proxy: &Proxy, name: &str) -> u64 {
    let (_, text) = proxy.admin_get("/stats/prometheus");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn listeners_follow_the_config() {
    let a = Echo::start("a");
    let port = free_port();
    let extra = free_port();
    let proxy = Proxy::start(&routed_to(port, &[("a", a.port())], "a", None));
    let extra_addr: SocketAddr = format!("127.0.0.1:{extra}").parse().expect("addr");
    assert!(std::net::TcpStream::connect(extra_addr).is_err());

    let v = proxy.config_version();
    replace_config(&proxy, &routed_to(port, &[("a", a.port())], "a", Some(extra)));
    wait_version_above(&proxy, v);
    proxy.wait_ready();
    assert_eq!(raw_get(extra_addr, "/", "x").expect("new listener").0, 200);

    let v = proxy.config_version();
    replace_config(&proxy, &routed_to(port, &[("a", a.port())], "a", None));
    wait_version_above(&proxy, v);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::net::TcpStream::connect(extra_addr).is_err(),
        "removed listener still accepts"
    );
}

#[test]
fn sighup_reloads() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let proxy = Proxy::start(&routed_to(port, &services, "a", None));
    // Write in place without a rename, then signal.
    let v = proxy.config_version();
    std::fs::write(&proxy.config, routed_to(port, &services, "b", None)).expect("write");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &proxy.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_version_above(&proxy, v);
    assert_eq!(served_by(port), "b");
}

#[test]
fn bad_initial_config_exits_with_a_clear_error() {
    let dir = scratch_dir("bad-start");
    let config = dir.join("vs.yaml");
    std::fs::write(
        &config,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: broken\nspec:\n  hosts: [x]\n  http:\n  - route:\n    - destination:\n        hostt: a\n",
    )
    .expect("write");
    let mut proxy = Proxy::spawn(&config, &[]);
    let status = proxy.child.wait().expect("wait");
    assert!(!status.success());
    let log = proxy.log_text();
    assert!(
        log.contains("vs.yaml") && log.contains("VirtualService default/broken") && log.contains("hostt"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn malformed_requests_never_reach_the_upstream() {
    let a = Echo::start("a");
    let port = free_port();
    let proxy = Proxy::start(&routed_to(port, &[("a", a.port())], "a", None));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let huge = "x".repeat(70 * 1024);
    let cases = [
        (
            "oversized header block",
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n"),
        ),
        (
            "space in header name",
            "GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n".to_string(),
        ),
        (
            "control byte in header value",
            "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n".to_string(),
        ),
        (
            "two different content-lengths",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_string(),
        ),
        (
            "bad chunk size",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_string(),
        ),
        ("bad request line", "GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n".to_string()),
        (
            "unknown transfer-encoding",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc".to_string(),
        ),
    ];
    for (what, request) in cases {
        let (status, _, _) = raw_request(addr, &request).expect("send");
        assert!(status == 0 || (400..500).contains(&status), "{what}: got {status}");
        if what == "oversized header block" {
            assert_eq!(status, 431, "{what}");
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.count(), 0, "a malformed request reached the upstream");
    // The proxy is still healthy.
    assert_eq!(raw_get(addr, "/", "x").expect("ok").0, 200);
    assert_eq!(a.count(), 1);
    assert!(!proxy.log_text().contains("panicked"));
}

/// Slowloris: a client that never finishes its request head, or a keep-alive connection left
/// idle, is closed after `--request-headers-timeout`; a prompt client is served as usual.
#[test]
fn connections_that_do_not_send_a_request_head_in_time_are_closed() {
    use std::io::{Read, Write};
    let a = Echo::start("a");
    let port = free_port();
    let proxy = Proxy::start_with(
        &routed_to(port, &[("a", a.port())], "a", None),
        &["--request-headers-timeout", "1s"],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // Read until the proxy closes the connection (or 5 s pass): what it sent, and when.
    let closed_after = |stream: &mut std::net::TcpStream| {
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let started = Instant::now();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Some((started.elapsed(), String::from_utf8_lossy(&received).into_owned())),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some((started.elapsed(), String::from_utf8_lossy(&received).into_owned()));
                }
                Err(_) => return None,
            }
        }
    };

    let mut slow = std::net::TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        .expect("partial head");
    let mut idle = std::net::TcpStream::connect(addr).expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    // A client that sends its request in time is served while the slow one waits.
    assert_eq!(raw_get(addr, "/", "x").expect("prompt request").0, 200);

    let (waited, sent) = closed_after(&mut slow).expect("the slow client's connection is closed within 5 s");
    assert!(waited <= Duration::from_millis(2500), "closed after {waited:?}");
    assert!(sent.is_empty() || sent.starts_with("HTTP/1.1 408"), "{sent}");
    // The keep-alive connection got its response, then was closed once it sat idle.
    let (_, sent) = closed_after(&mut idle).expect("the idle connection is closed within 5 s");
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    assert_eq!(a.count(), 2, "the unfinished request never reached the upstream");
    assert!(!proxy.log_text().contains("panicked"));
}

/// RFC 9112 §6.3: with both headers, Transfer-Encoding wins and the connection must be closed
/// after the response, so nothing smuggled after the chunked body is read as a request.
#[test]
fn content_length_with_transfer_encoding_cannot_smuggle() {
    let a = Echo::start("a");
    let port = free_port();
    let _proxy = Proxy::start(&routed_to(port, &[("a", a.port())], "a", None));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let smuggle = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let (status, headers, body) = raw_request(addr, smuggle).expect("send");
    assert!(
        status == 0 || status == 200 || (400..500).contains(&status),
        "got {status}"
    );
    if status == 200 {
        let j: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(j["body_len"], 0, "the chunked framing was used");
        assert!(j["headers"].get("content-length").is_none(), "{j}");
        assert!(
            headers.iter().any(|(k, v)| k == "connection" && v == "close"),
            "{headers:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.count() <= 1, "the smuggled request was forwarded");
}

#[test]
fn admin_reports_readiness_config_and_metrics() {
    let a = Echo::start("a");
    let port = free_port();
    let proxy = Proxy::start(&routed_to(port, &[("a", a.port())], "a", None));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    for _ in 0..3 {
        assert_eq!(raw_get(addr, "/", "x").expect("req").0, 200);
    }
    assert_eq!(proxy.admin_get("/ready").0, 200);
    assert_eq!(proxy.admin_get("/healthz").0, 200);
    let (status, dump) = proxy.admin_get("/config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("config dump is JSON");
    assert_eq!(dump["version"], 1);
    assert_eq!(dump["snapshot"]["listeners"][0]["port"], port);
    assert_eq!(dump["snapshot"]["clusters"][0]["name"], "outbound|80||a.test");
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics.contains(
            "meshgate_requests_total{route=\"default/vs[0]\",destination=\"outbound|80||a.test\",code=\"200\"} 3"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshgate_upstream_connections_total{cluster=\"outbound|80||a.test\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshgate_upstream_requests_total{cluster=\"outbound|80||a.test\"} 3"),
        "{metrics}"
    );
    assert_eq!(proxy.admin_get("/nope").0, 404);
}

#[test]
fn sigterm_drains_requests_in_flight_then_exits() {
    let a = Echo::start("a");
    let port = free_port();
    let mut proxy = Proxy::start(&routed_to(port, &[("a", a.port())], "a", None));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let slow = std::thread::spawn(move || raw_get(addr, "/delay/700", "x").expect("slow request"));
    while a.count() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = proxy.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(proxy.admin_get("/ready").0, 503, "a draining proxy is not ready");
    let (status, _, _) = slow.join().expect("join");
    assert_eq!(status, 200, "the request in flight was answered");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(exit) = proxy.child.try_wait().expect("wait") {
            assert!(exit.success(), "{exit:?}");
            break;
        }
        assert!(Instant::now() < deadline, "did not exit after draining");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_config_folder_reloads_on_yaml_changes_only() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let dir = scratch_dir("folder");
    std::fs::write(dir.join("mesh.yaml"), routed_to(port, &services, "a", None)).expect("write");
    let proxy = Proxy::spawn(&dir, &[]);
    proxy.wait_ready();
    let v = proxy.config_version();
    std::fs::write(dir.join("notes.txt"), "not config").expect("write");
    std::fs::write(dir.join(".mesh.yaml.swp"), "editor droppings").expect("write");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(proxy.config_version(), v, "a non-YAML file triggered a reload");
    std::fs::write(dir.join("mesh.yaml"), routed_to(port, &services, "b", None)).expect("write");
    wait_version_above(&proxy, v);
    assert_eq!(served_by(port), "b");
}

/// The voluntary context switches of meshgate's config-watch thread: one per wake-up.
#[cfg(target_os = "linux")]
fn config_watch_wakeups(proxy: &Proxy) -> u64 {
    let tasks = format!("/proc/{}/task", proxy.child.id());
    for task in std::fs::read_dir(tasks).expect("tasks").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "config-watch" {
            let status = std::fs::read_to_string(task.path().join("status")).expect("status");
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("voluntary_ctxt_switches");
        }
    }
    panic!("no config-watch thread");
}

/// A busy file next to the config (meshgate's own log here, an access log or a load
/// generator's log in real life) must not wake the watcher on each write; replacing the
/// config still reloads it.
#[cfg(target_os = "linux")]
#[test]
fn writes_to_a_file_beside_the_config_do_not_wake_the_watcher() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let proxy = Proxy::start(&routed_to(port, &services, "a", None));
    let v = proxy.config_version();
    let before = config_watch_wakeups(&proxy);
    let mut busy = std::fs::File::create(proxy.config.with_file_name("requests.log")).expect("log");
    for i in 0..2000 {
        use std::io::Write;
        writeln!(busy, "request {i}").expect("write");
        if i % 200 == 0 {
            // Let the watcher run between bursts, as it would under a steady writer.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    drop(busy);
    std::thread::sleep(Duration::from_millis(300));
    let woken = config_watch_wakeups(&proxy) - before;
    assert!(
        woken <= 3,
        "the watcher woke {woken} times for 2000 writes to another file"
    );
    assert_eq!(proxy.config_version(), v, "another file triggered a reload");

    // Written in place, then replaced by a rename: both reload, and the file that replaced the
    // config is watched in turn.
    std::fs::write(&proxy.config, routed_to(port, &services, "b", None)).expect("write");
    wait_version_above(&proxy, v);
    let v = proxy.config_version();
    replace_config(&proxy, &routed_to(port, &services, "a", None));
    wait_version_above(&proxy, v);
    let v = proxy.config_version();
    std::fs::write(&proxy.config, routed_to(port, &services, "b", None)).expect("write");
    wait_version_above(&proxy, v);
}

/// Kubernetes updates a ConfigMap volume by renaming a new `..data` symlink over the old one;
/// the config file, a symlink through `..data`, keeps its name.
#[test]
fn a_configmap_style_symlink_swap_reloads() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let dir = scratch_dir("configmap");
    let version_dir = |n: u32, target: &str| {
        let d = dir.join(format!("..v{n}"));
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("mesh.yaml"), routed_to(port, &services, target, None)).expect("write");
    };
    version_dir(1, "a");
    std::os::unix::fs::symlink("..v1", dir.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/mesh.yaml", dir.join("mesh.yaml")).expect("symlink");
    let proxy = Proxy::spawn(&dir.join("mesh.yaml"), &[]);
    proxy.wait_ready();
    let v = proxy.config_version();

    version_dir(2, "b");
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
    wait_version_above(&proxy, v);
    assert_eq!(served_by(port), "b");
}

/// A config file that is a symlink to a file elsewhere: the target's folder is watched too, so
/// replacing the target by rename reloads, again and again.
#[test]
fn a_symlinked_config_reloads_when_its_target_is_replaced() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let dir = scratch_dir("symlinked");
    let (link_dir, real_dir) = (dir.join("etc"), dir.join("srv"));
    std::fs::create_dir_all(&link_dir).expect("mkdir");
    std::fs::create_dir_all(&real_dir).expect("mkdir");
    let real = real_dir.join("mesh.yaml");
    std::fs::write(&real, routed_to(port, &services, "a", None)).expect("write");
    std::os::unix::fs::symlink(&real, link_dir.join("mesh.yaml")).expect("symlink");
    let proxy = Proxy::spawn(&link_dir.join("mesh.yaml"), &[]);
    proxy.wait_ready();
    for target in ["b", "a", "b"] {
        let v = proxy.config_version();
        let tmp = real_dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, routed_to(port, &services, target, None)).expect("write");
        std::fs::rename(&tmp, &real).expect("rename");
        wait_version_above(&proxy, v);
    }
}

/// A config file moved away (`mv config.yaml config.bak`) is no longer the config: writes to it
/// do not reload, and a new file under the config's name does.
#[test]
fn a_config_moved_away_is_no_longer_watched() {
    let a = Echo::start("a");
    let b = Echo::start("b");
    let port = free_port();
    let services = [("a", a.port()), ("b", b.port())];
    let proxy = Proxy::start(&routed_to(port, &services, "a", None));
    let v = proxy.config_version();
    let moved = proxy.config.with_file_name("config.bak");
    std::fs::rename(&proxy.config, &moved).expect("mv");
    // The move is a change: the reload finds no file and keeps the last good config.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&proxy, "meshgate_config_reload_failures_total") < 1 {
        assert!(Instant::now() < deadline, "moving the config away did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&moved, routed_to(port, &services, "b", None)).expect("write");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        metric(&proxy, "meshgate_config_reload_failures_total"),
        1,
        "a write to the moved-away file reloaded"
    );
    std::fs::write(&proxy.config, routed_to(port, &services, "b", None)).expect("write");
    wait_version_above(&proxy, v);
}
