//! Group commit: many sessions wait for one fsync.
//!
//! A session writes its message into sled (in memory), then asks the committer
//! task for durability. The committer takes every request that is waiting,
//! runs one `flush_async`, and answers them all. Because each request is sent
//! after its writes, the flush that follows covers them.
//!
//! sled 0.34 makes its log stable with `sync_file_range`, which writes the
//! pages but neither flushes the drive's write cache nor the file's
//! metadata; that survives `kill -9` but not a power cut. So after sled's
//! flush the committer also `fdatasync`s the database file itself (any
//! descriptor of the file will do): one extra call per batch, not per message.
//! The direct path (no committer) does the same, so no caller gets less.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Why a commit did not make the writes durable. Cloneable because one
/// result answers a whole batch of waiters.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("store flush: {0}")]
    Flush(Arc<sled::Error>),
    #[error("fdatasync: {0}")]
    Sync(Arc<std::io::Error>),
    /// The blocking task running the `fdatasync` panicked or was cancelled.
    #[error("fdatasync task: {0}")]
    Task(String),
}

type Waiter = oneshot::Sender<Result<(), CommitError>>;

#[derive(Clone)]
pub(crate) struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
    db: sled::Db,
    file: Option<Arc<std::fs::File>>,
}

impl GroupCommit {
    /// `file` is sled's data file (`<dir>/db`), fsynced after each flush.
    pub(crate) fn new(db: sled::Db, file: Option<std::fs::File>) -> GroupCommit {
        let (tx, rx) = mpsc::unbounded_channel();
        let file = file.map(Arc::new);
        // The committer is started lazily: admin commands open the store
        // outside any runtime and never ask for group commit.
        let gc = GroupCommit {
            tx,
            db: db.clone(),
            file: file.clone(),
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(committer(db, file, rx));
        } else {
            drop(rx);
        }
        gc
    }

    /// Wait until every write made before this call is on disk.
    pub(crate) async fn flush(&self) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(tx).is_err() {
            // No committer (no runtime at open): flush directly.
            return self.flush_direct().await;
        }
        match rx.await {
            Ok(res) => res,
            Err(_) => self.flush_direct().await,
        }
    }

    async fn flush_direct(&self) -> Result<(), CommitError> {
        self.db
            .flush_async()
            .await
            .map_err(|e| CommitError::Flush(Arc::new(e)))?;
        sync_file(self.file.clone()).await
    }
}

/// `fdatasync` the data file on the blocking pool (it can take milliseconds).
async fn sync_file(file: Option<Arc<std::fs::File>>) -> Result<(), CommitError> {
    let Some(f) = file else { return Ok(()) };
    match tokio::task::spawn_blocking(move || f.sync_data()).await {
        Ok(r) => r.map_err(|e| CommitError::Sync(Arc::new(e))),
        Err(e) => Err(CommitError::Task(e.to_string())),
    }
}

async fn committer(
    db: sled::Db,
    file: Option<Arc<std::fs::File>>,
    mut rx: mpsc::UnboundedReceiver<Waiter>,
) {
    let mut batch: Vec<Waiter> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut res = db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|e| CommitError::Flush(Arc::new(e)));
        if res.is_ok() {
            res = sync_file(file.clone()).await;
        }
        if let Err(e) = &res {
            tracing::error!(error = %e, "store flush failed; acknowledging nothing");
        }
        for w in batch.drain(..) {
            let _ = w.send(res.clone());
        }
    }
}
