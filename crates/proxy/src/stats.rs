//! Proxy metrics, rendered in the Prometheus text format for `/stats/prometheus`.
//!
//! Counters live outside the config snapshot, keyed by name, so a reload does not reset
//! them. The request path touches only atomics it already holds an `Arc` to (resolved when a
//! snapshot is activated), never a registry lookup.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::response_flags::{self, ResponseFlags};

/// Requests for one (route, destination cluster) pair, counted by status code.
#[derive(Default)]
pub struct RouteStats {
    /// Counts for status codes 100..=599, indexed by `code - 100`; allocated lazily per
    /// hundred so an unused class costs nothing.
    classes: [std::sync::OnceLock<Box<[AtomicU64; 100]>>; 5],
}

impl RouteStats {
    pub fn record(&self, status: u16) {
        if !(100..600).contains(&status) {
            return;
        }
        let class = usize::from(status / 100 - 1);
        let counts = self.classes[class].get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        counts[usize::from(status % 100)].fetch_add(1, Relaxed);
    }

    fn each(&self, mut f: impl FnMut(u16, u64)) {
        for (class, counts) in self.classes.iter().enumerate() {
            if let Some(counts) = counts.get() {
                for (i, c) in counts.iter().enumerate() {
                    let n = c.load(Relaxed);
                    if n > 0 {
                        f((class as u16 + 1) * 100 + i as u16, n);
                    }
                }
            }
        }
    }
}

/// Connection figures for one upstream cluster.
#[derive(Default)]
pub struct UpstreamStats {
    pub connections_opened: AtomicU64,
    pub connections_active: AtomicU64,
    pub connect_failures: AtomicU64,
    pub requests: AtomicU64,
    pub requests_active: AtomicU64,
    /// Retries sent (Envoy's `upstream_rq_retry`).
    pub retries: AtomicU64,
    /// Requests whose retry got a response that needed no further retry
    /// (`upstream_rq_retry_success`).
    pub retry_successes: AtomicU64,
    /// Retries not sent because the retry budget was used up (`upstream_rq_retry_overflow`).
    pub retry_overflows: AtomicU64,
    /// Tries that hit their per-try timeout (`upstream_rq_per_try_timeout`).
    pub per_try_timeouts: AtomicU64,
    /// Retries in flight now, for the retry budget and the `max_retries` circuit breaker.
    pub retries_active: AtomicU64,
    /// Requests waiting for a connection now (Envoy's `upstream_rq_pending_active`).
    pub requests_pending: AtomicU64,
    /// Endpoints ejected by outlier detection (Envoy's `outlier_detection.ejections_enforced_total`).
    pub outlier_ejections: AtomicU64,
    /// Active health-check probes that failed.
    pub health_check_failures: AtomicU64,
    /// Upstream requests from sending until their response ends, for `max_requests`; only
    /// counted for clusters that set the limit.
    pub requests_open: AtomicU64,
    /// Connections open or being opened, for `max_connections`.
    pub connections_reserved: AtomicU64,
    /// Requests (or retries) refused by each circuit breaker, indexed by [`Breaker`].
    pub overflows: [AtomicU64; 4],
    /// Wakes pending requests when a connection goes idle or closes.
    pub connection_freed: tokio::sync::Notify,
}

/// Envoy's circuit breakers, as the `breaker` label of `meshgate_upstream_overflows_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// A new connection was needed at `max_connections` (the request then waits as pending;
    /// Envoy's `upstream_cx_overflow`).
    Connections = 0,
    /// `max_pending_requests` (`upstream_rq_pending_overflow`).
    Pending = 1,
    /// `max_requests` (Envoy counts these under `upstream_rq_pending_overflow` too).
    Requests = 2,
    /// `max_retries` or the retry budget (`upstream_rq_retry_overflow`).
    Retries = 3,
}

impl Breaker {
    pub const ALL: [Breaker; 4] = [
        Breaker::Connections,
        Breaker::Pending,
        Breaker::Requests,
        Breaker::Retries,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Breaker::Connections => "connections",
            Breaker::Pending => "pending",
            Breaker::Requests => "requests",
            Breaker::Retries => "retries",
        }
    }
}

/// Downstream figures for one listener.
#[derive(Default)]
pub struct ListenerStats {
    pub connections_opened: AtomicU64,
    pub connections_active: AtomicU64,
    pub requests: AtomicU64,
    /// Requests no route matched (`NR`).
    pub no_route: AtomicU64,
}

/// Every metric of the process.
#[derive(Default)]
pub struct Stats {
    routes: Mutex<BTreeMap<(String, String), Arc<RouteStats>>>,
    upstreams: Mutex<BTreeMap<String, Arc<UpstreamStats>>>,
    listeners: Mutex<BTreeMap<String, Arc<ListenerStats>>>,
    pub config_reloads: AtomicU64,
    pub config_reload_failures: AtomicU64,
    pub config_version: AtomicU64,
    /// Requests being handled now (until their response headers are sent).
    pub requests_in_flight: AtomicU64,
    /// Responses carrying each response flag, indexed like [`response_flags::ALL`].
    response_flags: [AtomicU64; response_flags::ALL.len()],
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: AtomicU64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a map half-updated in a way that
    // matters for counters, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stats {
    /// Counts a response under each flag it carries.
    pub fn record_flags(&self, flags: ResponseFlags) {
        for (counter, (flag, _, _)) in self.response_flags.iter().zip(response_flags::ALL) {
            if flags.contains(flag) {
                counter.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn route(&self, route: &str, destination: &str) -> Arc<RouteStats> {
        locked(&self.routes)
            .entry((route.to_string(), destination.to_string()))
            .or_default()
            .clone()
    }

    pub fn upstream(&self, cluster: &str) -> Arc<UpstreamStats> {
        locked(&self.upstreams).entry(cluster.to_string()).or_default().clone()
    }

    pub fn listener(&self, name: &str) -> Arc<ListenerStats> {
        locked(&self.listeners).entry(name.to_string()).or_default().clone()
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP meshgate_requests_total Requests by route, destination cluster and response code.\n");
        out.push_str("# TYPE meshgate_requests_total counter\n");
        for ((route, destination), stats) in locked(&self.routes).iter() {
            stats.each(|code, n| {
                let _ = writeln!(
                    out,
                    "meshgate_requests_total{{route=\"{}\",destination=\"{}\",code=\"{code}\"}} {n}",
                    escape(route),
                    escape(destination)
                );
            });
        }
        let upstreams = locked(&self.upstreams);
        type Field = fn(&UpstreamStats) -> &AtomicU64;
        let upstream_metrics: [(&str, &str, &str, Field); 13] = [
            (
                "meshgate_upstream_health_check_failures_total",
                "counter",
                "Active health-check probes that failed.",
                |s| &s.health_check_failures,
            ),
            (
                "meshgate_upstream_outlier_ejections_total",
                "counter",
                "Endpoints ejected by outlier detection.",
                |s| &s.outlier_ejections,
            ),
            (
                "meshgate_upstream_connections_total",
                "counter",
                "Upstream connections opened.",
                |s| &s.connections_opened,
            ),
            (
                "meshgate_upstream_connections_active",
                "gauge",
                "Upstream connections open now.",
                |s| &s.connections_active,
            ),
            (
                "meshgate_upstream_connect_failures_total",
                "counter",
                "Upstream connection attempts that failed.",
                |s| &s.connect_failures,
            ),
            (
                "meshgate_upstream_requests_total",
                "counter",
                "Requests sent upstream.",
                |s| &s.requests,
            ),
            (
                "meshgate_upstream_requests_active",
                "gauge",
                "Upstream requests in flight.",
                |s| &s.requests_active,
            ),
            (
                "meshgate_upstream_retries_total",
                "counter",
                "Retries sent upstream (upstream_rq_retry).",
                |s| &s.retries,
            ),
            (
                "meshgate_upstream_retry_successes_total",
                "counter",
                "Requests whose retries ended in a response needing no further retry.",
                |s| &s.retry_successes,
            ),
            (
                "meshgate_upstream_retry_overflows_total",
                "counter",
                "Retries not sent because the cluster's retry budget was used up.",
                |s| &s.retry_overflows,
            ),
            (
                "meshgate_upstream_per_try_timeouts_total",
                "counter",
                "Tries that hit the per-try timeout.",
                |s| &s.per_try_timeouts,
            ),
            (
                "meshgate_upstream_retries_active",
                "gauge",
                "Retries in flight now.",
                |s| &s.retries_active,
            ),
            (
                "meshgate_upstream_requests_pending",
                "gauge",
                "Requests waiting for an upstream connection now.",
                |s| &s.requests_pending,
            ),
        ];
        for (name, kind, help, field) in upstream_metrics {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (cluster, stats) in upstreams.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{cluster=\"{}\"}} {}",
                    escape(cluster),
                    field(stats).load(Relaxed)
                );
            }
        }
        let name = "meshgate_upstream_overflows_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests and retries refused by a circuit breaker (response flag UO), by breaker.\n# TYPE {name} counter"
        );
        for (cluster, stats) in upstreams.iter() {
            for breaker in Breaker::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{cluster=\"{}\",breaker=\"{}\"}} {}",
                    escape(cluster),
                    breaker.name(),
                    stats.overflows[breaker as usize].load(Relaxed)
                );
            }
        }
        drop(upstreams);
        let listeners = locked(&self.listeners);
        type ListenerField = fn(&ListenerStats) -> &AtomicU64;
        let listener_metrics: [(&str, &str, &str, ListenerField); 4] = [
            (
                "meshgate_downstream_connections_total",
                "counter",
                "Downstream connections accepted.",
                |s| &s.connections_opened,
            ),
            (
                "meshgate_downstream_connections_active",
                "gauge",
                "Downstream connections open now.",
                |s| &s.connections_active,
            ),
            (
                "meshgate_downstream_requests_total",
                "counter",
                "Downstream requests received.",
                |s| &s.requests,
            ),
            (
                "meshgate_no_route_total",
                "counter",
                "Requests that matched no route (response flag NR).",
                |s| &s.no_route,
            ),
        ];
        for (name, kind, help, field) in listener_metrics {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (listener, stats) in listeners.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\"}} {}",
                    escape(listener),
                    field(stats).load(Relaxed)
                );
            }
        }
        drop(listeners);
        for (name, kind, help, value) in [
            (
                "meshgate_config_reloads_total",
                "counter",
                "Configuration reloads applied.",
                &self.config_reloads,
            ),
            (
                "meshgate_config_reload_failures_total",
                "counter",
                "Configuration reloads rejected; the last good config kept serving.",
                &self.config_reload_failures,
            ),
            (
                "meshgate_config_version",
                "gauge",
                "Version of the configuration being served.",
                &self.config_version,
            ),
            (
                "meshgate_access_log_dropped_total",
                "counter",
                "Access log lines dropped because the log writer fell behind.",
                &self.access_log_dropped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Relaxed)
            );
        }
        out.push_str(
            "# HELP meshgate_response_flags_total Responses by Envoy response flag (UH, UF, UO, NR, URX, UT, DC, UC, FI, DI, RL, UAEX).\n# TYPE meshgate_response_flags_total counter\n",
        );
        for (counter, (_, name, _)) in self.response_flags.iter().zip(response_flags::ALL) {
            let _ = writeln!(
                out,
                "meshgate_response_flags_total{{flag=\"{name}\"}} {}",
                counter.load(Relaxed)
            );
        }
        out
    }
}

fn escape(label: &str) -> std::borrow::Cow<'_, str> {
    if label.contains(['\\', '"', '\n']) {
        label
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        label.into()
    }
}
