//! The quarantine as the mailbox servers see it, backed by the sled store.
//!
//! `mailbox` knows only the [`QuarantineStore`] trait; this is where it meets
//! the real store and the delivery scheduler (a release re-queues the
//! message durably and wakes delivery at once). Store failures are logged
//! here and passed on as [`QuarantineError`], never as "gone".

use std::time::Duration;

pub(crate) mod digest;
pub(crate) mod links;

use crate::mailbox::store::{
    HeldMeta, ListKind, QResult, QuarantineError, QuarantineStore, Releaser,
};
use crate::store::lists::{ListEntry, Scope};
use crate::store::wake::Scheduler;
use crate::store::{Store, StoreError};

pub(crate) struct SledQuarantine {
    pub(crate) store: Store,
    pub(crate) scheduler: Scheduler,
}

/// Log a store failure once, here, and hand the mailbox a typed error.
fn unavailable(what: &str, e: StoreError) -> QuarantineError {
    tracing::error!(error = %e, "quarantine {what} failed");
    QuarantineError::Unavailable(e.to_string())
}

impl QuarantineStore for SledQuarantine {
    fn list(&self) -> QResult<Vec<HeldMeta>> {
        let entries = self
            .store
            .held_entries()
            .map_err(|e| unavailable("list", e))?;
        Ok(entries
            .into_iter()
            .map(|e| HeldMeta {
                id: e.id,
                sender: e.sender,
                recipient: e.recipient,
                reason: e.reason,
                received_unix: e.received,
                size: e.size,
            })
            .collect())
    }

    fn body(&self, id: u64) -> QResult<Option<Vec<u8>>> {
        let Some(e) = self
            .store
            .held_entry(id)
            .map_err(|e| unavailable("read", e))?
        else {
            return Ok(None);
        };
        let body = self
            .store
            .held_body(&e)
            .map_err(|e| unavailable("read", e))?;
        Ok(body.map(|b| b.to_vec()))
    }

    fn contains(&self, id: u64) -> QResult<bool> {
        self.store
            .held_contains(id)
            .map_err(|e| unavailable("read", e))
    }

    fn delete(&self, id: u64) -> QResult<bool> {
        let gone = self
            .store
            .unhold(id)
            .map_err(|e| unavailable("delete", e))?;
        if gone.is_some() {
            let _ = self.store.note_gone(
                id,
                crate::store::outcomes::Outcome::Deleted,
                "a mail client",
                "mailbox",
            );
            tracing::info!(id = %crate::store::fmt_id(id), "quarantine entry deleted by a mailbox user");
        }
        Ok(gone.is_some())
    }

    /// Runs on the blocking pool (the mailbox shells put every store call
    /// there), so it may wait for the group commit: the message is queued
    /// durably, with the fdatasync, before the held copy goes.
    fn release(&self, id: u64, who: &Releaser) -> QResult<bool> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(QuarantineError::Unavailable(
                "release needs the runtime's group commit".into(),
            ));
        };
        let qid = rt
            .block_on(self.store.release_held(id, who))
            .map_err(|e| unavailable("release", e))?;
        let Some(qid) = qid else { return Ok(false) };
        tracing::info!(id = %crate::store::fmt_id(id), queued = %crate::store::fmt_id(qid), by = %who.by, via = who.via.as_str(), "released from quarantine");
        self.scheduler.now(qid);
        Ok(true)
    }

    /// Same runtime need as [`SledQuarantine::release`]: waits until the entry is durable.
    fn list_sender(&self, login: &str, sender: &str, list: ListKind) -> QResult<bool> {
        if sender.trim().is_empty() {
            return Ok(false);
        }
        let Ok(entry) = ListEntry::parse(sender) else {
            return Ok(false);
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(QuarantineError::Unavailable(
                "listing needs the runtime's group commit".into(),
            ));
        };
        rt.block_on(
            self.store
                .list_add_durable(Scope::User(login), list, &entry),
        )
        .map_err(|e| unavailable("list", e))?;
        tracing::info!(user = %login, sender = %entry.as_text(), list = list.as_str(), "sender listed from a mailbox folder");
        Ok(true)
    }

    fn get_state(&self, key: &[u8]) -> QResult<Option<Vec<u8>>> {
        self.store
            .get_state(key)
            .map_err(|e| unavailable("state read", e))
    }

    fn put_state(&self, key: &[u8], value: &[u8]) -> QResult<()> {
        self.store
            .put_state(key, value)
            .map_err(|e| unavailable("state write", e))
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()> {
        self.store.subscribe()
    }
}

/// Purge entries older than `retention`, now and then every `every`.
pub(crate) async fn purge_loop(store: Store, retention: Duration, every: Duration) {
    loop {
        let cutoff = crate::store::now_unix() - retention.as_secs() as i64;
        match store.purge_held(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "quarantine retention: old entries deleted"),
            Err(e) => tracing::error!(error = %e, "quarantine purge failed"),
        }
        // What digest links say of entries gone longer ago than that.
        if let Err(e) = store.purge_gone(cutoff) {
            tracing::error!(error = %e, "quarantine purge of old outcomes failed");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A release from the blocking pool (where the mailbox shells call it) waits for the
    /// group commit, queues the message, drops the entry and wakes delivery.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_from_the_blocking_pool_goes_through_the_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t = crate::store::test_held_template();
        let id = store.quarantine(&t, &["a@l.test".into()], b"body").unwrap()[0];
        let (scheduler, mut woken) = Scheduler::channel();
        let q = Arc::new(SledQuarantine {
            store: store.clone(),
            scheduler,
        });
        let release = |q: Arc<SledQuarantine>| async move {
            let who = Releaser {
                by: "alice".into(),
                via: crate::store::Via::Imap,
            };
            tokio::task::spawn_blocking(move || q.release(id, &who))
                .await
                .unwrap()
        };
        assert!(release(q.clone()).await.unwrap());
        let (_, qid) = woken.recv().await.unwrap();
        let queued = store.entry(qid).unwrap().unwrap();
        assert_eq!(queued.recipients[0].address, "a@l.test");
        let body = store.body(qid).unwrap().unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("X-Postern-Released: by alice via imap; ")
                && body.ends_with("\r\nbody"),
            "{body}"
        );
        assert!(store.held_entry(id).unwrap().is_none());
        // Gone now: Ok(false), not an error.
        assert!(!release(q).await.unwrap());
    }
}
