//! Group commit: many sessions wait for one fsync.
//!
//! A session writes its message into sled (in memory), then asks the committer
//! task for durability. The committer takes every request that is waiting,
//! runs one `flush_async`, and answers them all. Because each request is sent
//! after its writes, the flush that follows covers them.

use tokio::sync::{mpsc, oneshot};

use super::{Result, StoreError};

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
    db: sled::Db,
}

impl GroupCommit {
    pub fn new(db: sled::Db) -> GroupCommit {
        let (tx, rx) = mpsc::unbounded_channel();
        // The committer is started lazily: admin commands open the store
        // outside any runtime and never ask for group commit.
        let gc = GroupCommit { tx, db };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(committer(gc.db.clone(), rx));
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

async fn committer(db: sled::Db, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    let mut batch: Vec<Waiter> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let res = db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        if let Err(e) = &res {
            tracing::error!(error = %e, "store flush failed; acknowledging nothing");
        }
        for w in batch.drain(..) {
            let _ = w.send(res.clone());
        }
    }
}
