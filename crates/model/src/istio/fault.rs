//! VirtualService `http[].fault`: delays and aborts injected before a request is routed, as
//! Envoy's fault filter does (delay first, then abort; percentages per request).

use serde::Deserialize;
use serde_json::Value;

use super::Diag;
use crate::diag::{at, decode_value};
use crate::snapshot::{FaultAbort, FaultDelay, FaultPolicy};
use crate::source::Document;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpFaultInjection {
    delay: Option<Delay>,
    abort: Option<Abort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Delay {
    fixed_delay: Option<String>,
    exponential_delay: Option<Value>,
    percentage: Option<Percent>,
    /// Istio's deprecated integer percentage.
    percent: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Abort {
    http_status: Option<i64>,
    grpc_status: Option<String>,
    http2_error: Option<Value>,
    percentage: Option<Percent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Percent {
    value: Option<f64>,
}

/// gRPC status codes by the names Istio accepts.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A percentage (0–100, default 100) as requests per million.
fn per_million(
    doc: &Document,
    path: &str,
    percentage: Option<&Percent>,
    percent: Option<i64>,
    diag: &mut Diag,
) -> Option<u32> {
    let value = match (percentage.and_then(|p| p.value), percent) {
        (Some(v), _) => v,
        (None, Some(p)) => p as f64,
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&value) || value.is_nan() {
        diag.error(
            doc,
            at(path, "percentage.value"),
            format!("must be 0..100, got {value}"),
        );
        return None;
    }
    Some((value * 10_000.0).round() as u32)
}

/// The route's fault policy; `Err` after reporting invalid values.
pub(crate) fn policy(
    doc: &Document,
    route_path: &str,
    fault: Option<&Value>,
    diag: &mut Diag,
) -> Result<Option<FaultPolicy>, ()> {
    let Some(fault) = fault else { return Ok(None) };
    let path = at(route_path, "fault");
    let spec: HttpFaultInjection = decode_value(doc, fault, &path, diag).ok_or(())?;
    let mut ok = true;
    let delay = match &spec.delay {
        None => None,
        Some(d) => {
            let dpath = at(&path, "delay");
            if d.exponential_delay.is_some() {
                diag.error(
                    doc,
                    at(&dpath, "exponentialDelay"),
                    "not supported (Istio does not support it either)",
                );
                ok = false;
            }
            let share = per_million(doc, &dpath, d.percentage.as_ref(), d.percent, diag);
            match (d.fixed_delay.as_deref().map(crate::duration::parse), share) {
                (Some(Ok(duration)), Some(per_million)) => Some(FaultDelay { duration, per_million }),
                (Some(Err(e)), _) => {
                    diag.error(doc, at(&dpath, "fixedDelay"), e);
                    ok = false;
                    None
                }
                (None, _) => {
                    diag.error(doc, at(&dpath, "fixedDelay"), "required");
                    ok = false;
                    None
                }
                (_, None) => {
                    ok = false;
                    None
                }
            }
        }
    };
    let abort = match &spec.abort {
        None => None,
        Some(a) => {
            let apath = at(&path, "abort");
            let share = per_million(doc, &apath, a.percentage.as_ref(), None, diag);
            if a.http2_error.is_some() {
                diag.error(doc, at(&apath, "http2Error"), "not supported yet");
                ok = false;
            }
            let kind = match (a.http_status, a.grpc_status.as_deref()) {
                (Some(status), None) if (200..=599).contains(&status) => Some(FaultAbort::Http(status as u16)),
                (Some(status), None) => {
                    diag.error(doc, at(&apath, "httpStatus"), format!("must be 200..599, got {status}"));
                    None
                }
                (None, Some(code)) => match GRPC_CODES.iter().position(|c| *c == code) {
                    Some(n) => Some(FaultAbort::Grpc(n as u32)),
                    None => {
                        diag.error(doc, at(&apath, "grpcStatus"), format!("unknown gRPC status {code:?}"));
                        None
                    }
                },
                (Some(_), Some(_)) => {
                    diag.error(doc, &apath, "httpStatus and grpcStatus are mutually exclusive");
                    None
                }
                (None, None) => {
                    diag.error(doc, &apath, "httpStatus or grpcStatus is required");
                    None
                }
            };
            match (kind, share) {
                (Some(kind), Some(per_million)) => Some((kind, per_million)),
                _ => {
                    ok = false;
                    None
                }
            }
        }
    };
    if !ok {
        return Err(());
    }
    if delay.is_none() && abort.is_none() {
        return Ok(None);
    }
    Ok(Some(FaultPolicy { delay, abort }))
}
