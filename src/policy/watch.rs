//! Reload on file change (mtime polling, no extra crate) and the limiter
//! housekeeping timer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use crate::policy::Policy;

/// (path, modified, length) of every file directly in `dirs`, sorted.
fn fingerprint(dirs: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            out.push((dir.clone(), None, 0));
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if let Ok(meta) = entry.metadata()
                && meta.is_file()
            {
                out.push((path, meta.modified().ok(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Polls the files of `dirs` every second and calls [`Policy::reload`]
/// when one is added, removed or changed. A failed reload keeps the running
/// set (and is logged and counted by `reload`). Runs until aborted.
pub fn watch(policy: Arc<Policy>, dirs: Vec<PathBuf>) -> JoinHandle<()> {
    watch_every(policy, dirs, Duration::from_secs(1))
}

/// [`watch`] with a chosen poll interval.
pub fn watch_every(policy: Arc<Policy>, dirs: Vec<PathBuf>, every: Duration) -> JoinHandle<()> {
    // The baseline is taken now, not when the task first runs, so a change
    // made right after this call is not mistaken for the starting state.
    let mut last = fingerprint(&dirs);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let scan_dirs = dirs.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&scan_dirs)).await else {
                continue;
            };
            if now == last {
                continue;
            }
            last = now;
            tracing::info!(dirs = ?dirs.iter().map(|d: &PathBuf| d.as_path()).collect::<Vec<&Path>>(), "rule or policy files changed, reloading");
            let p = policy.clone();
            // Errors are logged and counted inside reload.
            let _ = tokio::task::spawn_blocking(move || p.reload()).await;
        }
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
