//! DestinationRule `trafficPolicy.outlierDetection` → the data plane's ejection settings, with
//! Istio's defaults; invalid fields are reported through `report(field, message)`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::snapshot::OutlierDetection;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    consecutive_errors: Option<Value>,
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<Value>,
    consecutive_gateway_errors: Option<Value>,
    consecutive_local_origin_failures: Option<Value>,
    split_external_local_origin_errors: Option<bool>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<Value>,
    min_health_percent: Option<Value>,
}

/// A count field: a non-negative integer (Istio's protobuf wrappers arrive as numbers).
fn count(value: &Option<Value>, field: &str, report: &mut dyn FnMut(&str, String)) -> Option<u32> {
    let v = value.as_ref()?;
    match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
        Some(n) => Some(n),
        None => {
            report(field, format!("must be a non-negative integer, got {v}"));
            None
        }
    }
}

fn duration(value: &Option<String>, field: &str, default: Duration, report: &mut dyn FnMut(&str, String)) -> Duration {
    match value.as_deref().map(crate::duration::parse) {
        None => default,
        Some(Ok(d)) if d >= Duration::from_millis(1) => d,
        Some(Ok(_)) => {
            report(field, "must be at least 1ms".to_string());
            default
        }
        Some(Err(e)) => {
            report(field, e);
            default
        }
    }
}

/// The settings of `value`, or `None` when there is no outlier detection.
pub(crate) fn settings(value: Option<&Value>, report: &mut dyn FnMut(&str, String)) -> Option<OutlierDetection> {
    let value = value?;
    let spec: Spec = match serde_path_to_error::deserialize(value) {
        Ok(s) => s,
        Err(e) => {
            report(&e.path().to_string(), e.into_inner().to_string());
            return None;
        }
    };
    if spec.consecutive_errors.is_some() {
        report(
            "consecutiveErrors",
            "removed from Istio; use consecutive5xxErrors".to_string(),
        );
    }
    let percent = |v: &Option<Value>, field: &str, default: u32, report: &mut dyn FnMut(&str, String)| match count(
        v, field, report,
    ) {
        Some(n) if n <= 100 => n,
        Some(n) => {
            report(field, format!("must be 0..100, got {n}"));
            default
        }
        None => default,
    };
    let split = spec.split_external_local_origin_errors.unwrap_or(false);
    Some(OutlierDetection {
        // Istio: 5 unless set; 0 disables.
        consecutive_5xx: count(&spec.consecutive_5xx_errors, "consecutive5xxErrors", report).unwrap_or(5),
        consecutive_gateway: count(&spec.consecutive_gateway_errors, "consecutiveGatewayErrors", report).unwrap_or(0),
        split_local_origin: split,
        consecutive_local_origin: if split {
            count(
                &spec.consecutive_local_origin_failures,
                "consecutiveLocalOriginFailures",
                report,
            )
            .unwrap_or(5)
        } else {
            0
        },
        interval: duration(&spec.interval, "interval", Duration::from_secs(10), report),
        base_ejection_time: duration(
            &spec.base_ejection_time,
            "baseEjectionTime",
            Duration::from_secs(30),
            report,
        ),
        max_ejection_percent: percent(&spec.max_ejection_percent, "maxEjectionPercent", 10, report),
        min_health_percent: percent(&spec.min_health_percent, "minHealthPercent", 0, report),
        failure_statuses: None,
    })
}
