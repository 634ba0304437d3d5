//! ListenerSets (GEP-1713): listeners that other teams add to a shared Gateway.
//!
//! A ListenerSet's listeners are served on its parent Gateway's addresses, next to the
//! Gateway's own, once the Gateway's `spec.allowedListeners` accepts the ListenerSet's namespace
//! (by default it accepts none). Routes reach them only through a parentRef naming the
//! ListenerSet, never through the Gateway, so listener names need only be unique per resource.
//! The merged listeners follow the GEP's precedence: the Gateway's own, then ListenerSets oldest
//! first, then by `namespace/name`. A ListenerSet listener that conflicts with an earlier one
//! (the same port with the other protocol, or the same port and hostname) is not served, so a
//! team can neither take over nor break hosts another listener already serves.

use super::listeners::{
    GwListener, ListenerSetKey, ListenerSetState, Parents, check_namespace_filter, declare_listeners,
    namespace_selected,
};
use super::types::AllowedListeners;
use super::{Ctx, EXPERIMENTAL_GROUP, GROUP, creation_order};
use crate::diag::resource_name;
use crate::istio;
use crate::source::Document;

/// Whether a parentRef's group and kind name a ListenerSet.
pub(super) fn is_listener_set(group: &str, kind: &str) -> bool {
    (group == GROUP && kind == "ListenerSet")
        || (group == EXPERIMENTAL_GROUP && matches!(kind, "XListenerSet" | "ListenerSet"))
}

/// Validates a served Gateway's `spec.allowedListeners`.
pub(super) fn check_allowed_listeners(ctx: &mut Ctx<'_, '_, '_>, gateway: &Document, allowed: &AllowedListeners) {
    if let Some(namespaces) = &allowed.namespaces {
        check_namespace_filter(
            ctx,
            gateway,
            "spec.allowedListeners.namespaces",
            namespaces,
            &["None", "Same", "All", "Selector"],
            "None",
        );
    }
}

/// Why `gateway` does not accept ListenerSets of namespace `namespace`, or `None` when it does.
fn not_allowed(
    ctx: &Ctx<'_, '_, '_>,
    gateway: &Document,
    allowed: Option<&AllowedListeners>,
    namespace: &str,
) -> Option<String> {
    let filter = allowed.and_then(|a| a.namespaces.as_ref());
    let gateway_name = resource_name(gateway);
    match filter.and_then(|f| f.from.as_deref()).unwrap_or("None") {
        "All" => None,
        "Same" if namespace == gateway.namespace => None,
        "Same" => Some(format!(
            "{gateway_name} only accepts ListenerSets of its own namespace (spec.allowedListeners.namespaces.from: Same)"
        )),
        "Selector" => {
            let selected = filter
                .and_then(|f| f.selector.as_ref())
                .is_some_and(|s| namespace_selected(ctx, s, namespace));
            (!selected).then(|| {
                format!(
                    "{gateway_name} only accepts ListenerSets of the namespaces its spec.allowedListeners.namespaces.selector matches, and namespace {namespace} does not match"
                )
            })
        }
        _ => Some(format!(
            "{gateway_name} accepts no ListenerSets (spec.allowedListeners.namespaces.from is None, the default; set it to Same, All or Selector)"
        )),
    }
}

/// Why listener `candidate` conflicts with one of the `earlier` listeners of its Gateway, which
/// win by precedence, or `None`.
fn conflict(listeners: &[GwListener<'_>], earlier: &[usize], candidate: &GwListener<'_>) -> Option<String> {
    let protocol = |l: &GwListener<'_>| if l.tls.is_some() { "HTTPS" } else { "HTTP" };
    earlier
        .iter()
        .map(|&li| &listeners[li])
        .filter(|l| l.port == candidate.port)
        .find_map(|l| {
            let owner = format!("listener {} of {}", l.name, resource_name(l.doc));
            if l.tls.is_some() != candidate.tls.is_some() {
                Some(format!(
                    "port {} is already served with protocol {} by {owner}",
                    candidate.port,
                    protocol(l)
                ))
            } else if l.hostname == candidate.hostname {
                Some(format!(
                    "hostname {} on port {} is already served by {owner}",
                    candidate.hostname, candidate.port
                ))
            } else {
                None
            }
        })
}

/// An accepted ListenerSet waiting for its place among its Gateway's listeners.
struct AcceptedListenerSet<'c> {
    /// GEP-1713 precedence among the Gateway's ListenerSets: oldest first, then
    /// `namespace/name`.
    precedence: ((u8, String, usize), String),
    key: ListenerSetKey<'c>,
    listeners: Vec<GwListener<'c>>,
}

/// Attaches every ListenerSet to its parent Gateway: the listeners of accepted ListenerSets are
/// validated and, unless they conflict, added to `listeners` after their Gateway's own; what each
/// ListenerSet offers routes is recorded in `parents`.
pub(super) fn attach_all<'c>(
    ctx: &mut Ctx<'c, '_, '_>,
    listeners: &mut Vec<GwListener<'c>>,
    parents: &mut Parents<'c>,
) {
    let res = ctx.res;
    // Accepted ListenerSets, by index of their Gateway in `parents.gateways`.
    let mut accepted: Vec<Vec<AcceptedListenerSet<'c>>> = parents.gateways.iter().map(|_| Vec::new()).collect();
    for (seq, set) in res.listener_sets.iter().enumerate() {
        let doc = set.doc;
        let key = (
            istio::api_group(doc),
            doc.kind.as_str(),
            doc.namespace.as_str(),
            doc.name.as_str(),
        );
        let parent = &set.spec.parent_ref;
        let group = parent.group.as_deref().unwrap_or(GROUP);
        let kind = parent.kind.as_deref().unwrap_or("Gateway");
        let namespace = parent
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&doc.namespace);
        let name = parent.name.as_str();
        let state = if group != GROUP || kind != "Gateway" {
            let why = format!("parent kind {kind} of group {group:?} is not supported (only Gateway)");
            ctx.diag.warn(
                doc,
                "spec.parentRef",
                format!("{why}; the listeners of this {} are not served", doc.kind),
            );
            ListenerSetState::Rejected(why)
        } else if let Some(&gi) = parents.gateway_index.get(&(namespace, name)) {
            let gateway = &parents.gateways[gi];
            let allowed = gateway.res.spec.allowed_listeners.as_ref();
            match not_allowed(ctx, gateway.res.doc, allowed, &doc.namespace) {
                Some(why) => {
                    ctx.diag.warn(doc, "spec.parentRef", format!("not served: {why}"));
                    ListenerSetState::Rejected(why)
                }
                None => {
                    let declared =
                        declare_listeners(ctx, doc, gateway.res.doc, &set.spec.listeners, &gateway.addresses);
                    accepted[gi].push(AcceptedListenerSet {
                        precedence: (creation_order(doc, seq), format!("{}/{}", doc.namespace, doc.name)),
                        key,
                        listeners: declared,
                    });
                    continue;
                }
            }
        } else if parents.foreign.contains(&(namespace, name)) {
            ListenerSetState::Foreign
        } else {
            ctx.diag.warn(
                doc,
                "spec.parentRef.name",
                format!(
                    "Gateway {namespace}/{name} is not defined; the listeners of this {} are not served",
                    doc.kind
                ),
            );
            ListenerSetState::Rejected(format!("its parent Gateway {namespace}/{name} is not defined"))
        };
        parents.listener_sets.insert(key, state);
    }

    for (gi, mut sets) in accepted.into_iter().enumerate() {
        sets.sort_by(|a, b| a.precedence.cmp(&b.precedence));
        let mut merged = parents.gateways[gi].own.clone();
        for set in sets {
            let mut served = Vec::new();
            for listener in set.listeners {
                if let Some(why) = conflict(listeners, &merged, &listener) {
                    ctx.diag
                        .warn(listener.doc, listener.path.clone(), format!("not served: {why}"));
                    continue;
                }
                served.push(listeners.len());
                merged.push(listeners.len());
                listeners.push(listener);
            }
            parents.gateways[gi].from_listener_sets.extend(&served);
            parents
                .listener_sets
                .insert(set.key, ListenerSetState::Attached(served));
        }
    }
}
