//! TLS with rustls: termination for listeners (SNI certificate selection, ALPN) and
//! origination to upstream clusters (DestinationRule `tls`).

use std::fmt;
use std::sync::Arc;

use meshgate_model::snapshot::{ListenerTls, TlsCertificate, TlsVersions, UpstreamTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The one crypto provider of the process (ring); used explicitly so no global default is needed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a rustls server config for a listener; fails on unparsable certificates or keys.
pub fn server_config(tls: &ListenerTls, listener: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut certs = Vec::with_capacity(tls.certificates.len());
    for cert in &tls.certificates {
        certs.push((
            cert.sni_hosts.clone(),
            certified_key(cert).map_err(|e| format!("listener {listener}: {e}"))?,
        ));
    }
    if certs.is_empty() {
        return Err(format!("listener {listener}: TLS without certificates"));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.versions {
        TlsVersions::Tls12And13 => rustls::DEFAULT_VERSIONS,
        TlsVersions::Tls12Only => &[&rustls::version::TLS12],
        TlsVersions::Tls13Only => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("listener {listener}: {e}"))?;
    let builder = match &tls.client_certificates {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let roots = root_store(&client.ca.pem)
                .map_err(|e| format!("listener {listener}: caCertificates {}: {e}", client.ca.path.display()))?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = if client.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("listener {listener}: caCertificates {}: {e}", client.ca.path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { certs }));
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

fn certified_key(cert: &TlsCertificate) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert.cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate {}: {e}", cert.cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {}: no CERTIFICATE block",
            cert.cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&cert.key_pem)
        .map_err(|e| format!("private key {}: {e}", cert.key_path.display()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("private key {}: {e}", cert.key_path.display()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing_key)))
}

/// Picks the certificate whose hosts match the ClientHello's SNI most specifically, else the
/// first one.
struct SniResolver {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("hosts", &self.certs.iter().map(|c| &c.0).collect::<Vec<_>>())
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|sni| most_specific_group(self.certs.iter().map(|c| c.0.as_slice()), sni))
            .unwrap_or(0);
        self.certs.get(chosen).map(|c| c.1.clone())
    }
}

/// The index of the host group that matches `name` most specifically: an exact host beats a
/// wildcard, a longer wildcard suffix beats a shorter one, and `*` matches last. This is how a
/// Gateway picks the listener for a hostname, for SNI and for `Host` alike.
pub fn most_specific_group<'a>(groups: impl Iterator<Item = &'a [String]>, name: &str) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (index, hosts) in groups.enumerate() {
        for pattern in hosts {
            if !host_matches(pattern, name) {
                continue;
            }
            let pattern = pattern.rsplit('/').next().unwrap_or(pattern);
            let rank = match pattern.strip_prefix('*') {
                None => usize::MAX,
                Some(suffix) => suffix.len(),
            };
            if best.is_none_or(|(_, r)| rank > r) {
                best = Some((index, rank));
            }
        }
    }
    best.map(|(index, _)| index)
}

/// `*` matches all, `*.example.com` matches any subdomain, otherwise exact (case-insensitive).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.rsplit('/').next().unwrap_or(pattern);
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(&suffix.to_ascii_lowercase()),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// TLS origination to a cluster's endpoints (Istio DestinationRule `tls` SIMPLE / MUTUAL),
/// built once per config so that a bad file or key fails the reload, not a request.
pub struct UpstreamTlsConfig {
    /// No ALPN, so the server speaks HTTP/1.1 (Istio sets ALPN only for HTTP/2 clusters).
    http1: Arc<rustls::ClientConfig>,
    /// ALPN `h2`.
    http2: Arc<rustls::ClientConfig>,
    /// `sni`; `None`: the upstream request's host (Envoy's auto SNI).
    sni: Option<ServerName<'static>>,
}

impl UpstreamTlsConfig {
    pub fn new(tls: &UpstreamTls, cluster: &str) -> Result<Self, String> {
        let err = |e: String| format!("cluster {cluster}: tls: {e}");
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
            Arc::new(NoVerification(provider.clone()))
        } else {
            let roots = match &tls.ca_certificates {
                Some(file) => Arc::new(
                    root_store(&file.pem).map_err(|e| err(format!("caCertificates {}: {e}", file.path.display())))?,
                ),
                None => system_roots().map_err(err)?,
            };
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| err(e.to_string()))?;
            if tls.subject_alt_names.is_empty() {
                webpki
            } else {
                let names = tls
                    .subject_alt_names
                    .iter()
                    .map(|n| ServerName::try_from(n.as_str()).map(|n| n.to_owned()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err(format!("subjectAltNames: {e}")))?;
                Arc::new(SubjectAltNames { inner: webpki, names })
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut http1 = match &tls.client_certificate {
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert.pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| err(format!("clientCertificate {}: {e}", cert.path.display())))?;
                let key_der = PrivateKeyDer::from_pem_slice(&key.pem)
                    .map_err(|e| err(format!("privateKey {}: {e}", key.path.display())))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| err(format!("clientCertificate and privateKey: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        http1.alpn_protocols.clear();
        let mut http2 = http1.clone();
        http2.alpn_protocols = vec![b"h2".to_vec()];
        let sni = tls
            .sni
            .as_deref()
            .map(|s| ServerName::try_from(s).map(|n| n.to_owned()))
            .transpose()
            .map_err(|e| err(format!("sni: {e}")))?;
        Ok(UpstreamTlsConfig {
            http1: Arc::new(http1),
            http2: Arc::new(http2),
            sni,
        })
    }

    /// Whether every connection sends the same server name (`sni` is set).
    pub fn has_fixed_sni(&self) -> bool {
        self.sni.is_some()
    }

    /// The config for a connection of the given protocol.
    pub fn client_config(&self, http2: bool) -> &Arc<rustls::ClientConfig> {
        if http2 { &self.http2 } else { &self.http1 }
    }

    /// The server name for a request to `host` (its authority, port allowed): `sni` when set.
    /// `None` when neither is a valid DNS name or IP address.
    pub fn server_name(&self, host: &str) -> Option<ServerName<'static>> {
        if let Some(sni) = &self.sni {
            return Some(sni.clone());
        }
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => host.rsplit_once(':').map_or(host, |(h, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    host
                }
            }),
        };
        ServerName::try_from(host).ok().map(|n| n.to_owned())
    }
}

fn root_store(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE block".to_string());
    }
    Ok(roots)
}

/// Where distributions keep the system's trusted roots as one PEM bundle (the list Go and
/// rustls-native-certs look through); `SSL_CERT_FILE` comes first, as for OpenSSL.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's trusted roots, read once: what Istio verifies against without `caCertificates`.
fn system_roots() -> Result<Arc<rustls::RootCertStore>, String> {
    static ROOTS: std::sync::OnceLock<Result<Arc<rustls::RootCertStore>, String>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let from_env = std::env::var("SSL_CERT_FILE").ok();
            for path in from_env
                .iter()
                .map(String::as_str)
                .chain(SYSTEM_BUNDLES.iter().copied())
            {
                if let Ok(pem) = std::fs::read(path) {
                    // Bundles may hold certificates webpki cannot use; keep the others.
                    let mut roots = rustls::RootCertStore::empty();
                    let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
                    roots.add_parsable_certificates(certs);
                    if !roots.is_empty() {
                        return Ok(Arc::new(roots));
                    }
                }
            }
            Err(format!(
                "no caCertificates given and no system CA bundle found (SSL_CERT_FILE, {})",
                SYSTEM_BUNDLES.join(", ")
            ))
        })
        .clone()
}

/// Istio's `subjectAltNames`: the chain must be valid and the certificate must name one of
/// these, whatever server name was sent.
#[derive(Debug)]
struct SubjectAltNames {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for SubjectAltNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no subjectAltNames".to_string());
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
            {
                Ok(verified) => return Ok(verified),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Istio's `insecureSkipVerify`: any certificate is accepted (the handshake's signatures are
/// still checked, so the connection is encrypted to whoever holds the presented key).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
