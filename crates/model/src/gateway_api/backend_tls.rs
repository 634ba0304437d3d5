//! BackendTLSPolicy → TLS origination to the Services it targets: `validation.hostname` is the
//! server name sent and the name the certificate must be valid for (unless `subjectAltNames`
//! are given), against the CA certificates of ConfigMaps (`ca.crt`) or the system's roots
//! (`wellKnownCACertificates: System`). A policy that cannot be honoured (a CA reference that
//! does not resolve, a URI subject alt name) makes its backends invalid (HTTP 500, with a
//! warning), never plain text: the Gateway API forbids falling back. Malformed fields, which
//! the API server's schema would refuse, are errors.

use std::collections::HashMap;

use super::Resources;
use super::types::BackendTlsPolicySpec;
use crate::diag::{Diag, Res, at};
use crate::snapshot::{PemFile, UpstreamTls};

/// What a policy gives each target: `(namespace, Service, port name)` (no port name: every
/// port) → the TLS settings, or why its backends are invalid.
pub(crate) type Policies = HashMap<(String, String, Option<String>), Result<UpstreamTls, String>>;

/// Compiles every BackendTLSPolicy, reporting problems once; the oldest policy wins a target
/// two of them claim, as the Gateway API resolves policy conflicts.
pub(crate) fn compile(res: &Resources<'_>, diag: &mut Diag) -> Policies {
    let mut order: Vec<(usize, &Res<'_, BackendTlsPolicySpec>)> = res.backend_tls.iter().enumerate().collect();
    order.sort_by_key(|(seq, p)| super::creation_order(p.doc, *seq));
    let mut policies = Policies::new();
    for (_, policy) in order {
        let settings = settings(res, policy, diag);
        for (i, target) in policy.spec.target_refs.iter().enumerate() {
            if !target.group.is_empty() || target.kind != "Service" {
                diag.warn(
                    policy.doc,
                    format!("spec.targetRefs[{i}]"),
                    format!(
                        "only core Services can be targeted, not {}/{}",
                        target.group, target.kind
                    ),
                );
                continue;
            }
            let key = (
                policy.doc.namespace.clone(),
                target.name.clone(),
                target.section_name.clone().filter(|s| !s.is_empty()),
            );
            if policies.contains_key(&key) {
                diag.warn(
                    policy.doc,
                    format!("spec.targetRefs[{i}]"),
                    format!(
                        "Service {} is already targeted by an older BackendTLSPolicy; ignored",
                        target.name
                    ),
                );
                continue;
            }
            policies.insert(key, settings.clone());
        }
    }
    policies
}

fn settings(
    res: &Resources<'_>,
    policy: &Res<'_, BackendTlsPolicySpec>,
    diag: &mut Diag,
) -> Result<UpstreamTls, String> {
    let (doc, validation) = (policy.doc, &policy.spec.validation);
    let path = "spec.validation";
    let invalid = |why: String| format!("BackendTLSPolicy {}/{}: {why}", doc.namespace, doc.name);
    let hostname = crate::istio::upstream_tls::check_name(&validation.hostname).and_then(|()| {
        match validation.hostname.parse::<std::net::IpAddr>() {
            Ok(_) => Err("must be a fully qualified domain name, not an IP address".to_string()),
            Err(_) => Ok(()),
        }
    });
    if let Err(e) = hostname {
        diag.error(doc, at(path, "hostname"), e.clone());
        return Err(invalid(e));
    }
    let mut subject_alt_names = Vec::new();
    for (i, san) in validation.subject_alt_names.iter().enumerate() {
        let field = format!("{path}.subjectAltNames[{i}]");
        match (san.kind.as_str(), san.hostname.as_deref()) {
            ("Hostname", Some(name)) => match crate::istio::upstream_tls::check_name(name) {
                Ok(()) => subject_alt_names.push(name.to_string()),
                Err(e) => {
                    diag.error(doc, at(&field, "hostname"), e.clone());
                    return Err(invalid(e));
                }
            },
            ("URI", _) => {
                let e = "URI subject alt names cannot be checked yet".to_string();
                diag.warn(doc, field, e.clone());
                return Err(invalid(e));
            }
            (kind, _) => {
                let e = format!("type {kind:?} needs its value (Hostname with hostname, URI with uri)");
                diag.error(doc, field, e.clone());
                return Err(invalid(e));
            }
        }
    }
    let ca_certificates = match (
        validation.ca_certificate_refs.is_empty(),
        validation.well_known_ca_certificates.as_deref(),
    ) {
        (true, Some("System")) => None,
        (false, None) => {
            let mut pem = String::new();
            for (i, r) in validation.ca_certificate_refs.iter().enumerate() {
                let field = format!("{path}.caCertificateRefs[{i}]");
                let cert = (r.group.is_empty() && r.kind == "ConfigMap")
                    .then(|| res.config_maps.get(&(doc.namespace.clone(), r.name.clone())))
                    .flatten()
                    .and_then(|c| c.spec.data.get("ca.crt"))
                    .filter(|c| decodes_as_certificates(c));
                match cert {
                    Some(cert) => {
                        pem.push_str(cert);
                        pem.push('\n');
                    }
                    None => {
                        // An unresolved reference is the policy's status (ResolvedRefs false),
                        // not a configuration error: its backends answer 500.
                        let e = format!(
                            "{} {} has no PEM certificate under ca.crt in namespace {}",
                            r.kind, r.name, doc.namespace
                        );
                        diag.warn(doc, field, e.clone());
                        return Err(invalid(e));
                    }
                }
            }
            Some(PemFile {
                path: std::path::PathBuf::from(format!("{}#{path}.caCertificateRefs", doc.file.display())),
                pem: pem.into_bytes(),
            })
        }
        (true, Some(other)) => {
            let e = format!("wellKnownCACertificates {other:?} is not known (System)");
            diag.error(doc, at(path, "wellKnownCACertificates"), e.clone());
            return Err(invalid(e));
        }
        _ => {
            let e = "exactly one of caCertificateRefs and wellKnownCACertificates is required".to_string();
            diag.error(doc, path.to_string(), e.clone());
            return Err(invalid(e));
        }
    };
    if policy
        .spec
        .options
        .as_ref()
        .is_some_and(|o| o.as_object().is_some_and(|m| !m.is_empty()))
    {
        diag.warn(doc, "spec.options", "no options are implemented; ignored");
    }
    Ok(UpstreamTls {
        sni: Some(validation.hostname.clone()),
        subject_alt_names,
        insecure_skip_verify: false,
        ca_certificates,
        client_certificate: None,
    })
}

/// Whether `pem` holds at least one CERTIFICATE block and every one decodes to DER (a
/// SEQUENCE): a CA that cannot be read makes the policy's backends invalid here, rather than
/// failing the whole configuration when the proxy builds its TLS settings.
fn decodes_as_certificates(pem: &str) -> bool {
    use base64::Engine;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut rest = pem;
    let mut found = false;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let Some(end) = after.find(END) else {
            return false;
        };
        let body: String = after[..end].chars().filter(|c| !c.is_whitespace()).collect();
        match base64::engine::general_purpose::STANDARD.decode(body) {
            Ok(der) if der.first() == Some(&0x30) && der.len() > 16 => found = true,
            _ => return false,
        }
        rest = &after[end + END.len()..];
    }
    found
}
