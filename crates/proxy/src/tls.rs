//! Downstream TLS termination: rustls server configs with SNI certificate selection and ALPN.

use std::fmt;
use std::sync::Arc;

use meshgate_model::snapshot::{ListenerTls, TlsCertificate};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("listener {listener}: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certs }));
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
