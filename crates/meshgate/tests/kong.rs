//! Kong decK files served by a real meshgate process on its Kong proxy listener (`--listen`).

mod support;

use std::net::SocketAddr;

use support::{Echo, Proxy, analyze, free_port, raw_get, raw_request, scratch_dir};

fn deck(stable: &Echo, canary: &Echo, other: &Echo) -> String {
    format!(
        r#"_format_version: "3.0"
upstreams:
- name: orders-upstream
  algorithm: round-robin
  targets:
  - target: 127.0.0.1:{stable}
    weight: 90
  - target: 127.0.0.1:{canary}
    weight: 10
services:
- name: orders
  host: orders-upstream
  path: /v1
  routes:
  - name: orders
    paths: [/orders]
  - name: orders-special
    paths: [/orders/special]
    strip_path: false
  - name: items
    paths: ["~/items/\\d+$"]
  - name: cart
    hosts: [shop.example.com]
    paths: [/cart]
    strip_path: false
    preserve_host: true
  - name: secure
    paths: [/secure]
    protocols: [https]
- name: payments
  url: http://127.0.0.1:{other}/pay
  routes:
  - name: payments-v2
    paths: [/orders]
    methods: [POST]
    headers:
      x-version: [V2]
"#,
        stable = stable.port(),
        canary = canary.port(),
        other = other.port(),
    )
}

fn get(addr: SocketAddr, path: &str, host: &str) -> (u16, serde_json::Value, String) {
    let (status, _, body) = raw_get(addr, path, host).expect("request");
    (status, serde_json::from_str(&body).unwrap_or_default(), body)
}

#[test]
fn deck_services_routes_and_upstreams_route_like_kong() {
    let stable = Echo::start("stable");
    let canary = Echo::start("canary");
    let other = Echo::start("payments");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = Proxy::start_with(&deck(&stable, &canary, &other), &["--listen", &listen]);
    let addr: SocketAddr = listen.parse().expect("addr");

    // strip_path (default true) removes the matched prefix; the rest joins the service path.
    let (status, echo, _) = get(addr, "/orders/123?x=1", "api.example.com");
    assert_eq!(status, 200);
    assert_eq!(echo["uri"], "/v1/123?x=1");
    // Without preserve_host the upstream sees the service's host (the upstream's name).
    assert_eq!(echo["headers"]["host"], "orders-upstream");
    let (_, echo, _) = get(addr, "/orders", "api.example.com");
    assert_eq!(echo["path"], "/v1");
    // Kong's latency headers: proxied responses carry the upstream and proxy latencies,
    // answers meshgate gives itself the response latency.
    let (_, headers, _) = raw_get(addr, "/orders", "api.example.com").expect("proxied");
    let number = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    assert!(
        number("x-kong-upstream-latency").is_some() && number("x-kong-proxy-latency").is_some(),
        "{headers:?}"
    );
    assert!(
        headers.iter().any(|(k, v)| k == "via" && v.contains("meshgate")),
        "{headers:?}"
    );
    let (status, headers, _) = raw_get(addr, "/nowhere", "api.example.com").expect("no route");
    assert_eq!(status, 404);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "x-kong-response-latency" && v.parse::<u64>().is_ok()),
        "{headers:?}"
    );

    // A longer prefix has priority, whatever the order; strip_path false keeps the path.
    let (_, echo, _) = get(addr, "/orders/special/7", "api.example.com");
    assert_eq!(echo["path"], "/v1/orders/special/7");

    // Regex paths (`~`) are anchored at the start; the match is stripped.
    let (status, echo, _) = get(addr, "/items/42", "x");
    assert_eq!(status, 200);
    assert_eq!(echo["path"], "/v1");
    assert_eq!(get(addr, "/items/42/more", "x").0, 404);

    // Hosts + preserve_host.
    let (_, echo, _) = get(addr, "/cart", "shop.example.com");
    assert_eq!(echo["path"], "/v1/cart");
    assert_eq!(echo["headers"]["host"], "shop.example.com");
    assert_eq!(get(addr, "/cart", "other.example.com").0, 404);

    // Methods and headers (values compared case-insensitively) make a route more specific.
    let (status, _, body) = raw_request(
        addr,
        "POST /orders/9 HTTP/1.1\r\nHost: x\r\nx-version: v2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .expect("post");
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["name"], "payments");
    assert_eq!(echo["path"], "/pay/9");

    // An https-only route on a plain listener: Kong's 426.
    let (status, _, body) = raw_get(addr, "/secure", "x").expect("426");
    assert_eq!(status, 426);
    assert!(body.contains("Please use HTTPS protocol"), "{body}");

    // No route: Kong's JSON message.
    let (status, headers, body) = raw_get(addr, "/nothing", "x").expect("404");
    assert_eq!(status, 404);
    assert!(body.contains("no Route matched with those values"), "{body}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/json"))
    );

    // The seeds' canary: target weights 90/10 split traffic.
    let before = (stable.count(), canary.count());
    for _ in 0..400 {
        assert_eq!(get(addr, "/orders/1", "x").0, 200);
    }
    let (s, c) = (stable.count() - before.0, canary.count() - before.1);
    assert_eq!(s + c, 400);
    assert!((20..=60).contains(&c), "canary got {c} of 400");
}

#[test]
fn enforcing_plugins_refuse_the_config_and_others_warn() {
    let dir = scratch_dir("kong-analyze");
    let secured = dir.join("secured.yaml");
    std::fs::write(
        &secured,
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://127.0.0.1:9\n  routes:\n  - name: r\n    paths: [/]\n  plugins:\n  - name: hmac-auth\n",
    )
    .expect("write");
    let (code, stdout) = analyze(&secured);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("error: ")
            && stdout.contains("KongDeclarativeConfig default/secured")
            && stdout.contains("services[0].plugins[0].name")
            && stdout.contains("hmac-auth"),
        "{stdout}"
    );

    let logged = dir.join("logged.yaml");
    std::fs::write(
        &logged,
        "_format_version: \"3.0\"\nplugins:\n- name: statsd\nservices:\n- name: s\n  url: http://127.0.0.1:9\n  routes:\n  - name: r\n    paths: [/]\n",
    )
    .expect("write");
    let (code, stdout) = analyze(&logged);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("plugins[0].name") && stdout.contains("statsd"),
        "{stdout}"
    );

    let typo = dir.join("typo.yaml");
    std::fs::write(
        &typo,
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://127.0.0.1:9\n  routes:\n  - name: r\n    pathz: [/]\n",
    )
    .expect("write");
    let (code, stdout) = analyze(&typo);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("services[0].routes[0]") && stdout.contains("pathz"),
        "{stdout}"
    );
}

fn plugins_deck(app: &Echo) -> String {
    format!(
        r#"_format_version: "3.0"
consumers:
- username: alice
  id: 4a6b1d5e-0000-4000-8000-00000000a11c
  custom_id: crm-17
  keyauth_credentials:
  - key: alice-secret-key
    id: cred-alice
  acls:
  - group: gold
  basicauth_credentials:
  - username: alice
    password: s3cret
- username: bob
  keyauth_credentials:
  - key: bob-key
- username: guest
plugins:
- name: correlation-id
  config:
    header_name: X-Correlation-ID
    echo_downstream: true
services:
- name: app
  url: http://127.0.0.1:{port}
  routes:
  - name: open
    paths: [/open]
  - name: gold
    paths: [/gold]
    plugins:
    - name: key-auth
      config:
        hide_credentials: true
    - name: acl
      config:
        allow: [gold]
  - name: limited
    paths: [/limited]
    plugins:
    - name: key-auth
      config:
        anonymous: guest
    - name: rate-limiting
      config:
        minute: 3
        limit_by: consumer
        policy: local
  - name: internal
    paths: [/internal]
    plugins:
    - name: ip-restriction
      config:
        deny: [127.0.0.0/8]
  - name: basic
    paths: [/basic]
    plugins:
    - name: basic-auth
      config:
        hide_credentials: true
  - name: small
    paths: [/small]
    plugins:
    - name: request-size-limiting
      config:
        allowed_payload_size: 1
        size_unit: kilobytes
  - name: transform
    paths: [/transform]
    strip_path: false
    plugins:
    - name: request-transformer
      config:
        remove:
          headers: [x-remove]
        rename:
          headers: ["x-old:x-new"]
        add:
          headers: ["x-added:yes"]
          querystring: ["page:1"]
    - name: response-transformer
      config:
        add:
          headers: ["x-served-by:meshgate"]
        remove:
          headers: [content-type]
    - name: cors
      config:
        origins: [https://app.example.com]
        methods: [GET]
        max_age: 600
  - name: maintenance
    paths: [/maintenance]
    plugins:
    - name: request-termination
      config:
        status_code: 503
        message: down for maintenance
"#,
        port = app.port()
    )
}

fn request(addr: SocketAddr, path: &str, headers: &str) -> (u16, Vec<(String, String)>, String) {
    raw_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: api.test\r\n{headers}Connection: close\r\n\r\n"),
    )
    .expect("request")
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn plugins_authenticate_authorize_limit_and_terminate_like_kong() {
    let app = Echo::start("app");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = Proxy::start_with(&plugins_deck(&app), &["--listen", &listen]);
    let addr: SocketAddr = listen.parse().expect("addr");

    // A global correlation-id: generated for the upstream and echoed to the client.
    let (status, headers, body) = request(addr, "/open", "");
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = header(&headers, "x-correlation-id").expect("echoed correlation id");
    assert_eq!(echo["headers"]["x-correlation-id"], id);
    assert!(id.contains('#'), "uuid#counter: {id}");

    // key-auth: no key, a wrong key, a good key (in a header or the query, hidden upstream).
    let (status, headers, body) = request(addr, "/gold", "");
    assert_eq!(status, 401);
    assert_eq!(body, r#"{"message":"No API key found in request"}"#);
    assert_eq!(header(&headers, "www-authenticate"), Some(r#"Key realm="kong""#));
    let (status, _, body) = request(addr, "/gold", "apikey: nope\r\n");
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"message":"Invalid authentication credentials"}"#)
    );
    let before = app.count();
    let (status, _, body) = request(
        addr,
        "/gold?apikey=alice-secret-key&x=1",
        "x-consumer-username: mallory\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["uri"], "/?x=1", "strip_path, and hide_credentials drops the key");
    assert_eq!(
        echo["headers"]["x-consumer-username"], "alice",
        "client-sent values are replaced"
    );
    assert_eq!(echo["headers"]["x-consumer-id"], "4a6b1d5e-0000-4000-8000-00000000a11c");
    assert_eq!(echo["headers"]["x-consumer-custom-id"], "crm-17");
    assert_eq!(echo["headers"]["x-credential-identifier"], "cred-alice");
    assert_eq!(echo["headers"]["x-consumer-groups"], "gold");
    assert!(echo["headers"].get("apikey").is_none());
    assert_eq!(app.count(), before + 1);

    // acl: bob is authenticated but not in the allowed group.
    let (status, _, body) = request(addr, "/gold", "apikey: bob-key\r\n");
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"message":"You cannot consume this service"}"#)
    );

    // rate-limiting by consumer, 3 a minute; anonymous requests count as the guest consumer.
    for n in 0..3 {
        let (status, headers, body) = request(addr, "/limited", "apikey: bob-key\r\n");
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&headers, "x-ratelimit-limit-minute"), Some("3"));
        assert_eq!(
            header(&headers, "x-ratelimit-remaining-minute"),
            Some(["2", "1", "0"][n])
        );
        assert_eq!(header(&headers, "ratelimit-limit"), Some("3"));
    }
    let (status, headers, body) = request(addr, "/limited", "apikey: bob-key\r\n");
    assert_eq!(
        (status, body.as_str()),
        (429, r#"{"message":"API rate limit exceeded"}"#)
    );
    let retry_after: u64 = header(&headers, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after));
    assert_eq!(header(&headers, "ratelimit-remaining"), Some("0"));
    let (status, _, body) = request(addr, "/limited", "");
    assert_eq!(status, 200, "the anonymous guest has its own counter: {body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["headers"]["x-anonymous-consumer"], "true");
    assert_eq!(echo["headers"]["x-consumer-username"], "guest");

    // ip-restriction and request-termination answer without reaching the upstream.
    let before = app.count();
    let (status, _, body) = request(addr, "/internal", "");
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"message":"Your IP address is not allowed"}"#)
    );
    let (status, _, body) = request(addr, "/maintenance", "");
    assert_eq!((status, body.as_str()), (503, r#"{"message":"down for maintenance"}"#));
    assert_eq!(app.count(), before);

    // basic-auth: constant-time password check, the Authorization header hidden upstream.
    let (status, headers, body) = request(addr, "/basic", "");
    assert_eq!((status, body.as_str()), (401, r#"{"message":"Unauthorized"}"#));
    assert_eq!(header(&headers, "www-authenticate"), Some(r#"Basic realm="service""#));
    // "alice:wrong" and "alice:s3cret" in base64.
    let (status, _, body) = request(addr, "/basic", "authorization: Basic YWxpY2U6d3Jvbmc=\r\n");
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"message":"Invalid authentication credentials"}"#)
    );
    let (status, _, body) = request(addr, "/basic", "authorization: Basic YWxpY2U6czNjcmV0\r\n");
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["headers"]["x-consumer-username"], "alice");
    assert!(echo["headers"].get("authorization").is_none());

    // request-size-limiting on Content-Length.
    let big = "x".repeat(2000);
    let (status, _, body) = raw_request(
        addr,
        &format!(
            "POST /small HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
            big.len()
        ),
    )
    .expect("post");
    assert_eq!(
        (status, body.as_str()),
        (413, r#"{"message":"Request size limit exceeded"}"#)
    );

    // Transformers edit what the upstream sees and what the client gets.
    let (status, headers, body) = request(addr, "/transform?a=b", "x-remove: 1\r\nx-old: kept\r\n");
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["uri"], "/transform?a=b&page=1");
    assert_eq!(echo["headers"]["x-added"], "yes");
    assert_eq!(echo["headers"]["x-new"], "kept");
    assert!(echo["headers"].get("x-remove").is_none() && echo["headers"].get("x-old").is_none());
    assert_eq!(header(&headers, "x-served-by"), Some("meshgate"));
    assert_eq!(header(&headers, "content-type"), None);

    // cors: preflights answered by the gateway.
    let (status, headers, _) = raw_request(
        addr,
        "OPTIONS /transform HTTP/1.1\r\nHost: api.test\r\norigin: https://app.example.com\r\naccess-control-request-method: GET\r\nConnection: close\r\n\r\n",
    )
    .expect("preflight");
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(header(&headers, "access-control-max-age"), Some("600"));
}

mod jwt_keys {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};

    pub fn b64url(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `header.claims.signature` with `sign` over the first two parts.
    pub fn token(header: &str, claims: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", b64url(header.as_bytes()), b64url(claims.as_bytes()));
        let signature = sign(input.as_bytes());
        format!("{input}.{}", b64url(&signature))
    }

    pub fn hs256(secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        move |input| ring::hmac::sign(&key, input).as_ref().to_vec()
    }

    /// A fresh P-256 key: the signer and its public key as a PEM SubjectPublicKeyInfo.
    pub fn es256() -> (impl Fn(&[u8]) -> Vec<u8>, String) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("p256 key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("p256 pair");
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
            0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(pair.public_key().as_ref());
        let pem = pem("PUBLIC KEY", &spki);
        let sign = move |input: &[u8]| {
            pair.sign(&ring::rand::SystemRandom::new(), input)
                .expect("sign")
                .as_ref()
                .to_vec()
        };
        (sign, pem)
    }

    /// A fresh RSA-2048 key made by the openssl tool (ring cannot generate RSA keys).
    pub fn rs256(dir: &std::path::Path, name: &str) -> (impl Fn(&[u8]) -> Vec<u8>, String) {
        let key = dir.join(format!("{name}.pem"));
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .output()
            .expect("run openssl genpkey");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let public = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .output()
            .expect("run openssl pkey");
        assert!(public.status.success());
        let private_pem = std::fs::read_to_string(&key).expect("key file");
        let der = base64::engine::general_purpose::STANDARD
            .decode(
                private_pem
                    .lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .expect("pkcs8 der");
        let pair = RsaKeyPair::from_pkcs8(&der).expect("rsa pair");
        let sign = move |input: &[u8]| {
            let mut signature = vec![0; pair.public().modulus_len()];
            pair.sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input,
                &mut signature,
            )
            .expect("rsa sign");
            signature
        };
        (sign, String::from_utf8_lossy(&public.stdout).into_owned())
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
    }
}

#[test]
fn jwt_tokens_signed_with_real_keys_are_checked_like_kong() {
    use jwt_keys::*;
    let app = Echo::start("jwt-app");
    let dir = scratch_dir("kong-jwt");
    let (es_sign, es_pem) = es256();
    let (rs_sign, rs_pem) = rs256(&dir, "good");
    let (other_rs_sign, _) = rs256(&dir, "other");
    let indent = |pem: &str| pem.lines().map(|l| format!("      {l}\n")).collect::<String>();
    let deck = format!(
        r#"_format_version: "3.0"
consumers:
- username: hs-user
  jwt_secrets:
  - key: hs-issuer
    secret: very-secret-shared-key
- username: es-user
  jwt_secrets:
  - key: es-issuer
    algorithm: ES256
    rsa_public_key: |
{es}- username: rs-user
  jwt_secrets:
  - key: rs-issuer
    algorithm: RS256
    rsa_public_key: |
{rs}services:
- name: app
  url: http://127.0.0.1:{port}
  routes:
  - name: api
    paths: [/api]
  plugins:
  - name: jwt
    config:
      claims_to_verify: [exp]
"#,
        es = indent(&es_pem),
        rs = indent(&rs_pem),
        port = app.port(),
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = Proxy::start_with(&deck, &["--listen", &listen]);
    let addr: SocketAddr = listen.parse().expect("addr");
    let future = 4_102_444_800u64; // 2100-01-01
    let bearer = |token: &str| format!("authorization: Bearer {token}\r\n");
    let claims = |iss: &str, exp: u64| format!(r#"{{"iss":"{iss}","exp":{exp},"sub":"42"}}"#);

    let good = token(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &claims("hs-issuer", future),
        hs256(b"very-secret-shared-key"),
    );
    let (status, _, body) = request(addr, "/api", &bearer(&good));
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["headers"]["x-consumer-username"], "hs-user");
    let (status, _, _) = request(addr, &format!("/api?jwt={good}"), "");
    assert_eq!(status, 200, "a token in the jwt query parameter");

    let cases: Vec<(String, &str)> = vec![
        (String::new(), r#"{"message":"Unauthorized"}"#),
        (
            bearer(&token(
                r#"{"alg":"HS256"}"#,
                &claims("hs-issuer", future),
                hs256(b"wrong-key"),
            )),
            r#"{"message":"Invalid signature"}"#,
        ),
        (
            bearer(&token(r#"{"alg":"none"}"#, &claims("hs-issuer", future), |_| {
                Vec::new()
            })),
            r#"{"message":"Invalid algorithm"}"#,
        ),
        (
            bearer(&token(
                r#"{"alg":"HS256"}"#,
                &claims("hs-issuer", 1_000_000),
                hs256(b"very-secret-shared-key"),
            )),
            r#"{"exp":"token expired"}"#,
        ),
        (
            bearer(&token(r#"{"alg":"HS256"}"#, &claims("nobody", future), hs256(b"x"))),
            r#"{"message":"No credentials found for given 'iss'"}"#,
        ),
        (
            bearer(&token(r#"{"alg":"HS256"}"#, r#"{"sub":"1"}"#, hs256(b"x"))),
            r#"{"message":"No mandatory 'iss' in claims"}"#,
        ),
        (bearer("not.a-token"), r#"{"message":"Bad token; invalid JWT"}"#),
        // A token for the ES256 credential signed as RS256: the wrong key type.
        (
            bearer(&token(r#"{"alg":"RS256"}"#, &claims("es-issuer", future), &rs_sign)),
            r#"{"message":"Invalid algorithm"}"#,
        ),
        (
            bearer(&token(
                r#"{"alg":"RS256"}"#,
                &claims("rs-issuer", future),
                &other_rs_sign,
            )),
            r#"{"message":"Invalid signature"}"#,
        ),
    ];
    for (headers, want) in &cases {
        let (status, _, body) = request(addr, "/api", headers);
        assert_eq!((status, body.as_str()), (401, *want), "{headers}");
    }

    let es_token = token(r#"{"alg":"ES256"}"#, &claims("es-issuer", future), &es_sign);
    let (status, _, body) = request(addr, "/api", &bearer(&es_token));
    assert_eq!(status, 200, "ES256: {body}");
    let rs_token = token(r#"{"alg":"RS256"}"#, &claims("rs-issuer", future), &rs_sign);
    let (status, _, body) = request(addr, "/api", &bearer(&rs_token));
    assert_eq!(status, 200, "RS256: {body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(echo["headers"]["x-consumer-username"], "rs-user");
}

/// A redis-server on a free loopback port, killed on drop.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        RedisServer { child, port }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn redis_rate_limits_are_shared_by_proxies_and_fault_tolerance_decides_when_redis_is_down() {
    let app = Echo::start("redis-app");
    let mut redis = RedisServer::start();
    let deck = format!(
        r#"_format_version: "3.0"
services:
- name: app
  url: http://127.0.0.1:{app}
  routes:
  - name: tolerant
    paths: [/tolerant]
    plugins:
    - name: rate-limiting
      config:
        minute: 4
        limit_by: ip
        policy: redis
        redis:
          host: 127.0.0.1
          port: {redis}
          timeout: 500
  - name: strict
    paths: [/strict]
    plugins:
    - name: rate-limiting
      config:
        minute: 100
        policy: redis
        redis_host: 127.0.0.1
        redis_port: {redis}
        redis_timeout: 500
        fault_tolerant: false
"#,
        app = app.port(),
        redis = redis.port,
    );
    let (port_a, port_b) = (free_port(), free_port());
    let (listen_a, listen_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let _a = Proxy::start_with(&deck, &["--listen", &listen_a]);
    let _b = Proxy::start_with(&deck, &["--listen", &listen_b]);
    let (a, b): (SocketAddr, SocketAddr) = (listen_a.parse().expect("addr"), listen_b.parse().expect("addr"));

    // Two meshgate processes count against the same Redis counters: 4 a minute in total.
    let mut statuses = Vec::new();
    for n in 0..6 {
        let addr = if n % 2 == 0 { a } else { b };
        statuses.push(request(addr, "/tolerant", "").0);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "{statuses:?}");
    assert_eq!(request(a, "/strict", "").0, 200);

    // Redis goes away: fault_tolerant lets traffic through, otherwise Kong's 500.
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let (status, headers, _) = request(b, "/tolerant", "");
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "x-ratelimit-limit-minute"),
        None,
        "no counters, no headers"
    );
    let (status, _, body) = request(a, "/strict", "");
    assert_eq!(
        (status, body.as_str()),
        (500, r#"{"message":"An unexpected error occurred"}"#)
    );
}

#[test]
fn file_log_and_http_log_record_each_request_without_credentials() {
    let app = Echo::start("logged-app");
    let collector = Echo::start("log-collector");
    let dir = scratch_dir("kong-logs");
    let log_path = dir.join("requests.log");
    let deck = format!(
        r#"_format_version: "3.0"
consumers:
- username: carol
  keyauth_credentials:
  - key: carol-key
services:
- name: app
  url: http://127.0.0.1:{app}
  routes:
  - name: logged
    paths: [/logged]
  plugins:
  - name: key-auth
  - name: file-log
    config:
      path: {log}
  - name: http-log
    config:
      http_endpoint: http://127.0.0.1:{collector}/logs
"#,
        app = app.port(),
        log = log_path.display(),
        collector = collector.port(),
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = Proxy::start_with(&deck, &["--listen", &listen]);
    let addr: SocketAddr = listen.parse().expect("addr");

    assert_eq!(request(addr, "/logged/a", "apikey: carol-key\r\n").0, 200);
    assert_eq!(
        request(addr, "/logged/b", "").0,
        401,
        "rejected requests are logged too"
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let lines = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if (lines.len() >= 2 && collector.count() >= 2) || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["request"]["uri"], "/logged/a");
    assert_eq!(lines[0]["response"]["status"], 200);
    assert_eq!(lines[0]["consumer"]["username"], "carol");
    assert_eq!(lines[0]["route"]["name"], "kong/app/logged");
    assert_eq!(
        lines[0]["request"]["headers"]["apikey"], "REDACTED",
        "credentials never reach logs"
    );
    assert_eq!(lines[1]["response"]["status"], 401);
    assert_eq!(collector.count(), 2, "http-log posted both entries");
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!text.contains("carol-key"));
}

#[test]
fn proxy_cache_answers_repeated_gets_from_memory() {
    let app = Echo::start("cached-app");
    let deck = format!(
        r#"_format_version: "3.0"
services:
- name: app
  url: http://127.0.0.1:{port}
  routes:
  - name: cached
    paths: [/cached]
    strip_path: false
    plugins:
    - name: proxy-cache
      config:
        strategy: memory
        cache_ttl: 60
        content_type: [application/json]
"#,
        port = app.port()
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = Proxy::start_with(&deck, &["--listen", &listen]);
    let addr: SocketAddr = listen.parse().expect("addr");

    let before = app.count();
    let (status, headers, first) = request(addr, "/cached?page=1", "");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-cache-status"), Some("Miss"));
    let (status, headers, second) = request(addr, "/cached?page=1", "");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-cache-status"), Some("Hit"));
    assert_eq!(first, second, "the cached body");
    assert!(header(&headers, "age").is_some());
    assert_eq!(app.count(), before + 1, "the hit never reached the upstream");

    // Another query is another key; a POST is not cached.
    assert_eq!(
        header(&request(addr, "/cached?page=2", "").1, "x-cache-status"),
        Some("Miss")
    );
    let (status, headers, _) = raw_request(
        addr,
        "POST /cached HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .expect("post");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-cache-status"), Some("Bypass"));
    assert_eq!(app.count(), before + 3);
}

/// Plugins scoped to a consumer replace the route's instance of the same plugin (and add new
/// ones) once an auth plugin has identified that consumer, as Kong's precedence has it.
#[test]
fn consumer_scoped_plugins_apply_to_their_consumer_only() {
    let app = Echo::start("consumer-app");
    let deck = format!(
        r#"_format_version: "3.0"
services:
- name: app
  url: http://127.0.0.1:{port}
  routes:
  - name: api
    paths: [/api]
  plugins:
  - name: key-auth
  - name: rate-limiting
    config: {{minute: 100, limit_by: consumer}}
consumers:
- username: free
  keyauth_credentials: [{{key: free-key}}]
- username: gold
  keyauth_credentials: [{{key: gold-key}}]
  plugins:
  - name: rate-limiting
    config: {{minute: 2, limit_by: consumer}}
  - name: response-transformer
    config: {{add: {{headers: ["x-tier:gold"]}}}}
- username: blocked
  keyauth_credentials: [{{key: blocked-key}}]
plugins:
- name: request-termination
  consumer: blocked
  config: {{status_code: 403, message: "account suspended"}}
"#,
        port = app.port()
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _proxy = Proxy::start_with(&deck, &["--listen", &listen]);
    let addr: SocketAddr = listen.parse().expect("addr");

    // gold: its own limit (2 a minute) and its response header.
    for _ in 0..2 {
        let (status, headers, _) = request(addr, "/api", "apikey: gold-key\r\n");
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-tier"), Some("gold"));
        assert_eq!(header(&headers, "x-ratelimit-limit-minute"), Some("2"));
    }
    assert_eq!(request(addr, "/api", "apikey: gold-key\r\n").0, 429);
    // free: the service's limit, no header.
    let (status, headers, _) = request(addr, "/api", "apikey: free-key\r\n");
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-ratelimit-limit-minute"), Some("100"));
    assert_eq!(header(&headers, "x-tier"), None);
    // blocked: terminated by its own plugin, never reaching the upstream.
    let before = app.count();
    let (status, _, body) = request(addr, "/api", "apikey: blocked-key\r\n");
    assert_eq!((status, body.as_str()), (403, r#"{"message":"account suspended"}"#));
    assert_eq!(app.count(), before);
    // Without a key nobody is identified: key-auth answers.
    assert_eq!(request(addr, "/api", "").0, 401);

    // Auth plugins cannot be scoped to a consumer, as in Kong; an unknown consumer is named.
    let dir = scratch_dir("consumer-scoped-bad");
    let bad = dir.join("kong.yaml");
    std::fs::write(
        &bad,
        "_format_version: \"3.0\"\nconsumers:\n- username: a\nplugins:\n- name: key-auth\n  consumer: a\n- name: rate-limiting\n  consumer: nobody\n  config: {minute: 1}\n",
    )
    .expect("write");
    let (code, out) = analyze(&bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("plugins[0].consumer") && out.contains("cannot be scoped to a consumer"),
        "{out}"
    );
    assert!(
        out.contains("plugins[1].consumer") && out.contains("no consumer \"nobody\""),
        "{out}"
    );
}

/// Kong's passive health checks (circuit breaker): a target answering statuses from
/// `unhealthy.http_statuses` `http_failures` times is taken out and stays out; an active check
/// brings it back after `healthy.successes` good probes, as in Kong.
#[test]
fn passive_health_checks_take_a_failing_target_out_until_an_active_check_brings_it_back() {
    let steady = Echo::start("steady-passive");
    let dir = scratch_dir("passive-target");
    std::fs::write(dir.join("api"), "flaky").expect("api file");
    std::fs::write(dir.join("healthz"), "ok").expect("healthz file");
    let flaky_port = free_port();
    let mut flaky = support::file_server(flaky_port, &dir);
    let deck = |active: bool| {
        let active = if active {
            "\n    active:\n      http_path: /healthz\n      healthy: {interval: 0.25, successes: 2}\n      unhealthy: {interval: 0.25, http_failures: 3}"
        } else {
            ""
        };
        format!(
            r#"_format_version: "3.0"
upstreams:
- name: pool
  targets:
  - target: 127.0.0.1:{steady}
  - target: 127.0.0.1:{flaky_port}
  healthchecks:
    passive:
      unhealthy: {{http_failures: 2, http_statuses: [404, 500]}}{active}
services:
- name: app
  host: pool
  retries: 0
  routes:
  - name: api
    paths: [/api]
    strip_path: false
"#,
            steady = steady.port(),
        )
    };
    for active in [false, true] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let _proxy = Proxy::start_with(&deck(active), &["--listen", &listen]);
        let addr: SocketAddr = listen.parse().expect("addr");
        // Both serve while healthy.
        let flaky_share = |n: usize| {
            (0..n)
                .filter(|_| {
                    let (status, _, body) = raw_get(addr, "/api", "x").expect("request");
                    assert_eq!(status, 200, "{body}");
                    body == "flaky"
                })
                .count()
        };
        assert!(flaky_share(10) > 0);

        // The target starts answering 404: after two of them it is out.
        std::fs::remove_file(dir.join("api")).expect("remove");
        let failures = (0..20)
            .filter(|_| raw_get(addr, "/api", "x").expect("request").0 == 404)
            .count();
        assert_eq!(failures, 2, "http_failures: 2 in a row take the target out");
        std::fs::write(dir.join("api"), "flaky").expect("restore");
        if !active {
            // Passive checks alone never bring it back, though it is fine again.
            std::thread::sleep(std::time::Duration::from_millis(700));
            assert_eq!(flaky_share(20), 0, "stays out without active checks");
        } else {
            // Two good probes, 0.25 s apart, bring it back.
            assert_eq!(flaky_share(6), 0, "still out right after");
            std::thread::sleep(std::time::Duration::from_millis(1200));
            assert!(flaky_share(20) > 0, "an active check brought it back");
        }
    }
    let _ = flaky.kill();
    let _ = flaky.wait();
}

#[test]
fn upstream_failures_get_kongs_answers() {
    let closed = free_port();
    let deck = format!(
        r#"_format_version: "3.0"
upstreams:
- name: empty-upstream
  targets:
  - target: 127.0.0.1:{closed}
    weight: 0
services:
- name: down
  url: http://127.0.0.1:{closed}
  retries: 0
  routes:
  - name: down
    paths: [/down]
- name: empty
  host: empty-upstream
  routes:
  - name: empty
    paths: [/empty]
"#
    );
    let listen = free_port();
    let proxy = Proxy::start_with(&deck, &["--listen", &format!("127.0.0.1:{listen}")]);
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    let (status, headers, body) = raw_get(addr, "/down", "k.test").expect("request");
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        body,
        "{\n  \"message\":\"An invalid response was received from the upstream server\"\n}"
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/json"))
    );
    let (status, _, body) = raw_get(addr, "/empty", "k.test").expect("request");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("failure to get a peer from the ring-balancer"), "{body}");
    let (_, metrics) = proxy.admin_get("/stats/prometheus");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meshgate_requests_total") && l.contains("code=\"502\"")),
        "{metrics}"
    );
}

#[test]
fn kong_upstream_headers_and_request_id_are_set_as_kong_sets_them() {
    let app = Echo::start("app");
    let deck = format!(
        r#"_format_version: "3.0"
services:
- name: app
  url: http://127.0.0.1:{port}/base
  routes:
  - name: app
    paths: [/api]
    plugins:
    - name: request-transformer
      config:
        replace:
          uri: /rewritten
"#,
        port = app.port(),
    );
    let listen = free_port();
    let _proxy = Proxy::start_with(&deck, &["--listen", &format!("127.0.0.1:{listen}")]);
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    let (status, headers, body) = raw_request(
        addr,
        "GET /api/items?x=1 HTTP/1.1\r\nHost: shop.example.com:8000\r\nX-Forwarded-Prefix: /evil\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n",
    )
    .expect("request");
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("json");
    let sent = &echo["headers"];
    // The plugin rewrote the upstream path; X-Forwarded-Path still names the client's.
    assert_eq!(echo["path"], "/rewritten");
    assert_eq!(sent["x-real-ip"], "127.0.0.1");
    // A client Kong does not trust cannot set these: Kong writes its own.
    assert_eq!(sent["x-forwarded-host"], "shop.example.com");
    assert_eq!(sent["x-forwarded-port"], listen.to_string());
    assert_eq!(sent["x-forwarded-path"], "/api/items");
    assert!(sent.get("x-forwarded-prefix").is_none(), "{sent}");
    let id = sent["x-kong-request-id"].as_str().expect("request id upstream");
    assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(header("x-kong-request-id"), Some(id), "the same id downstream");
    // Local answers carry one too.
    let (status, headers, _) = raw_get(addr, "/nowhere", "shop.example.com").expect("request");
    assert_eq!(status, 404);
    assert!(headers.iter().any(|(k, v)| k == "x-kong-request-id" && v.len() == 32));
}

/// Kong `hash_on: cookie`: a request without the cookie gets a new UUID in `Set-Cookie`
/// (`name=<uuid>; Path=<hash_on_cookie_path>; Same-Site=Lax; HttpOnly`, as Kong writes it), and requests that send it back stay on the
/// target it hashes to.
#[test]
fn hash_on_cookie_sets_a_uuid_cookie_and_sticks_to_its_target() {
    let targets: Vec<Echo> = (0..3).map(|i| Echo::start(&format!("t{i}"))).collect();
    let mut deck = String::from(
        "_format_version: \"3.0\"\nupstreams:\n- name: app-upstream\n  algorithm: consistent-hashing\n  hash_on: cookie\n  hash_on_cookie: kong-affinity\n  hash_on_cookie_path: /app\n  targets:\n",
    );
    for t in &targets {
        deck.push_str(&format!("  - target: 127.0.0.1:{}\n", t.port()));
    }
    deck.push_str("services:\n- name: app\n  host: app-upstream\n  routes:\n  - name: app\n    paths: [/app]\n");
    let listen = free_port();
    let _proxy = Proxy::start_with(&deck, &["--listen", &format!("127.0.0.1:{listen}")]);
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    let mut owners = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (status, headers, body) = request(addr, "/app", "");
        assert_eq!(status, 200, "{body}");
        let set_cookie = header(&headers, "set-cookie").expect("a generated cookie");
        let value = set_cookie
            .strip_prefix("kong-affinity=")
            .and_then(|v| v.strip_suffix("; Path=/app; Same-Site=Lax; HttpOnly"))
            .unwrap_or_else(|| panic!("{set_cookie}"));
        assert_eq!(value.len(), 36, "a UUID: {value}");
        let served = header(&headers, "x-echo-name").expect("echo").to_string();
        for _ in 0..3 {
            let (_, headers, _) = request(addr, "/app", &format!("Cookie: kong-affinity={value}\r\n"));
            assert_eq!(header(&headers, "x-echo-name"), Some(served.as_str()));
            assert_eq!(header(&headers, "set-cookie"), None);
        }
        owners.insert(served);
    }
    assert!(owners.len() >= 2, "12 cookies all hashed to {owners:?}");

    // A cookie name that would smuggle attributes into Set-Cookie is refused.
    let bad = scratch_dir("kong-cookie").join("bad.yaml");
    std::fs::write(
        &bad,
        deck.replace("hash_on_cookie: kong-affinity", "hash_on_cookie: \"x; Domain=.evil\""),
    )
    .expect("write");
    let (code, stdout) = analyze(&bad);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("upstreams[0].hash_on_cookie"), "{stdout}");
}

/// Kong's other hash inputs: the authenticated consumer, the path, a header with a regex
/// capture of the route's path as `hash_fallback`, and a header nobody sends (the empty string
/// is hashed, so every request goes to one target).
#[test]
fn hash_on_consumer_path_header_and_uri_capture_fallback() {
    let targets: Vec<Echo> = (0..4).map(|i| Echo::start(&format!("t{i}"))).collect();
    let target_list: String = targets
        .iter()
        .map(|t| format!("  - target: 127.0.0.1:{}\n", t.port()))
        .collect();
    let mut deck = String::from("_format_version: \"3.0\"\nconsumers:\n");
    for i in 0..8 {
        deck.push_str(&format!(
            "- username: user{i}\n  keyauth_credentials:\n  - key: key{i}\n"
        ));
    }
    deck.push_str("upstreams:\n");
    for (name, settings) in [
        ("by-consumer", "hash_on: consumer"),
        ("by-path", "hash_on: path"),
        (
            "by-header",
            "hash_on: header\n  hash_on_header: x-user\n  hash_fallback: uri_capture\n  hash_fallback_uri_capture: id",
        ),
        (
            "by-absent-header",
            "hash_on: header\n  hash_on_header: x-nobody-sends-this",
        ),
        ("by-query", "hash_on: query_arg\n  hash_on_query_arg: user"),
    ] {
        deck.push_str(&format!(
            "- name: {name}\n  algorithm: consistent-hashing\n  {settings}\n  targets:\n{target_list}"
        ));
    }
    deck.push_str(
        r#"services:
- name: consumer
  host: by-consumer
  routes: [{name: consumer, paths: [/consumer], plugins: [{name: key-auth}]}]
- name: path
  host: by-path
  routes: [{name: path, paths: [/path]}]
- name: users
  host: by-header
  routes: [{name: users, paths: ["~/users/(?<id>[0-9]+)"]}]
- name: absent
  host: by-absent-header
  routes: [{name: absent, paths: [/absent]}]
- name: query
  host: by-query
  routes: [{name: query, paths: [/query]}]
"#,
    );
    let listen = free_port();
    let _proxy = Proxy::start_with(&deck, &["--listen", &format!("127.0.0.1:{listen}")]);
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    // Every request of one key, sent `tries` times, lands on one target; returns it.
    let sticky = |path: &str, headers: &str, tries: usize| -> String {
        let mut served = std::collections::BTreeSet::new();
        for _ in 0..tries {
            let (status, h, body) = request(addr, path, headers);
            assert_eq!(status, 200, "{path} {headers}: {body}");
            served.insert(header(&h, "x-echo-name").expect("echo").to_string());
        }
        assert_eq!(served.len(), 1, "{path} {headers} went to {served:?}");
        served.into_iter().next().expect("one")
    };

    let by_consumer: std::collections::BTreeSet<String> = (0..8)
        .map(|i| sticky("/consumer", &format!("apikey: key{i}\r\n"), 3))
        .collect();
    assert!(by_consumer.len() >= 2, "8 consumers all on {by_consumer:?}");

    let by_path: std::collections::BTreeSet<String> = (0..8).map(|i| sticky(&format!("/path/{i}"), "", 3)).collect();
    assert!(by_path.len() >= 2, "8 paths all on {by_path:?}");
    // Kong hashes nginx's normalised `$uri`: escapes decoded, `//` merged, dot segments gone.
    for i in 0..4 {
        let plain = sticky(&format!("/path/item{i}"), "", 1);
        assert_eq!(sticky(&format!("/path//item%{:02X}", b'0' + i), "", 1), plain);
        assert_eq!(sticky(&format!("/path/x/../item{i}"), "", 1), plain);
    }

    // Repeated values are sorted and decoded before hashing, as Kong's get_uri_args reads them.
    let by_query: std::collections::BTreeSet<String> = (0..8)
        .map(|i| {
            let target = sticky(&format!("/query?user=u{i}&user=v"), "", 2);
            assert_eq!(sticky(&format!("/query?user=v&user=%75{i}"), "", 1), target);
            target
        })
        .collect();
    assert!(by_query.len() >= 2, "8 users all on {by_query:?}");

    // Without x-user, the `id` capture decides; with it, the header does, whatever the id.
    let by_capture: std::collections::BTreeSet<String> =
        (0..8).map(|i| sticky(&format!("/users/{i}"), "", 3)).collect();
    assert!(by_capture.len() >= 2, "8 ids all on {by_capture:?}");
    let header_target = sticky("/users/1", "x-user: alice\r\n", 2);
    for id in 2..6 {
        assert_eq!(sticky(&format!("/users/{id}"), "x-user: alice\r\n", 1), header_target);
    }

    // Nothing to hash: Kong hashes the empty string, so all such requests share one target.
    sticky("/absent", "", 12);

    // Kong's schema rules, as errors naming the field (the name whole, not as a prefix of
    // another field's).
    let names_field = |out: &str, field: &str| {
        out.match_indices(field).any(|(i, _)| {
            out[i + field.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        })
    };
    let dir = scratch_dir("kong-hash");
    let by_header = "hash_fallback: uri_capture\n  hash_fallback_uri_capture: id";
    for (i, (from, to, field)) in [
        (
            "hash_on: path",
            "hash_on: cookie\n  hash_on_cookie: c\n  hash_fallback: ip",
            "upstreams[1].hash_fallback",
        ),
        (by_header, "hash_fallback: header", "upstreams[2].hash_fallback_header"),
        (
            by_header,
            "hash_fallback: header\n  hash_fallback_header: x-user",
            "upstreams[2].hash_fallback",
        ),
        ("hash_on: consumer", "hash_on: sticky", "upstreams[0].hash_on"),
        // Checked whatever the algorithm, as Kong does.
        (
            "algorithm: consistent-hashing\n  hash_on: consumer",
            "algorithm: round-robin\n  hash_on: header",
            "upstreams[0].hash_on_header",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let bad = dir.join(format!("bad{i}.yaml"));
        assert!(deck.contains(from), "{from}");
        std::fs::write(&bad, deck.replacen(from, to, 1)).expect("write");
        let (code, stdout) = analyze(&bad);
        assert_eq!(code, Some(1), "{to}: {stdout}");
        assert!(names_field(&stdout, field), "{to}: expected {field} in {stdout}");
    }
    // Header names differing only in case pass Kong's check; the fallback is never used.
    let case_only = dir.join("case-only.yaml");
    std::fs::write(
        &case_only,
        deck.replacen(by_header, "hash_fallback: header\n  hash_fallback_header: X-User", 1),
    )
    .expect("write");
    let (code, stdout) = analyze(&case_only);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(names_field(&stdout, "upstreams[2].hash_fallback_header"), "{stdout}");
}
