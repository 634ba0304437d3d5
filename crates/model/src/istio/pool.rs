//! DestinationRule `connectionPool` → [`ConnectionPoolSettings`].
//!
//! Istio's rules, kept here: a count of 0 (or an absent one) means "Istio's default", which is
//! 2^32-1 for every circuit-breaker threshold; `maxRequestsPerConnection: 0` is unlimited;
//! negative counts and durations under 1 ms are errors. Whole `connectionPool` objects
//! override each other (subset port-level > subset > port-level > rule), as Istio merges
//! traffic policies field by field at that level, not inside `connectionPool`.

use std::time::Duration;

use serde_json::Value;

use super::types::{ConnectionPool, HttpPool, TcpPool};
use crate::snapshot::{ConnectionPoolSettings, TcpKeepalive};

/// Compiles `pool`; each invalid field is passed to `report` as (path below
/// `connectionPool`, message) and left at its default.
pub(crate) fn settings(
    pool: Option<&ConnectionPool>,
    report: &mut dyn FnMut(String, String),
) -> ConnectionPoolSettings {
    let mut out = ConnectionPoolSettings::ISTIO_DEFAULT;
    let Some(pool) = pool else {
        return out;
    };
    if let Some(tcp) = &pool.tcp {
        tcp_settings(tcp, &mut out, report);
    }
    if let Some(http) = &pool.http {
        http_settings(http, &mut out, report);
    }
    out
}

fn tcp_settings(tcp: &TcpPool, out: &mut ConnectionPoolSettings, report: &mut dyn FnMut(String, String)) {
    if let Some(n) = count(&tcp.max_connections, "tcp.maxConnections", report).filter(|n| *n > 0) {
        out.max_connections = n;
    }
    if let Some(d) = duration(&tcp.connect_timeout, "tcp.connectTimeout", report) {
        out.connect_timeout = d;
    }
    out.max_connection_duration = duration(&tcp.max_connection_duration, "tcp.maxConnectionDuration", report);
    // Validated only: it applies to TCP proxying, which meshgate does not do (warned about
    // as unsupported).
    duration(&tcp.idle_timeout, "tcp.idleTimeout", report);
    if let Some(k) = &tcp.tcp_keepalive {
        let probes = count(&k.probes, "tcp.tcpKeepalive.probes", report).filter(|p| *p > 0);
        out.tcp_keepalive = Some(TcpKeepalive {
            probes,
            time: duration(&k.time, "tcp.tcpKeepalive.time", report),
            interval: duration(&k.interval, "tcp.tcpKeepalive.interval", report),
        });
    }
}

fn http_settings(http: &HttpPool, out: &mut ConnectionPoolSettings, report: &mut dyn FnMut(String, String)) {
    let positive = |v: Option<u32>| v.filter(|n| *n > 0);
    if let Some(n) = positive(count(
        &http.http1_max_pending_requests,
        "http.http1MaxPendingRequests",
        report,
    )) {
        out.max_pending_requests = n;
    }
    if let Some(n) = positive(count(&http.http2_max_requests, "http.http2MaxRequests", report)) {
        out.max_requests = n;
    }
    if let Some(n) = count(
        &http.max_requests_per_connection,
        "http.maxRequestsPerConnection",
        report,
    ) {
        out.max_requests_per_connection = n;
    }
    if let Some(n) = positive(count(&http.max_retries, "http.maxRetries", report)) {
        out.max_retries = n;
    }
    if let Some(d) = duration(&http.idle_timeout, "http.idleTimeout", report) {
        out.idle_timeout = d;
    }
    // Validated only (warned about as unsupported).
    count(&http.max_concurrent_streams, "http.maxConcurrentStreams", report);
    out.use_client_protocol = http.use_client_protocol.unwrap_or(false);
}

/// An Istio `int32`/`uint32` count: a JSON number or numeric string, 0..=2^31-1.
fn count(value: &Option<Value>, field: &str, report: &mut dyn FnMut(String, String)) -> Option<u32> {
    let value = value.as_ref()?;
    let parsed = match value {
        Value::Null => return None,
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match parsed {
        Some(n) if n < 0 => {
            report(field.to_string(), format!("must not be negative (got {n})"));
            None
        }
        Some(n) if n > i64::from(i32::MAX) => {
            report(field.to_string(), format!("{n} is out of range (at most 2147483647)"));
            None
        }
        Some(n) => Some(n as u32),
        None => {
            report(field.to_string(), format!("expected a whole number, found {value}"));
            None
        }
    }
}

/// A protobuf duration of at least 1 ms, as Istio's validation requires.
fn duration(value: &Option<String>, field: &str, report: &mut dyn FnMut(String, String)) -> Option<Duration> {
    let value = value.as_deref()?;
    match crate::duration::parse(value) {
        Ok(d) if d < Duration::from_millis(1) => {
            report(field.to_string(), format!("duration {value:?} must be at least 1ms"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            report(field.to_string(), e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str) -> (ConnectionPoolSettings, Vec<String>) {
        let pool: ConnectionPool = serde_saphyr::from_str(yaml).expect("yaml");
        let mut errors = Vec::new();
        let s = settings(Some(&pool), &mut |f, m| errors.push(format!("{f}: {m}")));
        (s, errors)
    }

    #[test]
    fn absent_pool_is_istio_default() {
        let s = settings(None, &mut |_, _| panic!("no errors"));
        assert_eq!(s, ConnectionPoolSettings::ISTIO_DEFAULT);
        assert_eq!(s.max_connections, u32::MAX);
        assert_eq!(s.max_pending_requests, u32::MAX);
        assert_eq!(s.max_requests, u32::MAX);
        assert_eq!(s.max_retries, u32::MAX);
        assert_eq!(s.max_requests_per_connection, 0);
        assert_eq!(s.connect_timeout, Duration::from_secs(10));
        assert_eq!(s.idle_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn every_field_is_read() {
        let (s, errors) = compile(
            "tcp:\n  maxConnections: 7\n  connectTimeout: 250ms\n  maxConnectionDuration: 1m\n  tcpKeepalive:\n    probes: 3\n    time: 60s\n    interval: 10s\nhttp:\n  http1MaxPendingRequests: \"5\"\n  http2MaxRequests: 9\n  maxRequestsPerConnection: 1\n  maxRetries: 2\n  idleTimeout: 30s\n  useClientProtocol: true\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s.max_connections, 7);
        assert_eq!(s.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.max_connection_duration, Some(Duration::from_secs(60)));
        assert_eq!(
            s.tcp_keepalive,
            Some(TcpKeepalive {
                probes: Some(3),
                time: Some(Duration::from_secs(60)),
                interval: Some(Duration::from_secs(10)),
            })
        );
        assert_eq!(s.max_pending_requests, 5);
        assert_eq!(s.max_requests, 9);
        assert_eq!(s.max_requests_per_connection, 1);
        assert_eq!(s.max_retries, 2);
        assert_eq!(s.idle_timeout, Duration::from_secs(30));
        assert!(s.use_client_protocol);
    }

    #[test]
    fn zero_thresholds_keep_istio_defaults() {
        let (s, errors) = compile("tcp:\n  maxConnections: 0\nhttp:\n  http1MaxPendingRequests: 0\n  maxRetries: 0\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s, ConnectionPoolSettings::ISTIO_DEFAULT);
    }

    #[test]
    fn bad_values_are_errors_with_their_fields() {
        let (s, errors) = compile(
            "tcp:\n  maxConnections: -1\n  connectTimeout: 0s\nhttp:\n  http2MaxRequests: lots\n  idleTimeout: 5\n  maxRetries: 4294967296\n",
        );
        assert_eq!(s, ConnectionPoolSettings::ISTIO_DEFAULT);
        assert_eq!(errors.len(), 5, "{errors:?}");
        for field in [
            "tcp.maxConnections: must not be negative",
            "tcp.connectTimeout: duration \"0s\" must be at least 1ms",
            "http.http2MaxRequests: expected a whole number",
            "http.idleTimeout: invalid duration",
            "http.maxRetries: 4294967296 is out of range",
        ] {
            assert!(errors.iter().any(|e| e.starts_with(field)), "{field} in {errors:?}");
        }
    }
}
