//! Loading and hot-reloading configuration.
//!
//! A reload compiles the files from scratch. Only a config that parses, validates and
//! activates completely replaces the one being served; anything else is logged with the
//! findings that name file, resource and field, and the last good config keeps serving.
//! File events are debounced because editors report several events per save.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use meshgate_model::Severity;
use tokio::sync::mpsc;

use crate::Shared;
use crate::active::Active;

/// Quiet period after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Compiles the config files and, if everything is valid, makes them the served config.
pub fn reload(shared: &Shared) -> Result<u64, String> {
    let result = meshgate_model::source::read_paths(&shared.options.config_paths)
        .and_then(|mut documents| {
            documents.extend(shared.admin_api_documents.load().iter().cloned());
            meshgate_model::compile(&documents, &shared.options.compile)
        })
        .map_err(|findings| {
            for f in &findings.0 {
                match f.severity {
                    Severity::Error => tracing::error!("{f}"),
                    Severity::Warning => tracing::warn!("{f}"),
                }
            }
            format!("{} error(s) in the configuration", findings.errors().count())
        })
        .and_then(|compiled| {
            for w in &compiled.warnings {
                tracing::warn!("{w}");
            }
            let previous = shared.active.load();
            let version = previous.version + 1;
            Active::build(
                compiled.snapshot,
                version,
                &previous,
                shared.options.bind_address,
                shared.options.workers,
                &shared.stats,
            )
        });
    match result {
        Ok(active) => {
            let version = active.version;
            let (listeners, clusters) = (active.listeners.len(), active.clusters.len());
            shared.active.store(Arc::new(active));
            shared.stats.config_version.store(version, Relaxed);
            shared.stats.config_reloads.fetch_add(1, Relaxed);
            shared.version.send_replace(version);
            tracing::info!(version, listeners, clusters, "configuration activated");
            Ok(version)
        }
        Err(e) => {
            shared.stats.config_reload_failures.fetch_add(1, Relaxed);
            tracing::error!(
                "configuration rejected, still serving version {}: {e}",
                shared.active.load().version
            );
            Err(e)
        }
    }
}

/// Reloads on SIGHUP and whenever a config file changes, until the process ends.
pub async fn watch(shared: Arc<Shared>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let _watch = match crate::config_watch::start(&shared.options.config_paths, tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP");
            None
        }
    };
    let sighup_tx = tx;
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading configuration");
            if sighup_tx.send(()).is_err() {
                return;
            }
        }
    });
    while rx.recv().await.is_some() {
        // Debounce: wait until events stop arriving for a moment.
        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
        let shared = shared.clone();
        let _ = tokio::task::spawn_blocking(move || reload(&shared)).await;
    }
}
