//! Reload on file change (through the crate's one watcher, [`crate::watch`])
//! and the limiter housekeeping timer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::policy::Policy;

/// Polls the files of `dirs` every second and calls [`Policy::reload`]
/// when one is added, removed or changed. A failed reload keeps the running
/// set (and is logged and counted by `reload`). Runs until aborted.
pub fn watch(policy: Arc<Policy>, dirs: Vec<PathBuf>) -> JoinHandle<()> {
    watch_every(policy, dirs, Duration::from_secs(1))
}

/// [`watch`] with a chosen poll interval.
pub fn watch_every(policy: Arc<Policy>, dirs: Vec<PathBuf>, every: Duration) -> JoinHandle<()> {
    crate::watch::spawn(dirs, every, move || {
        tracing::info!("rule or policy files changed, reloading");
        // Errors are logged and counted inside reload.
        let _ = policy.reload();
    })
}

/// Calls [`Policy::housekeeping`] every `every` (e.g. 60 s). Runs until aborted.
pub fn spawn_housekeeping(policy: Arc<Policy>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let p = policy.clone();
            if let Ok(keys) = tokio::task::spawn_blocking(move || p.housekeeping()).await {
                tracing::debug!(keys, "rate-limiter housekeeping");
            }
        }
    })
}

/// With `[cluster] redis`: asks Redis every [`PROBE_EVERY`](crate::policy::cluster::PROBE_EVERY)
/// whether it answers, so `postern_ratelimit_backend_up` tells the truth
/// while no mail comes. None for a single node. Runs until aborted.
pub fn spawn_cluster_probe(policy: Arc<Policy>) -> Option<JoinHandle<()>> {
    if !policy.is_clustered() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::policy::cluster::PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = policy.probe_backend().await;
        }
    }))
}
