//! The configuration being served: a compiled snapshot plus the runtime objects the request
//! path needs (TLS configs, cluster pools, metric handles), resolved once per reload.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshgate_model::Snapshot;
use meshgate_model::snapshot::RouteAction;

use crate::stats::{ListenerStats, RouteStats, Stats};
use crate::tls;
use crate::upstream::cluster::ClusterRuntime;

/// A listener as the request path sees it.
pub struct ListenerRuntime {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub stats: Arc<ListenerStats>,
    /// `route_stats[virtual_host][route][destination]`; routes the proxy answers itself
    /// (redirects, direct responses) have one entry with an empty destination.
    pub route_stats: Vec<Vec<Vec<Arc<RouteStats>>>>,
}

/// An activated configuration. Requests hold an `Arc` to the one they started with.
pub struct Active {
    pub version: u64,
    pub snapshot: Snapshot,
    pub listeners: Vec<ListenerRuntime>,
    pub listener_by_addr: HashMap<SocketAddr, usize>,
    /// Each listener's address, indexed like `listeners`.
    listener_addrs: Vec<SocketAddr>,
    pub clusters: Vec<Arc<ClusterRuntime>>,
}

impl Active {
    /// The listener bound to `addr`, looked up on every request: a scan of a handful of
    /// addresses costs less than hashing one with the map's SipHash.
    pub fn listener_index(&self, addr: &SocketAddr) -> Option<usize> {
        if self.listener_addrs.len() <= 16 {
            self.listener_addrs.iter().position(|a| a == addr)
        } else {
            self.listener_by_addr.get(addr).copied()
        }
    }

    /// An empty configuration, served before the first successful load.
    pub fn empty() -> Self {
        Active {
            version: 0,
            snapshot: Snapshot::default(),
            listeners: Vec::new(),
            listener_by_addr: HashMap::new(),
            listener_addrs: Vec::new(),
            clusters: Vec::new(),
        }
    }

    /// Resolves a compiled snapshot into runtime objects, reusing unchanged clusters of
    /// `previous` so their connection pools survive.
    pub fn build(
        snapshot: Snapshot,
        version: u64,
        previous: &Active,
        bind_address: IpAddr,
        workers: usize,
        stats: &Stats,
    ) -> Result<Self, String> {
        let mut clusters = Vec::with_capacity(snapshot.clusters.len());
        for cluster in &snapshot.clusters {
            let reused = previous.clusters.iter().find(|c| c.config == *cluster);
            clusters.push(match reused {
                Some(c) => c.clone(),
                None => Arc::new(ClusterRuntime::new(
                    cluster.clone(),
                    stats.upstream(&cluster.name),
                    workers,
                )?),
            });
        }
        let mut listeners = Vec::with_capacity(snapshot.listeners.len());
        let mut listener_by_addr = HashMap::new();
        for (i, listener) in snapshot.listeners.iter().enumerate() {
            let addr = SocketAddr::new(listener.address.unwrap_or(bind_address), listener.port);
            if listener_by_addr.insert(addr, i).is_some() {
                return Err(format!("two listeners bind {addr}"));
            }
            let tls = match &listener.tls {
                Some(t) => Some(tls::server_config(t, &listener.name)?),
                None => None,
            };
            let route_stats = listener
                .routes
                .virtual_hosts
                .iter()
                .map(|vh| {
                    vh.routes
                        .iter()
                        .map(|route| match &route.action {
                            RouteAction::Forward(f) => f
                                .destinations
                                .iter()
                                .map(|d| {
                                    let cluster = snapshot.clusters.get(d.cluster).map_or("", |c| c.name.as_str());
                                    stats.route(&route.name, cluster)
                                })
                                .collect(),
                            _ => vec![stats.route(&route.name, "")],
                        })
                        .collect()
                })
                .collect();
            listeners.push(ListenerRuntime {
                addr,
                tls,
                stats: stats.listener(&listener.name),
                route_stats,
            });
        }
        for listener in &snapshot.listeners {
            for vh in &listener.routes.virtual_hosts {
                for route in &vh.routes {
                    if let RouteAction::Forward(f) = &route.action
                        && let Some(d) = f.destinations.iter().find(|d| d.cluster >= clusters.len())
                    {
                        return Err(format!(
                            "route {} refers to cluster #{} that does not exist",
                            route.name, d.cluster
                        ));
                    }
                }
            }
        }
        Ok(Active {
            version,
            snapshot,
            listeners,
            listener_addrs: {
                let mut addrs = vec![SocketAddr::from(([0, 0, 0, 0], 0)); listener_by_addr.len()];
                for (addr, &i) in &listener_by_addr {
                    addrs[i] = *addr;
                }
                addrs
            },
            listener_by_addr,
            clusters,
        })
    }
}
