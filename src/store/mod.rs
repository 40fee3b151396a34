//! The durable store: one sled database holding the queue and the quarantine.
//!
//! Layout (seven trees):
//! - `body`: queue id → the message bytes, exactly as they will be delivered;
//! - `queue`: queue id → [`QueueEntry`] (JSON), the envelope and delivery state;
//! - `held`: quarantine id → [`HeldEntry`] (JSON), one per held recipient;
//! - `held_body`: message key → the held message bytes (shared by its entries);
//! - `held_refs`: message key → how many held entries share that body;
//! - `state`: small key/value space for the mailbox servers (UIDs, flags);
//! - `recent`: copies of received messages for `rules replay --recent`
//!   (`[rules] keep_recent`, see [`recent`]).
//! - `lists`: sender allow and block lists, site-wide and per user ([`lists`]).
//!
//! A body is written before the entry that points at it, and sled recovers a
//! prefix of its writes, so after a crash an entry never lacks its body; a
//! body without an entry is swept at open. "250 OK" waits for
//! [`Store::durable`], which shares one fsync among every session that asks
//! for it at the same time (group commit); a quarantine release waits for it
//! too, whoever asks (IMAP, the control socket, the CLI).

mod commit;
pub mod lists;
pub(crate) mod outcomes;
pub mod recent;
pub(crate) mod space;
pub(crate) mod wake;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub(crate) use commit::{CommitError, GroupCommit};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt record {0}: {1}")]
    Corrupt(String, serde_json::Error),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("cannot open the store at {path}: {why}")]
    Open { path: String, why: String },
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    /// The filesystem is full (ENOSPC), as opposed to any other failure.
    pub(crate) fn is_no_space(&self) -> bool {
        let io = match self {
            StoreError::Sled(sled::Error::Io(io)) => io,
            StoreError::Commit(CommitError::Flush(e)) => match e.as_ref() {
                sled::Error::Io(io) => io,
                _ => return false,
            },
            StoreError::Commit(CommitError::Sync(io)) => io.as_ref(),
            _ => return false,
        };
        io.kind() == std::io::ErrorKind::StorageFull
    }
}

/// Where a queued message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum QueueState {
    /// Waiting for its first attempt (or an admin's retry).
    Queued,
    /// At least one attempt failed temporarily; waiting for the next.
    Deferred,
    /// Held by an admin: not delivered until released.
    Held,
}

impl QueueState {
    pub(crate) const ALL: [QueueState; 3] =
        [QueueState::Queued, QueueState::Deferred, QueueState::Held];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QueueState::Queued => "queued",
            QueueState::Deferred => "deferred",
            QueueState::Held => "held",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<QueueState> {
        QueueState::ALL.into_iter().find(|q| q.as_str() == s)
    }
}

/// One recipient's delivery status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "status")]
pub(crate) enum RcptStatus {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Recipient {
    pub(crate) address: String,
    pub(crate) status: RcptStatus,
    /// The last reply or error for this recipient, for `queue show` and DSNs.
    #[serde(default)]
    pub(crate) last_reply: Option<String>,
    /// The host that gave `last_reply`.
    #[serde(default)]
    pub(crate) remote: Option<String>,
    /// The TLS of the session that gave `last_reply` ("TLSv1.3 ..." or
    /// "none"); absent when there was no SMTP/LMTP session (Maildir, no
    /// connection) and in records written before outbound TLS existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<String>,
}

/// A queued message's envelope and delivery state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct QueueEntry {
    pub(crate) id: u64,
    /// Envelope sender; empty for a bounce (`MAIL FROM:<>`).
    pub(crate) sender: String,
    pub(crate) recipients: Vec<Recipient>,
    pub(crate) state: QueueState,
    /// Unix seconds.
    pub(crate) created: i64,
    /// Unix milliseconds of the next attempt.
    pub(crate) next_attempt_ms: i64,
    pub(crate) attempts: u32,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) client_ip: String,
    #[serde(default)]
    pub(crate) helo: String,
    #[serde(default)]
    pub(crate) last_error: Option<String>,
    /// How the message was decided (absent in records from before traces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) trace: Option<crate::policy::Trace>,
    /// It came from a client neither trusted nor authenticated: its
    /// sender may be forged, so a bounce to outside may be backscatter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) from_outside: bool,
}

impl QueueEntry {
    /// A new message, due now, every recipient pending. `client_ip` and
    /// `helo` say where it came from (empty for mail we make ourselves).
    pub(crate) fn new(
        id: u64,
        sender: String,
        recipients: impl IntoIterator<Item = String>,
        size: u64,
        client_ip: String,
        helo: String,
    ) -> QueueEntry {
        QueueEntry {
            id,
            sender,
            recipients: recipients
                .into_iter()
                .map(|address| Recipient {
                    address,
                    status: RcptStatus::Pending,
                    last_reply: None,
                    remote: None,
                    tls: None,
                })
                .collect(),
            state: QueueState::Queued,
            created: now_unix(),
            next_attempt_ms: now_ms(),
            attempts: 0,
            size,
            client_ip,
            helo,
            last_error: None,
            trace: None,
            from_outside: false,
        }
    }

    pub(crate) fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Pending)
    }
}

/// A quarantine entry: one held message for one recipient.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HeldEntry {
    pub(crate) id: u64,
    /// Key of the shared body in `held_body`.
    pub(crate) body_key: u64,
    pub(crate) sender: String,
    pub(crate) recipient: String,
    pub(crate) reason: String,
    /// The script (and function) that decided, if a script did.
    #[serde(default)]
    pub(crate) script: Option<String>,
    /// Unix seconds.
    pub(crate) received: i64,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) client_ip: String,
    #[serde(default)]
    pub(crate) helo: String,
    /// How the message was decided (absent in records from before traces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) trace: Option<crate::policy::Trace>,
    /// Came from a client neither trusted nor authenticated: once released,
    /// its delivery failures get no DSN to a sender outside our domains
    /// (backscatter). Records from before this field count as outside.
    #[serde(default = "outside_by_default")]
    pub(crate) from_outside: bool,
}

fn outside_by_default() -> bool {
    true
}

pub(crate) fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// How a release was asked for: the label of `postern_releases_total{via}`
/// and the `via` of the `X-Postern-Released` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Imap,
    Pop3,
    Web,
    Cli,
}

impl Via {
    pub const ALL: [Via; 4] = [Via::Imap, Via::Pop3, Via::Web, Via::Cli];

    pub fn as_str(self) -> &'static str {
        match self {
            Via::Imap => "imap",
            Via::Pop3 => "pop3",
            Via::Web => "web",
            Via::Cli => "cli",
        }
    }
}

/// Who released a held message and how, for the header the released copy carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Releaser {
    /// A login, or `operator` for the CLI.
    pub by: String,
    pub via: Via,
}

impl Releaser {
    /// `X-Postern-Released: by alice via imap; <RFC 5322 date>` and its CRLF.
    /// `by` is reduced to printable ASCII without `;` so the header stays one
    /// well-formed line whatever a users file holds.
    fn header(&self, at: chrono::DateTime<chrono::Utc>) -> String {
        let by: String = self
            .by
            .chars()
            .filter(|c| c.is_ascii_graphic() && *c != ';')
            .take(256)
            .collect();
        let by = if by.is_empty() { "unknown".into() } else { by };
        format!(
            "X-Postern-Released: by {by} via {}; {}\r\n",
            self.via.as_str(),
            at.to_rfc2822()
        )
    }
}

fn key_id(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

/// Queue ids are shown as 16 hex digits.
pub(crate) fn fmt_id(id: u64) -> String {
    format!("{id:016X}")
}

pub(crate) fn parse_id(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

pub(crate) fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    body: sled::Tree,
    queue: sled::Tree,
    held: sled::Tree,
    held_body: sled::Tree,
    /// body key → how many held entries share that body (so deleting an
    /// entry needs no scan of the whole quarantine).
    held_refs: sled::Tree,
    state: sled::Tree,
    /// Copies for `rules replay --recent`, and their bytes (see [`recent`]).
    recent: sled::Tree,
    recent_bytes: Arc<AtomicU64>,
    lists: sled::Tree,
    commit: GroupCommit,
    space: space::Space,
    counts: Arc<Mutex<HashMap<QueueState, i64>>>,
    changes: tokio::sync::broadcast::Sender<()>,
}

impl Store {
    /// Open (or create) the store in `dir`. Fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            why: e.to_string(),
        })?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(Some(200))
            .open()
            .map_err(|e| StoreError::Open {
                path: dir.display().to_string(),
                why: match e {
                    sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                        "it is in use by another process (is `postern serve` running with a different data_dir or control socket?)".into()
                    }
                    other => other.to_string(),
                },
            })?;
        let (changes, _) = tokio::sync::broadcast::channel(64);
        let store = Store {
            body: db.open_tree("body")?,
            queue: db.open_tree("queue")?,
            held: db.open_tree("held")?,
            held_body: db.open_tree("held_body")?,
            held_refs: db.open_tree("held_refs")?,
            state: db.open_tree("state")?,
            recent: db.open_tree("recent")?,
            recent_bytes: Arc::default(),
            lists: db.open_tree("lists")?,
            commit: GroupCommit::new(db.clone(), std::fs::File::open(dir.join("db")).ok()),
            space: space::Space::new(dir.to_path_buf()),
            counts: Arc::default(),
            changes,
            db,
        };
        store.sweep_orphans()?;
        store.recount()?;
        Ok(store)
    }

    /// Remove bodies whose entry never made it to disk (a crash between the two writes).
    fn sweep_orphans(&self) -> Result<()> {
        for kv in self.body.iter() {
            let (k, _) = kv?;
            if !self.queue.contains_key(&k)? {
                self.body.remove(&k)?;
            }
        }
        Ok(())
    }

    fn recount(&self) -> Result<()> {
        let mut counts = HashMap::new();
        for e in self.queue_entries()? {
            *counts.entry(e.state).or_insert(0) += 1;
        }
        if let Ok(mut c) = self.counts.lock() {
            *c = counts;
        }
        Ok(())
    }

    /// Messages per queue state, for the `postern_queue_messages` gauge.
    pub(crate) fn counts(&self) -> HashMap<QueueState, i64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn count(&self, old: Option<QueueState>, new: Option<QueueState>) {
        if old == new {
            return;
        }
        if let Ok(mut c) = self.counts.lock() {
            if let Some(o) = old {
                *c.entry(o).or_insert(0) -= 1;
            }
            if let Some(n) = new {
                *c.entry(n).or_insert(0) += 1;
            }
        }
    }

    /// A fresh id, unique across restarts.
    pub(crate) fn next_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Wait until everything written so far is on disk.
    /// Keep this many bytes free on the data dir's filesystem: see [`space`].
    pub(crate) fn set_min_free(&self, bytes: u64) {
        self.space.set_reserve(bytes);
    }

    /// Whether a message of `bytes` may be stored now (see [`space`]).
    pub(crate) fn room_for(&self, bytes: u64) -> std::result::Result<(), space::Short> {
        self.space.room_for(bytes)
    }

    pub(crate) async fn durable(&self) -> Result<()> {
        Ok(self.commit.flush().await?)
    }

    /// Write a new queue entry and its body (not yet durable: call [`Store::durable`]).
    pub(crate) fn enqueue(&self, entry: &QueueEntry, body: &[u8]) -> Result<()> {
        let k = id_key(entry.id);
        self.body.insert(k, body)?;
        self.queue.insert(k, encode(entry))?;
        self.count(None, Some(entry.state));
        Ok(())
    }

    pub(crate) fn entry(&self, id: u64) -> Result<Option<QueueEntry>> {
        match self.queue.get(id_key(id))? {
            Some(v) => Ok(Some(decode(&v, id)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn body(&self, id: u64) -> Result<Option<sled::IVec>> {
        Ok(self.body.get(id_key(id))?)
    }

    /// Replace an existing entry; returns false if it is gone (deleted meanwhile).
    pub(crate) fn update(&self, entry: &QueueEntry) -> Result<bool> {
        let k = id_key(entry.id);
        let old = self.queue.get(k)?;
        let Some(old) = old else { return Ok(false) };
        let old_state = decode::<QueueEntry>(&old, entry.id).map(|o| o.state).ok();
        // Compare-and-swap so a concurrent admin change is not silently overwritten.
        match self
            .queue
            .compare_and_swap(k, Some(old), Some(encode(entry)))?
        {
            Ok(()) => {
                self.count(old_state, Some(entry.state));
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Remove an entry and its body; returns the removed entry.
    pub(crate) fn remove(&self, id: u64) -> Result<Option<QueueEntry>> {
        let k = id_key(id);
        let old = self.queue.remove(k)?;
        self.body.remove(k)?;
        match old {
            Some(v) => {
                let e: QueueEntry = decode(&v, id)?;
                self.count(Some(e.state), None);
                Ok(Some(e))
            }
            None => Ok(None),
        }
    }

    /// Every queue entry, in id order.
    /// When the oldest message still waiting for delivery (queued or
    /// deferred) arrived, in Unix seconds; `None` when none waits. Ids grow
    /// with time, so this is the first such entry in key order; held
    /// entries before it are skipped, at most `scan` of them.
    pub(crate) fn oldest_waiting(&self, scan: usize) -> Result<Option<i64>> {
        for kv in self.queue.iter().take(scan) {
            let (k, v) = kv?;
            let e: QueueEntry = decode(&v, key_id(&k).unwrap_or(0))?;
            if e.state != QueueState::Held {
                return Ok(Some(e.created));
            }
        }
        Ok(None)
    }

    pub(crate) fn queue_entries(&self) -> Result<Vec<QueueEntry>> {
        let mut out = Vec::new();
        for kv in self.queue.iter() {
            let (k, v) = kv?;
            let id = key_id(&k).unwrap_or(0);
            out.push(decode(&v, id)?);
        }
        Ok(out)
    }

    // ----- quarantine -----

    /// Hold a message for the given recipients; one entry per recipient.
    pub(crate) fn quarantine(
        &self,
        template: &HeldEntry,
        recipients: &[String],
        body: &[u8],
    ) -> Result<Vec<u64>> {
        let body_key = self.next_id()?;
        self.held_body.insert(id_key(body_key), body)?;
        self.held_refs
            .insert(id_key(body_key), &(recipients.len() as u64).to_be_bytes())?;
        let mut ids = Vec::new();
        for r in recipients {
            let id = self.next_id()?;
            let e = HeldEntry {
                id,
                body_key,
                recipient: r.clone(),
                ..template.clone()
            };
            self.held.insert(id_key(id), encode(&e))?;
            ids.push(id);
        }
        let _ = self.changes.send(());
        Ok(ids)
    }

    pub(crate) fn held_entries(&self) -> Result<Vec<HeldEntry>> {
        let mut out = Vec::new();
        for kv in self.held.iter() {
            let (k, v) = kv?;
            out.push(decode(&v, key_id(&k).unwrap_or(0))?);
        }
        Ok(out)
    }

    pub(crate) fn held_entry(&self, id: u64) -> Result<Option<HeldEntry>> {
        match self.held.get(id_key(id))? {
            Some(v) => Ok(Some(decode(&v, id)?)),
            None => Ok(None),
        }
    }

    /// Whether entry `id` is held (a key lookup, nothing decoded).
    pub(crate) fn held_contains(&self, id: u64) -> Result<bool> {
        Ok(self.held.contains_key(id_key(id))?)
    }

    pub(crate) fn held_body(&self, entry: &HeldEntry) -> Result<Option<sled::IVec>> {
        Ok(self.held_body.get(id_key(entry.body_key))?)
    }

    /// Remove a quarantine entry (and its body once no entry shares it).
    pub(crate) fn unhold(&self, id: u64) -> Result<Option<HeldEntry>> {
        let Some(v) = self.held.remove(id_key(id))? else {
            return Ok(None);
        };
        let e: HeldEntry = decode(&v, id)?;
        let left = self.held_refs.update_and_fetch(id_key(e.body_key), |old| {
            let n = old.and_then(key_id)?;
            (n > 1).then(|| (n - 1).to_be_bytes().to_vec())
        })?;
        if left.is_none() {
            self.held_body.remove(id_key(e.body_key))?;
        }
        let _ = self.changes.send(());
        Ok(Some(e))
    }

    /// Quarantine entries held (sled counts by walking the keys: call it per
    /// scrape, not per message).
    pub(crate) fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Release a quarantine entry: queue its message (with an
    /// `X-Postern-Released` header naming `who`) for its recipient and drop
    /// the entry, in one sled transaction over the five trees, so of any
    /// number of callers at once exactly one wins and the others get
    /// `None` ("already released or gone"); a crash leaves the one or the
    /// other, never both. Returns the new queue id once it is durable.
    pub(crate) async fn release_held(&self, id: u64, who: &Releaser) -> Result<Option<u64>> {
        let qid = self.swap_held_for_queued(id, who)?;
        if qid.is_some() {
            self.note_gone(id, outcomes::Outcome::Released, &who.by, who.via.as_str())?;
            let _ = self.changes.send(());
            self.durable().await?;
        }
        Ok(qid)
    }

    /// The compare-and-swap of [`Store::release_held`] (not yet durable).
    fn swap_held_for_queued(&self, id: u64, who: &Releaser) -> Result<Option<u64>> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        let qid = self.next_id()?;
        let header = who.header(chrono::Utc::now());
        let k = id_key(id);
        let done = (
            &self.held,
            &self.held_refs,
            &self.held_body,
            &self.queue,
            &self.body,
        )
            .transaction(|(held, refs, held_body, queue, body)| {
                let Some(v) = held.get(k)? else {
                    return Ok(None);
                };
                let e: HeldEntry = decode(&v, id).map_err(Abort::Abort)?;
                let bk = id_key(e.body_key);
                let held_bytes = held_body.get(bk)?;
                held.remove(&k)?;
                match refs.get(bk)?.as_deref().and_then(key_id) {
                    Some(n) if n > 1 => {
                        refs.insert(&bk, &(n - 1).to_be_bytes())?;
                    }
                    _ => {
                        refs.remove(&bk)?;
                        held_body.remove(&bk)?;
                    }
                }
                // A held entry without its body is dropped, not queued.
                let Some(held_bytes) = held_bytes else {
                    return Ok(None);
                };
                let mut out = Vec::with_capacity(header.len() + held_bytes.len());
                out.extend_from_slice(header.as_bytes());
                out.extend_from_slice(&held_bytes);
                let mut entry = QueueEntry::new(
                    qid,
                    e.sender.clone(),
                    [e.recipient.clone()],
                    out.len() as u64,
                    e.client_ip.clone(),
                    e.helo.clone(),
                );
                entry.trace = e.trace.clone();
                entry.from_outside = e.from_outside;
                body.insert(&id_key(qid), out)?;
                queue.insert(&id_key(qid), encode(&entry))?;
                Ok(Some(entry.state))
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        Ok(done.map(|state| {
            self.count(None, Some(state));
            qid
        }))
    }

    /// Delete quarantine entries received before `cutoff` (unix seconds).
    pub(crate) fn purge_held(&self, cutoff: i64) -> Result<usize> {
        let mut n = 0;
        for e in self.held_entries()? {
            if e.received < cutoff && self.unhold(e.id)?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Fires whenever the quarantine changes.
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()> {
        self.changes.subscribe()
    }

    // ----- small state for the mailbox servers -----

    pub(crate) fn get_state(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.state.get(key)?.map(|v| v.to_vec()))
    }

    pub(crate) fn put_state(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.state.insert(key, value)?;
        Ok(())
    }

    /// Flush everything (shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising our own plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: for<'a> Deserialize<'a>>(v: &[u8], id: u64) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(fmt_id(id), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> QueueEntry {
        QueueEntry {
            id,
            sender: "a@b.test".into(),
            recipients: vec![Recipient {
                address: "c@d.test".into(),
                status: RcptStatus::Pending,
                last_reply: None,
                remote: None,
                tls: None,
            }],
            state: QueueState::Queued,
            created: now_unix(),
            next_attempt_ms: 0,
            attempts: 0,
            size: 3,
            client_ip: String::new(),
            helo: String::new(),
            last_error: None,
            trace: None,
            from_outside: false,
        }
    }

    #[tokio::test]
    async fn enqueue_reopen_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let s = Store::open(dir.path()).unwrap();
            id = s.next_id().unwrap();
            s.enqueue(&entry(id), b"abc").unwrap();
            s.durable().await.unwrap();
            assert_eq!(s.counts()[&QueueState::Queued], 1);
        }
        // The committer task lets go of the database once it sees the store dropped.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.entry(id).unwrap().unwrap().sender, "a@b.test");
        assert_eq!(&*s.body(id).unwrap().unwrap(), b"abc");
        assert_eq!(s.counts()[&QueueState::Queued], 1);
        s.remove(id).unwrap();
        assert_eq!(s.counts()[&QueueState::Queued], 0);
        assert!(s.body(id).unwrap().is_none());
    }

    #[test]
    fn a_record_from_before_outbound_tls_still_loads() {
        let old = r#"{"id":1,"sender":"a@b.test","recipients":[{"address":"c@d.test","status":{"status":"delivered"},"last_reply":"250 ok","remote":"mx.d.test"}],"state":"queued","created":0,"next_attempt_ms":0,"attempts":1,"size":3}"#;
        let e: QueueEntry = serde_json::from_str(old).unwrap();
        assert_eq!(e.recipients[0].tls, None);
        let mut e = e;
        e.recipients[0].tls = Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into());
        let back: QueueEntry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back.recipients[0].tls, e.recipients[0].tls);
    }

    #[test]
    fn ids_round_trip() {
        assert_eq!(parse_id(&fmt_id(0xABCDEF)), Some(0xABCDEF));
        assert_eq!(parse_id("zz"), None);
    }
}

/// The held-entry template the store's and the quarantine's tests share.
#[cfg(test)]
pub(crate) fn test_held_template() -> HeldEntry {
    HeldEntry {
        id: 0,
        body_key: 0,
        sender: "x@far.test".into(),
        recipient: String::new(),
        reason: "test".into(),
        script: None,
        received: now_unix(),
        size: 4,
        client_ip: String::new(),
        helo: String::new(),
        trace: None,
        from_outside: true,
    }
}

#[cfg(test)]
mod quarantine_tests {
    use super::*;

    #[tokio::test]
    async fn shared_body_goes_with_its_last_entry() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let t = test_held_template();
        let ids = s
            .quarantine(&t, &["a@l.test".into(), "b@l.test".into()], b"body")
            .unwrap();
        let first = s.held_entry(ids[0]).unwrap().unwrap();
        s.unhold(ids[0]).unwrap();
        let second = s.held_entry(ids[1]).unwrap().unwrap();
        assert_eq!(&*s.held_body(&second).unwrap().unwrap(), b"body");
        s.unhold(ids[1]).unwrap();
        assert!(s.held_body(&first).unwrap().is_none());
        assert_eq!(s.held_count(), 0);
    }

    /// Many callers releasing one entry at the same moment: one queue
    /// entry, one winner; the shared body stays for the other recipient.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_release_is_won_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let t = test_held_template();
        for _ in 0..20 {
            let ids = s
                .quarantine(&t, &["a@l.test".into(), "b@l.test".into()], b"body")
                .unwrap();
            let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let (s, b, id) = (s.clone(), barrier.clone(), ids[0]);
                    tokio::spawn(async move {
                        b.wait().await;
                        let who = Releaser {
                            by: "a\r\nBcc: x@y; z".into(),
                            via: Via::Cli,
                        };
                        s.release_held(id, &who).await.unwrap()
                    })
                })
                .collect();
            let mut won = Vec::new();
            for t in tasks {
                won.extend(t.await.unwrap());
            }
            assert_eq!(won.len(), 1, "{won:?}");
            let body = s.body(won[0]).unwrap().unwrap();
            assert!(
                body.starts_with(b"X-Postern-Released: by aBcc:x@yz via cli; "),
                "{}",
                String::from_utf8_lossy(&body)
            );
            let other = s.held_entry(ids[1]).unwrap().unwrap();
            assert_eq!(&*s.held_body(&other).unwrap().unwrap(), b"body");
            s.unhold(ids[1]).unwrap();
            s.remove(won[0]).unwrap();
        }
        assert_eq!(s.held_count(), 0);
        assert_eq!(s.queue_entries().unwrap().len(), 0);
        assert_eq!(s.held_body.len(), 0);
        assert_eq!(s.held_refs.len(), 0);
    }
}
