//! The Kong-compatible Admin API of a real meshgate process: entities created through it route
//! traffic at once, invalid ones are refused with Kong's schema-violation error, the state
//! survives a restart, and a token protects it.

mod support;

use std::net::SocketAddr;

use support::{Echo, KongNode, Proxy, admin_call, free_port, raw_get, raw_request, scratch_dir};

/// One Admin API call with a JSON body: (status, parsed JSON body or Null).
fn call(admin: SocketAddr, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    admin_call(admin, method, path, "application/json", body, token)
}

#[test]
fn entities_created_through_the_admin_api_route_traffic_and_persist() {
    let app = Echo::start("admin-app");
    let dir = scratch_dir("kong-admin");
    let state = dir.join("state.db");
    let (admin_port, proxy_port) = (free_port(), free_port());
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("addr");
    let gateway: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().expect("addr");
    let args = [
        "--admin-api".to_string(),
        admin.to_string(),
        "--admin-api-database".to_string(),
        state.display().to_string(),
        "--listen".to_string(),
        gateway.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start_with("", &args);

    let (status, service) = call(
        admin,
        "POST",
        "/services",
        &format!(r#"{{"name": "app", "url": "http://127.0.0.1:{}"}}"#, app.port()),
        None,
    );
    assert_eq!(status, 201, "{service}");
    assert_eq!(service["id"].as_str().map(str::len), Some(36));
    let (status, route) = call(
        admin,
        "POST",
        "/services/app/routes",
        r#"{"name": "r", "paths": ["/app"]}"#,
        None,
    );
    assert_eq!(status, 201, "{route}");
    assert_eq!(route["service"]["id"], service["id"]);
    // Applied before the response: the route serves at once.
    let (status, _, body) = raw_get(gateway, "/app/x", "api.test").expect("proxied");
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["path"], "/x");

    // A consumer with a key, and key-auth on the service.
    assert_eq!(
        call(admin, "POST", "/consumers", r#"{"username": "alice"}"#, None).0,
        201
    );
    assert_eq!(
        call(
            admin,
            "POST",
            "/consumers/alice/key-auth",
            r#"{"key": "alice-key"}"#,
            None
        )
        .0,
        201
    );
    assert_eq!(
        call(admin, "POST", "/services/app/plugins", r#"{"name": "key-auth"}"#, None).0,
        201
    );
    assert_eq!(raw_get(gateway, "/app", "api.test").expect("no key").0, 401);
    let (status, _, _) = raw_request(
        gateway,
        "GET /app HTTP/1.1\r\nHost: api.test\r\napikey: alice-key\r\nConnection: close\r\n\r\n",
    )
    .expect("with key");
    assert_eq!(status, 200);

    // Invalid config is refused naming the field, and changes nothing.
    let (status, error) = call(
        admin,
        "POST",
        "/plugins",
        r#"{"name": "rate-limiting", "config": {"minut": 5}}"#,
        None,
    );
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["name"], "schema violation");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("minut")),
        "{error}"
    );
    assert_eq!(
        call(admin, "GET", "/plugins", "", None).1["data"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        call(
            admin,
            "POST",
            "/services",
            r#"{"name": "app", "url": "http://x"}"#,
            None
        )
        .0,
        409
    );

    // PATCH changes the service; the listing and /status answer as in Kong.
    let (status, patched) = call(admin, "PATCH", "/services/app", r#"{"path": "/v2"}"#, None);
    assert_eq!((status, &patched["path"]), (200, &serde_json::json!("/v2")));
    let (_, _, body) = raw_request(
        gateway,
        "GET /app/y HTTP/1.1\r\nHost: api.test\r\napikey: alice-key\r\nConnection: close\r\n\r\n",
    )
    .expect("patched");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["path"],
        "/v2/y"
    );
    assert_eq!(call(admin, "GET", "/services", "", None).1["data"][0]["name"], "app");
    assert_eq!(call(admin, "GET", "/status", "", None).1["database"]["reachable"], true);

    // The state survives a restart.
    drop(proxy);
    let proxy = Proxy::start_with("", &args);
    assert_eq!(call(admin, "GET", "/routes/r", "", None).1["paths"][0], "/app");
    assert_eq!(call(admin, "DELETE", "/routes/r", "", None).0, 204);
    assert_eq!(raw_get(gateway, "/app", "api.test").expect("deleted").0, 404);
    drop(proxy);
}

#[test]
fn the_admin_api_needs_its_token_and_refuses_to_be_exposed_without_one() {
    let dir = scratch_dir("kong-admin-token");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let args = [
        "--admin-api".to_string(),
        admin.to_string(),
        "--admin-api-token".to_string(),
        "s3cret".to_string(),
        "--admin-api-database".to_string(),
        dir.join("state.db").display().to_string(),
        "--listen".to_string(),
        format!("127.0.0.1:{}", free_port()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _proxy = Proxy::start_with("", &args);
    assert_eq!(call(admin, "GET", "/", "", None).0, 401);
    assert_eq!(call(admin, "GET", "/", "", Some("wrong")).0, 401);
    assert_eq!(call(admin, "GET", "/", "", Some("s3cret")).0, 200);

    // Bound beyond loopback without a token: meshgate refuses to start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["proxy", "--admin-api-database"])
        .arg(dir.join("state.db"))
        .args(["--admin-api", "0.0.0.0:0", "--admin-addr", "127.0.0.1:0"])
        .env_remove("MESHGATE_ADMIN_TOKEN")
        .output()
        .expect("run meshgate");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-api-token"));
}

#[test]
fn config_import_then_export_round_trips_a_deck_file() {
    let dir = scratch_dir("kong-import");
    let input = dir.join("kong.yaml");
    let state = dir.join("state.db");
    let deck = "_format_version: \"3.0\"\nservices:\n- name: app\n  url: http://127.0.0.1:9/api\n  routes:\n  - name: r\n    paths: [/app]\n    strip_path: false\n  plugins:\n  - name: rate-limiting\n    config: {minute: 10, policy: local}\nconsumers:\n- username: alice\n  keyauth_credentials:\n  - key: k1\nupstreams:\n- name: pool\n  targets:\n  - {target: 127.0.0.1:9, weight: 100}\n";
    std::fs::write(&input, deck).expect("write");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(args)
            .output()
            .expect("run meshgate")
    };
    let state_arg = state.display().to_string();
    let out = run(&[
        "config",
        "import",
        &input.display().to_string(),
        "--database",
        &state_arg,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["config", "export", "--database", &state_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let exported = String::from_utf8_lossy(&out.stdout).into_owned();
    let parse = |text: &str| meshgate_model_docs(text);
    assert_eq!(parse(&exported), parse(deck), "{exported}");

    // An invalid file is refused and the state is left alone.
    std::fs::write(
        &input,
        "_format_version: \"3.0\"\nservices:\n- name: app\n  url: http://x\n  routez: []\n",
    )
    .expect("write");
    let out = run(&[
        "config",
        "import",
        &input.display().to_string(),
        "--database",
        &state_arg,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("routez"));
    let out = run(&["config", "export", "--database", &state_arg]);
    assert_eq!(parse(&String::from_utf8_lossy(&out.stdout)), parse(deck));
}

/// A YAML text as a JSON value, for comparing decK files regardless of formatting.
fn meshgate_model_docs(text: &str) -> serde_json::Value {
    meshgate_model::source::parse_str(std::path::Path::new("doc.yaml"), text)
        .ok()
        .and_then(|docs| docs.into_iter().next())
        .map(|d| d.body)
        .unwrap_or_default()
}

/// Drives the Admin API from its checked-in OpenAPI document: every `POST` with its example,
/// then every `GET`, each answered with a status the document lists.
#[test]
fn the_openapi_document_describes_the_api_it_drives() {
    let spec_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/admin-api.openapi.json"
    ))
    .expect("docs/admin-api.openapi.json");
    let spec: serde_json::Value = serde_json::from_str(&spec_text).expect("OpenAPI JSON");
    let dir = scratch_dir("kong-openapi");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let args = [
        "--admin-api".to_string(),
        admin.to_string(),
        "--admin-api-database".to_string(),
        dir.join("state.db").display().to_string(),
        "--listen".to_string(),
        format!("127.0.0.1:{}", free_port()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _proxy = Proxy::start_with("", &args);

    let (_, _, served) = raw_get(admin, "/openapi.json", "admin").expect("openapi");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&served).expect("served JSON"),
        spec,
        "the served document is the checked-in one"
    );

    let paths = spec["paths"].as_object().expect("paths");
    // `{id}` of each collection: the name its create example gives.
    let example_name = |collection: &str| -> String {
        let example =
            &paths[&format!("/{collection}")]["post"]["requestBody"]["content"]["application/json"]["example"];
        example["instance_name"]
            .as_str()
            .or(example["name"].as_str())
            .or(example["username"].as_str())
            .or(example["id"].as_str())
            .unwrap_or("missing")
            .to_string()
    };
    let concrete = |path: &str| -> String {
        let path = match path.split('/').nth(1) {
            Some(collection) if path.contains("{id}") => path.replace("{id}", &example_name(collection)),
            _ => path.to_string(),
        };
        // `{item}`: the first entity its list holds (created by the POSTs before).
        let path = match path.strip_suffix("/{item}") {
            Some(list) => {
                let (_, listed) = call(admin, "GET", list, "", None);
                let id = listed["data"][0]["id"].as_str().unwrap_or("missing").to_string();
                format!("{list}/{id}")
            }
            None => path,
        };
        path.replace("{name}", "key-auth")
    };
    // Top-level collections first (a route's example names the service), then nested ones.
    let mut posts: Vec<&String> = paths.keys().filter(|p| paths[*p].get("post").is_some()).collect();
    posts.sort_by_key(|p| (p.matches('/').count(), *p != "/services"));
    let mut exercised = 0;
    for path in posts {
        let operation = &paths[path]["post"];
        let example = &operation["requestBody"]["content"]["application/json"]["example"];
        if path == "/config" {
            continue; // replacing the whole state would undo the others
        }
        let expected = if path == "/schemas/plugins/validate" { 200 } else { 201 };
        let (status, body) = call(admin, "POST", &concrete(path), &example.to_string(), None);
        assert!(
            operation["responses"].get(status.to_string()).is_some(),
            "POST {path}: {status} is not documented ({body})"
        );
        assert_eq!(status, expected, "POST {path}: {body}");
        exercised += 1;
    }
    for (path, item) in paths {
        let Some(operation) = item.get("get") else { continue };
        let (status, body) = call(admin, "GET", &concrete(path), "", None);
        assert!(
            operation["responses"].get(status.to_string()).is_some(),
            "GET {path}: {status} is not documented ({body})"
        );
        assert_eq!(status, 200, "GET {path}: {body}");
        exercised += 1;
    }
    assert!(exercised >= 45, "only {exercised} operations exercised");
}

/// Admin API changes apply under load without failing a request: clients keep calling a
/// route while its service is patched and plugins come and go 30 times.
#[test]
fn admin_changes_under_load_drop_no_request() {
    let app = Echo::start("admin-load-app");
    let dir = scratch_dir("kong-admin-load");
    let node = KongNode::start(&dir.join("state.db").display().to_string(), false);
    let (admin, gateway) = (node.admin, node.gateway);
    let service = format!(r#"{{"name": "app", "url": "http://127.0.0.1:{}"}}"#, app.port());
    assert_eq!(call(admin, "POST", "/services", &service, None).0, 201);
    assert_eq!(
        call(
            admin,
            "POST",
            "/services/app/routes",
            r#"{"name": "r", "paths": ["/load"]}"#,
            None
        )
        .0,
        201
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    match raw_get(gateway, "/load/x", "api.test") {
                        Ok((200, _, _)) => ok += 1,
                        Ok((status, _, body)) => failed.push(format!("{status} {body}")),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for i in 0..30 {
        let (status, body) = call(
            admin,
            "PATCH",
            "/services/app",
            &format!(r#"{{"path": "/v{i}", "retries": {}}}"#, i % 5),
            None,
        );
        assert_eq!(status, 200, "{body}");
        if i % 2 == 0 {
            let (status, body) = call(
                admin,
                "POST",
                "/plugins",
                &format!(r#"{{"name": "correlation-id", "instance_name": "c{i}"}}"#),
                None,
            );
            assert_eq!(status, 201, "{body}");
        } else {
            assert_eq!(call(admin, "DELETE", &format!("/plugins/c{}", i - 1), "", None).0, 204);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.join().expect("client");
        assert!(failed.is_empty(), "failed requests during admin changes: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "only {total} requests were made");
    // The last change serves.
    let (_, _, body) = raw_get(gateway, "/load/x", "api.test").expect("final");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["path"],
        "/v29/x"
    );
}
