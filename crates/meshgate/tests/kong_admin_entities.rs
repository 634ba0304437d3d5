//! Kong Admin API entities beyond services and routes, through a real meshgate process:
//! certificates and SNIs served on the TLS proxy listener, nested credentials, plugin schemas,
//! paging, PUT upserts, and decK-nested entities listed like Kong lists them.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Value, json};
use support::{Echo, KongNode, admin_call, parse_response, raw_get, raw_request, scratch_dir};

fn call(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    admin_call(admin, method, path, "application/json", body, None)
}

fn call_as(admin: SocketAddr, method: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
    admin_call(admin, method, path, content_type, body, None)
}

/// Kong's documentation drives the Admin API with `curl --data` forms and loads declarative
/// files with `curl -F config=@kong.yml`; both work unchanged.
#[test]
fn form_encoded_and_multipart_bodies_work_as_in_kongs_docs() {
    let app = Echo::start("form-app");
    let node = start("kong-forms");
    let form = "application/x-www-form-urlencoded";
    let (status, service) = call_as(
        node.admin,
        "POST",
        "/services",
        form,
        &format!(
            "name=form-svc&url=http%3A%2F%2F127.0.0.1%3A{}%2Fbase&retries=2",
            app.port()
        ),
    );
    assert_eq!(status, 201, "{service}");
    assert_eq!((&service["path"], &service["retries"]), (&json!("/base"), &json!(2)));
    let (status, route) = call_as(
        node.admin,
        "POST",
        "/services/form-svc/routes",
        form,
        "name=form-route&paths[]=/form&methods=GET&strip_path=true",
    );
    assert_eq!(status, 201, "{route}");
    assert_eq!(route["paths"], json!(["/form"]));
    let (status, plugin) = call_as(
        node.admin,
        "POST",
        "/services/form-svc/plugins",
        form,
        "name=rate-limiting&config.minute=2&config.policy=local",
    );
    assert_eq!(status, 201, "{plugin}");
    assert_eq!(plugin["config"]["minute"], 2);
    assert_eq!(raw_get(node.gateway, "/form/x", "x").expect("1").0, 200);
    assert_eq!(raw_get(node.gateway, "/form/x", "x").expect("2").0, 200);
    assert_eq!(raw_get(node.gateway, "/form/x", "x").expect("3").0, 429);

    // A declarative file as a multipart upload replaces the state.
    let deck = format!(
        "_format_version: \"3.0\"\nservices:\n- name: uploaded\n  url: http://127.0.0.1:{}\n  routes:\n  - name: up\n    paths: [/up]\n",
        app.port()
    );
    let body = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"config\"; filename=\"kong.yml\"\r\nContent-Type: application/octet-stream\r\n\r\n{deck}\r\n--XyZ--\r\n"
    );
    let (status, loaded) = call_as(
        node.admin,
        "POST",
        "/config",
        "multipart/form-data; boundary=XyZ",
        &body,
    );
    assert_eq!(status, 201, "{loaded}");
    assert_eq!(raw_get(node.gateway, "/up", "x").expect("uploaded").0, 200);
    assert_eq!(raw_get(node.gateway, "/form/x", "x").expect("replaced").0, 404);
    // And wrapped in JSON, as `{"config": "<file>"}`.
    let (status, _) = call(
        node.admin,
        "POST",
        "/config",
        &json!({ "config": deck.replace("/up", "/wrapped") }).to_string(),
    );
    assert_eq!(status, 201);
    assert_eq!(raw_get(node.gateway, "/wrapped", "x").expect("wrapped").0, 200);
}

/// A node with an Admin API on a fresh SQLite database, and plain and TLS proxy listeners.
fn start(name: &str) -> KongNode {
    KongNode::start(&scratch_dir(name).join("admin.db").display().to_string(), true)
}

/// GET over TLS with `sni`, trusting only `root`: (status, body, the server certificate's DER).
fn tls_get(addr: SocketAddr, sni: &str, root: &[u8], path: &str) -> Result<(u16, String, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(root.to_vec()))
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf);
    let presented = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let (status, _, body) = parse_response(&buf);
    Ok((status, body, presented))
}

fn certificate(host: &str) -> (String, String, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec![host.to_string()]).expect("cert");
    (
        cert.cert.pem(),
        cert.signing_key.serialize_pem(),
        cert.cert.der().to_vec(),
    )
}

#[test]
fn certificates_and_snis_serve_tls_by_name_and_protocols_choose_the_listener() {
    let app = Echo::start("tls-app");
    let node = start("kong-tls");
    let (a_pem, a_key, a_der) = certificate("a.test");
    let (b_pem, b_key, b_der) = certificate("b.test");

    let svc = format!(r#"{{"name": "app", "url": "http://127.0.0.1:{}"}}"#, app.port());
    assert_eq!(call(node.admin, "POST", "/services", &svc).0, 201);
    let (status, _) = call(
        node.admin,
        "POST",
        "/services/app/routes",
        r#"{"name": "secure", "paths": ["/secure"], "protocols": ["https"]}"#,
    );
    assert_eq!(status, 201);
    let (status, _) = call(
        node.admin,
        "POST",
        "/services/app/routes",
        r#"{"name": "plain", "paths": ["/plain"], "protocols": ["http"]}"#,
    );
    assert_eq!(status, 201);

    // A certificate with its SNIs given as names (the Admin API's shorthand).
    let (status, cert_a) = call(
        node.admin,
        "POST",
        "/certificates",
        &json!({"cert": a_pem, "key": a_key, "snis": ["a.test"]}).to_string(),
    );
    assert_eq!(status, 201, "{cert_a}");
    // A second one, its SNI added through /snis.
    let (status, cert_b) = call(
        node.admin,
        "POST",
        "/certificates",
        &json!({"cert": b_pem, "key": b_key}).to_string(),
    );
    assert_eq!(status, 201, "{cert_b}");
    let (status, sni) = call(
        node.admin,
        "POST",
        "/snis",
        &json!({"name": "b.test", "certificate": {"id": cert_b["id"]}}).to_string(),
    );
    assert_eq!(status, 201, "{sni}");
    let (_, snis) = call(node.admin, "GET", "/snis", "");
    let names: Vec<&str> = snis["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["a.test", "b.test"], "{snis}");
    assert_eq!(
        call(node.admin, "GET", "/snis/b.test", "").1["certificate"]["id"],
        cert_b["id"]
    );
    assert_eq!(
        call(
            node.admin,
            "POST",
            "/snis",
            &json!({"name": "a.test", "certificate": {"id": cert_b["id"]}}).to_string()
        )
        .0,
        409,
        "an SNI belongs to one certificate"
    );

    // Each name gets its own certificate, and the HTTPS-only route serves over TLS.
    let (status, body, presented) =
        tls_get(node.tls_gateway.expect("tls listener"), "a.test", &a_der, "/secure/x").expect("a.test");
    assert_eq!((status, presented == a_der), (200, true), "{body}");
    let (status, _, presented) =
        tls_get(node.tls_gateway.expect("tls listener"), "b.test", &b_der, "/secure/y").expect("b.test");
    assert_eq!((status, presented == b_der), (200, true));
    // Over plain HTTP the HTTPS-only route answers Kong's 426; the HTTP-only route is not
    // served over TLS.
    let (status, _, body) = raw_get(node.gateway, "/secure", "a.test").expect("plain");
    assert_eq!(status, 426, "{body}");
    assert_eq!(raw_get(node.gateway, "/plain", "a.test").expect("plain").0, 200);
    assert_eq!(
        tls_get(node.tls_gateway.expect("tls listener"), "a.test", &a_der, "/plain")
            .expect("tls")
            .0,
        404
    );

    // A key that is not a key is refused naming the certificate, and nothing changes.
    let (status, error) = call(
        node.admin,
        "POST",
        "/certificates",
        &json!({"cert": a_pem, "key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "snis": ["c.test"]}).to_string(),
    );
    assert_eq!(status, 400, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("certificates")),
        "{error}"
    );
    assert_eq!(
        call(node.admin, "GET", "/certificates", "").1["data"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Deleting an SNI takes the name away from its certificate.
    assert_eq!(call(node.admin, "DELETE", "/snis/b.test", "").0, 204);
    assert_eq!(call(node.admin, "GET", "/snis/b.test", "").0, 404);
}

#[test]
fn credentials_schemas_paging_and_upserts_behave_like_kong() {
    let app = Echo::start("cred-app");
    let node = start("kong-entities");
    let svc = format!(r#"{{"name": "app", "url": "http://127.0.0.1:{}"}}"#, app.port());
    assert_eq!(call(node.admin, "POST", "/services", &svc).0, 201);
    assert_eq!(
        call(
            node.admin,
            "POST",
            "/services/app/routes",
            r#"{"name": "r", "paths": ["/"]}"#
        )
        .0,
        201
    );

    // Entities show Kong's defaults for what was left out; a service its routes refer to
    // cannot be deleted (Kong's foreign key violation).
    let (_, service) = call(node.admin, "GET", "/services/app", "");
    assert_eq!(
        (&service["retries"], &service["connect_timeout"], &service["protocol"]),
        (&json!(5), &json!(60000), &json!("http")),
        "{service}"
    );
    assert!(service["updated_at"].is_u64(), "{service}");
    let (_, route) = call(node.admin, "GET", "/routes/r", "");
    assert_eq!(
        (&route["strip_path"], &route["https_redirect_status_code"]),
        (&json!(true), &json!(426))
    );
    let (status, refusal) = call(node.admin, "DELETE", "/services/app", "");
    assert_eq!(
        (status, &refusal["name"]),
        (400, &json!("foreign key violation")),
        "{refusal}"
    );
    assert_eq!(call(node.admin, "GET", "/", "").1["version"], "3.9.0");

    // Credentials of every kind, with what Kong generates when it is left out.
    assert_eq!(call(node.admin, "POST", "/consumers", r#"{"username": "bob"}"#).0, 201);
    let (status, basic) = call(
        node.admin,
        "POST",
        "/consumers/bob/basic-auth",
        r#"{"username": "bob", "password": "hunter2"}"#,
    );
    assert_eq!(status, 201, "{basic}");
    let (status, jwt) = call(node.admin, "POST", "/consumers/bob/jwt", "{}");
    assert_eq!(status, 201, "{jwt}");
    assert!(jwt["key"].as_str().is_some_and(|k| k.len() >= 16), "{jwt}");
    assert!(jwt["secret"].as_str().is_some_and(|k| k.len() >= 16), "{jwt}");
    let (status, key) = call(node.admin, "POST", "/consumers/bob/key-auth", "{}");
    assert_eq!(status, 201, "{key}");
    let key_id = key["id"].as_str().expect("id").to_string();
    assert_eq!(
        call(node.admin, "GET", &format!("/consumers/bob/key-auth/{key_id}"), "").1["key"],
        key["key"]
    );
    assert_eq!(
        call(node.admin, "GET", "/consumers/bob/basic-auth", "").1["data"][0]["username"],
        "bob"
    );

    // basic-auth on the route: the credential works, and is gone once deleted.
    assert_eq!(
        call(node.admin, "POST", "/routes/r/plugins", r#"{"name": "basic-auth"}"#).0,
        201
    );
    assert_eq!(
        call(node.admin, "GET", "/routes/r/plugins", "").1["data"][0]["name"],
        "basic-auth"
    );
    let authorized = "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Ym9iOmh1bnRlcjI=\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_request(node.gateway, authorized).expect("basic").0, 200);
    let basic_id = basic["id"].as_str().expect("id");
    assert_eq!(
        call(
            node.admin,
            "DELETE",
            &format!("/consumers/bob/basic-auth/{basic_id}"),
            ""
        )
        .0,
        204
    );
    assert_eq!(raw_request(node.gateway, authorized).expect("basic").0, 401);

    // Plugin schemas: Kong's shape, and 404 for an unknown plugin.
    let (status, schema) = call(node.admin, "GET", "/schemas/plugins/rate-limiting", "");
    assert_eq!(status, 200);
    let config_fields = schema["fields"]
        .as_array()
        .and_then(|f| f.iter().find_map(|f| f.get("config")))
        .expect("config field");
    assert!(
        config_fields["fields"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["policy"]["default"] == "local")),
        "{schema}"
    );
    assert_eq!(call(node.admin, "GET", "/schemas/plugins/no-such", "").0, 404);
    let (status, _) = call(
        node.admin,
        "POST",
        "/schemas/plugins/validate",
        r#"{"name": "rate-limiting", "config": {"minute": 5}}"#,
    );
    assert_eq!(status, 200);
    let (status, refusal) = call(
        node.admin,
        "POST",
        "/schemas/plugins/validate",
        r#"{"name": "rate-limiting", "config": {"minut": 5}}"#,
    );
    assert_eq!(status, 400);
    assert!(
        refusal["message"].as_str().is_some_and(|m| m.contains("minut")),
        "{refusal}"
    );

    // Paging: `size` and the `offset` that `next` carries.
    for i in 0..5 {
        assert_eq!(
            call(
                node.admin,
                "POST",
                "/upstreams",
                &format!(r#"{{"name": "u{i}.test", "tags": ["t{}"]}}"#, i % 2)
            )
            .0,
            201
        );
    }
    let (_, first) = call(node.admin, "GET", "/upstreams?size=2", "");
    assert_eq!(first["data"].as_array().map(Vec::len), Some(2));
    let offset = first["offset"].as_str().expect("offset").to_string();
    let (_, second) = call(node.admin, "GET", &format!("/upstreams?size=2&offset={offset}"), "");
    assert_eq!(second["data"][0]["name"], "u2.test");
    let (_, tagged) = call(node.admin, "GET", "/upstreams?tags=t1", "");
    assert_eq!(tagged["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(call(node.admin, "GET", "/upstreams?size=0", "").0, 400);

    // PUT creates under a name, then replaces.
    let (status, put) = call(node.admin, "PUT", "/consumers/carol", r#"{"custom_id": "c-1"}"#);
    assert_eq!((status, &put["username"]), (200, &json!("carol")), "{put}");
    let (status, put) = call(node.admin, "PUT", "/consumers/carol", r#"{"custom_id": "c-2"}"#);
    assert_eq!((status, &put["custom_id"]), (200, &json!("c-2")), "{put}");
    assert_eq!(put["id"].as_str().map(str::len), Some(36));

    // A declarative file's nested routes and plugins are listed like Kong lists them.
    let deck = format!(
        "_format_version: \"3.0\"\nservices:\n- name: nested\n  url: http://127.0.0.1:{}\n  routes:\n  - name: inner\n    paths: [/inner]\n    plugins:\n    - name: correlation-id\n",
        app.port()
    );
    let (status, loaded) = call(node.admin, "POST", "/config", &deck);
    assert_eq!(status, 201, "{loaded}");
    let (_, routes) = call(node.admin, "GET", "/routes", "");
    assert_eq!(routes["data"][0]["name"], "inner", "{routes}");
    let service_id = call(node.admin, "GET", "/services/nested", "").1["id"].clone();
    assert_eq!(service_id.as_str().map(str::len), Some(36), "ids are given on load");
    assert_eq!(routes["data"][0]["service"]["id"], service_id);
    let (_, plugins) = call(node.admin, "GET", "/routes/inner/plugins", "");
    assert_eq!(plugins["data"][0]["name"], "correlation-id", "{plugins}");
    assert_eq!(raw_get(node.gateway, "/inner", "x").expect("inner").0, 200);
}

/// Kong's runtime health endpoints: `GET /upstreams/{u}/health` shows what the balancer sees,
/// and a target set unhealthy by hand takes no traffic until it is set healthy again.
#[test]
fn upstream_health_is_shown_and_set_by_hand() {
    let a = Echo::start("health-a");
    let b = Echo::start("health-b");
    let node = start("kong-health");
    let upstream = json!({
        "name": "pool",
        "healthchecks": {"passive": {"unhealthy": {"http_failures": 5}}},
    });
    assert_eq!(call(node.admin, "POST", "/upstreams", &upstream.to_string()).0, 201);
    for echo in [&a, &b] {
        let target = json!({"target": format!("127.0.0.1:{}", echo.port())});
        assert_eq!(
            call(node.admin, "POST", "/upstreams/pool/targets", &target.to_string()).0,
            201
        );
    }
    assert_eq!(
        call(node.admin, "POST", "/upstreams", r#"{"name": "unchecked"}"#).0,
        201
    );
    assert_eq!(
        call(
            node.admin,
            "POST",
            "/upstreams/unchecked/targets",
            r#"{"target": "127.0.0.1:9"}"#
        )
        .0,
        201
    );
    assert_eq!(
        call(node.admin, "POST", "/services", r#"{"name": "s", "host": "pool"}"#).0,
        201
    );
    assert_eq!(
        call(node.admin, "POST", "/services", r#"{"name": "u", "host": "unchecked"}"#).0,
        201
    );
    assert_eq!(
        call(
            node.admin,
            "POST",
            "/services/s/routes",
            r#"{"name": "r", "paths": ["/"]}"#
        )
        .0,
        201
    );
    assert_eq!(
        call(
            node.admin,
            "POST",
            "/services/u/routes",
            r#"{"name": "ru", "paths": ["/u"]}"#
        )
        .0,
        201
    );

    let health = |upstream: &str| -> Vec<String> {
        let (status, body) = call(node.admin, "GET", &format!("/upstreams/{upstream}/health"), "");
        assert_eq!(status, 200, "{body}");
        body["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|t| t["health"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(health("pool"), ["HEALTHY", "HEALTHY"]);
    assert_eq!(health("unchecked"), ["HEALTHCHECKS_OFF"]);

    let served_by = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                let (status, _, body) = raw_get(node.gateway, "/", "x").expect("request");
                assert_eq!(status, 200, "{body}");
                serde_json::from_str::<Value>(&body).expect("json")["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    };
    let target_a = format!("127.0.0.1:{}", a.port());
    let path = format!("/upstreams/pool/targets/{target_a}/unhealthy");
    assert_eq!(call(node.admin, "PUT", &path, "").0, 204);
    assert_eq!(health("pool"), ["UNHEALTHY", "HEALTHY"]);
    assert!(
        served_by(10).iter().all(|s| s == "health-b"),
        "a target set unhealthy takes no traffic"
    );
    let path = format!("/upstreams/pool/targets/{target_a}/healthy");
    assert_eq!(call(node.admin, "PUT", &path, "").0, 204);
    assert_eq!(health("pool"), ["HEALTHY", "HEALTHY"]);
    assert!(served_by(10).iter().any(|s| s == "health-a"));
    // Without health checks there is nothing to set.
    assert_eq!(
        call(
            node.admin,
            "PUT",
            "/upstreams/unchecked/targets/127.0.0.1:9/unhealthy",
            ""
        )
        .0,
        400
    );
}

/// Kong's top-level credential lists (`/key-auths`, ...) show every consumer's credentials
/// with their consumer, and create, read and delete them by id; a key deleted there stops
/// authenticating.
#[test]
fn top_level_credential_lists_work_like_kongs() {
    let app = Echo::start("creds-app");
    let node = start("kong-credential-lists");
    let svc = format!(r#"{{"name": "app", "url": "http://127.0.0.1:{}"}}"#, app.port());
    assert_eq!(call(node.admin, "POST", "/services", &svc).0, 201);
    assert_eq!(
        call(
            node.admin,
            "POST",
            "/services/app/routes",
            r#"{"name": "r", "paths": ["/"]}"#
        )
        .0,
        201
    );
    assert_eq!(
        call(node.admin, "POST", "/routes/r/plugins", r#"{"name": "key-auth"}"#).0,
        201
    );
    let (_, alice) = call(node.admin, "POST", "/consumers", r#"{"username": "alice"}"#);
    assert_eq!(call(node.admin, "POST", "/consumers", r#"{"username": "bob"}"#).0, 201);
    assert_eq!(
        call(node.admin, "POST", "/consumers/bob/key-auth", r#"{"key": "bob-key"}"#).0,
        201
    );
    let body = json!({"consumer": {"id": alice["id"]}, "key": "alice-key"}).to_string();
    let (status, created) = call(node.admin, "POST", "/key-auths", &body);
    assert_eq!(status, 201, "{created}");
    let (status, refused) = call(
        node.admin,
        "POST",
        "/key-auths",
        r#"{"consumer": {"id": "00000000-0000-4000-8000-000000000000"}, "key": "x"}"#,
    );
    assert_eq!(status, 400, "{refused}");

    let (status, list) = call(node.admin, "GET", "/key-auths", "");
    assert_eq!(status, 200);
    let mut owners: Vec<(String, String)> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|k| {
            let consumer = k["consumer"]["id"].as_str().expect("consumer id").to_string();
            (k["key"].as_str().expect("key").to_string(), consumer)
        })
        .collect();
    owners.sort();
    assert_eq!(owners.len(), 2, "{list}");
    assert_eq!(
        owners[0],
        ("alice-key".to_string(), alice["id"].as_str().expect("id").to_string())
    );
    assert_eq!(owners[1].0, "bob-key");

    // The new key authenticates; read and delete it by id; then it does not.
    let authorized = |key: &str| {
        raw_request(
            node.gateway,
            &format!("GET / HTTP/1.1\r\nHost: x\r\napikey: {key}\r\nConnection: close\r\n\r\n"),
        )
        .expect("request")
        .0
    };
    assert_eq!(authorized("alice-key"), 200);
    let id = created["id"].as_str().expect("id");
    let (_, shown) = call(node.admin, "GET", &format!("/key-auths/{id}"), "");
    assert_eq!(shown["key"], "alice-key");
    assert_eq!(shown["consumer"]["id"], alice["id"], "{shown}");
    // Kong also finds a key-auth by its key.
    assert_eq!(call(node.admin, "GET", "/key-auths/alice-key", "").1["id"], json!(id));
    assert_eq!(call(node.admin, "DELETE", &format!("/key-auths/{id}"), "").0, 204);
    assert_eq!(call(node.admin, "GET", &format!("/key-auths/{id}"), "").0, 404);
    assert_eq!(authorized("alice-key"), 401);
    assert_eq!(authorized("bob-key"), 200);
    // The other kinds are listed too.
    assert_eq!(call(node.admin, "GET", "/acls", "").0, 200);
    assert_eq!(call(node.admin, "GET", "/jwts", "").0, 200);
    assert_eq!(call(node.admin, "GET", "/basic-auths", "").0, 200);
}

/// `/ca_certificates`: Kong's CA certificate entities, with their `cert_digest`, one per
/// certificate, referred to by a service's `ca_certificates` (and kept by an export).
#[test]
fn ca_certificates_are_entities_that_services_refer_to() {
    let node = start("kong-ca-certificates");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("key");
    let ca = params.self_signed(&key).expect("ca");
    let body = json!({"cert": ca.pem()}).to_string();
    let (status, created) = call(node.admin, "POST", "/ca_certificates", &body);
    assert_eq!(status, 201, "{created}");
    let digest = created["cert_digest"].as_str().expect("digest");
    let expected: String = ring::digest::digest(&ring::digest::SHA256, ca.der())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, expected);
    assert_eq!(call(node.admin, "POST", "/ca_certificates", &body).0, 409);
    let (status, refused) = call(node.admin, "POST", "/ca_certificates", r#"{"cert": "not a pem"}"#);
    assert_eq!(status, 400, "{refused}");
    assert!(refused["message"].as_str().unwrap_or("").contains("cert"), "{refused}");
    assert_eq!(
        call(node.admin, "GET", "/ca_certificates", "").1["data"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let id = created["id"].as_str().expect("id");
    let service = json!({"name": "secure", "url": "https://127.0.0.1:9", "tls_verify": true, "ca_certificates": [id]});
    assert_eq!(call(node.admin, "POST", "/services", &service.to_string()).0, 201);
    let bogus = json!({"name": "bogus", "url": "https://127.0.0.1:9", "tls_verify": true,
                       "ca_certificates": ["00000000-0000-4000-8000-000000000000"]});
    let (status, refused) = call(node.admin, "POST", "/services", &bogus.to_string());
    assert_eq!(status, 400, "{refused}");
    // The stored document keeps the entity and the reference.
    let (_, config) = call(node.admin, "GET", "/config", "");
    assert_eq!(config["ca_certificates"][0]["id"], json!(id), "{config}");
    // Kong refuses to delete a CA certificate a service lists, even one it would not compile
    // (a disabled service).
    let (status, refused) = call(node.admin, "DELETE", &format!("/ca_certificates/{id}"), "");
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or("")
            .contains("still referenced by services"),
        "{refused}"
    );
    assert_eq!(
        call(node.admin, "PATCH", "/services/secure", r#"{"enabled": false}"#).0,
        200
    );
    assert_eq!(call(node.admin, "DELETE", &format!("/ca_certificates/{id}"), "").0, 400);
    // One certificate per entity.
    let two = json!({"cert": format!("{}{}", ca.pem(), ca.pem())}).to_string();
    let (status, refused) = call(node.admin, "POST", "/ca_certificates", &two);
    assert_eq!(status, 400, "{refused}");
    // A new certificate gets a new digest.
    let other_key = rcgen::KeyPair::generate().expect("key");
    let other = params.self_signed(&other_key).expect("ca");
    let (status, patched) = call(
        node.admin,
        "PATCH",
        &format!("/ca_certificates/{id}"),
        &json!({"cert": other.pem()}).to_string(),
    );
    assert_eq!(status, 200, "{patched}");
    assert_ne!(patched["cert_digest"], json!(digest), "{patched}");
}

/// Kong route `snis`: the route matches TLS connections whose server name it lists, and
/// outranks an otherwise equal route (the SNI is one more matched field); other names and
/// plain HTTP fall through to the next route.
#[test]
fn route_snis_match_the_tls_server_name() {
    let a_app = Echo::start("sni-a");
    let other_app = Echo::start("sni-other");
    let node = start("kong-route-snis");
    let (pem, key, der) = {
        let cert = rcgen::generate_simple_self_signed(vec!["a.test".to_string(), "b.test".to_string()]).expect("cert");
        (
            cert.cert.pem(),
            cert.signing_key.serialize_pem(),
            cert.cert.der().to_vec(),
        )
    };
    let body = json!({"cert": pem, "key": key, "snis": ["a.test", "b.test"]}).to_string();
    assert_eq!(call(node.admin, "POST", "/certificates", &body).0, 201);
    for (name, port) in [("a", a_app.port()), ("other", other_app.port())] {
        let svc = json!({"name": name, "url": format!("http://127.0.0.1:{port}")}).to_string();
        assert_eq!(call(node.admin, "POST", "/services", &svc).0, 201);
    }
    // The catch-all first: Kong breaks ties by age, so only the SNI can make `by-sni` win.
    assert_eq!(
        call(
            node.admin,
            "POST",
            "/services/other/routes",
            r#"{"name": "any", "paths": ["/"]}"#
        )
        .0,
        201
    );
    let (status, route) = call(
        node.admin,
        "POST",
        "/services/a/routes",
        r#"{"name": "by-sni", "paths": ["/"], "snis": ["A.test."], "protocols": ["https"]}"#,
    );
    assert_eq!(status, 201, "{route}");
    // With http too: plain requests are not checked against snis, as in Kong.
    let (status, route) = call(
        node.admin,
        "POST",
        "/services/a/routes",
        r#"{"name": "both", "paths": ["/both"], "snis": ["a.test"], "protocols": ["http", "https"]}"#,
    );
    assert_eq!(status, 201, "{route}");
    let tls = node.tls_gateway.expect("tls listener");
    let served = |sni: &str, path: &str| -> String {
        let (status, body, _) = tls_get(tls, sni, &der, path).expect("tls");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).expect("json")["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(served("a.test", "/x"), "sni-a");
    assert_eq!(served("b.test", "/x"), "sni-other");
    assert_eq!(served("b.test", "/both"), "sni-other");
    let plain = |path: &str| -> (u16, String) {
        let (status, headers, _) = raw_get(node.gateway, path, "a.test").expect("plain");
        let name = headers.iter().find(|(k, _)| k == "x-echo-name").map(|(_, v)| v.clone());
        (status, name.unwrap_or_default())
    };
    assert_eq!(plain("/both"), (200, "sni-a".to_string()));
    // The HTTPS-only route still matches a plain request (its snis are not checked there)
    // and answers Kong's 426.
    assert_eq!(plain("/x").0, 426);

    // snis need a TLS protocol, as Kong's schema says.
    let (status, refused) = call(
        node.admin,
        "POST",
        "/services/a/routes",
        r#"{"name": "plain-sni", "paths": ["/p"], "snis": ["a.test"], "protocols": ["http"]}"#,
    );
    assert_eq!(status, 400, "{refused}");
    assert!(refused["message"].as_str().unwrap_or("").contains("snis"), "{refused}");
}
