//! Kubernetes Gateway API resources → [`crate::Snapshot`].
//!
//! meshgate serves the Gateways whose GatewayClass names [`crate::CompileOptions::controller_name`]
//! as controller. The work is split by concern:
//! - [`types`]: serde structs (strict: unknown fields are errors);
//! - this module: classification, decoding, the Kubernetes objects Gateway API refers to
//!   (Namespace labels, Service + EndpointSlice endpoints, TLS Secrets) and ReferenceGrants;
//! - `routes`: HTTPRoute rules → snapshot routes with their Gateway API precedence;
//! - `grpc_routes`: GRPCRoutes → the HTTPRoutes they are equivalent to;
//! - `listeners`: Gateway listeners, route attachment, hostname intersection and listener
//!   isolation, one snapshot listener per (address, port);
//! - `listener_sets`: ListenerSets, whose listeners join their parent Gateway's.
//!
//! Backends resolve to clusters named as Istio names them (`outbound|PORT||NAME.NS.svc.cluster.local`)
//! in the registry shared with the Istio compiler: when an Istio ServiceEntry defines that host,
//! its endpoints are used, otherwise the Service's EndpointSlices; either way a DestinationRule
//! for the host sets the cluster's traffic policy.

mod backend_tls;
mod grpc_routes;
mod listener_sets;
mod listeners;
mod routes;
pub mod types;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use base64::Engine;
use serde_json::Value;

use crate::diag::{Diag, Res, at, decode_value};
use crate::istio::registry::Registry;
use crate::istio::types::Labels;
use crate::snapshot::{
    Cluster, ClusterId, Discovery, Endpoint, INVALID_BACKEND_CLUSTER, LoadBalancer, Snapshot, UpstreamProtocol,
};
use crate::source::Document;
use crate::{CompileOptions, istio};
use types::{
    BackendTlsPolicySpec, ConfigMap, EndpointSlice, GatewayClassSpec, GatewaySpec, HttpRouteSpec, ListenerSetSpec,
    ReferenceGrantSpec, Secret, ServicePort, ServiceSpec,
};

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// Versions whose schema meshgate reads (v1beta1 is the same schema for these kinds).
const VERSIONS: &[&str] = &["v1", "v1beta1"];
const KINDS: &[&str] = &[
    "GatewayClass",
    "Gateway",
    "HTTPRoute",
    "GRPCRoute",
    "ReferenceGrant",
    "ListenerSet",
    "BackendTLSPolicy",
];
/// The experimental Gateway API group, where ListenerSet was `XListenerSet` before v1.5.
pub const EXPERIMENTAL_GROUP: &str = "gateway.networking.x-k8s.io";
const EXPERIMENTAL_VERSION: &str = "v1alpha1";
const EXPERIMENTAL_KINDS: &[&str] = &["XListenerSet", "ListenerSet"];
/// `kubernetes.io/service-name`: the label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Fields accepted but not implemented, as patterns over the `spec` (`a[]` walks an array).
const UNSUPPORTED: &[(&str, &[&str])] = &[
    ("GatewayClass", &["parametersRef"]),
    (
        "Gateway",
        &[
            "infrastructure",
            "backendTLS",
            "tls",
            "defaultScope",
            "listeners[].tls.frontendValidation",
            "listeners[].tls.options",
        ],
    ),
    ("HTTPRoute", &["useDefaultGateways", "rules[].sessionPersistence"]),
    ("GRPCRoute", &["rules[].sessionPersistence"]),
    (
        "ListenerSet",
        &["listeners[].tls.frontendValidation", "listeners[].tls.options"],
    ),
    (
        "XListenerSet",
        &["listeners[].tls.frontendValidation", "listeners[].tls.options"],
    ),
];

/// Whether a document is read by this module: Gateway API kinds and the Kubernetes core
/// objects they refer to.
pub(crate) fn claims(doc: &Document) -> bool {
    let group = istio::api_group(doc);
    group == GROUP
        || group == EXPERIMENTAL_GROUP
        || (doc.api_version == "v1" && matches!(doc.kind.as_str(), "Namespace" | "Service" | "Secret" | "ConfigMap"))
        || (group == "discovery.k8s.io" && doc.kind == "EndpointSlice")
}

/// All decoded Gateway API and Kubernetes resources, in document order.
#[derive(Default)]
pub(crate) struct Resources<'a> {
    classes: Vec<Res<'a, GatewayClassSpec>>,
    gateways: Vec<Res<'a, GatewaySpec>>,
    routes: Vec<Res<'a, HttpRouteSpec>>,
    grants: Vec<Res<'a, ReferenceGrantSpec>>,
    /// ListenerSets of both groups (`Document::kind` tells `XListenerSet` apart).
    listener_sets: Vec<Res<'a, ListenerSetSpec>>,
    /// Namespace name → labels (with the automatic `kubernetes.io/metadata.name`).
    namespaces: HashMap<String, Labels>,
    /// (namespace, name) → Service.
    services: HashMap<(String, String), Res<'a, ServiceSpec>>,
    slices: Vec<Res<'a, EndpointSlice>>,
    /// (namespace, name) → Secret.
    secrets: HashMap<(String, String), Res<'a, Secret>>,
    /// (namespace, name) → ConfigMap (CA certificates of BackendTLSPolicies).
    config_maps: HashMap<(String, String), Res<'a, ConfigMap>>,
    backend_tls: Vec<Res<'a, BackendTlsPolicySpec>>,
}

pub(crate) fn decode_all<'a>(documents: &'a [Document], diag: &mut Diag) -> Resources<'a> {
    let mut res = Resources::default();
    let mut seen: HashMap<(String, String, String, String), &Document> = HashMap::new();
    for doc in documents {
        if !claims(doc) {
            continue;
        }
        let group = istio::api_group(doc).to_string();
        if group == GROUP {
            let version = doc.api_version.rsplit_once('/').map_or("", |(_, v)| v);
            if !KINDS.contains(&doc.kind.as_str()) {
                diag.warn(
                    doc,
                    "",
                    format!(
                        "ignored: kind {} of apiVersion {} is not supported yet",
                        doc.kind, doc.api_version
                    ),
                );
                continue;
            }
            // BackendTLSPolicy went v1 in Gateway API 1.4; v1alpha3 is the same schema.
            let version_ok = VERSIONS.contains(&version) || (doc.kind == "BackendTLSPolicy" && version == "v1alpha3");
            if !version_ok {
                diag.error(
                    doc,
                    "apiVersion",
                    format!(
                        "unsupported apiVersion {} for kind {} (use {GROUP}/v1 or {GROUP}/v1beta1)",
                        doc.api_version, doc.kind
                    ),
                );
                continue;
            }
        } else if group == EXPERIMENTAL_GROUP {
            let version = doc.api_version.rsplit_once('/').map_or("", |(_, v)| v);
            if !EXPERIMENTAL_KINDS.contains(&doc.kind.as_str()) {
                diag.warn(
                    doc,
                    "",
                    format!(
                        "ignored: kind {} of apiVersion {} is not supported yet",
                        doc.kind, doc.api_version
                    ),
                );
                continue;
            }
            if version != EXPERIMENTAL_VERSION {
                diag.error(
                    doc,
                    "apiVersion",
                    format!(
                        "unsupported apiVersion {} for kind {} (use {EXPERIMENTAL_GROUP}/{EXPERIMENTAL_VERSION}, or {GROUP}/v1 kind ListenerSet)",
                        doc.api_version, doc.kind
                    ),
                );
                continue;
            }
        }
        let key = (group, doc.kind.clone(), doc.namespace.clone(), doc.name.clone());
        if let Some(first) = seen.get(&key) {
            diag.duplicate(doc, first);
            continue;
        }
        seen.insert(key, doc);
        report_unsupported(doc, diag);
        let id = (doc.namespace.clone(), doc.name.clone());
        match doc.kind.as_str() {
            "GatewayClass" => decode_spec(doc, diag).map(|spec| res.classes.push(Res { doc, spec })),
            "Gateway" => decode_spec(doc, diag).map(|spec| res.gateways.push(Res { doc, spec })),
            "HTTPRoute" => decode_spec(doc, diag).map(|spec| res.routes.push(Res { doc, spec })),
            // Compiled as the HTTPRoute it is equivalent to; `doc.kind` still says GRPCRoute.
            "GRPCRoute" => decode_spec(doc, diag)
                .and_then(|spec| grpc_routes::to_http_route(doc, spec, diag))
                .map(|spec| res.routes.push(Res { doc, spec })),
            "ReferenceGrant" => decode_spec(doc, diag).map(|spec| res.grants.push(Res { doc, spec })),
            "ListenerSet" | "XListenerSet" => {
                decode_spec(doc, diag).map(|spec| res.listener_sets.push(Res { doc, spec }))
            }
            "Service" => decode_spec(doc, diag).map(|spec| {
                res.services.insert(id, Res { doc, spec });
            }),
            "EndpointSlice" => decode_body(doc, diag).map(|spec| res.slices.push(Res { doc, spec })),
            "Secret" => decode_body(doc, diag).map(|spec| {
                res.secrets.insert(id, Res { doc, spec });
            }),
            "ConfigMap" => decode_body(doc, diag).map(|spec| {
                res.config_maps.insert(id, Res { doc, spec });
            }),
            "BackendTLSPolicy" => decode_spec(doc, diag).map(|spec| res.backend_tls.push(Res { doc, spec })),
            _ => {
                // Namespace: only its labels matter (for allowedRoutes selectors).
                let mut labels = doc.labels.clone();
                labels.insert("kubernetes.io/metadata.name".to_string(), doc.name.clone());
                res.namespaces.insert(doc.name.clone(), labels);
                None
            }
        };
    }
    res
}

/// Decodes `body.spec`.
fn decode_spec<T: serde::de::DeserializeOwned>(doc: &Document, diag: &mut Diag) -> Option<T> {
    let empty = Value::Object(serde_json::Map::new());
    let spec = doc.body.get("spec").filter(|v| !v.is_null()).unwrap_or(&empty);
    decode_value(doc, &crate::diag::without_null_fields(spec), "spec", diag)
}

/// Decodes the top-level fields of objects without `spec` (EndpointSlice, Secret), leaving
/// out the identity, `metadata` and `status`.
fn decode_body<T: serde::de::DeserializeOwned>(doc: &Document, diag: &mut Diag) -> Option<T> {
    let mut body = doc.body.clone();
    if let Value::Object(map) = &mut body {
        for key in ["apiVersion", "kind", "metadata", "status"] {
            map.remove(key);
        }
    }
    decode_value(doc, &crate::diag::without_null_fields(&body), "", diag)
}

fn report_unsupported(doc: &Document, diag: &mut Diag) {
    let Some(spec) = doc.body.get("spec") else {
        return;
    };
    let mut found = Vec::new();
    for (kind, patterns) in UNSUPPORTED {
        if *kind != doc.kind {
            continue;
        }
        for p in *patterns {
            let segments: Vec<&str> = p.split('.').collect();
            istio::unsupported_walk(spec, &segments, "spec".to_string(), &mut found);
        }
    }
    found.sort();
    for field in found {
        diag.warn(doc, field, "not supported yet, ignored");
    }
}

/// Sort key for "oldest first", the Gateway API's tie-breaker between routes and between
/// ListenerSets: `(0, creationTimestamp, 0)` when the document has one (RFC 3339 times sort as
/// text), else `(1, "", seq)`, where the position `seq` in the configuration stands in for the
/// order a cluster would have created the objects in.
pub(crate) fn creation_order(doc: &Document, seq: usize) -> (u8, String, usize) {
    match doc
        .body
        .get("metadata")
        .and_then(|m| m.get("creationTimestamp"))
        .and_then(Value::as_str)
    {
        Some(t) => (0, t.to_string(), 0),
        None => (1, String::new(), seq),
    }
}

/// Compiles the served Gateways and the HTTPRoutes attached to them into `snapshot`.
pub(crate) fn build(
    res: &Resources<'_>,
    registry: &mut Registry<'_>,
    options: &CompileOptions,
    snapshot: &mut Snapshot,
    diag: &mut Diag,
) {
    let backend_tls = backend_tls::compile(res, diag);
    let mut ctx = Ctx {
        res,
        registry,
        invalid_cluster: None,
        diag,
        reported_shadowed: std::collections::HashSet::new(),
        backend_tls,
    };
    listeners::build(&mut ctx, options, snapshot);
}

/// State shared by the compilation steps.
pub(crate) struct Ctx<'c, 'a, 'r> {
    res: &'c Resources<'a>,
    registry: &'c mut Registry<'r>,
    invalid_cluster: Option<ClusterId>,
    diag: &'c mut Diag,
    /// HTTPRoute matches already reported as never matching (route, entry), so a match
    /// served on several hosts is reported once.
    reported_shadowed: std::collections::HashSet<(usize, usize)>,
    /// BackendTLSPolicies by target.
    backend_tls: backend_tls::Policies,
}

/// Where a backend reference points, as written (`HTTPBackendRef` / mirror `backendRef`).
pub(crate) struct BackendRef<'b> {
    pub group: Option<&'b str>,
    pub kind: Option<&'b str>,
    pub name: &'b str,
    pub namespace: Option<&'b str>,
    pub port: Option<u16>,
}

impl Ctx<'_, '_, '_> {
    /// Whether a ReferenceGrant in `to_ns` lets `from` (an HTTPRoute, Gateway or ListenerSet,
    /// matched by its own group and kind) refer to `to_group`/`to_kind` `to_name`.
    /// Same-namespace references need none.
    fn granted(&self, from: &Document, to_group: &str, to_kind: &str, to_ns: &str, to_name: &str) -> bool {
        let from_group = istio::api_group(from);
        from.namespace == to_ns
            || self.res.grants.iter().any(|g| {
                g.doc.namespace == to_ns
                    && g.spec
                        .from
                        .iter()
                        .any(|f| f.group == from_group && f.kind == from.kind && f.namespace == from.namespace)
                    && g.spec.to.iter().any(|t| {
                        t.group == to_group
                            && t.kind == to_kind
                            && t.name.as_deref().is_none_or(|n| n.is_empty() || n == to_name)
                    })
            })
    }

    /// The placeholder cluster invalid destinations point at.
    fn invalid_cluster(&mut self) -> ClusterId {
        if let Some(id) = self.invalid_cluster {
            return id;
        }
        let id = self.registry.add_cluster(Cluster {
            name: INVALID_BACKEND_CLUSTER.to_string(),
            service: String::new(),
            subset: String::new(),
            port: 0,
            protocol: UpstreamProtocol::Http1,
            load_balancer: LoadBalancer::RoundRobin,
            discovery: Discovery::Static,
            endpoints: Vec::new(),
            pool: Default::default(),
            outlier: None,
            health_check: None,
            tls: None,
        });
        self.invalid_cluster = Some(id);
        id
    }

    /// Resolves a backend reference of an HTTPRoute (`route_doc`) to a cluster. `Err` carries
    /// why the backend is invalid (requests sent to it must get HTTP 500); errors in the
    /// configuration itself are reported to `diag` and also give `Err`.
    fn backend(&mut self, route_doc: &Document, field: &str, r: &BackendRef<'_>) -> Result<ClusterId, String> {
        let group = r.group.unwrap_or("");
        let kind = r.kind.unwrap_or("Service");
        if !group.is_empty() || kind != "Service" {
            return Err(format!(
                "backend kind {kind:?} of group {group:?} is not supported (only core Services)"
            ));
        }
        let ns = r.namespace.filter(|n| !n.is_empty()).unwrap_or(&route_doc.namespace);
        let name = r.name;
        let Some(port) = r.port else {
            self.diag
                .error(route_doc, at(field, "port"), "port is required for a Service backend");
            return Err("no port".to_string());
        };
        if !self.granted(route_doc, "", "Service", ns, name) {
            return Err(format!(
                "no ReferenceGrant in namespace {ns} allows HTTPRoutes of namespace {} to refer to Service {name}",
                route_doc.namespace
            ));
        }
        let host = format!("{name}.{ns}.svc.cluster.local");
        let res = self.res;
        let service = res.services.get(&(ns.to_string(), name.to_string()));
        let service_port = service.and_then(|s| s.spec.ports.iter().find(|p| p.port == port));
        // gRPC is HTTP/2, whatever the port says.
        let h2c = route_doc.kind == "GRPCRoute"
            || service_port.is_some_and(|p| p.app_protocol.as_deref() == Some("kubernetes.io/h2c"));
        // Endpoints supplied as an Istio ServiceEntry for the Service's host take precedence.
        if self.registry.resolve(&host, ns).is_some() {
            let id = self
                .registry
                .cluster(route_doc, field, &host, Some(port), None, self.diag)
                .ok_or_else(|| format!("cluster for {host} port {port} could not be built"))?;
            if h2c && let Some(c) = self.registry.cluster_mut(id) {
                c.protocol = UpstreamProtocol::Http2;
            }
            let port_name = service_port.and_then(|p| p.name.as_deref());
            self.apply_backend_tls(route_doc, field, (ns, name, port_name), id)?;
            return Ok(id);
        }
        let Some(service) = service else {
            return Err(format!("Service {ns}/{name} does not exist"));
        };
        let Some(service_port) = service_port else {
            let known: Vec<String> = service.spec.ports.iter().map(|p| p.port.to_string()).collect();
            return Err(format!(
                "Service {ns}/{name} has no port {port} (ports: {})",
                known.join(", ")
            ));
        };
        let cluster_name = format!("outbound|{port}||{host}");
        let is_new = !self.registry_has(&cluster_name);
        let external = service
            .spec
            .external_name
            .as_ref()
            .and_then(Value::as_str)
            .filter(|_| service.spec.kind.as_deref() == Some("ExternalName"));
        let (endpoints, discovery, slices) = match external {
            // An ExternalName Service is an alias: its name is resolved when connecting.
            Some(target) => (
                vec![Endpoint {
                    address: target.to_ascii_lowercase(),
                    port,
                    weight: 1,
                    labels: BTreeMap::new(),
                }],
                Discovery::Dns,
                1,
            ),
            None => self.endpoints(ns, name, service_port),
        };
        if is_new && slices == 0 {
            self.diag.warn(
                service.doc,
                "",
                format!(
                    "no EndpointSlice (label {SERVICE_NAME_LABEL}: {name}) or ServiceEntry for host {host} gives this Service endpoints; requests to it fail"
                ),
            );
        }
        if !is_new {
            // Another route to the same Service port built it.
            let id = self
                .registry
                .cluster_id(&cluster_name)
                .ok_or_else(|| format!("cluster {cluster_name} is missing"))?;
            if h2c && let Some(c) = self.registry.cluster_mut(id) {
                c.protocol = UpstreamProtocol::Http2;
            }
            self.apply_backend_tls(route_doc, field, (ns, name, service_port.name.as_deref()), id)?;
            return Ok(id);
        }
        // A DestinationRule for the Service's host sets its traffic policy, as in Istio (which
        // has no subsets here). PASSTHROUGH would send requests back to the gateway's own
        // listener, so the Service's endpoints are kept.
        let policy = self.registry.service_policy(&host, port);
        if policy.passthrough {
            self.diag.warn(
                route_doc,
                field.to_string(),
                format!(
                    "the DestinationRule for {host} asks for PASSTHROUGH, which a gateway cannot use for a Service backend; the Service's endpoints are used"
                ),
            );
        }
        let id = self.registry.add_cluster(Cluster {
            name: cluster_name,
            service: host,
            subset: String::new(),
            port,
            protocol: if h2c || policy.upgrade_to_http2 {
                UpstreamProtocol::Http2
            } else {
                UpstreamProtocol::Http1
            },
            load_balancer: policy.load_balancer,
            discovery,
            endpoints,
            pool: policy.pool,
            outlier: policy.outlier,
            health_check: policy.health_check,
            tls: policy.tls,
        });
        // The cluster may exist already (another route to the same Service port): HTTP/2 asked
        // for by any of them holds for all, whatever the order of the documents.
        if h2c && let Some(c) = self.registry.cluster_mut(id) {
            c.protocol = UpstreamProtocol::Http2;
        }
        self.apply_backend_tls(route_doc, field, (ns, name, service_port.name.as_deref()), id)?;
        Ok(id)
    }

    /// Gives cluster `id` the TLS of the BackendTLSPolicy targeting Service `ns/name` (its port
    /// `port_name`, or all ports); `Err` (the backend is invalid) when that policy is.
    fn apply_backend_tls(
        &mut self,
        route_doc: &Document,
        field: &str,
        (ns, name, port_name): (&str, &str, Option<&str>),
        id: ClusterId,
    ) -> Result<(), String> {
        let key = |section: Option<&str>| (ns.to_string(), name.to_string(), section.map(str::to_string));
        let policy = port_name
            .and_then(|p| self.backend_tls.get(&key(Some(p))))
            .or_else(|| self.backend_tls.get(&key(None)));
        match policy {
            None => Ok(()),
            Some(Err(why)) => Err(why.clone()),
            Some(Ok(tls)) => {
                let Some(c) = self.registry.cluster_mut(id) else {
                    return Ok(());
                };
                // Say so when the policy replaces the TLS settings a DestinationRule gave the
                // cluster (which Istio routes to the same host share).
                let replaced = c.tls.as_ref().is_some_and(|old| old != tls);
                let cluster = c.name.clone();
                c.tls = Some(tls.clone());
                if replaced {
                    self.diag.warn(
                        route_doc,
                        field.to_string(),
                        format!(
                            "the BackendTLSPolicy for Service {ns}/{name} replaces the DestinationRule tls of cluster {cluster}"
                        ),
                    );
                }
                Ok(())
            }
        }
    }

    fn registry_has(&self, cluster_name: &str) -> bool {
        self.registry.has_cluster(cluster_name)
    }

    /// Endpoints of a Service port from the EndpointSlices of the Service; also returns how
    /// many slices belong to the Service.
    fn endpoints(&self, ns: &str, name: &str, port: &ServicePort) -> (Vec<Endpoint>, Discovery, usize) {
        let port_name = port.name.as_deref().unwrap_or("");
        let target = match &port.target_port {
            Some(types::IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(types::IntOrString::String(_)) => None,
            None => Some(port.port),
        };
        let mut endpoints = Vec::new();
        let mut slices = 0;
        let mut fqdn = false;
        let res = self.res;
        for slice in &res.slices {
            if slice.doc.namespace != ns || slice.doc.labels.get(SERVICE_NAME_LABEL).map(String::as_str) != Some(name) {
                continue;
            }
            slices += 1;
            let number = if slice.spec.ports.is_empty() {
                target
            } else {
                slice
                    .spec
                    .ports
                    .iter()
                    .find(|p| p.name.as_deref().unwrap_or("") == port_name)
                    .and_then(|p| p.port)
            };
            let Some(number) = number else { continue };
            if slice.spec.address_type.as_deref() == Some("FQDN") {
                fqdn = true;
            }
            for ep in &slice.spec.endpoints {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for address in &ep.addresses {
                    endpoints.push(Endpoint {
                        address: address.clone(),
                        port: number,
                        weight: 1,
                        labels: BTreeMap::new(),
                    });
                }
            }
        }
        let discovery = if fqdn { Discovery::Dns } else { Discovery::Static };
        (endpoints, discovery, slices)
    }

    /// Reads a listener certificate from a `kubernetes.io/tls` Secret. `owner_doc` is the
    /// Gateway or ListenerSet declaring the listener: each needs its own ReferenceGrant.
    fn certificate(
        &mut self,
        owner_doc: &Document,
        field: &str,
        r: &types::ObjectRef,
    ) -> Option<(PathBuf, Vec<u8>, PathBuf, Vec<u8>)> {
        let group = r.group.as_deref().unwrap_or("");
        let kind = r.kind.as_deref().unwrap_or("Secret");
        if !group.is_empty() || kind != "Secret" {
            self.diag.error(
                owner_doc,
                field,
                format!("certificateRefs of kind {kind:?} (group {group:?}) are not supported; use a Secret"),
            );
            return None;
        }
        let ns = r
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&owner_doc.namespace);
        if !self.granted(owner_doc, "", "Secret", ns, &r.name) {
            self.diag.error(
                owner_doc,
                field,
                format!(
                    "no ReferenceGrant in namespace {ns} allows {}s of namespace {} to use Secret {}",
                    owner_doc.kind, owner_doc.namespace, r.name
                ),
            );
            return None;
        }
        let res = self.res;
        let Some(secret) = res.secrets.get(&(ns.to_string(), r.name.clone())) else {
            self.diag.error(
                owner_doc,
                field,
                format!("Secret {ns}/{} is not defined in the configuration", r.name),
            );
            return None;
        };
        if let Some(t) = secret.spec.kind.as_deref()
            && t != "kubernetes.io/tls"
        {
            self.diag.warn(
                secret.doc,
                "type",
                format!("Secret type is {t:?}, expected kubernetes.io/tls; reading tls.crt and tls.key anyway"),
            );
        }
        let mut read = |key: &str| -> Option<Vec<u8>> {
            let bytes = if let Some(s) = secret.spec.string_data.get(key) {
                s.as_bytes().to_vec()
            } else if let Some(b64) = secret.spec.data.get(key) {
                let cleaned: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
                match base64::engine::general_purpose::STANDARD.decode(cleaned) {
                    Ok(v) => v,
                    Err(e) => {
                        self.diag
                            .error(secret.doc, format!("data.{key}"), format!("invalid base64: {e}"));
                        return None;
                    }
                }
            } else {
                self.diag.error(secret.doc, "data", format!("{key} is missing"));
                return None;
            };
            if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
                self.diag
                    .error(secret.doc, format!("data.{key}"), format!("{key} is not PEM"));
                return None;
            }
            Some(bytes)
        };
        let cert = read("tls.crt");
        let key = read("tls.key");
        let label = |k: &str| PathBuf::from(format!("{} (Secret {ns}/{} {k})", secret.doc.file.display(), r.name));
        Some((label("tls.crt"), cert?, label("tls.key"), key?))
    }
}
