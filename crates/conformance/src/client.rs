//! The test client: one request on a new connection (the Go suite disables keep-alives), as
//! HTTP/1.1, HTTP/1.1 or HTTP/2 over TLS with SNI, or h2c with prior knowledge.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Each attempt's client timeout (upstream: 10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 4 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Protocol {
    Http1,
    H2,
    H2cPriorKnowledge,
}

/// A request as a case describes it, placeholders already substituted.
pub struct Outgoing<'a> {
    pub connect: SocketAddr,
    pub protocol: Protocol,
    pub tls: Option<Tls<'a>>,
    pub method: &'a str,
    /// The Host header (`:authority` for HTTP/2).
    pub host: &'a str,
    pub path: &'a str,
    pub headers: Vec<(String, String)>,
}

pub struct Tls<'a> {
    pub server_name: &'a str,
    pub trust: &'a Arc<PinnedCertificate>,
}

/// Trusts exactly one certificate, matching names as Go's crypto/x509 does. (webpki, rustls'
/// default verifier, refuses the suite's `*.org` SAN as too broad; Go accepts it.)
#[derive(Debug)]
pub struct PinnedCertificate {
    pub der: CertificateDer<'static>,
    /// The certificate's DNS SANs.
    pub names: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCertificate {
    pub fn new(der: CertificateDer<'static>, names: Vec<String>) -> PinnedCertificate {
        PinnedCertificate {
            der,
            names,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

/// Go's `matchHostnames`: a leading `*.` matches exactly one label.
fn name_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() != self.der.as_ref() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        }
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        };
        if !self.names.iter().any(|pattern| name_matches(pattern, name.as_ref())) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

pub struct Received {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub async fn send(out: &Outgoing<'_>) -> anyhow::Result<Received> {
    tokio::time::timeout(REQUEST_TIMEOUT, send_untimed(out))
        .await
        .map_err(|_| anyhow!("no response within {REQUEST_TIMEOUT:?}"))?
}

async fn send_untimed(out: &Outgoing<'_>) -> anyhow::Result<Received> {
    let tcp = TcpStream::connect(out.connect)
        .await
        .with_context(|| format!("connect {}", out.connect))?;
    let _ = tcp.set_nodelay(true);
    match &out.tls {
        None => exchange(tcp, out).await,
        Some(tls) => {
            let alpn: &[u8] = if out.protocol == Protocol::H2 {
                b"h2"
            } else {
                b"http/1.1"
            };
            let mut config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()?
                    .dangerous()
                    .with_custom_certificate_verifier(tls.trust.clone())
                    .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            let name = ServerName::try_from(tls.server_name.to_string()).context("TLS server name")?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            exchange(stream, out).await
        }
    }
}

async fn exchange<S>(stream: S, out: &Outgoing<'_>) -> anyhow::Result<Received>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let response = match out.protocol {
        Protocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let mut builder = Request::builder()
                .method(out.method)
                .uri(out.path)
                .header(http::header::HOST, out.host);
            for (name, value) in &out.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            // Go's transport with keep-alives disabled asks the server to close.
            builder = builder.header(http::header::CONNECTION, "close");
            sender.send_request(builder.body(Empty::<Bytes>::new())?).await?
        }
        Protocol::H2 | Protocol::H2cPriorKnowledge => {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            let scheme = if out.protocol == Protocol::H2 { "https" } else { "http" };
            let mut builder = Request::builder()
                .method(out.method)
                .uri(format!("{scheme}://{}{}", out.host, out.path));
            for (name, value) in &out.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            sender.send_request(builder.body(Empty::<Bytes>::new())?).await?
        }
    };
    read_response(response).await
}

async fn read_response(response: hyper::Response<Incoming>) -> anyhow::Result<Received> {
    let (parts, body) = response.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => bail!("reading the response body: {e}"),
    };
    Ok(Received {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn wildcards_match_one_label_like_go() {
        assert!(super::name_matches("*.org", "example.org"));
        assert!(super::name_matches("*.wildcard.org", "third-example.wildcard.org"));
        assert!(!super::name_matches("*.org", "a.wildcard.org"));
        assert!(!super::name_matches("*.org", "org"));
        assert!(super::name_matches("example.org", "EXAMPLE.org"));
    }
}
