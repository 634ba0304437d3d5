//! TLS origination (DestinationRule `tls` SIMPLE and MUTUAL) through a real meshgate process
//! to a real TLS upstream, which reports what it saw of each connection: the server name,
//! ALPN, protocol version and whether a client certificate came.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;

/// A CA, a server certificate for `api.test` it signed, and a client CA with its client.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = scratch_dir("upstream-tls");
        let server_ca = authority("meshgate test CA");
        let client_ca = authority("meshgate test client CA");
        let (server, server_key) = leaf(&server_ca, &["api.test"]);
        let (client, client_key) = leaf(&client_ca, &["client.test"]);
        for (name, pem) in [
            ("ca.pem", server_ca.pem()),
            ("client-ca.pem", client_ca.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.join(name), pem).expect("write pem");
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, names: &[&str]) -> (String, String) {
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// A TLS upstream answering every request with JSON describing the connection.
struct TlsUpstream {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl TlsUpstream {
    fn start(pki: &Pki, require_client_cert: bool) -> TlsUpstream {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.dir.join("server.pem"))
            .expect("server.pem")
            .collect::<Result<_, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_file(pki.dir.join("server-key.pem")).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(pki.dir.join("client-ca.pem")).expect("client-ca.pem") {
                roots.add(c.expect("cert")).expect("root");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key).expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (h, r) = (handshakes.clone(), requests.clone());
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (handshakes, requests) = (h.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let conn = tls.get_ref().1;
                    let sni = conn.server_name().unwrap_or("").to_string();
                    let alpn = conn
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .unwrap_or_default();
                    let client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let mut seen = serde_json::json!({
                            "sni": sni,
                            "alpn": alpn,
                            "client_cert": client_cert,
                            "version": format!("{:?}", req.version()),
                            "host": req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or(""),
                            "authority": req.uri().authority().map(|a| a.to_string()).unwrap_or_default(),
                            "path": req.uri().path(),
                            "scheme": req.uri().scheme_str().unwrap_or(""),
                            "chunked": req.headers().get("transfer-encoding").is_some(),
                        });
                        async move {
                            seen["body_len"] = body_len(req.into_body()).await.into();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                seen.to_string(),
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            handshakes,
            requests,
            _runtime: runtime,
        }
    }
}

/// A gateway on `port` routing every host to `api.test`, whose one endpoint is `upstream`,
/// with `tls` as the DestinationRule's traffic policy (YAML, indented for it).
fn config(port: u16, upstream: &TlsUpstream, protocol: &str, tls: &str) -> String {
    format!(
        r#"{gw}apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api
spec:
  hosts: ["api.test"]
  resolution: STATIC
  ports:
  - number: 80
    name: web
    protocol: {protocol}
    targetPort: {upstream_port}
  endpoints:
  - address: 127.0.0.1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: api
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: api.test
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: api
spec:
  host: api.test
  trafficPolicy:
    tls:
{tls}
"#,
        gw = gateway("gw", port),
        upstream_port = upstream.addr.port(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn get_json(port: u16, host: &str) -> Reply {
    rt().block_on(async {
        send(&client(false), get(port, "/hello", host, &[]))
            .await
            .expect("request")
    })
}

/// `mode: SIMPLE` trusting the test CA.
fn simple(pki: &Pki) -> String {
    format!("      mode: SIMPLE\n      caCertificates: {}\n", pki.path("ca.pem"))
}

/// meshgate in front of `upstream` with these TLS settings: its port, and the process.
fn serve(upstream: &TlsUpstream, protocol: &str, tls: &str) -> (u16, Proxy) {
    let port = free_port();
    let proxy = Proxy::start(&config(port, upstream, protocol, tls));
    (port, proxy)
}

#[test]
fn simple_tls_verifies_the_server_sends_the_host_as_sni_and_reuses_the_connection() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    let (port, _proxy) = serve(&upstream, "HTTP", &simple(&pki));
    let client = client(false);
    rt().block_on(async {
        for _ in 0..5 {
            let r = send(&client, get(port, "/hello", "api.test", &[]))
                .await
                .expect("request");
            assert_eq!(r.status, 200, "{}", r.body);
            let seen = r.json();
            assert_eq!(seen["sni"], "api.test", "{seen}");
            assert_eq!(seen["alpn"], "", "no ALPN for an HTTP/1.1 cluster, as Istio: {seen}");
            assert_eq!(seen["version"], "HTTP/1.1");
            assert_eq!(seen["host"], "api.test");
            assert_eq!(seen["path"], "/hello");
        }
    });
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 5);
    assert_eq!(
        upstream.handshakes.load(Ordering::SeqCst),
        1,
        "one pooled TLS connection"
    );
}

#[test]
fn a_certificate_not_valid_for_the_name_is_refused_before_any_request() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    let (port, _proxy) = serve(&upstream, "HTTP", &simple(&pki));
    // The server's certificate names api.test only.
    let r = get_json(port, "other.test");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("connection failure"), "{}", r.body);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 0);

    // A CA that did not sign it: refused too.
    let other = Pki::new();
    let (port, _proxy) = serve(&upstream, "HTTP", &simple(&other));
    assert_eq!(get_json(port, "api.test").status, 503);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn sni_and_subject_alt_names_replace_the_host_for_the_handshake() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    let tls = format!(
        "{}      sni: api.test\n      subjectAltNames: [\"api.test\"]\n",
        simple(&pki)
    );
    let (port, _proxy) = serve(&upstream, "HTTP", &tls);
    let r = get_json(port, "anything.example");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sni"], "api.test");
    assert_eq!(r.json()["host"], "anything.example");
}

#[test]
fn mutual_tls_presents_the_client_certificate() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, true);
    // SIMPLE has no certificate to present: the upstream refuses the handshake.
    let (port, proxy) = serve(&upstream, "HTTP", &simple(&pki));
    assert_eq!(get_json(port, "api.test").status, 503);
    drop(proxy);

    let mutual = format!(
        "      mode: MUTUAL\n      clientCertificate: {}\n      privateKey: {}\n      caCertificates: {}\n",
        pki.path("client.pem"),
        pki.path("client-key.pem"),
        pki.path("ca.pem")
    );
    let (port, _proxy) = serve(&upstream, "HTTP", &mutual);
    let r = get_json(port, "api.test");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["client_cert"], true);
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn insecure_skip_verify_accepts_any_certificate() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    let (port, _proxy) = serve(
        &upstream,
        "HTTP",
        "      mode: SIMPLE\n      insecureSkipVerify: true\n",
    );
    let r = get_json(port, "unknown.test");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sni"], "unknown.test");
}

#[test]
fn an_http2_cluster_negotiates_h2_by_alpn() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    let (port, _proxy) = serve(&upstream, "HTTP2", &simple(&pki));
    let r = get_json(port, "api.test");
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    assert_eq!(seen["alpn"], "h2", "{seen}");
    assert_eq!(seen["scheme"], "https", ":scheme of a request over TLS: {seen}");
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["sni"], "api.test");
}

#[test]
fn bad_tls_settings_name_the_field_and_keep_the_last_good_config() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    let (port, proxy) = serve(&upstream, "HTTP", &simple(&pki));
    assert_eq!(get_json(port, "api.test").status, 200);

    let missing = format!(
        "      mode: MUTUAL\n      privateKey: {}\n      caCertificates: {}\n",
        pki.path("client-key.pem"),
        pki.path("ca.pem")
    );
    std::fs::write(&proxy.config, config(port, &upstream, "HTTP", &missing)).expect("rewrite");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !proxy.log_text().contains("clientCertificate") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = proxy.log_text();
    assert!(
        log.contains("spec.trafficPolicy.tls.clientCertificate") && log.contains("required with tls mode MUTUAL"),
        "{log}"
    );
    // Still served with the SIMPLE settings.
    assert_eq!(get_json(port, "api.test").status, 200);
    assert!(Path::new(&pki.path("ca.pem")).exists());
}

/// A decK file with an `https` service on an upstream entity named `api.test` (so the host sent
/// upstream, and with it the server name, is `api.test`), served on a Kong listener.
fn kong_deck(upstream: &TlsUpstream, tls_verify: &str) -> String {
    format!(
        r#"_format_version: "3.0"
upstreams:
- name: api.test
  targets:
  - target: 127.0.0.1:{port}
services:
- name: api
  protocol: https
  host: api.test
{tls_verify}  routes:
  - name: api
    paths: [/]
"#,
        port = upstream.addr.port(),
    )
}

#[test]
fn kong_https_services_speak_tls_and_check_the_certificate_only_with_tls_verify() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    // Kong's default (tls_verify unset): TLS without checking the certificate.
    let listen = free_port();
    let proxy = Proxy::start_with(&kong_deck(&upstream, ""), &["--listen", &format!("127.0.0.1:{listen}")]);
    let r = get_json(listen, "anything.example");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sni"], "api.test", "{}", r.body);
    assert_eq!(r.json()["host"], "api.test");
    assert!(
        proxy.log_text().contains("tls_verify"),
        "the unchecked default is pointed out"
    );
    drop(proxy);

    // tls_verify: true checks against the system's roots, which did not sign this certificate.
    let listen = free_port();
    let _proxy = Proxy::start_with(
        &kong_deck(&upstream, "  tls_verify: true\n"),
        &["--listen", &format!("127.0.0.1:{listen}")],
    );
    let r = get_json(listen, "anything.example");
    // Kong's answer to a failed upstream connection.
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(
        r.json()["message"],
        "An invalid response was received from the upstream server"
    );
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
}

/// YAML block scalar lines of `pem`, indented by `indent` spaces.
fn block(pem: &str, indent: usize) -> String {
    pem.lines().map(|l| format!("{}{l}\n", " ".repeat(indent))).collect()
}

#[test]
fn kong_ca_and_client_certificate_entities_verify_and_authenticate() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, true);
    let read = |name: &str| std::fs::read_to_string(pki.dir.join(name)).expect("pem");
    let deck = format!(
        r#"_format_version: "3.0"
ca_certificates:
- id: 6d4c5b2a-0000-4000-8000-000000000001
  cert: |
{ca}certificates:
- id: 6d4c5b2a-0000-4000-8000-000000000002
  cert: |
{client}  key: |
{key}upstreams:
- name: api.test
  targets:
  - target: 127.0.0.1:{port}
services:
- name: api
  protocol: https
  host: api.test
  tls_verify: true
  ca_certificates: [6d4c5b2a-0000-4000-8000-000000000001]
  client_certificate: {{id: 6d4c5b2a-0000-4000-8000-000000000002}}
  routes:
  - name: api
    paths: [/]
"#,
        ca = block(&read("ca.pem"), 4),
        client = block(&read("client.pem"), 4),
        key = block(&read("client-key.pem"), 4),
        port = upstream.addr.port(),
    );
    let listen = free_port();
    let proxy = Proxy::start_with(&deck, &["--listen", &format!("127.0.0.1:{listen}")]);
    let r = get_json(listen, "anything.example");
    assert_eq!(r.status, 200, "{}\n{}", r.body, proxy.log_text());
    assert_eq!(r.json()["client_cert"], true);
    assert_eq!(r.json()["sni"], "api.test");
    assert!(
        !proxy.log_text().contains("not checked"),
        "tls_verify is on: no warning"
    );
}

#[test]
fn each_server_name_has_its_own_pool_even_under_a_connection_limit() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    // One connection allowed for the cluster; the server name follows each request's host.
    let tls =
        "      mode: SIMPLE\n      insecureSkipVerify: true\n    connectionPool:\n      tcp: {maxConnections: 1}\n";
    for protocol in ["HTTP2", "HTTP"] {
        let before = upstream.handshakes.load(Ordering::SeqCst);
        let (port, _proxy) = serve(&upstream, protocol, tls);
        let client = client(false);
        rt().block_on(async {
            for i in 0..6 {
                let host = if i % 2 == 0 { "a.test" } else { "b.test" };
                let r = send(&client, get(port, "/", host, &[])).await.expect("request");
                assert_eq!(r.status, 200, "{protocol} {host}: {}", r.body);
                assert_eq!(r.json()["sni"], host, "{protocol}: {}", r.body);
            }
        });
        // One connection per name, reused: not a handshake per request.
        let handshakes = upstream.handshakes.load(Ordering::SeqCst) - before;
        assert_eq!(handshakes, 2, "{protocol}: {handshakes} handshakes for 6 requests");
    }
}

#[test]
fn kong_tls_is_per_service_and_a_handshake_past_connect_timeout_is_a_504() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    // Accepts connections (the kernel does) and never answers the TLS handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let deck = format!(
        r#"_format_version: "3.0"
upstreams:
- name: api.test
  targets:
  - target: 127.0.0.1:{port}
services:
- name: secure
  protocol: https
  host: api.test
  routes:
  - name: secure
    paths: [/secure]
- name: plain
  protocol: http
  host: api.test
  retries: 0
  routes:
  - name: plain
    paths: [/plain]
- name: silent
  protocol: https
  host: 127.0.0.1
  port: {silent}
  connect_timeout: 300
  retries: 0
  routes:
  - name: silent
    paths: [/silent]
"#,
        port = upstream.addr.port(),
        silent = silent.local_addr().expect("addr").port(),
    );
    let listen = free_port();
    let _proxy = Proxy::start_with(&deck, &["--listen", &format!("127.0.0.1:{listen}")]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{listen}").parse().expect("addr");
    let (status, _, body) = raw_get(addr, "/secure", "k.test").expect("request");
    assert_eq!(status, 200, "{body}");
    // The same upstream in plain text for the http service: the TLS server does not answer it.
    let (status, _, body) = raw_get(addr, "/plain", "k.test").expect("request");
    assert_eq!(status, 502, "{body}");
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
    let started = std::time::Instant::now();
    let (status, _, body) = raw_get(addr, "/silent", "k.test").expect("request");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("The upstream server is timing out"), "{body}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

#[test]
fn request_bodies_stream_over_tls_with_and_without_a_length() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    for protocol in ["HTTP", "HTTP2"] {
        let (port, _proxy) = serve(&upstream, protocol, &simple(&pki));
        rt().block_on(async {
            // 4 MiB: more than rustls and the socket buffer hold, so writes must wait and flush.
            let total = 4 * 1024 * 1024u64;
            let with_length = hyper::Request::post("/upload")
                .header("host", "api.test")
                .header("content-length", total)
                .body(http_body_util::BodyExt::boxed(sized_body(total)))
                .expect("request");
            let without_length = hyper::Request::post("/upload")
                .header("host", "api.test")
                .body(http_body_util::BodyExt::boxed(sized_body(total)))
                .expect("request");
            for (req, chunked) in [(with_length, false), (without_length, true)] {
                let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect");
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("handshake");
                tokio::spawn(conn);
                let resp = sender.send_request(req).await.expect("response");
                let status = resp.status();
                let body = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .expect("body")
                    .to_bytes();
                assert_eq!(status, 200, "{protocol}: {}", String::from_utf8_lossy(&body));
                let seen: serde_json::Value = serde_json::from_slice(&body).expect("json");
                assert_eq!(seen["body_len"], total, "{protocol}: {seen}");
                if protocol == "HTTP" {
                    assert_eq!(seen["chunked"], chunked, "{seen}");
                }
            }
        });
    }
}

/// A Gateway API config: an `edge` Gateway on `port`, Service `api` (port 443) whose endpoint
/// is `upstream`, an HTTPRoute to it, and `policy` (YAML documents) after them.
fn gateway_api_config(port: u16, upstream: &TlsUpstream, policy: &str) -> String {
    format!(
        r#"{gateway}apiVersion: v1
kind: Service
metadata: {{name: api, namespace: apps}}
spec:
  ports:
  - {{name: https, port: 443}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-abc
  namespace: apps
  labels: {{kubernetes.io/service-name: api}}
addressType: IPv4
ports:
- {{name: https, port: {upstream_port}}}
endpoints:
- addresses: ["127.0.0.1"]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: api, namespace: apps}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - backendRefs: [{{name: api, port: 443}}]
---
{policy}"#,
        gateway = edge_gateway(port),
        upstream_port = upstream.addr.port(),
    )
}

#[test]
fn backend_tls_policy_originates_tls_with_its_hostname_and_ca() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki, false);
    let ca = std::fs::read_to_string(pki.dir.join("ca.pem")).expect("ca");
    let policy = format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: BackendTLSPolicy
metadata: {{name: api-tls, namespace: apps}}
spec:
  targetRefs: [{{group: "", kind: Service, name: api}}]
  validation:
    hostname: api.test
    caCertificateRefs: [{{group: "", kind: ConfigMap, name: api-ca}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: api-ca, namespace: apps}}
data:
  ca.crt: |
{ca}"#,
        ca = block(&ca, 4),
    );
    let port = free_port();
    let proxy = Proxy::start(&gateway_api_config(port, &upstream, &policy));
    let r = get_json(port, "anything.example");
    assert_eq!(r.status, 200, "{}\n{}", r.body, proxy.log_text());
    assert_eq!(r.json()["sni"], "api.test", "the policy's hostname, not the request's");
    assert_eq!(r.json()["host"], "anything.example");
    drop(proxy);

    // A CA reference that does not resolve, or a CA that does not decode: the backend is
    // invalid (500), never plain text, and the rest of the configuration loads.
    let garbled = format!(
        "{}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: garbled-ca, namespace: apps}}\ndata:\n  ca.crt: \"-----BEGIN CERTIFICATE-----\\nnot base64!\\n-----END CERTIFICATE-----\\n\"\n",
        policy.replace("name: api-ca}", "name: garbled-ca}")
    );
    for broken in [policy.replace("name: api-ca}", "name: missing-ca}"), garbled] {
        let port = free_port();
        let _proxy = Proxy::start(&gateway_api_config(port, &upstream, &broken));
        assert_eq!(get_json(port, "anything.example").status, 500);
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
}
