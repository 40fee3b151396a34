//! Message data between the first byte after `354` and the intake, with
//! bounded memory.
//!
//! Every session's DATA bytes held in memory are charged to one
//! [`Budget`] (`[smtp] data_memory`). A message stays in memory while it
//! is small (at most [`HEAD_MAX`], and only while the budget allows);
//! beyond, it goes to a file in `data_dir/spool/`, so a client trickling a
//! 24 MB message holds [`PENDING_MAX`] bytes of RAM, not 24 MB. The file is
//! removed when its [`MessageBody`] is dropped, whatever ends the session,
//! and the directory is emptied at start (a crash leaves files behind).
//!
//! At the end of DATA the intake still reads the whole message for its
//! checks: [`MessageBody::load`] charges its full size to the budget first
//! and refuses when it does not fit, so the messages being checked at once
//! never hold more than `data_memory` between them. (Issue 13 will let
//! large messages bypass memory altogether; this type is the seam.)

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;

/// A message at most this large is kept in memory while it arrives.
pub(crate) const HEAD_MAX: usize = 1 << 20;
/// A spooling session buffers this much before writing to its file.
pub(crate) const PENDING_MAX: usize = 64 * 1024;
/// The in-memory buffer grows in steps of at least this (fewer charges).
const STEP: usize = 16 * 1024;

/// The bytes of message data all sessions may hold in memory at once.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes charged right now (for tests and the log).
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Take `n` bytes if they fit; never waits.
    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes taken from the [`Budget`]; given back on drop.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Charge {
    fn none(budget: &Arc<Budget>) -> Charge {
        Charge {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Take `n` more bytes, if they fit.
    fn grow(&mut self, n: usize) -> bool {
        let ok = self.budget.try_take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }

    fn release(&mut self) {
        self.budget.give_back(self.bytes);
        self.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

/// `data_dir/spool/` and the memory budget, shared by every SMTP session.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    budget: Arc<Budget>,
    next: AtomicU64,
}

impl Spool {
    /// Create the directory (or empty it of a previous run's files).
    pub(crate) fn open(dir: &Path, data_memory: usize) -> io::Result<Arc<Spool>> {
        std::fs::create_dir_all(dir)?;
        let mut removed = 0;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(files = removed, dir = %dir.display(), "removed leftover spool files");
        }
        Ok(Arc::new(Spool {
            dir: dir.to_path_buf(),
            budget: Budget::new(data_memory),
            next: AtomicU64::new(1),
        }))
    }

    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// A writer for one message.
    pub(crate) fn writer(self: &Arc<Self>) -> BodyWriter {
        BodyWriter {
            body: MessageBody {
                head: Vec::new(),
                charge: Charge::none(&self.budget),
                file: None,
                len: 0,
                budget: self.budget.clone(),
            },
            spool: self.clone(),
            pending: Vec::new(),
            failed: None,
            discarded: false,
        }
    }

    fn create(&self) -> io::Result<SpoolFile> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n}.msg"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(SpoolFile {
            path,
            file: Some(tokio::fs::File::from_std(file)),
        })
    }
}

/// A spool file; removed on drop.
#[derive(Debug)]
struct SpoolFile {
    path: PathBuf,
    /// `None` once writing is over.
    file: Option<tokio::fs::File>,
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "spool file not removed");
        }
    }
}

/// A complete message: in memory, or in a spool file.
#[derive(Debug)]
pub(crate) struct MessageBody {
    /// The bytes in memory (all of them, unless `file` is set).
    head: Vec<u8>,
    /// What `head` is charged for.
    charge: Charge,
    file: Option<SpoolFile>,
    len: usize,
    budget: Arc<Budget>,
}

/// Why a message could not be read back for the checks.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("data_memory budget exhausted")]
    Budget,
    #[error("reading the spool file: {0}")]
    Io(#[from] io::Error),
}

impl LoadError {
    /// Refused for memory (not a disk error).
    pub(crate) fn is_budget(&self) -> bool {
        matches!(self, LoadError::Budget)
    }
}

/// A message in memory, its bytes charged to the budget until dropped.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) bytes: Vec<u8>,
    _charge: Charge,
}

impl MessageBody {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Did it go to a spool file?
    #[cfg(test)]
    pub(crate) fn spooled(&self) -> bool {
        self.file.is_some()
    }

    /// The whole message in memory, charged to the budget; refused, not
    /// waited for, when it does not fit.
    pub(crate) async fn load(mut self) -> Result<Loaded, LoadError> {
        let Some(file) = self.file.take() else {
            let charge = std::mem::replace(&mut self.charge, Charge::none(&self.budget));
            return Ok(Loaded {
                bytes: std::mem::take(&mut self.head),
                _charge: charge,
            });
        };
        let mut charge = Charge::none(&self.budget);
        if !charge.grow(self.len) {
            return Err(LoadError::Budget);
        }
        let bytes = tokio::fs::read(&file.path).await?;
        if bytes.len() != self.len {
            return Err(LoadError::Io(io::Error::other(format!(
                "spool file has {} bytes, expected {}",
                bytes.len(),
                self.len
            ))));
        }
        drop(file);
        Ok(Loaded {
            bytes,
            _charge: charge,
        })
    }
}

/// Receives one message's data as the decoder produces it.
#[derive(Debug)]
pub(crate) struct BodyWriter {
    body: MessageBody,
    spool: Arc<Spool>,
    /// Bytes waiting to be written to the spool file.
    pending: Vec<u8>,
    /// Writing failed (disk full, ...): the rest is dropped and the
    /// message refused with a temporary error.
    failed: Option<io::Error>,
    /// The message outgrew the size cap: nothing more is kept.
    discarded: bool,
}

impl BodyWriter {
    /// Add message bytes.
    pub(crate) async fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.discarded || self.failed.is_some() {
            return;
        }
        self.body.len += bytes.len();
        if self.body.file.is_none() {
            let need = self.body.head.len() + bytes.len();
            if need <= self.body.charge.bytes {
                self.body.head.extend_from_slice(bytes);
                return;
            }
            if need <= HEAD_MAX {
                let want = need.max(self.body.charge.bytes * 2).clamp(STEP, HEAD_MAX);
                let more = want - self.body.charge.bytes;
                if self.body.charge.grow(more) {
                    self.body.head.reserve_exact(want - self.body.head.len());
                    self.body.head.extend_from_slice(bytes);
                    return;
                }
            }
            // Too large for memory, or the budget is spent: to disk.
            if let Err(e) = self.spill().await {
                self.fail(e);
                return;
            }
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= PENDING_MAX
            && let Err(e) = self.write_pending().await
        {
            self.fail(e);
        }
    }

    /// The message is too big: drop what was kept, keep nothing more.
    pub(crate) fn discard(&mut self) {
        self.discarded = true;
        self.body.head = Vec::new();
        self.body.charge.release();
        self.body.file = None;
        self.pending = Vec::new();
    }

    /// The message as received, or why it could not be kept.
    pub(crate) async fn finish(mut self) -> io::Result<MessageBody> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.body.file.is_some() {
            self.write_pending().await?;
            if let Some(f) = self.body.file.as_mut().and_then(|f| f.file.as_mut()) {
                f.flush().await?;
            }
            if let Some(f) = self.body.file.as_mut() {
                f.file = None;
            }
        }
        Ok(self.body)
    }

    /// Open the spool file and move the in-memory bytes to it.
    async fn spill(&mut self) -> io::Result<()> {
        let file = self.spool.create()?;
        self.body.file = Some(file);
        self.pending = std::mem::take(&mut self.body.head);
        self.body.charge.release();
        self.write_pending().await?;
        // Keep a modest buffer, not the head's capacity.
        self.pending = Vec::with_capacity(PENDING_MAX);
        Ok(())
    }

    async fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(f) = self.body.file.as_mut().and_then(|f| f.file.as_mut()) else {
            return Err(io::Error::other("spool file already closed"));
        };
        f.write_all(&self.pending).await?;
        self.pending.clear();
        Ok(())
    }

    fn fail(&mut self, e: io::Error) {
        tracing::warn!(error = %e, "message data could not be spooled");
        self.failed = Some(e);
        self.body.head = Vec::new();
        self.body.charge.release();
        self.body.file = None;
        self.pending = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    #[tokio::test]
    async fn small_stays_in_memory_large_goes_to_disk_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 8 << 20).unwrap();
        let mut w = spool.writer();
        w.push(b"hello\r\n").await;
        let small = w.finish().await.unwrap();
        assert!(!small.spooled());
        assert!(spool.budget().used() > 0);
        let loaded = small.load().await.unwrap();
        assert_eq!(loaded.bytes, b"hello\r\n");
        drop(loaded);
        assert_eq!(spool.budget().used(), 0);

        let chunk: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = spool.writer();
        let mut want = Vec::new();
        for _ in 0..300 {
            w.push(&chunk).await;
            want.extend_from_slice(&chunk);
        }
        // Spooled: only the pending buffer is in memory, and it is not charged.
        assert_eq!(spool.budget().used(), 0);
        let big = w.finish().await.unwrap();
        assert!(big.spooled());
        assert_eq!(files(&dir.path().join("spool")), 1);
        let loaded = big.load().await.unwrap();
        assert_eq!(loaded.bytes, want);
        assert_eq!(spool.budget().used(), want.len());
        assert_eq!(files(&dir.path().join("spool")), 0);
        drop(loaded);
        assert_eq!(spool.budget().used(), 0);
    }

    #[tokio::test]
    async fn over_budget_spills_early_and_load_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 100_000).unwrap();
        let mut a = spool.writer();
        a.push(&[b'a'; 90_000]).await;
        let held = a.finish().await.unwrap();
        let held = held.load().await.unwrap();
        // The budget is nearly spent: the next message spills at once.
        let mut b = spool.writer();
        b.push(&[b'b'; 20_000]).await;
        let b = b.finish().await.unwrap();
        assert!(b.spooled());
        assert!(matches!(b.load().await, Err(LoadError::Budget)));
        // Refused, and its file is gone with it.
        assert_eq!(files(&dir.path().join("spool")), 0);
        drop(held);
        assert_eq!(spool.budget().used(), 0);
    }

    #[tokio::test]
    async fn dropped_writers_leave_no_file_and_start_empties_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        let mut w = spool.writer();
        w.push(&vec![b'x'; 2 << 20]).await;
        assert_eq!(files(&path), 1);
        drop(w);
        assert_eq!(files(&path), 0);
        std::fs::write(path.join("7.msg"), b"left over").unwrap();
        let _again = Spool::open(&path, 1 << 20).unwrap();
        assert_eq!(files(&path), 0);
    }

    #[tokio::test]
    async fn discard_frees_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Spool::open(&path, 1 << 20).unwrap();
        let mut w = spool.writer();
        w.push(&vec![b'x'; 3 << 20]).await;
        w.discard();
        w.push(b"more").await;
        assert_eq!(files(&path), 0);
        assert_eq!(spool.budget().used(), 0);
    }
}
