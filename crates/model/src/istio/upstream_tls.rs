//! DestinationRule `trafficPolicy.tls` (Istio's `ClientTLSSettings`) → TLS origination to a
//! cluster's endpoints. Files are read here, so a missing or malformed one is a config error
//! naming the field, and the last good config keeps serving.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::snapshot::{PemFile, UpstreamTls};

/// How serious a finding about the settings is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Level {
    Error,
    Warning,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    mode: Option<String>,
    client_certificate: Option<String>,
    private_key: Option<String>,
    ca_certificates: Option<String>,
    credential_name: Option<String>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    sni: Option<String>,
    insecure_skip_verify: Option<bool>,
    ca_crl: Option<String>,
}

/// The TLS settings of `value` (relative file paths are relative to `base`), or `None` for
/// plain text: no `tls`, mode `DISABLE`, or what cannot be honoured (reported).
pub(crate) fn settings(
    value: Option<&Value>,
    base: &Path,
    report: &mut dyn FnMut(&str, Level, String),
) -> Option<UpstreamTls> {
    let value = value?;
    let spec: Spec = match serde_path_to_error::deserialize(value) {
        Ok(s) => s,
        Err(e) => {
            report(&e.path().to_string(), Level::Error, e.into_inner().to_string());
            return None;
        }
    };
    // Istio's ClientTLSSettings.TLSmode defaults to DISABLE.
    let mode = spec.mode.as_deref().unwrap_or("DISABLE");
    let mutual = match mode {
        "DISABLE" => return None,
        "SIMPLE" => false,
        "MUTUAL" => true,
        "ISTIO_MUTUAL" => {
            report(
                "mode",
                Level::Warning,
                "ISTIO_MUTUAL needs the mesh's certificate authority, which a standalone proxy does not have: \
                 connections stay plain text"
                    .to_string(),
            );
            return None;
        }
        other => {
            report(
                "mode",
                Level::Error,
                format!("unknown tls mode {other:?} (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"),
            );
            return None;
        }
    };
    if spec.credential_name.is_some() {
        report(
            "credentialName",
            Level::Error,
            "credentialName names a Kubernetes Secret, which a standalone proxy cannot read; \
             give clientCertificate, privateKey and caCertificates files instead"
                .to_string(),
        );
        return None;
    }
    if spec.ca_crl.is_some() {
        report(
            "caCrl",
            Level::Warning,
            "certificate revocation lists are not supported yet, ignored".to_string(),
        );
    }
    for (i, san) in spec.subject_alt_names.iter().enumerate() {
        if san.contains("://") {
            report(
                &format!("subjectAltNames[{i}]"),
                Level::Error,
                format!("{san:?}: only DNS names and IP addresses can be checked (no URI SANs yet)"),
            );
            return None;
        }
        if let Err(e) = check_name(san) {
            report(&format!("subjectAltNames[{i}]"), Level::Error, e);
            return None;
        }
    }
    if let Some(sni) = spec.sni.as_deref().filter(|s| !s.is_empty())
        && let Err(e) = check_name(sni)
    {
        report("sni", Level::Error, e);
        return None;
    }
    let insecure_skip_verify = spec.insecure_skip_verify.unwrap_or(false);
    let mut ok = true;
    let mut read = |field: &str, value: Option<&str>, required: bool| -> Option<PemFile> {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            if required {
                report(field, Level::Error, format!("{field} is required with tls mode {mode}"));
                ok = false;
            }
            return None;
        };
        let path = base.join(value);
        match std::fs::read(&path) {
            Ok(pem) if pem.windows(10).any(|w| w == b"-----BEGIN") => Some(PemFile { path, pem }),
            Ok(_) => {
                report(field, Level::Error, format!("{} is not a PEM file", path.display()));
                ok = false;
                None
            }
            Err(e) => {
                report(field, Level::Error, format!("cannot read {}: {e}", path.display()));
                ok = false;
                None
            }
        }
    };
    let ca_certificates = if insecure_skip_verify {
        None
    } else {
        read("caCertificates", spec.ca_certificates.as_deref(), false)
    };
    let client_certificate = if mutual {
        let cert = read("clientCertificate", spec.client_certificate.as_deref(), true);
        let key = read("privateKey", spec.private_key.as_deref(), true);
        cert.zip(key)
    } else {
        None
    };
    if !ok {
        return None;
    }
    if !mutual && (spec.client_certificate.is_some() || spec.private_key.is_some()) {
        report(
            "clientCertificate",
            Level::Warning,
            "a client certificate is only presented with tls mode MUTUAL, ignored".to_string(),
        );
    }
    Some(UpstreamTls {
        sni: spec.sni.filter(|s| !s.is_empty()),
        subject_alt_names: spec.subject_alt_names,
        insecure_skip_verify,
        ca_certificates,
        client_certificate,
    })
}

/// A DNS name or IP address a certificate can be checked against (what rustls accepts as a
/// server name); a wildcard names no one host.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.contains('*') {
        return Err(format!("{name:?}: a wildcard names no one host; give the host name"));
    }
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("{name:?} is not a DNS name or IP address"));
    }
    Ok(())
}
