//! Gateways and the mesh listener: which sockets to open, their TLS, and which
//! VirtualService routes each one serves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::registry::{Registry, is_short};
use super::routes::{CompiledVs, GatewayRef};
use super::types::{GatewaySpec, Server, ServerTls};
use super::{Diag, Res, Resources, at};
use crate::CompileOptions;
use crate::diag::resource_name;
use crate::snapshot::{
    ClientCertificates, Forward, HeaderOps, Listener, ListenerFlavor, ListenerTls, PemFile, RetryPolicy, Route,
    RouteAction, RouteTable, Snapshot, TlsCertificate, TlsVersions, VirtualHost, WeightedDestination,
};
use crate::source::Document;

/// One served Gateway server, validated.
struct ServerInfo<'a> {
    doc: &'a Document,
    path: String,
    gateway: GatewayRef,
    /// `(namespace filter, host)`: `None` admits VirtualServices of any namespace.
    hosts: Vec<(Option<String>, String)>,
    port: u16,
    certificate: Option<TlsCertificate>,
    https_redirect: bool,
    /// `tls.minProtocolVersion` / `maxProtocolVersion` of an HTTPS server.
    tls_versions: TlsVersions,
    /// `MUTUAL` / `OPTIONAL_MUTUAL`: the CAs client certificates are verified against.
    client_certificates: Option<ClientCertificates>,
}

/// Warns about VirtualServices bound to the mesh that name a host an earlier one already
/// routes: sidecars use one VirtualService per host (the first), so the later rules are dead.
fn report_mesh_host_conflicts(vss: &[CompiledVs<'_>], diag: &mut Diag) {
    let mut owners: HashMap<&str, &Document> = HashMap::new();
    for vs in vss.iter().filter(|vs| vs.binds(&GatewayRef::Mesh)) {
        for (i, host) in vs.hosts.iter().enumerate() {
            match owners.get(host.as_str()) {
                Some(owner) if !std::ptr::eq(*owner, vs.doc) => diag.warn(
                    vs.doc,
                    format!("spec.hosts[{i}]"),
                    format!(
                        "{} already routes host {host} for the mesh; sidecars use one VirtualService per host, so this one's rules are ignored for it (istioctl: IST0109); merge them into one VirtualService",
                        resource_name(owner)
                    ),
                ),
                Some(_) => {}
                None => {
                    owners.insert(host.as_str(), vs.doc);
                }
            }
        }
    }
}

pub(crate) fn build(
    resources: &Resources<'_>,
    vss: &[CompiledVs<'_>],
    registry: &mut Registry<'_>,
    options: &CompileOptions,
    snapshot: &mut Snapshot,
    diag: &mut Diag,
) {
    report_mesh_host_conflicts(vss, diag);
    // Servers grouped by port, ports in order of first declaration.
    let mut ports: Vec<(u16, Vec<ServerInfo<'_>>)> = Vec::new();
    for gw in &resources.gateways {
        let selector = gw.spec.selector.clone().unwrap_or_default();
        if !super::registry::is_subset(&selector, &options.gateway_labels) {
            continue;
        }
        for (j, server) in gw.spec.servers.iter().enumerate() {
            let Some(info) = server_info(gw, j, server, diag) else {
                continue;
            };
            match ports.iter_mut().find(|(p, _)| *p == info.port) {
                Some((_, list)) => {
                    // One TLS configuration per port: its servers must all be TLS or all plain
                    // text, offer the same versions and ask for client certificates alike.
                    let same_client_auth = match (&list[0].client_certificates, &info.client_certificates) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a.required == b.required && a.ca.pem == b.ca.pem,
                        _ => false,
                    };
                    let tls = info.certificate.is_some();
                    let conflict = if list[0].certificate.is_some() != tls {
                        Some(("port.number", "mixes TLS and plain-text servers"))
                    } else if tls && !same_client_auth {
                        Some((
                            "tls.mode",
                            "has servers asking for client certificates differently (tls mode and caCertificates; per-server client verification is not supported yet)",
                        ))
                    } else if tls && list[0].tls_versions != info.tls_versions {
                        Some((
                            "tls.minProtocolVersion",
                            "has servers offering different TLS versions (per-server versions are not supported yet)",
                        ))
                    } else {
                        None
                    };
                    if let Some((field, problem)) = conflict {
                        diag.error(
                            info.doc,
                            at(&info.path, field),
                            format!(
                                "port {} {problem} (see {} {})",
                                info.port,
                                super::resource_name(list[0].doc),
                                list[0].path
                            ),
                        );
                        continue;
                    }
                    list.push(info);
                }
                None => ports.push((info.port, vec![info])),
            }
        }
    }
    for (port, servers) in ports {
        let mut table = RouteTable::default();
        bind(&servers, vss, port, &mut table);
        table.index();
        let versions = servers.first().map(|s| s.tls_versions).unwrap_or_default();
        let client_certificates = servers.first().and_then(|s| s.client_certificates.clone());
        let certificates: Vec<TlsCertificate> = servers.into_iter().filter_map(|s| s.certificate).collect();
        let tls = (!certificates.is_empty()).then(|| ListenerTls {
            certificates,
            alpn: vec!["h2".to_string(), "http/1.1".to_string()],
            versions,
            client_certificates,
        });
        snapshot.listeners.push(Listener {
            name: format!("0.0.0.0_{port}"),
            address: None,
            port,
            tls,
            routes: table,
            flavor: ListenerFlavor::Envoy,
        });
    }
    if let Some(port) = options.mesh_port {
        let routes = mesh_routes(vss, registry, port, diag);
        let address = options.mesh_address;
        snapshot.listeners.push(Listener {
            name: format!(
                "{}_{port}",
                address.map_or_else(|| "0.0.0.0".to_string(), |a| a.to_string())
            ),
            address,
            port,
            tls: None,
            routes,
            flavor: ListenerFlavor::Envoy,
        });
    }
}

fn server_info<'a>(gw: &Res<'a, GatewaySpec>, j: usize, server: &Server, diag: &mut Diag) -> Option<ServerInfo<'a>> {
    let doc = gw.doc;
    let path = format!("spec.servers[{j}]");
    let protocol = server.port.protocol.to_ascii_uppercase();
    let is_tls = match protocol.as_str() {
        "HTTP" | "HTTP2" | "GRPC" => false,
        "HTTPS" => true,
        other => {
            diag.warn(
                doc,
                at(&path, "port.protocol"),
                format!("protocol {other} is not supported yet, server ignored"),
            );
            return None;
        }
    };
    if server.hosts.is_empty() {
        diag.error(doc, at(&path, "hosts"), "at least one host is required");
        return None;
    }
    let hosts: Vec<(Option<String>, String)> = server
        .hosts
        .iter()
        .map(|h| match h.split_once('/') {
            Some(("*", host)) => (None, host.to_ascii_lowercase()),
            Some((".", host)) => (Some(doc.namespace.clone()), host.to_ascii_lowercase()),
            Some((ns, host)) => (Some(ns.to_string()), host.to_ascii_lowercase()),
            None => (None, h.to_ascii_lowercase()),
        })
        .collect();
    let tls_path = at(&path, "tls");
    let mut https_redirect = false;
    let mut certificate = None;
    let mut tls_versions = TlsVersions::default();
    let mut client_certificates = None;
    if is_tls {
        let Some(tls) = &server.tls else {
            diag.error(doc, tls_path, "HTTPS servers need tls settings");
            return None;
        };
        if tls.credential_name.is_some() || tls.credential_names.is_some() || tls.tls_certificates.is_some() {
            diag.error(
                doc,
                tls_path,
                "credentialName/credentialNames/tlsCertificates are not supported yet; use serverCertificate and privateKey files",
            );
            return None;
        }
        // Istio's TLSmode enum defaults to PASSTHROUGH.
        let mode = tls.mode.as_deref().unwrap_or("PASSTHROUGH");
        if !matches!(mode, "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") {
            diag.error(
                doc,
                at(&tls_path, "mode"),
                format!("tls mode {mode} is not supported yet (SIMPLE, MUTUAL, OPTIONAL_MUTUAL)"),
            );
            return None;
        }
        let ca_path = tls.ca_certificates.as_ref().and_then(serde_json::Value::as_str);
        if mode == "SIMPLE" {
            if tls.ca_certificates.is_some() {
                diag.warn(
                    doc,
                    at(&tls_path, "caCertificates"),
                    "has no effect with tls mode SIMPLE (client certificates are asked for with MUTUAL)",
                );
            }
        } else {
            let base = doc.file.parent().unwrap_or(Path::new("."));
            let (path, pem) = read_pem(doc, &tls_path, "caCertificates", ca_path, base, diag)?;
            client_certificates = Some(ClientCertificates {
                ca: PemFile { path, pem },
                required: mode == "MUTUAL",
            });
        }
        tls_versions = protocol_versions(doc, &tls_path, tls, diag)?;
        let base = doc.file.parent().unwrap_or(Path::new("."));
        let cert = read_pem(
            doc,
            &tls_path,
            "serverCertificate",
            tls.server_certificate.as_deref(),
            base,
            diag,
        );
        let key = read_pem(doc, &tls_path, "privateKey", tls.private_key.as_deref(), base, diag);
        let ((cert_path, cert_pem), (key_path, key_pem)) = (cert?, key?);
        certificate = Some(TlsCertificate {
            sni_hosts: hosts.iter().map(|(_, h)| h.clone()).collect(),
            cert_path,
            key_path,
            cert_pem,
            key_pem,
        });
    } else if let Some(tls) = &server.tls {
        https_redirect = tls.https_redirect.unwrap_or(false);
        // Only httpsRedirect means anything on a plain-text server; a certificate set here
        // would otherwise look as if it served TLS.
        let ignored: Vec<&str> = [
            ("mode", tls.mode.is_some()),
            ("serverCertificate", tls.server_certificate.is_some()),
            ("privateKey", tls.private_key.is_some()),
            ("caCertificates", tls.ca_certificates.is_some()),
            ("credentialName", tls.credential_name.is_some()),
            ("credentialNames", tls.credential_names.is_some()),
            ("tlsCertificates", tls.tls_certificates.is_some()),
            ("caCrl", tls.ca_crl.is_some()),
            ("subjectAltNames", tls.subject_alt_names.is_some()),
            ("verifyCertificateSpki", tls.verify_certificate_spki.is_some()),
            ("verifyCertificateHash", tls.verify_certificate_hash.is_some()),
            ("minProtocolVersion", tls.min_protocol_version.is_some()),
            ("maxProtocolVersion", tls.max_protocol_version.is_some()),
            ("cipherSuites", tls.cipher_suites.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, set)| set.then_some(field))
        .collect();
        if let Some(first) = ignored.first() {
            diag.warn(
                doc,
                at(&tls_path, first),
                format!(
                    "tls {} has no effect on a {protocol} server (only httpsRedirect does), ignored",
                    ignored.join(", ")
                ),
            );
        }
    }
    Some(ServerInfo {
        doc,
        path,
        gateway: GatewayRef::Named(doc.namespace.clone(), doc.name.clone()),
        hosts,
        port: server.port.number,
        certificate,
        https_redirect,
        tls_versions,
        client_certificates,
    })
}

/// The TLS versions an HTTPS server's `minProtocolVersion` and `maxProtocolVersion` leave.
/// meshgate's TLS (rustls) offers 1.2 and 1.3 only: a minimum below 1.2 means 1.2 (warning),
/// and a maximum below 1.2 leaves nothing (error). `None` when reported as an error.
fn protocol_versions(doc: &Document, tls_path: &str, tls: &ServerTls, diag: &mut Diag) -> Option<TlsVersions> {
    // Istio's names, as ordinals: 0 for TLS_AUTO (Envoy's default: 1.2 up to 1.3).
    let version = |field: &str, value: &Option<serde_json::Value>, diag: &mut Diag| -> Option<u8> {
        let Some(value) = value.as_ref().filter(|v| !v.is_null()) else {
            return Some(0);
        };
        match value.as_str() {
            Some("TLS_AUTO") => Some(0),
            Some("TLSV1_0") => Some(10),
            Some("TLSV1_1") => Some(11),
            Some("TLSV1_2") => Some(12),
            Some("TLSV1_3") => Some(13),
            _ => {
                diag.error(
                    doc,
                    at(tls_path, field),
                    format!("unknown TLS version {value} (TLS_AUTO, TLSV1_0, TLSV1_1, TLSV1_2, TLSV1_3)"),
                );
                None
            }
        }
    };
    let min = version("minProtocolVersion", &tls.min_protocol_version, diag);
    let max = version("maxProtocolVersion", &tls.max_protocol_version, diag);
    let (min, max) = (min?, max?);
    if min == 10 || min == 11 {
        diag.warn(
            doc,
            at(tls_path, "minProtocolVersion"),
            "TLS 1.0 and 1.1 are not offered (meshgate's TLS has 1.2 and 1.3 only): the minimum is TLS 1.2",
        );
    }
    if max == 10 || max == 11 {
        diag.error(
            doc,
            at(tls_path, "maxProtocolVersion"),
            "TLS 1.0 and 1.1 are not offered (meshgate's TLS has 1.2 and 1.3 only), so this maximum leaves no version",
        );
        return None;
    }
    match (min == 13, max == 12) {
        (true, true) => {
            diag.error(doc, at(tls_path, "minProtocolVersion"), "is above maxProtocolVersion");
            None
        }
        (true, false) => Some(TlsVersions::Tls13Only),
        (false, true) => Some(TlsVersions::Tls12Only),
        (false, false) => Some(TlsVersions::Tls12And13),
    }
}

/// Reads a PEM file named by `tls.<field>`; relative paths are relative to the YAML file.
fn read_pem(
    doc: &Document,
    tls_path: &str,
    field: &str,
    value: Option<&str>,
    base: &Path,
    diag: &mut Diag,
) -> Option<(PathBuf, Vec<u8>)> {
    let field_path = at(tls_path, field);
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        diag.error(doc, field_path, format!("{field} is required with this tls mode"));
        return None;
    };
    let path = base.join(value);
    match std::fs::read(&path) {
        Ok(bytes) if bytes.windows(10).any(|w| w == b"-----BEGIN") => Some((path, bytes)),
        Ok(_) => {
            diag.error(doc, field_path, format!("{} is not a PEM file", path.display()));
            None
        }
        Err(e) => {
            diag.error(doc, field_path, format!("cannot read {}: {e}", path.display()));
            None
        }
    }
}

/// Intersection of a VirtualService host and a Gateway server host, if they overlap.
pub(crate) fn intersect(a: &str, b: &str) -> Option<String> {
    if a == "*" {
        return Some(b.to_string());
    }
    if b == "*" {
        return Some(a.to_string());
    }
    let covers = |wild: &str, other: &str| {
        wild.strip_prefix('*')
            .is_some_and(|suffix| other.len() > suffix.len() && other.ends_with(suffix))
    };
    match (a.starts_with('*'), b.starts_with('*')) {
        _ if a == b => Some(a.to_string()),
        (true, _) if covers(a, b) => Some(b.to_string()),
        (_, true) if covers(b, a) => Some(a.to_string()),
        _ => None,
    }
}

/// Domains sharing routes: `(https_redirect, (VirtualService index, gateway)s, domains)`.
type DomainGroup = (bool, Vec<(usize, GatewayRef)>, Vec<String>);

/// Binds the VirtualServices to one listener's servers.
fn bind(servers: &[ServerInfo<'_>], vss: &[CompiledVs<'_>], port: u16, table: &mut RouteTable) {
    // domain → (https_redirect, contributing (VirtualService index, gateway)).
    let mut order: Vec<String> = Vec::new();
    let mut domains: HashMap<String, (bool, Vec<(usize, GatewayRef)>)> = HashMap::new();
    for server in servers {
        for (vi, vs) in vss.iter().enumerate() {
            if !vs.binds(&server.gateway) {
                continue;
            }
            for (ns_filter, server_host) in &server.hosts {
                if ns_filter.as_ref().is_some_and(|ns| *ns != vs.doc.namespace) {
                    continue;
                }
                for host in &vs.hosts {
                    let Some(domain) = intersect(host, server_host) else {
                        continue;
                    };
                    let entry = domains.entry(domain.clone()).or_insert_with(|| {
                        order.push(domain.clone());
                        (server.https_redirect, Vec::new())
                    });
                    if !entry.1.iter().any(|(i, _)| *i == vi) {
                        entry.1.push((vi, server.gateway.clone()));
                    }
                }
            }
        }
    }
    // Domains with the same routes share one virtual host.
    let mut groups: Vec<DomainGroup> = Vec::new();
    for domain in order {
        let Some((redirect, sources)) = domains.remove(&domain) else {
            continue;
        };
        match groups.iter_mut().find(|(r, s, _)| *r == redirect && *s == sources) {
            Some(group) => group.2.push(domain),
            None => groups.push((redirect, sources, vec![domain])),
        }
    }
    for (https_redirect, sources, domains) in groups {
        let routes = sources.iter().flat_map(|(vi, gw)| vss[*vi].routes_for(gw)).collect();
        table.virtual_hosts.push(VirtualHost {
            name: format!("{}:{port}", domains[0]),
            domains,
            routes,
            https_redirect,
        });
    }
}

/// The outbound (sidecar) listener: VirtualServices bound to `mesh`, then a default route
/// for every service host no VirtualService claims.
fn mesh_routes(vss: &[CompiledVs<'_>], registry: &mut Registry<'_>, port: u16, diag: &mut Diag) -> RouteTable {
    let mut table = RouteTable::default();
    let mut claimed: Vec<String> = Vec::new();
    for vs in vss {
        if !vs.binds(&GatewayRef::Mesh) {
            continue;
        }
        let mut domains = Vec::new();
        for host in &vs.hosts {
            let mut names = vec![host.clone()];
            if is_short(host) {
                let ns = &vs.doc.namespace;
                names.push(format!("{host}.{ns}"));
                names.push(format!("{host}.{ns}.svc"));
                names.push(format!("{host}.{ns}.svc.cluster.local"));
            }
            for n in names {
                if !claimed.contains(&n) {
                    claimed.push(n.clone());
                    domains.push(n);
                }
            }
        }
        if domains.is_empty() {
            continue;
        }
        table.virtual_hosts.push(VirtualHost {
            name: format!("{}:{port}", domains[0]),
            domains,
            routes: vs.routes_for(&GatewayRef::Mesh),
            https_redirect: false,
        });
    }
    let hosts: Vec<(String, u16)> = registry
        .services
        .iter()
        .filter_map(|s| s.ports.first().map(|p| (s.host.clone(), p.number)))
        .collect();
    for (host, number) in hosts {
        if claimed.contains(&host) {
            continue;
        }
        let Some(doc) = registry.service_doc(&host) else {
            continue;
        };
        let Some(cluster) = registry.cluster(doc, "spec.hosts", &host, Some(number), None, diag) else {
            continue;
        };
        table.virtual_hosts.push(VirtualHost {
            name: format!("{host}:{port}"),
            domains: vec![host.clone()],
            routes: vec![Route {
                name: format!("default/{host}"),
                matches: Vec::new(),
                action: RouteAction::Forward(Forward {
                    fault: None,
                    destinations: vec![WeightedDestination {
                        cluster,
                        weight: 100,
                        invalid: false,
                        request_headers: HeaderOps::default(),
                        response_headers: HeaderOps::default(),
                    }],
                    total_weight: 100,
                    rewrite: None,
                    timeout: None,
                    backend_timeout: None,
                    retry: Some(RetryPolicy::istio_default()),
                }),
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                mirrors: Vec::new(),
                cors: None,
                plugins: None,
            }],
            https_redirect: false,
        });
    }
    table.index();
    table
}
