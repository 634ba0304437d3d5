//! VirtualService `http[].retries` → [`RetryPolicy`], as Istio's `ConvertPolicy` translates it
//! for Envoy.

use std::time::Duration;

use super::types::HttpRetry;
use super::{Diag, at};
use crate::snapshot::{RetryOn, RetryPolicy};
use crate::source::Document;

/// The retry policy of a forwarding route. No `retries`: Istio's default (2 retries on
/// connection failures, refused streams, gRPC `unavailable`/`cancelled` and 503).
/// `attempts: 0` (or unset): no retries. Otherwise the default with each field given
/// replacing its part; a `retryOn` replaces both the conditions and the status codes.
pub(crate) fn policy(
    doc: &Document,
    route_path: &str,
    retries: Option<&HttpRetry>,
    diag: &mut Diag,
) -> Result<Option<RetryPolicy>, ()> {
    let Some(retries) = retries else {
        return Ok(Some(RetryPolicy::istio_default()));
    };
    let path = at(route_path, "retries");
    let mut ok = true;
    let attempts = retries.attempts.unwrap_or(0);
    let num_retries = match u32::try_from(attempts) {
        Ok(n) => n,
        Err(_) => {
            diag.error(
                doc,
                at(&path, "attempts"),
                format!("attempts must be between 0 and {}, found {attempts}", u32::MAX),
            );
            ok = false;
            0
        }
    };
    let mut policy = RetryPolicy::istio_default();
    policy.num_retries = num_retries;
    let mut duration = |field: &str, value: Option<&str>| -> Option<Duration> {
        let value = value?;
        match crate::duration::parse(value) {
            Ok(d) if d >= Duration::from_millis(1) => Some(d),
            Ok(_) => {
                diag.error(doc, at(&path, field), format!("{value:?} is below the minimum of 1ms"));
                ok = false;
                None
            }
            Err(e) => {
                diag.error(doc, at(&path, field), e);
                ok = false;
                None
            }
        }
    };
    policy.per_try_timeout = duration("perTryTimeout", retries.per_try_timeout.as_deref());
    if let Some(base) = duration("backoff", retries.backoff.as_deref()) {
        policy.backoff_base = base;
        policy.backoff_max = base.saturating_mul(10);
    }
    if let Some(retry_on) = retries.retry_on.as_deref() {
        match parse_retry_on(retry_on) {
            Ok((conditions, codes)) => {
                policy.retry_on = conditions;
                policy.retriable_status_codes = codes;
            }
            Err(e) => {
                diag.error(doc, at(&path, "retryOn"), e);
                ok = false;
            }
        }
    }
    if let Some(ignore) = retries.retry_ignore_previous_hosts {
        policy.avoid_previous_hosts = ignore;
    }
    if !ok {
        return Err(());
    }
    if num_retries == 0 {
        let configured = retries.per_try_timeout.is_some()
            || retries.retry_on.is_some()
            || retries.backoff.is_some()
            || retries.retry_remote_localities.is_some();
        if configured {
            diag.warn(
                doc,
                path,
                "retry settings have no effect: attempts is 0 (or unset), which disables retries",
            );
        }
        return Ok(None);
    }
    Ok(Some(policy))
}

/// Splits Istio's `retryOn` into Envoy conditions and retriable status codes: a bare number
/// is a status code and implies `retriable-status-codes`, as in Istio.
pub(crate) fn parse_retry_on(value: &str) -> Result<(RetryOn, Vec<u16>), String> {
    let mut conditions = RetryOn::NONE;
    let mut codes = Vec::new();
    for part in value.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("empty entry in {value:?}"));
        }
        if part.bytes().all(|b| b.is_ascii_digit()) {
            match part.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => {
                    if !codes.contains(&code) {
                        codes.push(code);
                    }
                    conditions |= RetryOn::RETRIABLE_STATUS_CODES;
                }
                _ => return Err(format!("{part:?} is not an HTTP status code (100-599)")),
            }
            continue;
        }
        match RetryOn::from_name(part) {
            Some(c) => conditions |= c,
            None => {
                let known: Vec<&str> = RetryOn::NAMES.iter().map(|(n, _)| *n).collect();
                let hint = if matches!(
                    part,
                    "retriable-headers" | "envoy-ratelimited" | "http3-post-connect-failure"
                ) {
                    " is not supported by meshgate"
                } else {
                    " is not a retry condition"
                };
                return Err(format!("{part:?}{hint} (use status codes or: {})", known.join(", ")));
            }
        }
    }
    Ok((conditions, codes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_splits_conditions_and_codes() {
        let (on, codes) = parse_retry_on("5xx, 503,connect-failure,409").expect("valid");
        assert_eq!(
            on,
            RetryOn::SERVER_ERROR | RetryOn::CONNECT_FAILURE | RetryOn::RETRIABLE_STATUS_CODES
        );
        assert_eq!(codes, [503, 409]);
        for bad in ["5xx,,reset", "600", "5xxx", "retriable-headers", ""] {
            assert!(parse_retry_on(bad).is_err(), "{bad}");
        }
    }
}
