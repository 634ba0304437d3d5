//! Gateway listeners, route attachment and the snapshot listeners built from them.
//!
//! Listeners of all served Gateways are grouped by (address, port); each group becomes one
//! snapshot listener. Within a group every request host belongs to the listener with the most
//! specific matching hostname (exact, then the longest wildcard, then none), and only the
//! routes attached to that listener serve it (Gateway API listener isolation). Virtual hosts
//! are made per domain: the listener hostnames and every listener-hostname ∩ route-hostname
//! intersection, so a route only serves the hosts its `hostnames` allow.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use super::routes::{self, CompiledHttpRoute};
use super::types::{AllowedRoutes, GatewaySpec, LabelSelector, Listener as GwListenerSpec, ParentRef, RouteNamespaces};
use super::{Ctx, GROUP, listener_sets};
use crate::CompileOptions;
use crate::diag::{Res, at, resource_name};
use crate::snapshot::{
    Listener, ListenerFlavor, ListenerTls, RequestMatch, Route, RouteTable, Snapshot, TlsCertificate, VirtualHost,
};
use crate::source::Document;

/// PEM certificate chain and key with the labels findings and logs use for them.
type CertData = (PathBuf, Vec<u8>, PathBuf, Vec<u8>);

/// (address, port) of a snapshot listener.
type SocketKey = (Option<IpAddr>, u16);

/// (index of the compiled route, index of its entry).
type EntryId = (usize, usize);

/// One validated listener of a served Gateway, declared by the Gateway itself or by one of the
/// ListenerSets it accepted.
pub(super) struct GwListener<'a> {
    /// The Gateway or ListenerSet declaring the listener: findings name it, and its namespace
    /// is the one `allowedRoutes` `Same` means.
    pub doc: &'a Document,
    /// The Gateway whose addresses the listener binds.
    pub gateway: &'a Document,
    pub path: String,
    pub name: String,
    /// Lower-cased hostname, `*` when absent.
    pub hostname: String,
    pub port: u16,
    /// Certificates of an HTTPS listener; `None` for HTTP.
    pub tls: Option<Vec<CertData>>,
    pub allowed: &'a AllowedRoutes,
    pub addresses: Vec<Option<IpAddr>>,
}

/// A served Gateway and the listeners merged into it.
pub(super) struct ServedGateway<'a> {
    pub res: &'a Res<'a, GatewaySpec>,
    pub addresses: Vec<Option<IpAddr>>,
    /// Its own listeners (indexes into the listener list): the only ones a parentRef naming the
    /// Gateway attaches to, since listener names are unique per resource only.
    pub own: Vec<usize>,
    /// Listeners of the ListenerSets it accepted, in precedence order.
    pub from_listener_sets: Vec<usize>,
}

/// What a parentRef naming a ListenerSet attaches to.
pub(super) enum ListenerSetState {
    /// Accepted by its served parent Gateway: its listeners that are served.
    Attached(Vec<usize>),
    /// Its parent Gateway belongs to another controller: not ours to judge.
    Foreign,
    /// Not served, and why (already reported on the ListenerSet).
    Rejected(String),
}

/// (group, kind, namespace, name) of a ListenerSet.
pub(super) type ListenerSetKey<'a> = (&'a str, &'a str, &'a str, &'a str);

/// The resources a route's parentRef can name, with their listeners.
#[derive(Default)]
pub(super) struct Parents<'a> {
    pub gateways: Vec<ServedGateway<'a>>,
    /// (namespace, name) → index in `gateways`.
    pub gateway_index: HashMap<(&'a str, &'a str), usize>,
    /// (namespace, name) of Gateways of other controllers.
    pub foreign: Vec<(&'a str, &'a str)>,
    pub listener_sets: HashMap<ListenerSetKey<'a>, ListenerSetState>,
}

/// Where a route's parentRef leads.
enum ParentLookup<'p> {
    /// The listeners of the parent (indexes into the listener list).
    Listeners(&'p [usize]),
    /// A parent served by another controller: no finding.
    Foreign,
    /// Not served: the field of the parentRef at fault (empty for the parentRef itself) and why.
    Unserved(&'static str, String),
}

impl<'a> Parents<'a> {
    fn gateway(&self, namespace: &str, name: &str) -> Option<&ServedGateway<'a>> {
        self.gateway_index.get(&(namespace, name)).map(|&i| &self.gateways[i])
    }

    /// The listeners of the parent `group`/`kind` `namespace`/`name`. The names share the
    /// result's lifetime because the maps are keyed by borrowed names.
    fn lookup<'s>(&'s self, group: &'s str, kind: &'s str, namespace: &'s str, name: &'s str) -> ParentLookup<'s> {
        if group == GROUP && kind == "Gateway" {
            return match self.gateway(namespace, name) {
                Some(gateway) => ParentLookup::Listeners(&gateway.own),
                None if self.foreign.contains(&(namespace, name)) => ParentLookup::Foreign,
                None => ParentLookup::Unserved(
                    "name",
                    format!("Gateway {namespace}/{name} is not defined; this parentRef is not served"),
                ),
            };
        }
        if !listener_sets::is_listener_set(group, kind) {
            return ParentLookup::Unserved(
                "",
                format!(
                    "parent kind {kind} of group {group:?} is not supported yet (only Gateway and ListenerSet); not attached"
                ),
            );
        }
        match self.listener_sets.get(&(group, kind, namespace, name)) {
            Some(ListenerSetState::Attached(members)) => ParentLookup::Listeners(members),
            Some(ListenerSetState::Foreign) => ParentLookup::Foreign,
            Some(ListenerSetState::Rejected(why)) => {
                ParentLookup::Unserved("", format!("{kind} {namespace}/{name} is not served: {why}"))
            }
            None => ParentLookup::Unserved(
                "name",
                format!("{kind} {namespace}/{name} is not defined; this parentRef is not served"),
            ),
        }
    }
}

struct Attachment {
    listener: usize,
    route: usize,
    /// Listener hostname ∩ route hostnames.
    domains: Vec<String>,
}

/// Validates a listener or route hostname: a DNS name, optionally with a leading `*.` label.
pub(crate) fn check_hostname(h: &str) -> Result<(), String> {
    if h.parse::<IpAddr>().is_ok() {
        return Err(format!("hostname {h:?} must be a DNS name, not an IP address"));
    }
    let rest = h.strip_prefix("*.").unwrap_or(h);
    let ok = !rest.is_empty()
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid hostname {h:?}: expected a DNS name such as foo.example.com or *.example.com"
        ))
    }
}

/// Whether pattern `p` (`*`, `*.suffix` or an exact name) covers every host `d` covers.
fn covers(p: &str, d: &str) -> bool {
    if p == "*" || p == d {
        return true;
    }
    match p.strip_prefix('*') {
        Some(suffix) => {
            let d = d.strip_prefix('*').unwrap_or(d);
            d.len() > suffix.len() && d.ends_with(suffix)
        }
        None => false,
    }
}

/// Gateway API hostname intersection of a listener and a route hostname.
fn intersect(a: &str, b: &str) -> Option<String> {
    if covers(a, b) {
        Some(b.to_string())
    } else if covers(b, a) {
        Some(a.to_string())
    } else {
        None
    }
}

/// Exact names beat wildcards, longer wildcards beat shorter ones, `*` comes last.
fn specificity(h: &str) -> (u8, usize) {
    match h {
        "*" => (0, 0),
        _ if h.starts_with('*') => (1, h.len()),
        _ => (2, h.len()),
    }
}

pub(crate) fn build(ctx: &mut Ctx<'_, '_, '_>, options: &CompileOptions, snapshot: &mut Snapshot) {
    let res = ctx.res;
    let served: Vec<&str> = res
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == options.controller_name)
        .map(|c| c.doc.name.as_str())
        .collect();
    let mut listeners: Vec<GwListener<'_>> = Vec::new();
    let mut parents = Parents::default();
    for gw in &res.gateways {
        let doc = gw.doc;
        let class = gw.spec.gateway_class_name.as_str();
        if !served.contains(&class) {
            parents.foreign.push((doc.namespace.as_str(), doc.name.as_str()));
            if !res.classes.iter().any(|c| c.doc.name == class) {
                ctx.diag.warn(
                    doc,
                    "spec.gatewayClassName",
                    format!(
                        "GatewayClass {class:?} is not defined; this Gateway is not served (meshgate serves classes whose controllerName is {})",
                        options.controller_name
                    ),
                );
            }
            continue;
        }
        let mut addresses = Vec::new();
        for (i, a) in gw.spec.addresses.iter().enumerate() {
            let apath = format!("spec.addresses[{i}]");
            match a.kind.as_deref().unwrap_or("IPAddress") {
                "IPAddress" => match a.value.parse::<IpAddr>() {
                    Ok(ip) => addresses.push(Some(ip)),
                    Err(e) => ctx.diag.error(
                        doc,
                        at(&apath, "value"),
                        format!("invalid IP address {:?}: {e}", a.value),
                    ),
                },
                other => ctx.diag.warn(
                    doc,
                    at(&apath, "type"),
                    format!("address type {other} is not supported (only IPAddress), ignored"),
                ),
            }
        }
        if addresses.is_empty() {
            addresses.push(None);
        }
        if let Some(allowed) = &gw.spec.allowed_listeners {
            listener_sets::check_allowed_listeners(ctx, doc, allowed);
        }
        let own = declare_listeners(ctx, doc, doc, &gw.spec.listeners, &addresses);
        let indexes: Vec<usize> = (listeners.len()..listeners.len() + own.len()).collect();
        listeners.extend(own);
        parents
            .gateway_index
            .insert((doc.namespace.as_str(), doc.name.as_str()), parents.gateways.len());
        parents.gateways.push(ServedGateway {
            res: gw,
            addresses,
            own: indexes,
            from_listener_sets: Vec::new(),
        });
    }
    listener_sets::attach_all(ctx, &mut listeners, &mut parents);

    let compiled = routes::compile_all(ctx);
    let mut attachments = Vec::new();
    for (ri, route) in compiled.iter().enumerate() {
        let spec = &res.routes[ri].spec;
        if spec.parent_refs.is_empty() {
            ctx.diag.warn(
                route.doc,
                "spec.parentRefs",
                "no parentRefs: this route is not attached to any Gateway",
            );
        }
        for (pi, parent) in spec.parent_refs.iter().enumerate() {
            attach(
                ctx,
                &listeners,
                &parents,
                route,
                ri,
                &format!("spec.parentRefs[{pi}]"),
                parent,
                &mut attachments,
            );
        }
    }

    // Group listeners by (address, port), in declaration order.
    let mut groups: Vec<(SocketKey, Vec<usize>)> = Vec::new();
    for (li, l) in listeners.iter().enumerate() {
        for address in &l.addresses {
            let key = (*address, l.port);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push(li),
                None => groups.push((key, vec![li])),
            }
        }
    }
    for ((address, port), members) in groups {
        if let Some(listener) = build_group(ctx, &listeners, &compiled, &attachments, address, port, &members) {
            snapshot.listeners.push(listener);
        }
    }
}

/// Validates the listeners a Gateway or ListenerSet (`doc`) declares for `gateway`, bound to
/// `addresses`; invalid ones are reported and left out.
pub(super) fn declare_listeners<'c>(
    ctx: &mut Ctx<'c, '_, '_>,
    doc: &'c Document,
    gateway: &'c Document,
    list: &'c [GwListenerSpec],
    addresses: &[Option<IpAddr>],
) -> Vec<GwListener<'c>> {
    let mut declared = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for (j, l) in list.iter().enumerate() {
        let path = format!("spec.listeners[{j}]");
        if names.contains(&l.name.as_str()) {
            ctx.diag
                .error(doc, at(&path, "name"), format!("duplicate listener name {:?}", l.name));
            continue;
        }
        names.push(&l.name);
        let hostname = match &l.hostname {
            None => "*".to_string(),
            Some(h) => {
                let h = h.to_ascii_lowercase();
                if let Err(e) = check_hostname(&h) {
                    ctx.diag.error(doc, at(&path, "hostname"), e);
                    continue;
                }
                h
            }
        };
        if !check_allowed_routes(ctx, doc, &path, l.allowed_routes.as_ref()) {
            continue;
        }
        let tls = match l.protocol.as_str() {
            "HTTP" => {
                if l.tls.is_some() {
                    ctx.diag
                        .warn(doc, at(&path, "tls"), "tls has no effect on an HTTP listener, ignored");
                }
                None
            }
            "HTTPS" => {
                let tls_path = at(&path, "tls");
                let Some(tls) = &l.tls else {
                    ctx.diag.error(doc, tls_path, "HTTPS listeners need tls settings");
                    continue;
                };
                let mode = tls.mode.as_deref().unwrap_or("Terminate");
                if mode != "Terminate" {
                    ctx.diag.warn(
                        doc,
                        at(&tls_path, "mode"),
                        format!("tls mode {mode} is not supported yet (only Terminate), listener ignored"),
                    );
                    continue;
                }
                if tls.certificate_refs.is_empty() {
                    ctx.diag.error(
                        doc,
                        at(&tls_path, "certificateRefs"),
                        "at least one certificate is required",
                    );
                    continue;
                }
                let mut certs = Vec::new();
                for (k, r) in tls.certificate_refs.iter().enumerate() {
                    if let Some(c) = ctx.certificate(doc, &format!("{tls_path}.certificateRefs[{k}]"), r) {
                        certs.push(c);
                    }
                }
                if certs.len() != tls.certificate_refs.len() {
                    continue;
                }
                Some(certs)
            }
            other => {
                ctx.diag.warn(
                    doc,
                    at(&path, "protocol"),
                    format!("protocol {other} is not supported yet (HTTP, HTTPS), listener ignored"),
                );
                continue;
            }
        };
        declared.push(GwListener {
            doc,
            gateway,
            path,
            name: l.name.clone(),
            hostname,
            port: l.port,
            tls,
            allowed: l.allowed_routes.as_ref().unwrap_or(&DEFAULT_ALLOWED),
            addresses: addresses.to_vec(),
        });
    }
    declared
}

static DEFAULT_ALLOWED: AllowedRoutes = AllowedRoutes {
    namespaces: None,
    kinds: None,
};

fn check_allowed_routes(ctx: &mut Ctx<'_, '_, '_>, doc: &Document, path: &str, a: Option<&AllowedRoutes>) -> bool {
    let Some(namespaces) = a.and_then(|a| a.namespaces.as_ref()) else {
        return true;
    };
    let npath = format!("{path}.allowedRoutes.namespaces");
    check_namespace_filter(ctx, doc, &npath, namespaces, &["Same", "All", "Selector"], "Same")
}

/// Validates a namespace filter (`allowedRoutes.namespaces`, `allowedListeners.namespaces`) at
/// `path`: `from` must be one of `values` (absent means `default`), and `Selector` needs a valid
/// selector.
pub(super) fn check_namespace_filter(
    ctx: &mut Ctx<'_, '_, '_>,
    doc: &Document,
    path: &str,
    filter: &RouteNamespaces,
    values: &[&str],
    default: &str,
) -> bool {
    let from = filter.from.as_deref().unwrap_or(default);
    if !values.contains(&from) {
        let (last, others) = values.split_last().unwrap_or((&"", &[]));
        ctx.diag.error(
            doc,
            at(path, "from"),
            format!("unknown value {from:?} ({} or {last})", others.join(", ")),
        );
        return false;
    }
    if from != "Selector" {
        return true;
    }
    let Some(selector) = &filter.selector else {
        ctx.diag
            .error(doc, at(path, "selector"), "selector is required with from: Selector");
        return false;
    };
    let mut ok = true;
    for (i, e) in selector.match_expressions.iter().enumerate() {
        if !matches!(e.operator.as_str(), "In" | "NotIn" | "Exists" | "DoesNotExist") {
            ctx.diag.error(
                doc,
                format!("{path}.selector.matchExpressions[{i}].operator"),
                format!("unknown operator {:?} (In, NotIn, Exists, DoesNotExist)", e.operator),
            );
            ok = false;
        }
    }
    ok
}

fn selector_matches(s: &LabelSelector, labels: &crate::istio::types::Labels) -> bool {
    s.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v))
        && s.match_expressions.iter().all(|e| {
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| e.values.contains(v)),
                "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Whether `selector` selects namespace `namespace` by its labels; a namespace the
/// configuration does not define has only Kubernetes' automatic `kubernetes.io/metadata.name`.
pub(super) fn namespace_selected(ctx: &Ctx<'_, '_, '_>, selector: &LabelSelector, namespace: &str) -> bool {
    match ctx.res.namespaces.get(namespace) {
        Some(labels) => selector_matches(selector, labels),
        None => {
            let automatic =
                crate::istio::types::Labels::from([("kubernetes.io/metadata.name".to_string(), namespace.to_string())]);
            selector_matches(selector, &automatic)
        }
    }
}

/// Why `listener` does not accept `route`, or `None` when it does.
fn rejection(ctx: &Ctx<'_, '_, '_>, listener: &GwListener<'_>, route: &CompiledHttpRoute<'_>) -> Option<String> {
    let gw_ns = &listener.doc.namespace;
    let route_ns = &route.doc.namespace;
    let ns = listener.allowed.namespaces.as_ref();
    match ns.and_then(|n| n.from.as_deref()).unwrap_or("Same") {
        "All" => {}
        "Selector" => {
            let selected = ns
                .and_then(|n| n.selector.as_ref())
                .is_some_and(|s| namespace_selected(ctx, s, route_ns));
            if !selected {
                return Some(format!(
                    "listener {} only allows routes from namespaces its selector matches, and namespace {route_ns} does not match",
                    listener.name
                ));
            }
        }
        _ => {
            if gw_ns != route_ns {
                return Some(format!(
                    "listener {} only allows routes from its own namespace {gw_ns}",
                    listener.name
                ));
            }
        }
    }
    // HTTPRoute or GRPCRoute: both are served by HTTP and HTTPS listeners.
    let kind = route.doc.kind.as_str();
    if let Some(kinds) = &listener.allowed.kinds
        && !kinds
            .iter()
            .any(|k| k.kind == kind && k.group.as_deref().unwrap_or(GROUP) == GROUP)
    {
        return Some(format!(
            "listener {} does not allow kind {kind} (allowedRoutes.kinds)",
            listener.name
        ));
    }
    None
}

/// Listener hostname ∩ route hostnames; `None` when a route with hostnames has none in common.
fn route_domains(listener: &GwListener<'_>, route: &CompiledHttpRoute<'_>) -> Vec<String> {
    if route.hostnames.is_empty() {
        return vec![listener.hostname.clone()];
    }
    let mut out: Vec<String> = Vec::new();
    for h in &route.hostnames {
        if let Some(d) = intersect(&listener.hostname, h)
            && !out.contains(&d)
        {
            out.push(d);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn attach(
    ctx: &mut Ctx<'_, '_, '_>,
    listeners: &[GwListener<'_>],
    parents: &Parents<'_>,
    route: &CompiledHttpRoute<'_>,
    ri: usize,
    path: &str,
    parent: &ParentRef,
    out: &mut Vec<Attachment>,
) {
    let doc = route.doc;
    let group = parent.group.as_deref().unwrap_or(GROUP);
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    let ns = parent
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(&doc.namespace);
    let name = parent.name.as_str();
    let members = match parents.lookup(group, kind, ns, name) {
        ParentLookup::Listeners(members) => members,
        ParentLookup::Foreign => return,
        ParentLookup::Unserved(field, why) => {
            let field = if field.is_empty() {
                path.to_string()
            } else {
                at(path, field)
            };
            ctx.diag.warn(doc, field, why);
            return;
        }
    };
    let parent_name = format!("{kind} {ns}/{name}");
    let candidates: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&li| parent.section_name.as_deref().is_none_or(|s| listeners[li].name == s))
        .filter(|&li| parent.port.is_none_or(|p| listeners[li].port == p))
        .collect();
    if candidates.is_empty() {
        let what = match (&parent.section_name, parent.port) {
            (Some(s), Some(p)) => format!("no listener named {s} on port {p}"),
            (Some(s), None) => format!("no listener named {s}"),
            (None, Some(p)) => format!("no listener on port {p}"),
            (None, None) => "no HTTP or HTTPS listener".to_string(),
        };
        // A Gateway parentRef never reaches its ListenerSets' listeners: say where the name is.
        let hint = parent
            .section_name
            .as_deref()
            .filter(|_| kind == "Gateway")
            .and_then(|section| {
                let gateway = parents.gateway(ns, name)?;
                let li = gateway
                    .from_listener_sets
                    .iter()
                    .find(|&&li| listeners[li].name == section)?;
                let owner = listeners[*li].doc;
                Some(format!(
                    " (listener {section} belongs to {}: routes reach it only through a parentRef of kind {} naming it)",
                    resource_name(owner),
                    owner.kind
                ))
            })
            .unwrap_or_default();
        ctx.diag
            .warn(doc, path, format!("not served: {parent_name} has {what}{hint}"));
        return;
    }
    let mut reasons = Vec::new();
    let mut attached = false;
    for li in candidates {
        let listener = &listeners[li];
        if let Some(reason) = rejection(ctx, listener, route) {
            reasons.push(reason);
            continue;
        }
        let domains = route_domains(listener, route);
        if domains.is_empty() {
            reasons.push(format!(
                "no route hostname intersects listener {} hostname {}",
                listener.name, listener.hostname
            ));
            continue;
        }
        attached = true;
        out.push(Attachment {
            listener: li,
            route: ri,
            domains,
        });
    }
    if !attached {
        ctx.diag.warn(
            doc,
            path,
            format!("not served by {parent_name}: {}", reasons.join("; ")),
        );
    }
}

fn build_group(
    ctx: &mut Ctx<'_, '_, '_>,
    listeners: &[GwListener<'_>],
    compiled: &[CompiledHttpRoute<'_>],
    attachments: &[Attachment],
    address: Option<IpAddr>,
    port: u16,
    members: &[usize],
) -> Option<Listener> {
    let first = &listeners[members[0]];
    if let Some(&bad) = members
        .iter()
        .find(|&&li| listeners[li].tls.is_some() != first.tls.is_some())
    {
        let l = &listeners[bad];
        ctx.diag.error(
            l.doc,
            at(&l.path, "protocol"),
            format!(
                "port {port} mixes HTTPS and HTTP listeners (see {} {})",
                resource_name(first.doc),
                first.path
            ),
        );
        return None;
    }
    let mut gateway_names: Vec<String> = Vec::new();
    for &li in members {
        let n = resource_name(listeners[li].gateway);
        if !gateway_names.contains(&n) {
            gateway_names.push(n);
        }
    }
    if gateway_names.len() > 1 {
        ctx.diag.warn(
            first.gateway,
            "spec.addresses",
            format!(
                "{} all listen on port {port} of the same address, so their routes are served together; give each Gateway its own spec.addresses to keep them apart",
                gateway_names.join(", ")
            ),
        );
    }

    let hosts: Vec<&str> = members.iter().map(|&li| listeners[li].hostname.as_str()).collect();
    let group_atts: Vec<&Attachment> = attachments.iter().filter(|a| members.contains(&a.listener)).collect();
    let mut domains: Vec<String> = Vec::new();
    for d in hosts
        .iter()
        .map(|h| h.to_string())
        .chain(group_atts.iter().flat_map(|a| a.domains.iter().cloned()))
    {
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    // Domains serving the same routes share a virtual host.
    let mut vhosts: Vec<(Vec<EntryId>, Vec<String>)> = Vec::new();
    for d in domains {
        let Some(owner) = hosts.iter().filter(|h| covers(h, &d)).max_by_key(|h| specificity(h)) else {
            continue;
        };
        let mut ids: Vec<EntryId> = Vec::new();
        for a in &group_atts {
            if listeners[a.listener].hostname != *owner || !a.domains.iter().any(|x| covers(x, &d)) {
                continue;
            }
            for ei in 0..compiled[a.route].entries.len() {
                if !ids.contains(&(a.route, ei)) {
                    ids.push((a.route, ei));
                }
            }
        }
        ids.sort_by(|a, b| compiled[a.0].entries[a.1].key.cmp(&compiled[b.0].entries[b.1].key));
        report_shadowed(ctx, compiled, &ids, &d);
        match vhosts.iter_mut().find(|(i, _)| *i == ids) {
            Some((_, ds)) => ds.push(d),
            None => vhosts.push((ids, vec![d])),
        }
    }
    let mut table = RouteTable::default();
    for (ids, domains) in vhosts {
        let routes: Vec<Route> = ids
            .iter()
            .map(|&(ri, ei)| compiled[ri].entries[ei].route.clone())
            .collect();
        table.virtual_hosts.push(VirtualHost {
            name: format!("{}:{port}", domains[0]),
            domains,
            routes,
            https_redirect: false,
        });
    }
    table.index();

    let tls = first.tls.is_some().then(|| {
        // Most specific SNI first: the first certificate whose hosts match is used.
        let mut order: Vec<usize> = members.to_vec();
        order.sort_by_key(|&li| std::cmp::Reverse(specificity(&listeners[li].hostname)));
        let mut certificates = Vec::new();
        for li in order {
            for (cert_path, cert_pem, key_path, key_pem) in listeners[li].tls.iter().flatten() {
                certificates.push(TlsCertificate {
                    sni_hosts: vec![listeners[li].hostname.clone()],
                    cert_path: cert_path.clone(),
                    key_path: key_path.clone(),
                    cert_pem: cert_pem.clone(),
                    key_pem: key_pem.clone(),
                });
            }
        }
        ListenerTls {
            certificates,
            alpn: vec!["h2".to_string(), "http/1.1".to_string()],
            versions: Default::default(),
            client_certificates: None,
        }
    });
    Some(Listener {
        name: format!(
            "{}_{port}",
            address.map_or_else(|| "0.0.0.0".to_string(), |a| a.to_string())
        ),
        address,
        port,
        tls,
        routes: table,
        flavor: ListenerFlavor::Envoy,
    })
}

/// Warns (once per match) about HTTPRoute matches that never win on `host`: a match earlier in
/// precedence order takes every request they would match, as when two routes share a match
/// (Gateway API then gives it to the older route).
fn report_shadowed(ctx: &mut Ctx<'_, '_, '_>, compiled: &[CompiledHttpRoute<'_>], ids: &[EntryId], host: &str) {
    if ids.len() > crate::shadowing::MAX_RULES_CHECKED {
        return;
    }
    for (position, &(route, entry)) in ids.iter().enumerate() {
        if ctx.reported_shadowed.contains(&(route, entry)) {
            continue;
        }
        let later = &compiled[route].entries[entry];
        let later_matches: Vec<&RequestMatch> = later.route.matches.iter().collect();
        let covering = ids[..position].iter().find(|&&(r, e)| {
            let earlier: Vec<&RequestMatch> = compiled[r].entries[e].route.matches.iter().collect();
            crate::shadowing::rule_covers(&earlier, &later_matches)
        });
        let Some(&(earlier_route, earlier_entry)) = covering else {
            continue;
        };
        ctx.reported_shadowed.insert((route, entry));
        let earlier = &compiled[earlier_route];
        let message = format!(
            "match {} never matches on host {host}: {} spec.rules[{}] takes precedence for every request it would match",
            later.key.match_index(),
            resource_name(earlier.doc),
            earlier.entries[earlier_entry].key.rule()
        );
        ctx.diag.warn(
            compiled[route].doc,
            format!("spec.rules[{}]", later.key.rule()),
            message,
        );
    }
}
