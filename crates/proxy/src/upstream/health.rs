//! Active health checks: every endpoint of a cluster with a [`HealthCheck`] is probed with an
//! HTTP `GET` at its interval; `unhealthy_threshold` failures in a row take it out of load
//! balancing, `healthy_threshold` successes bring it back. One task drives all probes and
//! follows reloads: clusters that leave the configuration stop being probed.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use meshgate_model::snapshot::HealthCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cluster::ClusterRuntime;
use crate::Shared;

/// How often the prober looks for probes that are due.
const TICK: Duration = Duration::from_millis(100);

struct EndpointHealth {
    healthy: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    /// Milliseconds since `epoch` when the next probe is due.
    next_probe: AtomicU64,
    probing: AtomicBool,
    /// Set while the endpoint is ejected by passive checks and its successes are being
    /// counted from the ejection on (Kong resets the counters when a target changes state).
    counting_since_ejection: AtomicBool,
}

pub struct HealthState {
    config: HealthCheck,
    endpoints: Box<[EndpointHealth]>,
    epoch: Instant,
}

impl HealthState {
    pub fn new(config: HealthCheck, endpoints: usize) -> HealthState {
        HealthState {
            config,
            endpoints: (0..endpoints)
                .map(|_| EndpointHealth {
                    healthy: AtomicBool::new(true),
                    successes: AtomicU32::new(0),
                    failures: AtomicU32::new(0),
                    next_probe: AtomicU64::new(0),
                    probing: AtomicBool::new(false),
                    counting_since_ejection: AtomicBool::new(false),
                })
                .collect(),
            epoch: Instant::now(),
        }
    }

    /// Sets an endpoint's state by hand (Kong's `/targets/{t}/healthy|unhealthy`); the
    /// counters start over, so probes change it again only after their thresholds.
    pub fn set_healthy(&self, endpoint: usize, healthy: bool) {
        if let Some(e) = self.endpoints.get(endpoint) {
            e.healthy.store(healthy, Relaxed);
            e.successes.store(0, Relaxed);
            e.failures.store(0, Relaxed);
        }
    }

    pub fn is_healthy(&self, endpoint: usize) -> bool {
        self.endpoints.get(endpoint).is_none_or(|e| e.healthy.load(Relaxed))
    }

    fn record(&self, endpoint: usize, ok: bool, cluster: &ClusterRuntime) {
        let Some(e) = self.endpoints.get(endpoint) else { return };
        if ok {
            e.failures.store(0, Relaxed);
            // Passive checks (outlier detection) cannot see a host they ejected recover; the
            // active check brings it back after `healthy_threshold` successes since then.
            let ejected = cluster.outlier.as_ref().is_some_and(|o| o.is_ejected(endpoint));
            if ejected && !e.counting_since_ejection.swap(true, Relaxed) {
                e.successes.store(0, Relaxed);
            }
            let successes = e.successes.fetch_add(1, Relaxed) + 1;
            if successes >= self.config.healthy_threshold {
                if !e.healthy.load(Relaxed) {
                    e.healthy.store(true, Relaxed);
                    tracing::info!(cluster = %cluster.config.name, endpoint = %cluster.endpoints[endpoint].authority, "health check: endpoint healthy again");
                }
                if ejected && cluster.outlier.as_ref().is_some_and(|o| o.reinstate(endpoint)) {
                    e.counting_since_ejection.store(false, Relaxed);
                    tracing::info!(cluster = %cluster.config.name, endpoint = %cluster.endpoints[endpoint].authority, "health check: endpoint taken out by passive checks is healthy again");
                }
            }
            if !ejected {
                e.counting_since_ejection.store(false, Relaxed);
            }
        } else {
            e.successes.store(0, Relaxed);
            cluster.stats.health_check_failures.fetch_add(1, Relaxed);
            let failures = e.failures.fetch_add(1, Relaxed) + 1;
            if e.healthy.load(Relaxed) && failures >= self.config.unhealthy_threshold {
                e.healthy.store(false, Relaxed);
                tracing::warn!(cluster = %cluster.config.name, endpoint = %cluster.endpoints[endpoint].authority, "health check: endpoint unhealthy");
            }
        }
    }
}

/// Probes the endpoints of every cluster of the active configuration that has health checks.
/// While no cluster has them, it sleeps until the next reload instead of ticking, so an idle
/// proxy (a sidecar, most of the time) is not woken ten times a second for nothing.
pub async fn run(shared: Arc<Shared>) {
    let mut versions = shared.version.subscribe();
    loop {
        let active = shared.active.load_full();
        if !active.clusters.iter().any(|c| c.health.is_some()) {
            drop(active);
            if versions.changed().await.is_err() {
                return;
            }
            continue;
        }
        for cluster in &active.clusters {
            let Some(health) = &cluster.health else { continue };
            let now = health.epoch.elapsed().as_millis() as u64;
            for (i, e) in health.endpoints.iter().enumerate() {
                if now < e.next_probe.load(Relaxed) || e.probing.swap(true, Relaxed) {
                    continue;
                }
                e.next_probe
                    .store(now + health.config.interval.as_millis() as u64, Relaxed);
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    let Some(health) = &cluster.health else { return };
                    let ok = match probe_tls(&cluster) {
                        Ok(tls) => probe(&health.config, cluster.endpoints[i].authority.as_str(), tls).await,
                        Err(e) => {
                            tracing::debug!(cluster = %cluster.config.name, error = ?e, "health probe has no TLS server name");
                            false
                        }
                    };
                    health.record(i, ok, &cluster);
                    health.endpoints[i].probing.store(false, Relaxed);
                });
            }
        }
        drop(active);
        tokio::time::sleep(TICK).await;
    }
}

/// The TLS of a cluster's probes: as Envoy's, they use the cluster's TLS (unless the check
/// asks for plain text), named with the rule's `sni`, else its first subject alt name, else
/// the service host, since a probe has no request host to take the name from. A name that
/// cannot be made is a failed probe, never a plain-text one.
fn probe_tls(cluster: &ClusterRuntime) -> Result<Option<super::connector::TlsTarget>, super::pool::UpstreamError> {
    let plain = cluster.health.as_ref().is_some_and(|h| h.config.plain_text);
    let Some(tls) = cluster.config.tls.as_ref().filter(|_| !plain) else {
        return Ok(None);
    };
    let name = tls
        .sni
        .as_deref()
        .or(tls.subject_alt_names.first().map(String::as_str))
        .unwrap_or(&cluster.config.service);
    cluster.tls_target(false, name)
}

/// One probe: `GET path` on a new connection; healthy when the status is a healthy one.
async fn probe(config: &HealthCheck, authority: &str, tls: Option<super::connector::TlsTarget>) -> bool {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
        let mut stream: Box<dyn Probed> = match tls {
            None => Box::new(tcp),
            Some(t) => Box::new(
                tokio_rustls::TlsConnector::from(t.config)
                    .connect(t.server_name, tcp)
                    .await
                    .ok()?,
            ),
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: meshgate-health-check\r\nConnection: close\r\n\r\n",
            config.path
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        stream.flush().await.ok()?;
        let mut head = [0u8; 32];
        let mut read = 0;
        while read < 12 {
            let n = stream.read(&mut head[read..]).await.ok()?;
            if n == 0 {
                break;
            }
            read += n;
        }
        let line = std::str::from_utf8(&head[..read]).ok()?;
        line.split(' ').nth(1)?.parse::<u16>().ok()
    };
    match tokio::time::timeout(config.timeout, attempt).await {
        Ok(Some(status)) => config.healthy_statuses.contains(&status),
        _ => false,
    }
}

/// A probe's connection: plain TCP or TLS.
trait Probed: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Probed for T {}
