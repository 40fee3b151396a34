//! File descriptors: every connection, spool file and sled segment takes
//! one. systemd's default soft limit (1 024) is far below what
//! `max_connections` allows, so `serve` raises the soft limit to the hard
//! one at start and says when the configured caps could still exceed it.

use crate::config::Config;

/// Descriptors beyond the connection caps: sled, listeners, the control
/// socket, delivery connections, spool files, the watcher.
pub const HEADROOM: u64 = 256;

/// The soft and hard `RLIMIT_NOFILE` now.
pub fn limits() -> std::io::Result<(u64, u64)> {
    rlimit::Resource::NOFILE.get()
}

/// Raise the soft limit to the hard limit; `(before, after)`.
pub fn raise() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = limits()?;
    if soft < hard {
        rlimit::Resource::NOFILE.set(hard, hard)?;
    }
    Ok((soft, limits()?.0))
}

/// What the configured caps may take at once.
pub fn needed(cfg: &Config) -> u64 {
    (cfg.smtp.max_connections as u64)
        .saturating_add(cfg.quarantine.max_connections as u64)
        .saturating_add(HEADROOM)
}

/// A warning when the caps may need more descriptors than `limit`.
pub fn warning(cfg: &Config, limit: u64) -> Option<String> {
    let need = needed(cfg);
    (need > limit).then(|| {
        format!(
            "[smtp] max_connections ({}) + [quarantine] max_connections ({}) + {HEADROOM} \
             headroom = {need} file descriptors, but the limit is {limit}: connections beyond \
             it wait unanswered in the backlog; raise LimitNOFILE= (systemd) or ulimit -n, \
             or lower the caps",
            cfg.smtp.max_connections, cfg.quarantine.max_connections
        )
    })
}

/// At start: raise the limit, log the result, warn if it is still short.
pub(crate) fn at_start(cfg: &Config) {
    match raise() {
        Ok((before, after)) => {
            tracing::info!(before, after, "file descriptor limit (soft RLIMIT_NOFILE)");
            if let Some(w) = warning(cfg, after) {
                tracing::warn!("{w}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the file descriptor limit"),
    }
}
