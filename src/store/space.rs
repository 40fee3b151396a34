//! The free-space reserve of the data dir (`[server] min_free_space`).
//!
//! sled must never meet ENOSPC: after a write fails for want of space it stops
//! answering (writes and flushes hang) until the process restarts, so "recovery
//! when space returns" is only possible if we refuse new mail *before* the disk
//! is full. Like Postfix's `queue_minfree`, a message is taken only while the
//! filesystem keeps the reserve plus twice the message (sled writes a value to its
//! log and again when it compacts a segment) free afterwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shared by every clone of the store.
#[derive(Clone, Debug)]
pub(crate) struct Space {
    dir: Arc<PathBuf>,
    reserve: Arc<AtomicU64>,
}

/// Why there is no room: what is free and what was needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Short {
    pub(crate) free: u64,
    pub(crate) needed: u64,
}

impl Space {
    pub(crate) fn new(dir: PathBuf) -> Space {
        Space {
            dir: Arc::new(dir),
            reserve: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn set_reserve(&self, bytes: u64) {
        self.reserve.store(bytes, Ordering::Relaxed);
    }

    /// `Ok` when `bytes` more can be stored and the reserve still kept. A
    /// filesystem that cannot say (statvfs fails) is taken as having room: the
    /// write itself then says what is wrong.
    pub(crate) fn room_for(&self, bytes: u64) -> Result<(), Short> {
        let reserve = self.reserve.load(Ordering::Relaxed);
        if reserve == 0 {
            return Ok(());
        }
        let Ok(free) = fs2::available_space(self.dir.as_path()) else {
            return Ok(());
        };
        let needed = reserve.saturating_add(bytes.saturating_mul(2));
        if free < needed {
            Err(Short { free, needed })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_beyond_the_disk_refuses_and_zero_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let s = Space::new(dir.path().to_path_buf());
        assert_eq!(s.room_for(u64::MAX / 4), Ok(()), "no reserve: no check");
        s.set_reserve(u64::MAX / 2);
        let short = s.room_for(1).unwrap_err();
        assert!(short.free < short.needed);
        s.set_reserve(1);
        assert_eq!(s.room_for(1), Ok(()));
    }
}
