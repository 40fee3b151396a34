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

use tokio::sync::{mpsc, oneshot};

use super::{Result, StoreError};

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
    db: sled::Db,
}

impl GroupCommit {
    /// `file` is sled's data file (`<dir>/db`), fsynced after each flush.
    pub fn new(db: sled::Db, file: Option<std::fs::File>) -> GroupCommit {
        let (tx, rx) = mpsc::unbounded_channel();
        // The committer is started lazily: admin commands open the store
        // outside any runtime and never ask for group commit.
        let gc = GroupCommit { tx, db };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(committer(gc.db.clone(), file.map(std::sync::Arc::new), rx));
        } else {
            drop(rx);
        }
        gc
    }

    /// Wait until every write made before this call is on disk.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(tx).is_err() {
            // No committer (no runtime at open): flush directly.
            self.db.flush_async().await?;
            return Ok(());
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(e)))),
            Err(_) => {
                self.db.flush_async().await?;
                Ok(())
            }
        }
    }
}

async fn committer(
    db: sled::Db,
    file: Option<std::sync::Arc<std::fs::File>>,
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
            .map_err(|e| e.to_string());
        if let (Ok(()), Some(f)) = (&res, &file) {
            let f = f.clone();
            res = match tokio::task::spawn_blocking(move || f.sync_data()).await {
                Ok(r) => r.map_err(|e| format!("fdatasync: {e}")),
                Err(e) => Err(e.to_string()),
            };
        }
        if let Err(e) = &res {
            tracing::error!(error = %e, "store flush failed; acknowledging nothing");
        }
        for w in batch.drain(..) {
            let _ = w.send(res.clone());
        }
    }
}
