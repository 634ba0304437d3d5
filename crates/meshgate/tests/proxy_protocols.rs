//! Protocols through a real meshgate process: h2c, TLS with ALPN and SNI, gRPC trailers,
//! WebSocket upgrades and large streamed bodies.

mod support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;

fn simple_config(port: u16, echo: &Echo, port_protocol: &str) -> String {
    format!(
        r#"{gw}apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: echo
spec:
  hosts: ["echo.test"]
  resolution: STATIC
  ports:
  - number: 80
    name: main
    protocol: {port_protocol}
  endpoints:
  - address: 127.0.0.1
    ports:
      main: {echo_port}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: echo
spec:
  hosts: ["*"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: echo.test
"#,
        gw = gateway("gw", port),
        echo_port = echo.port(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_the_http_port() {
    let echo = Echo::start("echo");
    let port = free_port();
    let _proxy = Proxy::start(&simple_config(port, &echo, "HTTP"));
    let h2 = client(true);
    for _ in 0..3 {
        let r = send(&h2, get(port, "/h2", "echo.test", &[]))
            .await
            .expect("h2c request");
        assert_eq!(r.status, 200);
        // Downstream HTTP/2, upstream HTTP/1.1 for an HTTP port.
        assert_eq!(r.json()["version"], "HTTP/1.1");
        // `:authority` (from the URI) takes precedence over a Host header (RFC 9113 §8.3.1).
        assert_eq!(r.json()["headers"]["host"], format!("127.0.0.1:{port}"));
    }
    let h1 = client(false);
    assert_eq!(
        send(&h1, get(port, "/h1", "echo.test", &[])).await.expect("h1").status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_survive_http2_both_ways() {
    let echo = Echo::start("grpc");
    let port = free_port();
    let _proxy = Proxy::start(&simple_config(port, &echo, "GRPC"));
    let h2 = client(true);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", http::HeaderValue::from_static("t1"));
    let body = support::FrameIter(
        vec![
            hyper::body::Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello")),
            hyper::body::Frame::trailers(trailers),
        ]
        .into_iter(),
    );
    let req = http::Request::post(format!("http://127.0.0.1:{port}/trailers"))
        .header("host", "echo.test")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("request");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let resp = client.request(req).await.expect("grpc call");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("body");
    let got_trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(got_trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    let body: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).expect("json");
    assert_eq!(body["version"], "HTTP/2.0", "a GRPC port is reached over HTTP/2");
    assert_eq!(
        body["trailers"]["x-client-trailer"], "t1",
        "request trailers reach the upstream"
    );
    let _ = h2;
}

fn tls_files(dir: &std::path::Path, host: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec![host.to_string()]).expect("cert");
    let cert_path = dir.join(format!("{host}.crt"));
    let key_path = dir.join(format!("{host}.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    (cert_path, key_path, cert.cert.der().to_vec())
}

/// A TLS client trusting only the `trusted` certificates (DER), offering `versions`.
fn client_builder(
    trusted: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots
            .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
            .expect("root");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
}

async fn tls_connect(
    port: u16,
    sni: &str,
    trusted: &[Vec<u8>],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let trusted: Vec<&[u8]> = trusted.iter().map(Vec::as_slice).collect();
    let mut config = client_builder(&trusted, rustls::DEFAULT_VERSIONS).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    handshake(port, sni, config).await.expect("tls handshake")
}

/// Connects to `port` and runs a TLS handshake naming `sni`.
async fn handshake(
    port: u16,
    sni: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_sni_certificates_alpn_and_https_redirect() {
    let echo = Echo::start("echo");
    let dir = scratch_dir("tls");
    let (a_crt, a_key, a_der) = tls_files(&dir, "a.test");
    let (b_crt, b_key, b_der) = tls_files(&dir, "b.test");
    let https = free_port();
    let http_port = free_port();
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {{number: {https}, name: https-a, protocol: HTTPS}}
    hosts: ["a.test"]
    tls:
      mode: SIMPLE
      serverCertificate: {a_crt}
      privateKey: {a_key}
  - port: {{number: {https}, name: https-b, protocol: HTTPS}}
    hosts: ["b.test"]
    tls:
      mode: SIMPLE
      serverCertificate: {b_crt}
      privateKey: {b_key}
  - port: {{number: {http_port}, name: http, protocol: HTTP}}
    hosts: ["a.test"]
    tls:
      httpsRedirect: true
---
{se}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: vs
spec:
  hosts: ["a.test", "b.test"]
  gateways: ["gw"]
  http:
  - route:
    - destination:
        host: echo.test
"#,
        a_crt = a_crt.display(),
        a_key = a_key.display(),
        b_crt = b_crt.display(),
        b_key = b_key.display(),
        se = service_entry("echo", "echo.test", &[(echo.port(), "v1")]),
    );
    let _proxy = Proxy::start(&yaml);

    // HTTP/1.1 over TLS to a.test: only a.test's certificate is trusted, so SNI picked it.
    let mut s = tls_connect(https, "a.test", std::slice::from_ref(&a_der), &[b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /secure HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let (status, _, body) = parse_response(&buf);
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");

    // A large response on a kept-alive HTTP/1.1 connection over TLS arrives whole: its last
    // TLS records are flushed, not left behind while the connection waits for the next request.
    let mut s = tls_connect(https, "a.test", std::slice::from_ref(&a_der), &[b"http/1.1"]).await;
    const SIZE: usize = 4 << 20;
    s.write_all(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // Read late, so the proxy's socket fills and TLS records wait in rustls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let whole = tokio::time::timeout(Duration::from_secs(10), async {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            if head_end.is_some_and(|h| got.len() - h >= SIZE) {
                return true;
            }
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(whole, Ok(true), "the response's end never arrived");

    // HTTP/2 negotiated by ALPN, to b.test with b's certificate.
    let s = tls_connect(https, "b.test", &[b_der], &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("https://b.test/over-h2")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = sender.send_request(req).await.expect("h2 over tls");
    assert_eq!(resp.status(), 200);

    // The same HTTP/2 connection (SNI b.test) asked for a.test, as connection reuse can do:
    // another server owns that host, so the answer is 421 and the upstream never sees it.
    let before = echo.count();
    let req = http::Request::get("https://a.test/misdirected")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = sender.send_request(req).await.expect("h2 over tls");
    assert_eq!(resp.status(), 421);
    assert_eq!(echo.count(), before, "a misdirected request is not forwarded");

    // Plain HTTP on the redirect server.
    let (status, headers, _) = raw_get(
        format!("127.0.0.1:{http_port}").parse().expect("addr"),
        "/x?y=1",
        "a.test",
    )
    .expect("redirect");
    assert_eq!(status, 301);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "location" && v == "https://a.test/x?y=1"),
        "{headers:?}"
    );
}

#[test]
fn websocket_upgrade_is_tunnelled() {
    let echo = Echo::start("ws");
    let port = free_port();
    let _proxy = Proxy::start(&simple_config(port, &echo, "HTTP"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: echo.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"\x81\x05hello"[..], b"any bytes at all"] {
        s.write_all(msg).expect("write frame");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).expect("echo");
        assert_eq!(back, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_streams_up_and_down_with_flat_memory() {
    const GIB: u64 = 1 << 30;
    let echo = Echo::start("big");
    let port = free_port();
    let proxy = Proxy::start(&simple_config(port, &echo, "HTTP"));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();

    stream_both_ways(&client, port, GIB, true, sized_body).await;
    let peak = peak_rss_kib(proxy.child.id());
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB after moving 2 GiB");
}

/// Whether a TLS handshake offering only `version` succeeds against `port`.
async fn handshake_with(
    port: u16,
    sni: &str,
    trusted: &[u8],
    version: &'static rustls::SupportedProtocolVersion,
) -> bool {
    let config = client_builder(&[trusted], &[version]).with_no_client_auth();
    handshake(port, sni, config).await.is_ok()
}

/// Istio `minProtocolVersion` / `maxProtocolVersion` on an HTTPS server: a client offering
/// only a version outside them fails its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_servers_offer_the_tls_versions_they_name() {
    let dir = scratch_dir("tls-versions");
    let (crt, key, der) = tls_files(&dir, "a.test");
    let (only13, only12, both) = (free_port(), free_port(), free_port());
    let server = |port: u16, versions: &str| {
        format!(
            "  - port: {{number: {port}, name: https-{port}, protocol: HTTPS}}\n    hosts: [\"a.test\"]\n    tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}{versions}}}\n",
            crt.display(),
            key.display()
        )
    };
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{}{}{}",
        server(only13, ", minProtocolVersion: TLSV1_3"),
        server(only12, ", maxProtocolVersion: TLSV1_2"),
        server(both, ", minProtocolVersion: TLSV1_2, maxProtocolVersion: TLS_AUTO"),
    );
    let _proxy = Proxy::start(&yaml);
    use rustls::version::{TLS12, TLS13};
    for (port, v12, v13) in [(only13, false, true), (only12, true, false), (both, true, true)] {
        assert_eq!(
            handshake_with(port, "a.test", &der, &TLS12).await,
            v12,
            "TLS 1.2 on {port}"
        );
        assert_eq!(
            handshake_with(port, "a.test", &der, &TLS13).await,
            v13,
            "TLS 1.3 on {port}"
        );
    }
}

/// A CA and a client certificate it signed, as PEM (CA certificate, client chain, client key).
fn client_pki(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("key")).expect("ca");
    let ca_path = dir.join(format!("{name}-ca.crt"));
    std::fs::write(&ca_path, ca.pem()).expect("write ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let client = rcgen::CertificateParams::new(vec![format!("{name}.client.test")])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("sign");
    (ca_path, client.pem(), key.serialize_pem())
}

/// Sends one request over TLS, with `client` (certificate chain and key PEM) if given; the
/// status, or `None` when the handshake or the exchange failed.
async fn mtls_status(port: u16, server_der: &[u8], client: Option<(&str, &str)>) -> Option<u16> {
    mtls_exchange(port, server_der, client).await.map(|(status, _)| status)
}

/// As [`mtls_status`], with the response body; the request carries a forged
/// `x-forwarded-client-cert`.
async fn mtls_exchange(port: u16, server_der: &[u8], client: Option<(&str, &str)>) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let builder = client_builder(&[server_der], rustls::DEFAULT_VERSIONS);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            use rustls_pki_types::pem::PemObject;
            let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
                .map(|c| c.expect("cert"))
                .collect();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client auth")
        }
    };
    let mut s = handshake(port, "a.test", config).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Client-Cert: Hash=forged\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let (status, _, body) = parse_response(&buf);
    (status != 0).then_some((status, body))
}

/// Istio `tls.mode: MUTUAL` asks for a client certificate that chains to `caCertificates` and
/// refuses clients without one; `OPTIONAL_MUTUAL` lets those in, but still refuses a
/// certificate from another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_servers_verify_client_certificates() {
    let echo = Echo::start("mtls-echo");
    let dir = scratch_dir("tls-mutual");
    let (crt, key, der) = tls_files(&dir, "a.test");
    let (ca, client_chain, client_key) = client_pki(&dir, "trusted");
    let (_, stranger_chain, stranger_key) = client_pki(&dir, "stranger");
    let (mutual, optional) = (free_port(), free_port());
    let server = |port: u16, mode: &str| {
        format!(
            "  - port: {{number: {port}, name: https-{port}, protocol: HTTPS}}\n    hosts: [\"a.test\"]\n    tls: {{mode: {mode}, serverCertificate: {}, privateKey: {}, caCertificates: {}}}\n",
            crt.display(),
            key.display(),
            ca.display()
        )
    };
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n{}{}---\n{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [\"a.test\"]\n  gateways: [gw]\n  http:\n  - route: [{{destination: {{host: echo.test}}}}]\n",
        server(mutual, "MUTUAL"),
        server(optional, "OPTIONAL_MUTUAL"),
        service_entry("echo", "echo.test", &[(echo.port(), "v1")]),
    );
    let _proxy = Proxy::start(&yaml);
    let trusted = Some((client_chain.as_str(), client_key.as_str()));
    let stranger = Some((stranger_chain.as_str(), stranger_key.as_str()));
    assert_eq!(mtls_status(mutual, &der, trusted).await, Some(200));
    assert_eq!(mtls_status(mutual, &der, None).await, None, "no client certificate");
    assert_eq!(
        mtls_status(mutual, &der, stranger).await,
        None,
        "another CA's certificate"
    );
    assert_eq!(mtls_status(optional, &der, None).await, Some(200));
    assert_eq!(mtls_status(optional, &der, trusted).await, Some(200));
    assert_eq!(
        mtls_status(optional, &der, stranger).await,
        None,
        "another CA's certificate"
    );

    // Envoy's SANITIZE_SET: the client's own x-forwarded-client-cert never reaches the
    // upstream; a verified certificate is named by its SHA-256.
    let forwarded = |body: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(body).expect("json")["headers"]["x-forwarded-client-cert"].clone()
    };
    let (_, body) = mtls_exchange(optional, &der, None).await.expect("exchange");
    assert_eq!(forwarded(&body), serde_json::Value::Null, "{body}");
    let (_, body) = mtls_exchange(mutual, &der, trusted).await.expect("exchange");
    use rustls_pki_types::pem::PemObject;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(client_chain.as_bytes())
        .next()
        .expect("leaf")
        .expect("der");
    let hash: String = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(forwarded(&body), serde_json::json!(format!("Hash={hash}")), "{body}");
}
