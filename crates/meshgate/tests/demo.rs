//! `meshgate demo` end to end: the gateway, the mesh listener and the demo services.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn demo_serves_canary_header_routing_and_mesh_calls() {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["demo", "--admin-addr", &admin.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let _demo = Demo(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(raw_get(admin, "/ready", "admin"), Ok((200, _, _))) {
        assert!(Instant::now() < deadline, "demo never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gateway: SocketAddr = "127.0.0.1:8080".parse().expect("addr");

    let (status, _, body) = raw_get(gateway, "/", "shop.local").expect("frontend");
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["service"], "frontend");
    assert_eq!(j["catalog_via_mesh"]["service"], "catalog", "{j}");

    let beta = raw_request(
        gateway,
        "GET /catalog HTTP/1.1\r\nHost: shop\r\nx-user-group: beta\r\nConnection: close\r\n\r\n",
    )
    .expect("beta");
    assert!(beta.2.contains("\"version\":\"v2\""), "{}", beta.2);
    let cookie = raw_request(
        gateway,
        "GET /catalog HTTP/1.1\r\nHost: shop\r\nCookie: theme=dark; experiment=new-ui\r\nConnection: close\r\n\r\n",
    )
    .expect("cookie");
    assert!(cookie.2.contains("\"version\":\"v2\""), "{}", cookie.2);

    let mut v2 = 0;
    for _ in 0..400 {
        let (status, headers, _) = raw_get(gateway, "/catalog", "shop").expect("catalog");
        assert_eq!(status, 200);
        assert!(headers.iter().any(|(k, v)| k == "x-canary-route" && v == "catalog"));
        if headers.iter().any(|(k, v)| k == "x-demo-version" && v == "v2") {
            v2 += 1;
        }
    }
    // Binomial(400, 0.1): mean 40, sd 6; 15..=70 is beyond 4 sd.
    assert!((15..=70).contains(&v2), "v2 served {v2} of 400");

    let (status, headers, _) = raw_get(gateway, "/shop", "shop").expect("redirect");
    assert_eq!(status, 301);
    assert!(
        headers.iter().any(|(k, v)| k == "location" && v == "http://shop/"),
        "{headers:?}"
    );

    // The Kong half: the catalog behind key-auth and rate limiting on port 8000.
    let edge: SocketAddr = "127.0.0.1:8000".parse().expect("addr");
    assert_eq!(raw_get(edge, "/api/catalog", "api").expect("no key").0, 401);
    let with_key = |key: &str| {
        raw_request(
            edge,
            &format!("GET /api/catalog HTTP/1.1\r\nHost: api\r\napikey: {key}\r\nConnection: close\r\n\r\n"),
        )
        .expect("with key")
    };
    let (status, headers, body) = with_key("demo-key");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"service\":\"catalog\""), "{body}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "x-ratelimit-limit-minute" && v == "30"),
        "{headers:?}"
    );
    // A consumer added through the Kong Admin API, form-encoded as in Kong's docs.
    let admin_api: SocketAddr = "127.0.0.1:8001".parse().expect("addr");
    let form = |path: &str, body: &str| {
        raw_request(
            admin_api,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .expect("admin api")
        .0
    };
    assert_eq!(form("/consumers", "username=you"), 201);
    assert_eq!(form("/consumers/you/key-auth", "key=your-key"), 201);
    assert_eq!(with_key("your-key").0, 200);
}
