//! `[rules] keep_recent`: a copy of every message the rules decided on,
//! with what they decided it from, for `postern rules replay --recent`.
//!
//! Tree `recent`: key = received (Unix ms, big-endian) ‖ queue id, so the
//! oldest copies come first and the purge is a walk from the front; value
//! = 4-byte big-endian length of a JSON [`RecentCase`], the JSON, then the
//! message bytes exactly as the rules saw them.
//!
//! The copies are written after the reply, without an fsync of their own
//! (they reach disk with the next group commit or sled's periodic flush): a
//! crash may lose the last copies, never a message. The tree is capped at
//! [`RECENT_MAX_BYTES`]; past it the oldest copies go first.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Result, Store};
use crate::policy::{CheckResults, ListHits, ScanResults};

/// The most message and case bytes kept (1 GiB): a burst of big mail
/// pushes the oldest copies out instead of filling the disk.
pub const RECENT_MAX_BYTES: u64 = 1 << 30;

/// What a received message was decided from, and what was decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentCase {
    /// The queue id (16 hex digits).
    pub id: String,
    /// Unix milliseconds.
    pub received: i64,
    pub ip: IpAddr,
    pub helo: String,
    /// The envelope sender, `""` for `<>`.
    pub from: String,
    pub rcpts: Vec<String>,
    #[serde(default)]
    pub auth_user: Option<String>,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub submission: bool,
    #[serde(default)]
    pub trusted: bool,
    #[serde(default)]
    pub checks: CheckResults,
    #[serde(default)]
    pub scan: ScanResults,
    #[serde(default)]
    pub lists: ListHits,
    /// The verdict given, as a word, and what decided it.
    pub verdict: String,
    pub decided_by: String,
}

fn recent_key(received_ms: i64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(received_ms.max(0) as u64).to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

fn split(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(v.get(..4)?.try_into().ok()?) as usize;
    let json = v.get(4..4 + len)?;
    Some((json, &v[4 + len..]))
}

impl Store {
    /// Keeps a copy of a decided message (not durable by itself).
    pub(crate) fn keep_recent(&self, case: &RecentCase, id: u64, message: &[u8]) -> Result<()> {
        let json = super::encode(case);
        let mut v = Vec::with_capacity(4 + json.len() + message.len());
        v.extend_from_slice(&(json.len() as u32).to_be_bytes());
        v.extend_from_slice(&json);
        v.extend_from_slice(message);
        let added = v.len() as u64;
        self.recent.insert(recent_key(case.received, id), v)?;
        let total = self.recent_bytes.fetch_add(added, Ordering::Relaxed) + added;
        if total > RECENT_MAX_BYTES {
            self.trim_recent(RECENT_MAX_BYTES)?;
        }
        Ok(())
    }

    /// Drops the oldest copies until at most `max` bytes are kept.
    fn trim_recent(&self, max: u64) -> Result<()> {
        while self.recent_bytes.load(Ordering::Relaxed) > max {
            match self.recent.pop_min()? {
                Some((_, v)) => {
                    self.recent_bytes.fetch_sub(
                        (v.len() as u64).min(self.recent_bytes.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                }
                None => {
                    self.recent_bytes.store(0, Ordering::Relaxed);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Deletes the copies received before `cutoff_ms` (Unix ms).
    pub(crate) fn purge_recent(&self, cutoff_ms: i64) -> Result<usize> {
        let end = recent_key(cutoff_ms, 0);
        let mut n = 0;
        for kv in self.recent.range(..end.as_slice()) {
            let (k, v) = kv?;
            if self.recent.remove(&k)?.is_some() {
                n += 1;
                let now = self.recent_bytes.load(Ordering::Relaxed);
                self.recent_bytes
                    .store(now.saturating_sub(v.len() as u64), Ordering::Relaxed);
            }
        }
        Ok(n)
    }

    /// Counts the kept bytes afresh (at start: the counter lives in memory).
    pub(crate) fn recount_recent(&self) -> Result<(usize, u64)> {
        let (mut n, mut bytes) = (0, 0u64);
        for kv in self.recent.iter() {
            let (_, v) = kv?;
            n += 1;
            bytes += v.len() as u64;
        }
        self.recent_bytes.store(bytes, Ordering::Relaxed);
        Ok((n, bytes))
    }

    /// Writes the copies received at or after `since_ms` into `dir` (which
    /// must not exist yet): `ID.eml` per message and `cases.jsonl`, one
    /// [`RecentCase`] per line in received order. Returns how many.
    pub fn export_recent(&self, since_ms: i64, dir: &Path) -> std::io::Result<usize> {
        use std::io::Write;
        use std::os::unix::fs::DirBuilderExt;
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        // Mail is private: only the gateway's user (and root) may read it.
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        let mut cases = std::io::BufWriter::new(std::fs::File::create(dir.join("cases.jsonl"))?);
        let mut n = 0;
        let start = recent_key(since_ms, 0);
        for kv in self.recent.range(start.as_slice()..) {
            let (k, v) = kv.map_err(std::io::Error::other)?;
            let Some((json, message)) = split(&v) else {
                tracing::warn!("recent copy {:02x?}: corrupt record, skipped", &k[..]);
                continue;
            };
            let Ok(case) = serde_json::from_slice::<RecentCase>(json) else {
                tracing::warn!("recent copy {:02x?}: corrupt case, skipped", &k[..]);
                continue;
            };
            // Ids are 16 hex digits we wrote; anything else is not a file name.
            if case.id.len() != 16 || !case.id.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            std::fs::write(dir.join(format!("{}.eml", case.id)), message)?;
            cases.write_all(json)?;
            cases.write_all(b"\n")?;
            n += 1;
        }
        cases.flush()?;
        Ok(n)
    }
}

/// Purges copies older than `keep` now and then every `keep / 2` (between
/// one second and ten minutes), off the runtime's workers. The first pass
/// also counts what is kept, for the byte cap.
pub(crate) async fn purge_loop(store: Store, keep: Duration) {
    if keep.is_zero() {
        // Off: whatever an earlier run kept goes, once.
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.purge_recent(i64::MAX)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(purged = n, "keep_recent is off: copies deleted"),
            _ => tracing::error!("keep_recent purge failed"),
        }
        return;
    }
    let every = (keep / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.recount_recent()).await {
        Ok(Ok((n, bytes))) => tracing::info!(copies = n, bytes, "keep_recent: copies kept"),
        Ok(Err(e)) => tracing::error!(error = %e, "keep_recent: cannot count the copies"),
        Err(e) => tracing::error!(error = %e, "keep_recent: count failed"),
    }
    loop {
        let cutoff = super::now_ms() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.purge_recent(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(purged = n, "keep_recent: old copies deleted"),
            Ok(Err(e)) => tracing::error!(error = %e, "keep_recent purge failed"),
            Err(e) => tracing::error!(error = %e, "keep_recent purge failed"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fmt_id;

    fn case(id: u64, received: i64) -> RecentCase {
        RecentCase {
            id: fmt_id(id),
            received,
            ip: "192.0.2.1".parse().unwrap(),
            helo: "h.test".into(),
            from: "a@far.test".into(),
            rcpts: vec!["u@local.test".into()],
            auth_user: None,
            tls: false,
            submission: false,
            trusted: false,
            checks: CheckResults::default(),
            scan: ScanResults::default(),
            lists: ListHits::default(),
            verdict: "accept".into(),
            decided_by: "default".into(),
        }
    }

    #[test]
    fn keep_purge_export_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("store")).unwrap();
        for (id, t) in [(1, 1_000), (2, 2_000), (3, 3_000)] {
            s.keep_recent(
                &case(id, t),
                id,
                format!("Subject: {id}\r\n\r\nx\r\n").as_bytes(),
            )
            .unwrap();
        }
        assert_eq!(s.purge_recent(2_000).unwrap(), 1);
        let out = dir.path().join("export");
        assert_eq!(s.export_recent(2_500, &out).unwrap(), 1);
        let lines = std::fs::read_to_string(out.join("cases.jsonl")).unwrap();
        let back: RecentCase = serde_json::from_str(lines.trim()).unwrap();
        assert_eq!(back, case(3, 3_000));
        let eml = std::fs::read(out.join(format!("{}.eml", fmt_id(3)))).unwrap();
        assert_eq!(eml, b"Subject: 3\r\n\r\nx\r\n");
        // An existing directory is never written into.
        assert!(s.export_recent(0, &out).is_err());
        // The cap drops the oldest first.
        let (n, bytes) = s.recount_recent().unwrap();
        assert_eq!(n, 2);
        s.trim_recent(bytes - 1).unwrap();
        assert_eq!(s.recount_recent().unwrap().0, 1);
        let again = dir.path().join("again");
        s.export_recent(0, &again).unwrap();
        assert!(again.join(format!("{}.eml", fmt_id(3))).exists());
    }
}
