//! Kong's runtime health endpoints: what this instance's balancer sees of an upstream's
//! targets, and setting a target healthy or unhealthy by hand.

use std::sync::Arc;

use serde_json::{Value, json};

use super::entities::{find_entry, names, with_kong_defaults};
use super::*;

/// The running cluster of upstream `key` (id or name) and the upstream as stored.
pub(super) fn upstream_runtime(
    state: &Value,
    key: &str,
    shared: &Shared,
) -> Option<(Value, Option<Arc<crate::upstream::cluster::ClusterRuntime>>)> {
    let entry = find_entry(state, "upstreams", key, "name")?;
    let upstream = state.pointer(&entry.pointer).cloned()?;
    let cluster_name = format!(
        "kong|{}",
        upstream.get("name").and_then(Value::as_str).unwrap_or_default()
    );
    let cluster = shared
        .active
        .load()
        .clusters
        .iter()
        .find(|c| c.config.name == cluster_name)
        .cloned();
    Some((upstream, cluster))
}

/// The endpoint index of `target` (`host[:port]`, Kong's default port 8000) in `cluster`.
pub(super) fn target_endpoint(cluster: &crate::upstream::cluster::ClusterRuntime, target: &str) -> Option<usize> {
    let authority = if target.starts_with('[') {
        if target.contains("]:") {
            target.to_string()
        } else {
            format!("{target}:8000")
        }
    } else {
        match target.matches(':').count() {
            0 => format!("{target}:8000"),
            1 => target.to_string(),
            _ => format!("[{target}]:8000"),
        }
    };
    cluster
        .endpoints
        .iter()
        .position(|e| e.authority.as_str().eq_ignore_ascii_case(&authority))
}

/// `GET /upstreams/{u}/health`: each target's health as the balancer sees it now.
pub(super) fn upstream_health(state: &Value, key: &str, shared: &Shared) -> Reply {
    let Some((upstream, cluster)) = upstream_runtime(state, key, shared) else {
        return not_found();
    };
    let targets = upstream
        .get("targets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let data: Vec<Value> = targets
        .into_iter()
        .map(|target| {
            let address = target.get("target").and_then(Value::as_str).unwrap_or_default();
            let health = match (&cluster, cluster.as_ref().and_then(|c| target_endpoint(c, address))) {
                (Some(c), Some(i)) if c.health.is_some() || c.outlier.is_some() => {
                    let healthy = c.health.as_ref().is_none_or(|h| h.is_healthy(i))
                        && c.outlier.as_ref().is_none_or(|o| !o.is_ejected(i));
                    if healthy { "HEALTHY" } else { "UNHEALTHY" }
                }
                _ => "HEALTHCHECKS_OFF",
            };
            let mut shown = with_kong_defaults("targets", target);
            shown["upstream"] = json!({"id": upstream.get("id")});
            shown["health"] = json!(health);
            shown
        })
        .collect();
    reply(StatusCode::OK, &json!({"data": data, "next": null}))
}

/// `PUT /upstreams/{u}/targets/{t}/healthy|unhealthy`: sets a target's state by hand until
/// the health checks change it again, as Kong does.
pub(super) fn set_target_health(state: &Value, key: &str, target: &str, healthy: bool, shared: &Shared) -> Reply {
    let Some((upstream, cluster)) = upstream_runtime(state, key, shared) else {
        return not_found();
    };
    let address = upstream
        .get("targets")
        .and_then(Value::as_array)
        .and_then(|targets| targets.iter().find(|t| names(t, target, "target")))
        .and_then(|t| t.get("target").and_then(Value::as_str))
        .map(str::to_string);
    let (Some(cluster), Some(address)) = (cluster, address) else {
        return not_found();
    };
    let Some(index) = target_endpoint(&cluster, &address) else {
        return not_found();
    };
    if cluster.health.is_none() && cluster.outlier.is_none() {
        return message(
            StatusCode::BAD_REQUEST,
            &format!("health checks are not enabled for upstream {key:?}"),
        );
    }
    if let Some(health) = &cluster.health {
        health.set_healthy(index, healthy);
    }
    if let Some(outlier) = &cluster.outlier {
        if healthy {
            outlier.reinstate(index);
        } else if cluster.health.is_none() {
            outlier.eject_until_reinstated(index);
        }
    }
    no_content()
}
