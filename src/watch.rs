//! The one file watcher: polls modification times (no extra crate, works
//! on every filesystem) and runs a callback when something changed. The
//! rules and policies reload through it, and so do the quarantine accounts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

/// (path, modified, length) of each watched file: a directory stands for
/// the files directly in it, a missing path for itself.
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut out = Vec::new();
    for path in paths {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.filter_map(Result::ok) {
                if let Ok(meta) = entry.metadata()
                    && meta.is_file()
                {
                    out.push((entry.path(), meta.modified().ok(), meta.len()));
                }
            }
        } else {
            match std::fs::metadata(path) {
                Ok(meta) => out.push((path.clone(), meta.modified().ok(), meta.len())),
                Err(_) => out.push((path.clone(), None, 0)),
            }
        }
    }
    out.sort();
    out
}

/// Polls `paths` (files, or directories for the files directly in them)
/// every `every`, and runs `on_change` on the blocking pool when a file is
/// added, removed or changed. Runs until aborted.
pub(crate) fn spawn<F>(paths: Vec<PathBuf>, every: Duration, on_change: F) -> JoinHandle<()>
where
    F: Fn() + Send + Sync + 'static,
{
    // The baseline is taken now, not when the task first runs, so a change
    // made right after this call is not mistaken for the starting state.
    let mut last = fingerprint(&paths);
    let on_change = Arc::new(on_change);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let scan = paths.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&scan)).await else {
                continue;
            };
            if now == last {
                continue;
            }
            last = now;
            tracing::info!(paths = ?paths, "watched files changed");
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || f()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_changed_file_and_a_new_file_in_a_directory_fire() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("users.toml");
        let dir = tmp.path().join("rules");
        std::fs::create_dir(&dir).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = spawn(
            vec![file.clone(), dir.clone()],
            Duration::from_millis(20),
            move || {
                h.fetch_add(1, Ordering::SeqCst);
            },
        );
        let wait_for = |n: usize| {
            let hits = hits.clone();
            async move {
                for _ in 0..200 {
                    if hits.load(Ordering::SeqCst) >= n {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        std::fs::write(&file, "x").unwrap();
        assert!(wait_for(1).await, "a created file");
        std::fs::write(dir.join("10-a.rhai"), "fn x(c) {}").unwrap();
        assert!(wait_for(2).await, "a new file in a watched directory");
        task.abort();
    }
}
