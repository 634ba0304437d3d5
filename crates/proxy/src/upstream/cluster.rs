//! Runtime state of an upstream cluster: endpoints, load balancing and connection pools.
//!
//! A [`ClusterRuntime`] is built from a compiled [`Cluster`] and reused across reloads while
//! the cluster's definition is unchanged, so pooled connections and balancer state survive
//! config edits that do not touch it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::sync::{Arc, Mutex, OnceLock};

use http::uri::Authority;
use meshgate_model::snapshot::{Cluster, Discovery, LoadBalancer};

use super::connector::TlsTarget;
use super::pool::{EndpointPool, UpstreamError};
use crate::stats::UpstreamStats;
use crate::worker;

/// One endpoint as the request path needs it.
pub struct EndpointRuntime {
    /// `address:port`, ready to put in an upstream URI.
    pub authority: Authority,
    pub weight: u32,
    /// Requests in flight, for least-request balancing.
    pub active: AtomicU32,
}

/// Connection pools of one worker thread for one cluster.
struct WorkerPools {
    /// Indexed like [`ClusterRuntime::endpoints`].
    endpoints: Vec<Arc<EndpointPool>>,
    /// Original-destination clusters: pools by the `host:port` the client asked for.
    by_address: Mutex<HashMap<String, Arc<EndpointPool>>>,
    /// TLS clusters whose server name follows the request's host: pools by `address name`,
    /// at most [`MAX_SERVER_NAME_POOLS`].
    by_server_name: Mutex<HashMap<String, Arc<EndpointPool>>>,
}

/// Server-name pools a worker keeps per cluster. Past this, requests for further names share
/// the endpoint's pool (its connections still serve one name each): clients choosing hosts
/// cannot multiply the one-connection allowance each pool has under `maxConnections`, nor
/// push other names' pools out (Envoy bounds this with `max_connection_pools`).
const MAX_SERVER_NAME_POOLS: usize = 64;

pub struct ClusterRuntime {
    pub config: Cluster,
    pub endpoints: Vec<EndpointRuntime>,
    pub stats: Arc<UpstreamStats>,
    /// Endpoint indexes in smooth weighted round-robin order; empty when weights are equal.
    schedule: Vec<u32>,
    next: AtomicUsize,
    /// One pool set per worker thread (plus one for other threads), created on first use.
    pools: Box<[OnceLock<WorkerPools>]>,
    /// Outlier detection, when the cluster's DestinationRule asks for it.
    pub outlier: Option<super::outlier::OutlierDetector>,
    /// Active health checks, when configured.
    pub health: Option<super::health::HealthState>,
    /// TLS origination, when the DestinationRule asks for it.
    pub tls: Option<crate::tls::UpstreamTlsConfig>,
}

impl ClusterRuntime {
    pub fn new(config: Cluster, stats: Arc<UpstreamStats>, workers: usize) -> Result<Self, String> {
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for ep in &config.endpoints {
            let host = if ep.address.contains(':') {
                format!("[{}]", ep.address)
            } else {
                ep.address.clone()
            };
            let authority = Authority::try_from(format!("{host}:{}", ep.port))
                .map_err(|e| format!("cluster {}: endpoint {}:{}: {e}", config.name, ep.address, ep.port))?;
            endpoints.push(EndpointRuntime {
                authority,
                weight: ep.weight.max(1),
                active: AtomicU32::new(0),
            });
        }
        let schedule = weighted_schedule(&endpoints);
        let outlier = config
            .outlier
            .clone()
            .map(|o| super::outlier::OutlierDetector::new(o, endpoints.len()));
        let health = config
            .health_check
            .clone()
            .map(|h| super::health::HealthState::new(h, endpoints.len()));
        let tls = config
            .tls
            .as_ref()
            .map(|t| crate::tls::UpstreamTlsConfig::new(t, &config.name))
            .transpose()?;
        Ok(ClusterRuntime {
            outlier,
            health,
            tls,
            config,
            endpoints,
            stats,
            schedule,
            next: AtomicUsize::new(fastrand::usize(..1024)),
            pools: (0..=workers).map(|_| OnceLock::new()).collect(),
        })
    }

    /// TLS for a connection that carries a request for `host` (its Host or `:authority`);
    /// `Ok(None)` for a plain-text cluster. Fails when no server name can be made of `host`
    /// and the DestinationRule gives no `sni`.
    pub fn tls_target(&self, http2: bool, host: &str) -> Result<Option<TlsTarget>, UpstreamError> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let server_name = tls
            .server_name(host)
            .ok_or_else(|| UpstreamError::Connect(format!("TLS: {host:?} is no server name to send (set tls.sni)")))?;
        Ok(Some(TlsTarget {
            config: tls.client_config(http2).clone(),
            server_name,
        }))
    }

    pub fn is_original_destination(&self) -> bool {
        self.config.discovery == Discovery::OriginalDestination
    }

    /// Picks an endpoint index, skipping endpoints outlier detection has ejected (unless the
    /// cluster is in panic mode); `None` when no endpoint is available. `hash` is the request's
    /// consistent-hash key, when the cluster balances by one and the request carries it.
    pub fn pick(&self, hash: Option<u64>) -> Option<usize> {
        let chosen = self.pick_any(hash)?;
        if self.outlier.is_none() && self.health.is_none() {
            return Some(chosen);
        }
        let panic = self.outlier.as_ref().is_some_and(|o| o.panic());
        let available = |i: usize| {
            self.health.as_ref().is_none_or(|h| h.is_healthy(i))
                && (panic || self.outlier.as_ref().is_none_or(|o| !o.is_ejected(i)))
        };
        if available(chosen) {
            return Some(chosen);
        }
        // The next available endpoint after the balancer's choice.
        let n = self.endpoints.len();
        (1..n).map(|k| (chosen + k) % n).find(|&i| available(i))
    }

    fn pick_any(&self, hash: Option<u64>) -> Option<usize> {
        let n = self.endpoints.len();
        if n <= 1 {
            return (n == 1).then_some(0);
        }
        Some(match (&self.config.load_balancer, hash) {
            (LoadBalancer::ConsistentHash(_), Some(h)) => self.rendezvous(h),
            (LoadBalancer::Random, _) | (LoadBalancer::ConsistentHash(_), None) => self.weighted_random(),
            (LoadBalancer::LeastRequest, _) => {
                // Envoy's default: two random choices, the one with fewer requests in flight.
                let a = self.weighted_random();
                let b = self.weighted_random();
                let load =
                    |i: usize| self.endpoints[i].active.load(Relaxed) as u64 * 1000 / self.endpoints[i].weight as u64;
                if load(b) < load(a) { b } else { a }
            }
            (LoadBalancer::RoundRobin, _) => {
                let i = self.next.fetch_add(1, Relaxed);
                if self.schedule.is_empty() {
                    i % n
                } else {
                    self.schedule[i % self.schedule.len()] as usize
                }
            }
        })
    }

    fn weighted_random(&self) -> usize {
        if self.schedule.is_empty() {
            return fastrand::usize(..self.endpoints.len());
        }
        self.schedule[fastrand::usize(..self.schedule.len())] as usize
    }

    /// Highest-random-weight hashing: the endpoint whose (key, endpoint) hash is largest
    /// wins, so removing an endpoint only moves the keys that were on it.
    fn rendezvous(&self, key: u64) -> usize {
        let mut best = (0, 0.0f64);
        for (i, ep) in self.endpoints.iter().enumerate() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            ep.authority.as_str().hash(&mut h);
            let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
            // Weighted: score = -w / ln(u) favours heavier endpoints in proportion.
            let score = -(ep.weight as f64) / unit.max(f64::MIN_POSITIVE).ln();
            if score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }

    fn worker_pools(&self) -> &WorkerPools {
        let slot = worker::current().min(self.pools.len() - 1);
        self.pools[slot].get_or_init(|| WorkerPools {
            endpoints: self
                .endpoints
                .iter()
                .map(|_| Arc::new(EndpointPool::new(self.config.pool)))
                .collect(),
            by_address: Mutex::default(),
            by_server_name: Mutex::default(),
        })
    }

    /// This worker's pool for endpoint `index`.
    pub fn pool(&self, index: usize) -> &Arc<EndpointPool> {
        &self.worker_pools().endpoints[index]
    }

    /// The pool for a TLS connection to endpoint `address` (whose own pool is `endpoint_pool`):
    /// that pool when the DestinationRule fixes `sni`; with the server name taken from each
    /// request, one pool per name, so that each name has its own connections, its own HTTP/2
    /// connection and its own allowance of one connection, as Envoy keys its pools by SNI.
    pub fn pool_for_tls(&self, endpoint_pool: &Arc<EndpointPool>, address: &str, tls: &TlsTarget) -> Arc<EndpointPool> {
        match &self.tls {
            Some(config) if !config.has_fixed_sni() => {
                let key = format!("{address} {}", tls.server_name.to_str());
                let mut pools = self
                    .worker_pools()
                    .by_server_name
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if let Some(pool) = pools.get(&key) {
                    return pool.clone();
                }
                if pools.len() >= MAX_SERVER_NAME_POOLS {
                    return endpoint_pool.clone();
                }
                pools
                    .entry(key)
                    .or_insert_with(|| Arc::new(EndpointPool::new(self.config.pool)))
                    .clone()
            }
            _ => endpoint_pool.clone(),
        }
    }

    /// This worker's pool for an address outside the endpoint list (original destination).
    pub fn pool_for_address(&self, address: &str) -> Arc<EndpointPool> {
        let mut pools = self.worker_pools().by_address.lock().unwrap_or_else(|p| p.into_inner());
        if pools.len() > 1024 {
            // Bound the memory a client choosing arbitrary destinations can make us hold.
            pools.clear();
        }
        pools
            .entry(address.to_string())
            .or_insert_with(|| Arc::new(EndpointPool::new(self.config.pool)))
            .clone()
    }
}

/// Smooth weighted round-robin order (as nginx does it), so heavier endpoints are spread
/// out rather than hit in bursts. Long schedules are scaled down to at most 1024 slots.
fn weighted_schedule(endpoints: &[EndpointRuntime]) -> Vec<u32> {
    if endpoints.windows(2).all(|w| w[0].weight == w[1].weight) {
        return Vec::new();
    }
    let total: u64 = endpoints.iter().map(|e| e.weight as u64).sum();
    let scale = total.div_ceil(1024).max(1);
    let weights: Vec<i64> = endpoints
        .iter()
        .map(|e| (e.weight as u64 / scale).max(1) as i64)
        .collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        schedule.push(best as u32);
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(weights: &[u32], lb: LoadBalancer) -> ClusterRuntime {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, w)| meshgate_model::snapshot::Endpoint {
                address: format!("127.0.0.{}", i + 1),
                port: 80,
                weight: *w,
                labels: Default::default(),
            })
            .collect();
        let config = Cluster {
            name: "c".into(),
            service: "s".into(),
            subset: String::new(),
            port: 80,
            protocol: meshgate_model::snapshot::UpstreamProtocol::Http1,
            load_balancer: lb,
            discovery: Discovery::Static,
            endpoints,
            pool: Default::default(),
            outlier: None,
            health_check: None,
            tls: None,
        };
        ClusterRuntime::new(config, Default::default(), 1).expect("valid cluster")
    }

    #[test]
    fn weighted_round_robin_follows_weights_and_interleaves() {
        let c = cluster(&[3, 1], LoadBalancer::RoundRobin);
        let picks: Vec<usize> = (0..8).map(|_| c.pick(None).expect("endpoint")).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert!(picks.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)), "{picks:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_spreads() {
        let c = cluster(
            &[1, 1, 1],
            LoadBalancer::ConsistentHash(meshgate_model::snapshot::HashKey::SourceIp),
        );
        let mut seen = [0; 3];
        for key in 0..300u64 {
            let first = c.pick(Some(key)).expect("endpoint");
            assert_eq!(c.pick(Some(key)), Some(first));
            seen[first] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn least_request_prefers_idle_endpoint() {
        let c = cluster(&[1, 1], LoadBalancer::LeastRequest);
        c.endpoints[0].active.store(100, Relaxed);
        let picks_of_busy = (0..200).filter(|_| c.pick(None) == Some(0)).count();
        // Only when both random choices land on the busy endpoint (about 1 in 4).
        assert!(picks_of_busy < 90, "{picks_of_busy}");
    }
}
