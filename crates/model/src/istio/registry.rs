//! The service registry (ServiceEntry + WorkloadEntry), DestinationRules, and the clusters
//! built from them on demand.
//!
//! Clusters are only created for destinations that routes reference (plus the mesh default
//! routes), named as Istio names Envoy clusters: `outbound|PORT|SUBSET|HOST`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::types::{
    ConnectionPool, DestinationRuleSpec, HttpCookie, Labels, LoadBalancerSettings, ServicePort, TrafficPolicy,
    WorkloadEntrySpec,
};
use super::{Diag, Res, Resources, at};
use crate::snapshot::{
    Cluster, ClusterId, CookieKey, Discovery, Endpoint, GeneratedCookie, GeneratedCookieValue, HashKey, LoadBalancer,
    UpstreamProtocol,
};
use crate::source::Document;

/// Kubernetes' cluster domain, used to expand short host names.
const DOMAIN_SUFFIX: &str = "svc.cluster.local";

/// `reviews` in namespace `ns` → `reviews.ns.svc.cluster.local`; other names unchanged.
pub(crate) fn expand_short(host: &str, namespace: &str) -> String {
    if is_short(host) {
        format!("{host}.{namespace}.{DOMAIN_SUFFIX}")
    } else {
        host.to_string()
    }
}

pub(crate) fn is_short(host: &str) -> bool {
    !host.contains('.') && !host.contains('*')
}

struct ServiceEndpoint {
    address: String,
    ports: BTreeMap<String, u16>,
    labels: Labels,
    weight: u32,
}

pub(crate) struct Service<'r> {
    doc: &'r Document,
    pub host: String,
    pub ports: Vec<ServicePort>,
    discovery: Discovery,
    endpoints: Vec<ServiceEndpoint>,
}

struct Rule<'r> {
    res: &'r Res<'r, DestinationRuleSpec>,
    /// `spec.host`, lower-cased, short names expanded in the rule's namespace.
    host: String,
}

/// The settings of a cluster that come from its DestinationRule.
pub(crate) struct ClusterPolicy {
    pub load_balancer: LoadBalancer,
    /// `loadBalancer.simple: PASSTHROUGH`: connect to the request's original destination.
    pub passthrough: bool,
    /// `connectionPool.http.h2UpgradePolicy: UPGRADE`.
    pub upgrade_to_http2: bool,
    pub pool: crate::snapshot::ConnectionPoolSettings,
    pub outlier: Option<crate::snapshot::OutlierDetection>,
    pub health_check: Option<crate::snapshot::HealthCheck>,
    pub tls: Option<crate::snapshot::UpstreamTls>,
}

pub(crate) struct Registry<'r> {
    pub services: Vec<Service<'r>>,
    by_host: HashMap<String, usize>,
    rules: Vec<Rule<'r>>,
    clusters: Vec<Cluster>,
    cluster_ids: HashMap<String, ClusterId>,
}

impl<'r> Registry<'r> {
    pub(crate) fn build(resources: &'r Resources<'r>, diag: &mut Diag) -> Self {
        let mut registry = Registry {
            services: Vec::new(),
            by_host: HashMap::new(),
            rules: Vec::new(),
            clusters: Vec::new(),
            cluster_ids: HashMap::new(),
        };
        for se in &resources.service_entries {
            registry.add_service_entry(se, resources, diag);
        }
        for dr in &resources.destination_rules {
            validate_destination_rule(dr, diag);
            let host = expand_short(&dr.spec.host.to_ascii_lowercase(), &dr.doc.namespace);
            if dr.spec.host.is_empty() {
                diag.error(dr.doc, "spec.host", "host is required");
                continue;
            }
            registry.rules.push(Rule { res: dr, host });
        }
        registry
    }

    fn add_service_entry(
        &mut self,
        se: &'r Res<'r, super::types::ServiceEntrySpec>,
        resources: &'r Resources<'r>,
        diag: &mut Diag,
    ) {
        let (doc, spec) = (se.doc, &se.spec);
        if spec.hosts.is_empty() {
            diag.error(doc, "spec.hosts", "at least one host is required");
        }
        if spec.ports.is_empty() {
            diag.error(doc, "spec.ports", "at least one port is required");
        }
        if let Some(loc) = &spec.location
            && !matches!(loc.as_str(), "MESH_EXTERNAL" | "MESH_INTERNAL")
        {
            diag.error(
                doc,
                "spec.location",
                format!("unknown location {loc:?} (MESH_EXTERNAL or MESH_INTERNAL)"),
            );
        }
        let discovery = match spec.resolution.as_deref().unwrap_or("NONE") {
            "NONE" => Discovery::OriginalDestination,
            "STATIC" => Discovery::Static,
            "DNS" | "DNS_ROUND_ROBIN" => Discovery::Dns,
            other => {
                diag.error(
                    doc,
                    "spec.resolution",
                    format!("unknown resolution {other:?} (NONE, STATIC, DNS or DNS_ROUND_ROBIN)"),
                );
                Discovery::OriginalDestination
            }
        };
        if discovery == Discovery::OriginalDestination
            && (!spec.endpoints.is_empty() || spec.workload_selector.is_some())
        {
            diag.warn(
                doc,
                "spec.resolution",
                "resolution NONE (the default) forwards to the address the client asked for; the listed endpoints are not used (set STATIC or DNS to use them)",
            );
        }
        // Endpoints: inline ones, then WorkloadEntries selected in the same namespace.
        let mut sources: Vec<(&Document, String, &WorkloadEntrySpec)> = spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (doc, format!("spec.endpoints[{i}]"), e))
            .collect();
        if let Some(selector) = &spec.workload_selector {
            let wanted = selector.labels.clone().unwrap_or_default();
            for we in &resources.workload_entries {
                let labels = we.spec.labels.clone().unwrap_or_default();
                if we.doc.namespace == doc.namespace && is_subset(&wanted, &labels) {
                    sources.push((we.doc, "spec".to_string(), &we.spec));
                }
            }
        }
        let mut endpoints = Vec::new();
        for (src_doc, path, ep) in sources {
            let Some(address) = ep.address.clone().filter(|a| !a.is_empty()) else {
                diag.error(src_doc, at(&path, "address"), "address is required");
                continue;
            };
            if discovery == Discovery::Static && address.parse::<IpAddr>().is_err() {
                diag.error(
                    src_doc,
                    at(&path, "address"),
                    format!(
                        "address {address:?} must be an IP address with resolution STATIC (use DNS for host names)"
                    ),
                );
                continue;
            }
            endpoints.push(ServiceEndpoint {
                address,
                ports: ep.ports.clone().unwrap_or_default(),
                labels: ep.labels.clone().unwrap_or_default(),
                weight: ep.weight.unwrap_or(1),
            });
        }
        for (i, host) in spec.hosts.iter().enumerate() {
            let host = host.to_ascii_lowercase();
            if host.is_empty() {
                diag.error(doc, format!("spec.hosts[{i}]"), "host must not be empty");
                continue;
            }
            if self.by_host.contains_key(&host) {
                diag.warn(
                    doc,
                    format!("spec.hosts[{i}]"),
                    format!("host {host} is already defined by an earlier ServiceEntry; this definition is ignored"),
                );
                continue;
            }
            // With DNS resolution and no endpoints, the host name itself is resolved.
            let own = if discovery == Discovery::Dns && endpoints.is_empty() && !host.contains('*') {
                vec![ServiceEndpoint {
                    address: host.clone(),
                    ports: BTreeMap::new(),
                    labels: Labels::new(),
                    weight: 1,
                }]
            } else {
                endpoints
                    .iter()
                    .map(|e| ServiceEndpoint {
                        address: e.address.clone(),
                        ports: e.ports.clone(),
                        labels: e.labels.clone(),
                        weight: e.weight,
                    })
                    .collect()
            };
            self.by_host.insert(host.clone(), self.services.len());
            self.services.push(Service {
                doc,
                host,
                ports: spec.ports.clone(),
                discovery,
                endpoints: own,
            });
        }
    }

    /// Finds the service for a destination host written in namespace `namespace`:
    /// the exact host first, then the expanded short name.
    pub(crate) fn resolve(&self, host: &str, namespace: &str) -> Option<usize> {
        let host = host.to_ascii_lowercase();
        self.by_host
            .get(&host)
            .or_else(|| {
                is_short(&host)
                    .then(|| self.by_host.get(&expand_short(&host, namespace)))
                    .flatten()
            })
            .copied()
    }

    /// The most specific DestinationRule for `host`: exact, then longest wildcard suffix,
    /// then `*`; the first declared wins a tie.
    fn rule_for(&self, host: &str) -> Option<&Rule<'r>> {
        let mut best: Option<(usize, &Rule<'r>)> = None;
        for rule in &self.rules {
            let score = if rule.host == host {
                usize::MAX
            } else if rule.host == "*" {
                0
            } else if let Some(suffix) = rule.host.strip_prefix('*') {
                if host.len() > suffix.len() && host.ends_with(suffix) {
                    suffix.len()
                } else {
                    continue;
                }
            } else {
                continue;
            };
            if best.is_none_or(|(s, _)| score > s) {
                best = Some((score, rule));
            }
        }
        best.map(|(_, r)| r)
    }

    /// Returns the cluster for a route destination, creating it on first use. `field` is the
    /// path of the destination (`spec.http[0].route[1].destination`) for findings.
    pub(crate) fn cluster(
        &mut self,
        doc: &Document,
        field: &str,
        host: &str,
        port: Option<u16>,
        subset: Option<&str>,
        diag: &mut Diag,
    ) -> Option<ClusterId> {
        let subset = subset.unwrap_or("");
        let (svc_host, svc_port, protocol, discovery, endpoints) = match self.resolve(host, &doc.namespace) {
            Some(i) => {
                let svc = &self.services[i];
                let svc_port = match port {
                    Some(n) => match svc.ports.iter().find(|p| p.number == n) {
                        Some(p) => p.clone(),
                        None => {
                            let known: Vec<String> = svc.ports.iter().map(|p| p.number.to_string()).collect();
                            diag.error(
                                doc,
                                at(field, "port.number"),
                                format!("service {} has no port {n} (ports: {})", svc.host, known.join(", ")),
                            );
                            return None;
                        }
                    },
                    None => match svc.ports.as_slice() {
                        [only] => only.clone(),
                        [] => {
                            diag.error(doc, field, format!("service {} has no ports", svc.host));
                            return None;
                        }
                        _ => {
                            diag.error(
                                doc,
                                at(field, "port"),
                                format!("service {} has several ports; the destination must name one", svc.host),
                            );
                            return None;
                        }
                    },
                };
                let endpoints: Vec<Endpoint> = svc
                    .endpoints
                    .iter()
                    .map(|e| Endpoint {
                        address: e.address.clone(),
                        port: svc_port
                            .name
                            .as_ref()
                            .and_then(|n| e.ports.get(n).copied())
                            .or(svc_port.target_port)
                            .unwrap_or(svc_port.number),
                        weight: e.weight,
                        labels: e.labels.clone(),
                    })
                    .collect();
                (
                    svc.host.clone(),
                    svc_port.number,
                    port_protocol(&svc_port),
                    svc.discovery,
                    endpoints,
                )
            }
            None => {
                let host = host.to_ascii_lowercase();
                let number = port.unwrap_or(80);
                let endpoint = Endpoint {
                    address: host.clone(),
                    port: number,
                    weight: 1,
                    labels: BTreeMap::new(),
                };
                (host, number, UpstreamProtocol::Http1, Discovery::Dns, vec![endpoint])
            }
        };
        let name = format!("outbound|{svc_port}|{subset}|{svc_host}");
        if let Some(&id) = self.cluster_ids.get(&name) {
            return Some(id);
        }
        if self.resolve(host, &doc.namespace).is_none() {
            diag.warn(
                doc,
                at(field, "host"),
                format!("no ServiceEntry defines host {svc_host}; it will be resolved by DNS"),
            );
        }
        let rule_host = expand_short(&svc_host, &doc.namespace);
        let rule = self.rule_for(&rule_host).map(|r| r.res);
        let subset_spec = if subset.is_empty() {
            None
        } else {
            match rule.and_then(|r| r.spec.subsets.iter().find(|s| s.name == subset)) {
                Some(s) => Some(s),
                None => {
                    diag.error(
                        doc,
                        at(field, "subset"),
                        format!("subset {subset:?} is not defined by any DestinationRule for host {svc_host}"),
                    );
                    return None;
                }
            }
        };
        let policy = self.policy(rule, subset_spec, &svc_host, svc_port);
        let protocol = if policy.upgrade_to_http2 {
            UpstreamProtocol::Http2
        } else {
            protocol
        };
        let endpoints = match subset_spec {
            Some(s) => {
                let wanted = s.labels.clone().unwrap_or_default();
                endpoints
                    .into_iter()
                    .filter(|e| is_subset(&wanted, &e.labels))
                    .collect()
            }
            None => endpoints,
        };
        let id = self.clusters.len();
        self.clusters.push(Cluster {
            name: name.clone(),
            service: svc_host,
            subset: subset.to_string(),
            port: svc_port,
            protocol,
            load_balancer: policy.load_balancer,
            discovery: if policy.passthrough {
                Discovery::OriginalDestination
            } else {
                discovery
            },
            endpoints,
            pool: policy.pool,
            outlier: policy.outlier,
            health_check: policy.health_check,
            tls: policy.tls,
        });
        self.cluster_ids.insert(name, id);
        Some(id)
    }

    /// The traffic policy the DestinationRule for `host` (a full name) gives a Kubernetes
    /// Service's `port`: the Gateway API's backends use the same rules as Istio routes.
    pub(crate) fn service_policy(&self, host: &str, port: u16) -> ClusterPolicy {
        let rule = self.rule_for(host).map(|r| r.res);
        self.policy(rule, None, host, port)
    }

    /// What `rule` (and its `subset_spec`) set for `svc_host`'s `svc_port`.
    fn policy(
        &self,
        rule: Option<&Res<'r, DestinationRuleSpec>>,
        subset_spec: Option<&crate::istio::types::Subset>,
        svc_host: &str,
        svc_port: u16,
    ) -> ClusterPolicy {
        // Precedence: subset port-level > subset > rule port-level > rule.
        let mut chain: Vec<&TrafficPolicy> = Vec::new();
        if let Some(tp) = subset_spec.and_then(|s| s.traffic_policy.as_ref()) {
            chain.push(tp);
        }
        if let Some(tp) = rule.and_then(|r| r.spec.traffic_policy.as_ref()) {
            chain.push(tp);
        }
        let mut lb_chain: Vec<&LoadBalancerSettings> = Vec::new();
        let mut pool_chain: Vec<&ConnectionPool> = Vec::new();
        let mut outlier_chain: Vec<&serde_json::Value> = Vec::new();
        let mut tls_chain: Vec<&serde_json::Value> = Vec::new();
        for tp in chain {
            if let Some(pl) = tp
                .port_level_settings
                .iter()
                .flatten()
                .find(|p| p.port.as_ref().and_then(|p| p.number) == Some(svc_port))
            {
                lb_chain.extend(pl.load_balancer.as_ref());
                pool_chain.extend(pl.connection_pool.as_ref());
                outlier_chain.extend(pl.outlier_detection.as_ref());
                tls_chain.extend(pl.tls.as_ref());
            }
            lb_chain.extend(tp.load_balancer.as_ref());
            pool_chain.extend(tp.connection_pool.as_ref());
            outlier_chain.extend(tp.outlier_detection.as_ref());
            tls_chain.extend(tp.tls.as_ref());
        }
        // Problems were reported by the DestinationRule's validation; they leave TLS off.
        let tls = rule.and_then(|r| {
            let base = r.doc.file.parent().unwrap_or(std::path::Path::new("."));
            let mut tls = super::upstream_tls::settings(tls_chain.first().copied(), base, &mut |_, _, _| {})?;
            // As Istio: without subjectAltNames of its own, a rule for a ServiceEntry host checks
            // the names the ServiceEntry lists (DNS names and IPs; URI SANs are for Istio mTLS,
            // and wildcards name no one host).
            if tls.subject_alt_names.is_empty() && !tls.insecure_skip_verify {
                tls.subject_alt_names = self
                    .service_doc(svc_host)
                    .and_then(|d| d.body.pointer("/spec/subjectAltNames"))
                    .and_then(serde_json::Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_str)
                    .filter(|san| !san.contains("://") && super::upstream_tls::check_name(san).is_ok())
                    .map(str::to_string)
                    .collect();
            }
            Some(tls)
        });
        let outlier = super::outlier::settings(outlier_chain.first().copied(), &mut |_, _| {});
        let (load_balancer, passthrough) = lb_chain
            .first()
            .map_or((LoadBalancer::LeastRequest, false), |lb| load_balancer(lb));
        let upgrade = pool_chain
            .first()
            .and_then(|p| p.http.as_ref())
            .and_then(|h| h.h2_upgrade_policy.as_deref())
            == Some("UPGRADE");
        // Invalid fields were reported by the DestinationRule's validation; they keep defaults.
        let pool = super::pool::settings(pool_chain.first().copied(), &mut |_, _| {});
        ClusterPolicy {
            load_balancer,
            passthrough,
            upgrade_to_http2: upgrade,
            pool,
            outlier,
            health_check: rule.and_then(|r| health_check_annotation(r.doc)),
            tls,
        }
    }

    /// The ServiceEntry that defined `host`.
    pub(crate) fn service_doc(&self, host: &str) -> Option<&'r Document> {
        self.by_host.get(host).map(|&i| self.services[i].doc)
    }

    /// Adds a cluster built elsewhere (Gateway API backends), or returns the id of the
    /// cluster that already has its name: clusters are shared by name across input formats.
    pub(crate) fn add_cluster(&mut self, cluster: Cluster) -> ClusterId {
        if let Some(&id) = self.cluster_ids.get(&cluster.name) {
            return id;
        }
        let id = self.clusters.len();
        self.cluster_ids.insert(cluster.name.clone(), id);
        self.clusters.push(cluster);
        id
    }

    pub(crate) fn cluster_id(&self, name: &str) -> Option<ClusterId> {
        self.cluster_ids.get(name).copied()
    }

    pub(crate) fn has_cluster(&self, name: &str) -> bool {
        self.cluster_ids.contains_key(name)
    }

    pub(crate) fn cluster_mut(&mut self, id: ClusterId) -> Option<&mut Cluster> {
        self.clusters.get_mut(id)
    }

    pub(crate) fn take_clusters(&mut self) -> Vec<Cluster> {
        std::mem::take(&mut self.clusters)
    }
}

/// `wanted ⊆ labels`.
pub(crate) fn is_subset(wanted: &Labels, labels: &Labels) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Istio's protocol selection: the declared protocol, else the port name's prefix.
fn port_protocol(port: &ServicePort) -> UpstreamProtocol {
    let is_h2 = |p: &str| matches!(p.to_ascii_uppercase().as_str(), "HTTP2" | "GRPC" | "GRPC-WEB");
    let by_protocol = port.protocol.as_deref().is_some_and(is_h2);
    let by_name = port.name.as_deref().is_some_and(|n| {
        let n = n.to_ascii_lowercase();
        ["http2", "grpc", "grpc-web"]
            .iter()
            .any(|p| n == *p || n.starts_with(&format!("{p}-")))
    });
    if by_protocol || by_name {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Http1
    }
}

/// Maps validated settings; returns whether `PASSTHROUGH` was asked for. Istio's default
/// (absent or `UNSPECIFIED`) is `LEAST_REQUEST`; `LEAST_CONN` is its deprecated alias.
fn load_balancer(lb: &LoadBalancerSettings) -> (LoadBalancer, bool) {
    if let Some(ch) = &lb.consistent_hash {
        let key = if let Some(h) = &ch.http_header_name {
            HashKey::Header(h.to_ascii_lowercase())
        } else if let Some(c) = &ch.http_cookie {
            HashKey::Cookie(cookie_key(c))
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashKey::QueryParameter(q.clone())
        } else {
            HashKey::SourceIp
        };
        return (LoadBalancer::ConsistentHash(key), false);
    }
    match lb.simple.as_deref() {
        Some("ROUND_ROBIN") => (LoadBalancer::RoundRobin, false),
        Some("RANDOM") => (LoadBalancer::Random, false),
        Some("PASSTHROUGH") => (LoadBalancer::LeastRequest, true),
        _ => (LoadBalancer::LeastRequest, false),
    }
}

/// Envoy's hash cookie: with a `ttl`, a request without the cookie gets one
/// (`name="<digest>"; Max-Age=<ttl>; Path=<path>; <attributes>; HttpOnly`); a zero `ttl` makes
/// it a session cookie (no `Max-Age`). Without `ttl` the cookie is only read.
fn cookie_key(cookie: &HttpCookie) -> CookieKey {
    let ttl = cookie.ttl.as_deref().and_then(|t| crate::duration::parse(t).ok());
    let Some(ttl) = ttl else {
        return CookieKey::read_only(cookie.name.clone());
    };
    let mut attributes = String::new();
    // Envoy keeps whole seconds.
    if ttl.as_secs() > 0 {
        attributes.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if let Some(path) = cookie.path.as_deref().filter(|p| !p.is_empty()) {
        attributes.push_str(&format!("; Path={path}"));
    }
    for a in &cookie.attributes {
        if a.value.is_empty() {
            attributes.push_str(&format!("; {}", a.name));
        } else {
            attributes.push_str(&format!("; {}={}", a.name, a.value));
        }
    }
    attributes.push_str("; HttpOnly");
    CookieKey {
        name: cookie.name.clone(),
        generate: Some(GeneratedCookie {
            value: GeneratedCookieValue::ConnectionDigest,
            attributes,
        }),
    }
}

/// Errors in an `httpCookie` that would make a malformed `Set-Cookie` or `Cookie` lookup.
fn validate_http_cookie(doc: &Document, path: &str, cookie: &HttpCookie, diag: &mut Diag) {
    let token = CookieKey::is_valid_name;
    let attribute_text = |s: &str| s.bytes().all(|b| (b.is_ascii_graphic() || b == b' ') && b != b';');
    if !token(&cookie.name) {
        diag.error(
            doc,
            at(path, "name"),
            format!("{:?} is not a valid cookie name", cookie.name),
        );
    }
    match cookie.ttl.as_deref().map(crate::duration::parse) {
        Some(Err(e)) => diag.error(doc, at(path, "ttl"), e),
        Some(Ok(_)) => {}
        None => diag.warn(
            doc,
            at(path, "ttl"),
            "not set: Istio requires it; without it meshgate only reads the cookie and never sets it",
        ),
    }
    if let Some(p) = cookie.path.as_deref()
        && !attribute_text(p)
    {
        diag.error(
            doc,
            at(path, "path"),
            format!("{p:?} cannot be a cookie path (no ';' or control characters)"),
        );
    }
    for (i, a) in cookie.attributes.iter().enumerate() {
        let field = format!("{path}.attributes[{i}]");
        if !token(&a.name) {
            diag.error(
                doc,
                at(&field, "name"),
                format!("{:?} is not a valid cookie attribute name", a.name),
            );
        }
        if !attribute_text(&a.value) {
            diag.error(
                doc,
                at(&field, "value"),
                format!("{:?} cannot be a cookie attribute value", a.value),
            );
        }
    }
}

fn validate_destination_rule(dr: &Res<'_, DestinationRuleSpec>, diag: &mut Diag) {
    validate_health_check_annotation(dr.doc, diag);
    if let Some(tp) = &dr.spec.traffic_policy {
        validate_policy(dr.doc, "spec.trafficPolicy", tp, diag);
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, subset) in dr.spec.subsets.iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        if subset.name.is_empty() {
            diag.error(dr.doc, at(&path, "name"), "subset name is required");
        }
        if let Some(first) = names.insert(subset.name.as_str(), i) {
            diag.error(
                dr.doc,
                at(&path, "name"),
                format!("duplicate subset name {:?} (also spec.subsets[{first}])", subset.name),
            );
        }
        if let Some(tp) = &subset.traffic_policy {
            validate_policy(dr.doc, &at(&path, "trafficPolicy"), tp, diag);
        }
    }
}

/// The DestinationRule annotation configuring active health checks (a meshgate extension:
/// Istio has no such field, and unknown `spec` fields would be rejected by Istio's schema).
pub(crate) const HEALTH_CHECK_ANNOTATION: &str = "meshgate.io/health-check";

fn health_check_annotation(doc: &Document) -> Option<crate::snapshot::HealthCheck> {
    let text = doc
        .body
        .pointer("/metadata/annotations")?
        .get(HEALTH_CHECK_ANNOTATION)?
        .as_str()?;
    serde_json::from_str(text).ok()
}

/// Reports a malformed health-check annotation (the registry then leaves health checks off).
pub(crate) fn validate_health_check_annotation(doc: &Document, diag: &mut Diag) {
    let Some(value) = doc
        .body
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(HEALTH_CHECK_ANNOTATION))
    else {
        return;
    };
    let field = format!("metadata.annotations.{HEALTH_CHECK_ANNOTATION}");
    let Some(text) = value.as_str() else {
        diag.error(doc, field, "must be a JSON string");
        return;
    };
    match serde_json::from_str::<crate::snapshot::HealthCheck>(text) {
        Ok(h) if h.interval.is_zero() || h.timeout.is_zero() => {
            diag.error(doc, field, "interval and timeout must be above 0")
        }
        Ok(h) if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 => {
            diag.error(doc, field, "healthyThreshold and unhealthyThreshold must be at least 1")
        }
        Ok(_) => {}
        Err(e) => diag.error(doc, field, format!("invalid health check: {e}")),
    }
}

fn validate_policy(doc: &Document, path: &str, tp: &TrafficPolicy, diag: &mut Diag) {
    let check = |path: &str, lb: Option<&LoadBalancerSettings>, pool: Option<&ConnectionPool>, diag: &mut Diag| {
        if let Some(lb) = lb {
            let lb_path = at(path, "loadBalancer");
            if let Some(s) = &lb.simple {
                let known = [
                    "UNSPECIFIED",
                    "ROUND_ROBIN",
                    "LEAST_CONN",
                    "LEAST_REQUEST",
                    "RANDOM",
                    "PASSTHROUGH",
                ];
                if !known.contains(&s.as_str()) {
                    diag.error(
                        doc,
                        at(&lb_path, "simple"),
                        format!("unknown load balancer {s:?} ({})", known.join(", ")),
                    );
                }
            }
            if let Some(ch) = &lb.consistent_hash {
                let set = [
                    ch.http_header_name.is_some(),
                    ch.http_cookie.is_some(),
                    ch.use_source_ip == Some(true),
                    ch.http_query_parameter_name.is_some(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if set != 1 {
                    diag.error(
                        doc,
                        at(&lb_path, "consistentHash"),
                        "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName is required",
                    );
                }
                if lb.simple.is_some() {
                    diag.error(doc, lb_path.clone(), "simple and consistentHash are mutually exclusive");
                }
                if let Some(cookie) = &ch.http_cookie {
                    validate_http_cookie(doc, &at(&at(&lb_path, "consistentHash"), "httpCookie"), cookie, diag);
                }
            }
        }
        if let Some(policy) = pool
            .and_then(|p| p.http.as_ref())
            .and_then(|h| h.h2_upgrade_policy.as_deref())
            && !matches!(policy, "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE")
        {
            diag.error(
                doc,
                at(path, "connectionPool.http.h2UpgradePolicy"),
                format!("unknown h2UpgradePolicy {policy:?} (DEFAULT, DO_NOT_UPGRADE, UPGRADE)"),
            );
        }
        if pool.is_some() {
            let pool_path = at(path, "connectionPool");
            super::pool::settings(pool, &mut |field, message| {
                diag.error(doc, at(&pool_path, field), message)
            });
        }
    };
    check(path, tp.load_balancer.as_ref(), tp.connection_pool.as_ref(), diag);
    let check_outlier = |path: &str, value: Option<&serde_json::Value>, diag: &mut Diag| {
        let outlier_path = at(path, "outlierDetection");
        super::outlier::settings(value, &mut |field, message| {
            diag.error(doc, at(&outlier_path, field), message)
        });
    };
    check_outlier(path, tp.outlier_detection.as_ref(), diag);
    let check_tls = |path: &str, value: Option<&serde_json::Value>, diag: &mut Diag| {
        let tls_path = at(path, "tls");
        let base = doc.file.parent().unwrap_or(std::path::Path::new("."));
        super::upstream_tls::settings(value, base, &mut |field, level, message| {
            let field = at(&tls_path, field);
            match level {
                super::upstream_tls::Level::Error => diag.error(doc, field, message),
                super::upstream_tls::Level::Warning => diag.warn(doc, field, message),
            }
        });
    };
    check_tls(path, tp.tls.as_ref(), diag);
    for (i, pl) in tp.port_level_settings.iter().flatten().enumerate() {
        check_outlier(
            &format!("{path}.portLevelSettings[{i}]"),
            pl.outlier_detection.as_ref(),
            diag,
        );
        check_tls(&format!("{path}.portLevelSettings[{i}]"), pl.tls.as_ref(), diag);
        let pl_path = format!("{path}.portLevelSettings[{i}]");
        if pl.port.as_ref().and_then(|p| p.number).is_none() {
            diag.error(doc, at(&pl_path, "port.number"), "port number is required");
        }
        check(&pl_path, pl.load_balancer.as_ref(), pl.connection_pool.as_ref(), diag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie(yaml: &str) -> CookieKey {
        cookie_key(&serde_saphyr::from_str::<HttpCookie>(yaml).expect("yaml"))
    }

    #[test]
    fn generated_cookie_attributes_follow_envoy() {
        let key =
            cookie("{name: s, ttl: 90.5s, path: /shop, attributes: [{name: SameSite, value: Lax}, {name: Secure}]}");
        let generate = key.generate.expect("generated");
        assert_eq!(generate.value, GeneratedCookieValue::ConnectionDigest);
        assert_eq!(
            generate.attributes,
            "; Max-Age=90; Path=/shop; SameSite=Lax; Secure; HttpOnly"
        );
        // A zero ttl makes a session cookie; no path, no Path attribute.
        let key = cookie("{name: s, ttl: 0s}");
        assert_eq!(key.generate.expect("generated").attributes, "; HttpOnly");
        // Without ttl the cookie is only read.
        assert_eq!(cookie("{name: s}"), CookieKey::read_only("s"));
    }
}
