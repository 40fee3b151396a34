//! The quarantine as the mailbox servers see it, and an in-memory store for tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio::sync::broadcast;

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

pub trait QuarantineStore: Send + Sync + 'static {
    /// All held entries, ascending id.
    fn list(&self) -> Vec<HeldMeta>;
    fn body(&self, id: u64) -> Option<Vec<u8>>;
    /// Remove the entry; false if it was already gone.
    fn delete(&self, id: u64) -> bool;
    /// Re-queue the message for delivery to the entry's recipient and remove the entry; false if gone.
    fn release(&self, id: u64) -> bool;
    /// Small persistent key/value space for per-user mailbox state (UIDVALIDITY, UID maps, flags, Release folder contents).
    fn get_state(&self, key: &[u8]) -> Option<Vec<u8>>;
    fn put_state(&self, key: &[u8], value: &[u8]);
    /// Fires whenever entries are added/removed (for IDLE / NOOP updates between sessions).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()>;
}

#[derive(Default)]
struct MemInner {
    next_id: u64,
    entries: BTreeMap<u64, (HeldMeta, std::sync::Arc<Vec<u8>>)>,
    state: HashMap<Vec<u8>, Vec<u8>>,
    released: Vec<HeldMeta>,
    deleted: Vec<u64>,
}

/// In-memory [`QuarantineStore`] for tests; records releases and deletions.
pub struct MemStore {
    inner: Mutex<MemInner>,
    tx: broadcast::Sender<()>,
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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
        self.lock().released.clone()
    }

    /// Ids deleted so far (in order).
    pub fn deleted(&self) -> Vec<u64> {
        self.lock().deleted.clone()
    }
}

impl QuarantineStore for MemStore {
    fn list(&self) -> Vec<HeldMeta> {
        self.lock()
            .entries
            .values()
            .map(|(m, _)| m.clone())
            .collect()
    }

    fn body(&self, id: u64) -> Option<Vec<u8>> {
        self.lock()
            .entries
            .get(&id)
            .map(|(_, b)| b.as_ref().clone())
    }

    fn delete(&self, id: u64) -> bool {
        let gone = {
            let mut g = self.lock();
            let r = g.entries.remove(&id).is_some();
            if r {
                g.deleted.push(id);
            }
            r
        };
        if gone {
            let _ = self.tx.send(());
        }
        gone
    }

    fn release(&self, id: u64) -> bool {
        let gone = {
            let mut g = self.lock();
            match g.entries.remove(&id) {
                Some((m, _)) => {
                    g.released.push(m);
                    true
                }
                None => false,
            }
        };
        if gone {
            let _ = self.tx.send(());
        }
        gone
    }

    fn get_state(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().state.get(key).cloned()
    }

    fn put_state(&self, key: &[u8], value: &[u8]) {
        self.lock().state.insert(key.to_vec(), value.to_vec());
    }

    fn subscribe(&self) -> broadcast::Receiver<()> {
        self.tx.subscribe()
    }
}
