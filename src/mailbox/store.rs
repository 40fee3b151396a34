//! The quarantine as the mailbox servers see it, and an in-memory store for tests.
//!
//! Every call may block (sled, later a database over the network): the
//! protocol shells make them on the blocking pool, never on a runtime thread.
//! A failing store is an `Err`, distinct from "no such entry" (`Ok(None)`,
//! `Ok(false)`), so clients hear "try again later", not "gone".

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::broadcast;

pub use crate::store::lists::ListKind;
pub use crate::store::{Releaser, Via};

/// One quarantine entry: one held message for ONE recipient (a message for 3 recipients is 3 entries sharing a body).
#[derive(Clone, Debug)]
pub struct HeldMeta {
    pub id: u64,
    pub sender: String,
    pub recipient: String,
    pub reason: String,
    pub received_unix: i64,
    pub size: u64,
}

/// The store could not answer; the entry may well still be there.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QuarantineError {
    #[error("quarantine store unavailable: {0}")]
    Unavailable(String),
}

pub(crate) type QResult<T> = Result<T, QuarantineError>;

pub trait QuarantineStore: Send + Sync + 'static {
    /// All held entries, ascending id.
    fn list(&self) -> QResult<Vec<HeldMeta>>;
    /// The held message; `Ok(None)` if the entry is gone.
    fn body(&self, id: u64) -> QResult<Option<Vec<u8>>>;
    /// Whether the entry is still held, without reading its body (IMAP answers
    /// from what it keeps of a message only while it is).
    fn contains(&self, id: u64) -> QResult<bool> {
        Ok(self.body(id)?.is_some())
    }
    /// Remove the entry; `Ok(false)` if it was already gone.
    fn delete(&self, id: u64) -> QResult<bool>;
    /// Re-queue the message for delivery to the entry's recipient (durably,
    /// marked as released by `who`) and remove the entry, as one
    /// compare-and-swap: of callers racing for one entry exactly one gets
    /// `Ok(true)`; `Ok(false)` if it was already released or gone.
    fn release(&self, id: u64, who: &Releaser) -> QResult<bool>;
    /// Put `sender` on user `login`'s allow or block list (durably);
    /// `Ok(false)` when it cannot be listed: a bounce's empty sender, or
    /// no address.
    fn list_sender(&self, login: &str, sender: &str, list: ListKind) -> QResult<bool>;
    /// Small persistent key/value space for per-user mailbox state (UIDVALIDITY, UID maps, flags).
    fn get_state(&self, key: &[u8]) -> QResult<Option<Vec<u8>>>;
    fn put_state(&self, key: &[u8], value: &[u8]) -> QResult<()>;
    /// Fires whenever entries are added/removed (for IDLE / NOOP updates between sessions).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()>;
}

/// Run `f` on a protocol core on the blocking pool and hand the core back:
/// the cores stay synchronous and sans-I/O, and store calls (sled) never run
/// on a runtime thread. A panic in `f` ends the session; the core is lost with it.
pub(crate) async fn offload<C: Send + 'static, T: Send + 'static>(
    mut core: C,
    f: impl FnOnce(&mut C) -> T + Send + 'static,
) -> std::io::Result<(C, T)> {
    tokio::task::spawn_blocking(move || {
        let t = f(&mut core);
        (core, t)
    })
    .await
    .map_err(std::io::Error::other)
}

#[derive(Default)]
struct MemInner {
    next_id: u64,
    entries: BTreeMap<u64, (HeldMeta, std::sync::Arc<Vec<u8>>)>,
    state: HashMap<Vec<u8>, Vec<u8>>,
    released: Vec<(HeldMeta, Releaser)>,
    deleted: Vec<u64>,
    listed: Vec<(String, String, ListKind)>,
}

/// In-memory [`QuarantineStore`] for tests; records releases and deletions,
/// counts listings, and can be switched to fail every call.
pub struct MemStore {
    inner: Mutex<MemInner>,
    tx: broadcast::Sender<()>,
    failing: AtomicBool,
    lists: AtomicUsize,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(64);
        MemStore {
            inner: Mutex::new(MemInner {
                next_id: 1,
                ..MemInner::default()
            }),
            tx,
            failing: AtomicBool::new(false),
            lists: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock, or the failure a broken store would give.
    fn inner(&self) -> QResult<std::sync::MutexGuard<'_, MemInner>> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(QuarantineError::Unavailable("MemStore set to fail".into()));
        }
        Ok(self.lock())
    }

    /// Make every [`QuarantineStore`] call fail (`true`) or work again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// How many times [`QuarantineStore::list`] has run (each decodes every entry in sled).
    #[cfg(test)]
    pub(crate) fn list_calls(&self) -> usize {
        self.lists.load(Ordering::SeqCst)
    }

    /// Hold `body` for each recipient (one entry per recipient); returns the new ids.
    pub fn add(&self, sender: &str, recipients: &[&str], reason: &str, body: &[u8]) -> Vec<u64> {
        let body = std::sync::Arc::new(body.to_vec());
        let now = chrono::Utc::now().timestamp();
        let mut ids = Vec::new();
        {
            let mut g = self.lock();
            for r in recipients {
                let id = g.next_id;
                g.next_id += 1;
                let meta = HeldMeta {
                    id,
                    sender: sender.to_string(),
                    recipient: r.to_string(),
                    reason: reason.to_string(),
                    received_unix: now,
                    size: body.len() as u64,
                };
                g.entries.insert(id, (meta, body.clone()));
                ids.push(id);
            }
        }
        let _ = self.tx.send(());
        ids
    }

    /// Entries released so far (in order).
    pub fn released(&self) -> Vec<HeldMeta> {
        self.lock()
            .released
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// Who released each of [`MemStore::released`].
    pub fn releasers(&self) -> Vec<Releaser> {
        self.lock()
            .released
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// `(login, sender, list)` put on lists so far (in order).
    pub fn listed(&self) -> Vec<(String, String, ListKind)> {
        self.lock().listed.clone()
    }

    /// Ids deleted so far (in order).
    pub fn deleted(&self) -> Vec<u64> {
        self.lock().deleted.clone()
    }
}

impl QuarantineStore for MemStore {
    fn list(&self) -> QResult<Vec<HeldMeta>> {
        let g = self.inner()?;
        self.lists.fetch_add(1, Ordering::SeqCst);
        Ok(g.entries.values().map(|(m, _)| m.clone()).collect())
    }

    fn body(&self, id: u64) -> QResult<Option<Vec<u8>>> {
        Ok(self
            .inner()?
            .entries
            .get(&id)
            .map(|(_, b)| b.as_ref().clone()))
    }

    fn contains(&self, id: u64) -> QResult<bool> {
        Ok(self.inner()?.entries.contains_key(&id))
    }

    fn delete(&self, id: u64) -> QResult<bool> {
        let gone = {
            let mut g = self.inner()?;
            let r = g.entries.remove(&id).is_some();
            if r {
                g.deleted.push(id);
            }
            r
        };
        if gone {
            let _ = self.tx.send(());
        }
        Ok(gone)
    }

    fn release(&self, id: u64, who: &Releaser) -> QResult<bool> {
        let gone = {
            let mut g = self.inner()?;
            match g.entries.remove(&id) {
                Some((m, _)) => {
                    g.released.push((m, who.clone()));
                    true
                }
                None => false,
            }
        };
        if gone {
            let _ = self.tx.send(());
        }
        Ok(gone)
    }

    fn list_sender(&self, login: &str, sender: &str, list: ListKind) -> QResult<bool> {
        let mut g = self.inner()?;
        if sender.trim().is_empty() {
            return Ok(false);
        }
        g.listed.push((login.to_string(), sender.to_string(), list));
        Ok(true)
    }

    fn get_state(&self, key: &[u8]) -> QResult<Option<Vec<u8>>> {
        Ok(self.inner()?.state.get(key).cloned())
    }

    fn put_state(&self, key: &[u8], value: &[u8]) -> QResult<()> {
        self.inner()?.state.insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<()> {
        self.tx.subscribe()
    }
}
