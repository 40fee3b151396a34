//! The quarantine as the mailbox servers see it, backed by the sled store.
//!
//! `mailbox` knows only the [`QuarantineStore`] trait; this is where it meets
//! the real store and the delivery scheduler (a release re-queues the
//! message and wakes delivery at once).

use std::time::Duration;

use crate::mailbox::store::{HeldMeta, QuarantineStore};
use crate::store::Store;
use crate::store::wake::Scheduler;

pub struct SledQuarantine {
    pub store: Store,
    pub scheduler: Scheduler,
}

impl QuarantineStore for SledQuarantine {
    fn list(&self) -> Vec<HeldMeta> {
        match self.store.held_entries() {
            Ok(v) => v
                .into_iter()
                .map(|e| HeldMeta {
                    id: e.id,
                    sender: e.sender,
                    recipient: e.recipient,
                    reason: e.reason,
                    received_unix: e.received,
                    size: e.size,
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot list the quarantine");
                Vec::new()
            }
        }
    }

    fn body(&self, id: u64) -> Option<Vec<u8>> {
        let e = self.store.held_entry(id).ok()??;
        self.store.held_body(&e).ok()?.map(|b| b.to_vec())
    }

    fn delete(&self, id: u64) -> bool {
        match self.store.unhold(id) {
            Ok(Some(_)) => {
                tracing::info!(id = %crate::store::fmt_id(id), "quarantine entry deleted by a mailbox user");
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "quarantine delete failed");
                false
            }
        }
    }

    fn release(&self, id: u64) -> bool {
        match self.store.release_held_blocking(id) {
            Ok(Some(qid)) => {
                tracing::info!(id = %crate::store::fmt_id(id), queued = %crate::store::fmt_id(qid), "released from quarantine");
                self.scheduler.now(qid);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "quarantine release failed");
                false
            }
        }
    }

    fn get_state(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store.get_state(key).ok().flatten()
    }

    fn put_state(&self, key: &[u8], value: &[u8]) {
        if let Err(e) = self.store.put_state(key, value) {
            tracing::error!(error = %e, "cannot save mailbox state");
        }
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()> {
        self.store.subscribe()
    }
}

/// Purge entries older than `retention`, now and then every `every`.
pub async fn purge_loop(store: Store, retention: Duration, every: Duration) {
    loop {
        let cutoff = crate::store::now_unix() - retention.as_secs() as i64;
        match store.purge_held(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "quarantine retention: old entries deleted"),
            Err(e) => tracing::error!(error = %e, "quarantine purge failed"),
        }
        tokio::time::sleep(every).await;
    }
}
