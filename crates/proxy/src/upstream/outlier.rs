//! Passive health checking (Envoy's outlier detection as Istio configures it): consecutive
//! failures of an endpoint eject it for `base_ejection_time` × the number of times it was
//! ejected; it comes back when the time is up and real traffic probes it (a failure ejects it
//! again, for longer). The request path only touches atomics.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use meshgate_model::snapshot::OutlierDetection;

use crate::stats::UpstreamStats;

/// Envoy's default `max_ejection_time`.
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// How a try to an endpoint ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// The upstream answered with this status.
    Status(u16),
    /// No response: connection failure, reset or timeout (a "local origin" failure).
    LocalFailure,
}

#[derive(Default)]
struct HostHealth {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Milliseconds since `epoch` until which the host is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    /// The ejection multiplier: times ejected, decreasing while healthy.
    ejections: AtomicU32,
    /// When the host last came back (ms since `epoch`), for the multiplier's decrease.
    returned_at: AtomicU64,
}

pub struct OutlierDetector {
    config: OutlierDetection,
    hosts: Box<[HostHealth]>,
    ejected: AtomicU32,
    epoch: Instant,
}

impl OutlierDetector {
    pub fn new(config: OutlierDetection, hosts: usize) -> OutlierDetector {
        OutlierDetector {
            config,
            hosts: (0..hosts).map(|_| HostHealth::default()).collect(),
            ejected: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether `host` is ejected now. A host whose time is up is returned here (once).
    pub fn is_ejected(&self, host: usize) -> bool {
        let Some(h) = self.hosts.get(host) else { return false };
        let until = h.ejected_until.load(Relaxed);
        if until == 0 {
            return false;
        }
        let now = self.now_ms();
        if now < until {
            return true;
        }
        if h.ejected_until.compare_exchange(until, 0, Relaxed, Relaxed).is_ok() {
            self.ejected.fetch_sub(1, Relaxed);
            h.returned_at.store(now.max(1), Relaxed);
            h.consecutive_5xx.store(0, Relaxed);
            h.consecutive_gateway.store(0, Relaxed);
            h.consecutive_local.store(0, Relaxed);
        }
        false
    }

    /// Below `minHealthPercent` of hosts available, ejections are ignored (Envoy's panic
    /// threshold, which Istio sets from it).
    pub fn panic(&self) -> bool {
        let n = self.hosts.len() as u64;
        let healthy = n.saturating_sub(u64::from(self.ejected.load(Relaxed)));
        self.config.min_health_percent > 0 && healthy * 100 < n * u64::from(self.config.min_health_percent)
    }

    pub fn ejected_now(&self) -> u32 {
        self.ejected.load(Relaxed)
    }

    /// Counts a try's outcome against `host` and ejects it when a threshold is reached.
    pub fn record(&self, host: usize, outcome: TryOutcome, stats: &UpstreamStats) {
        let Some(h) = self.hosts.get(host) else { return };
        let c = &self.config;
        let bump =
            |counter: &AtomicU32, threshold: u32| threshold > 0 && counter.fetch_add(1, Relaxed) + 1 >= threshold;
        let reset = |counter: &AtomicU32| {
            if counter.load(Relaxed) != 0 {
                counter.store(0, Relaxed);
            }
        };
        let eject = match outcome {
            TryOutcome::Status(status) if c.is_failure_status(status) => {
                let gateway = matches!(status, 502..=504);
                let by_5xx = bump(&h.consecutive_5xx, c.consecutive_5xx);
                let by_gateway = gateway && bump(&h.consecutive_gateway, c.consecutive_gateway);
                if !gateway {
                    reset(&h.consecutive_gateway);
                }
                by_5xx || by_gateway
            }
            TryOutcome::Status(_) => {
                reset(&h.consecutive_5xx);
                reset(&h.consecutive_gateway);
                reset(&h.consecutive_local);
                false
            }
            TryOutcome::LocalFailure if c.split_local_origin => bump(&h.consecutive_local, c.consecutive_local_origin),
            // Not split: Envoy counts a connection failure as a 503 from the host.
            TryOutcome::LocalFailure => {
                let by_5xx = bump(&h.consecutive_5xx, c.consecutive_5xx);
                let by_gateway = bump(&h.consecutive_gateway, c.consecutive_gateway);
                by_5xx || by_gateway
            }
        };
        if eject {
            self.eject(host, stats);
        }
    }

    /// Ends `host`'s ejection now (an active health check found it healthy, as Kong and
    /// Envoy let active checks do).
    pub fn reinstate(&self, host: usize) -> bool {
        let Some(h) = self.hosts.get(host) else { return false };
        let until = h.ejected_until.load(Relaxed);
        if until == 0 || h.ejected_until.compare_exchange(until, 0, Relaxed, Relaxed).is_err() {
            return false;
        }
        self.ejected.fetch_sub(1, Relaxed);
        h.returned_at.store(self.now_ms().max(1), Relaxed);
        h.consecutive_5xx.store(0, Relaxed);
        h.consecutive_gateway.store(0, Relaxed);
        h.consecutive_local.store(0, Relaxed);
        true
    }

    /// Takes `host` out by hand until it is reinstated (Kong's `/targets/{t}/unhealthy` on
    /// an upstream with passive checks only).
    pub fn eject_until_reinstated(&self, host: usize) {
        let Some(h) = self.hosts.get(host) else { return };
        if h.ejected_until.swap(u64::MAX, Relaxed) == 0 {
            self.ejected.fetch_add(1, Relaxed);
        }
    }

    fn eject(&self, host: usize, stats: &UpstreamStats) {
        let h = &self.hosts[host];
        if h.ejected_until.load(Relaxed) != 0 {
            return;
        }
        // Envoy ejects at least one host, whatever maxEjectionPercent says.
        let n = self.hosts.len() as u32;
        let allowed = (n * self.config.max_ejection_percent / 100).max(1);
        if self.ejected.fetch_add(1, Relaxed) >= allowed {
            self.ejected.fetch_sub(1, Relaxed);
            return;
        }
        let now = self.now_ms();
        // The multiplier drops by one per healthy `interval` since the host last came back.
        let returned = h.returned_at.load(Relaxed);
        let interval = self.config.interval.as_millis().max(1) as u64;
        let healthy_intervals = if returned == 0 {
            0
        } else {
            (now - returned.min(now)) / interval
        };
        let previous = u64::from(h.ejections.load(Relaxed)).saturating_sub(healthy_intervals);
        let multiplier = previous + 1;
        h.ejections.store(multiplier.min(u64::from(u32::MAX)) as u32, Relaxed);
        let base = self.config.base_ejection_time;
        let time = base.saturating_mul(multiplier as u32).min(MAX_EJECTION_TIME.max(base));
        h.ejected_until.store((now + time.as_millis() as u64).max(1), Relaxed);
        h.consecutive_5xx.store(0, Relaxed);
        h.consecutive_gateway.store(0, Relaxed);
        h.consecutive_local.store(0, Relaxed);
        stats.outlier_ejections.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(hosts: usize, max_percent: u32) -> OutlierDetector {
        OutlierDetector::new(
            OutlierDetection {
                consecutive_5xx: 3,
                consecutive_gateway: 0,
                split_local_origin: false,
                consecutive_local_origin: 0,
                interval: Duration::from_millis(50),
                base_ejection_time: Duration::from_millis(100),
                max_ejection_percent: max_percent,
                min_health_percent: 0,
                failure_statuses: None,
            },
            hosts,
        )
    }

    #[test]
    fn consecutive_5xx_eject_and_time_brings_the_host_back() {
        let stats = UpstreamStats::default();
        let d = detector(3, 50);
        d.record(0, TryOutcome::Status(500), &stats);
        d.record(0, TryOutcome::Status(200), &stats);
        d.record(0, TryOutcome::Status(500), &stats);
        d.record(0, TryOutcome::Status(500), &stats);
        assert!(!d.is_ejected(0), "a success in between resets the count");
        d.record(0, TryOutcome::LocalFailure, &stats);
        assert!(d.is_ejected(0));
        assert_eq!(stats.outlier_ejections.load(Relaxed), 1);
        std::thread::sleep(Duration::from_millis(120));
        assert!(!d.is_ejected(0), "back after the ejection time");
        assert_eq!(d.ejected_now(), 0);
    }

    #[test]
    fn max_ejection_percent_still_allows_one() {
        let stats = UpstreamStats::default();
        let d = detector(3, 10);
        for host in 0..2 {
            for _ in 0..3 {
                d.record(host, TryOutcome::Status(503), &stats);
            }
        }
        assert!(d.is_ejected(0));
        assert!(!d.is_ejected(1), "10% of 3 hosts rounds to the minimum of one ejection");
    }

    #[test]
    fn kong_statuses_count_and_an_active_check_reinstates() {
        let stats = UpstreamStats::default();
        let d = OutlierDetector::new(
            OutlierDetection {
                consecutive_5xx: 2,
                consecutive_gateway: 0,
                split_local_origin: true,
                consecutive_local_origin: 0,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(3600),
                max_ejection_percent: 100,
                min_health_percent: 0,
                failure_statuses: Some(vec![429, 500, 503]),
            },
            2,
        );
        // 502 is not in the list; 429 is.
        d.record(0, TryOutcome::Status(502), &stats);
        d.record(0, TryOutcome::Status(502), &stats);
        assert!(!d.is_ejected(0));
        d.record(0, TryOutcome::Status(429), &stats);
        d.record(0, TryOutcome::Status(503), &stats);
        assert!(d.is_ejected(0));
        // Connection failures have no threshold here.
        for _ in 0..10 {
            d.record(1, TryOutcome::LocalFailure, &stats);
        }
        assert!(!d.is_ejected(1));
        assert!(d.reinstate(0));
        assert!(!d.is_ejected(0));
        assert_eq!(d.ejected_now(), 0);
        assert!(!d.reinstate(0), "only an ejected host is reinstated");
    }
}
