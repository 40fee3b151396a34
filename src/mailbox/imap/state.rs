//! Per-user IMAP state kept in the store's state space: UIDVALIDITY, the next UID, for each
//! visible quarantine entry its UID and flags, the highest UID some session was told is
//! `\Recent`, and the folders unsubscribed. One JSON value per user under `imap/v1/<login>`,
//! decoded once and cached with the user's view until the quarantine changes.
//!
//! Also here: the bodies of entries this process removed (EXPUNGE, MOVE/COPY to a drop box),
//! kept for a while so that another session that was not yet told of the EXPUNGE can still
//! read them (RFC 2180 4.1.1, as Dovecot does).
//!
//! And the [`Summary`] of each held message FETCH or SEARCH has looked at (envelope,
//! body structures, header block, searched header values), computed once for all sessions
//! and kept, bounded, until the entry leaves the quarantine.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::mailbox::accounts::Account;
use crate::mailbox::imap::message::Summary;
use crate::mailbox::store::{HeldMeta, QResult, QuarantineStore, Releaser};

/// Keywords and flags per message are bounded so that the state stays small.
pub(crate) const MAX_FLAGS: usize = 32;
pub(crate) const MAX_FLAG_LEN: usize = 64;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MsgState {
    uid: u32,
    #[serde(default)]
    flags: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct UserState {
    uidvalidity: u32,
    uidnext: u32,
    #[serde(default)]
    msgs: BTreeMap<u64, MsgState>,
    /// Messages with a UID above this were never reported to a SELECT session:
    /// the next one to see them gets them as `\Recent` (RFC 3501 2.3.2).
    #[serde(default)]
    recent_upto: u32,
    /// Folders (canonical names) the user unsubscribed; all are subscribed
    /// by default, so a new user's LSUB shows every folder.
    #[serde(default)]
    unsubscribed: BTreeSet<String>,
}

/// One message as a session sees it.
#[derive(Clone, Debug)]
pub(crate) struct ViewMsg {
    pub(crate) meta: HeldMeta,
    pub(crate) uid: u32,
    /// Sorted, deduplicated.
    pub(crate) flags: Vec<String>,
}

/// The INBOX of one user at one moment.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub(crate) uidvalidity: u32,
    pub(crate) uidnext: u32,
    pub(crate) msgs: Vec<ViewMsg>,
}

/// Shared by all IMAP sessions of the process: the store, the per-user views
/// (cached), a lock serialising state updates, and a channel that tells
/// sessions that some user's flags changed.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn QuarantineStore>,
    /// `postern_releases_total{via="imap"}` (unregistered unless the gateway gives one).
    pub(crate) releases: prometheus::IntCounter,
    inner: Mutex<Inner>,
    changes: broadcast::Sender<()>,
    ghosts: Mutex<Ghosts>,
    summaries: Mutex<Summaries>,
    /// Summaries computed so far (each one a full MIME parse).
    summaries_built: AtomicUsize,
}

/// [`Summary`]s by quarantine entry id, oldest first for eviction, bounded in count and
/// bytes. Held entries never change, so an entry only leaves when it is evicted or its
/// message leaves the quarantine (seen at the next listing, [`Shared::view`]).
#[derive(Default)]
struct Summaries {
    map: HashMap<u64, Arc<Summary>>,
    order: VecDeque<u64>,
    bytes: usize,
}

const MAX_SUMMARIES: usize = 100_000;
const MAX_SUMMARY_BYTES: usize = 64 * 1024 * 1024;

impl Summaries {
    fn keep(&mut self, id: u64, s: Arc<Summary>) {
        let size = s.bytes();
        // One huge message must not push out everything else.
        if size > MAX_SUMMARY_BYTES / 16 || self.map.contains_key(&id) {
            return;
        }
        self.map.insert(id, s);
        self.order.push_back(id);
        self.bytes += size;
        while self.map.len() > MAX_SUMMARIES || self.bytes > MAX_SUMMARY_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.map.remove(&old) {
                self.bytes -= gone.bytes();
            }
        }
    }

    /// Forget the entries for which `keep` is false.
    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let bytes = &mut self.bytes;
        self.map.retain(|id, s| {
            let k = keep(*id);
            if !k {
                *bytes -= s.bytes();
            }
            k
        });
        let map = &self.map;
        self.order.retain(|id| map.contains_key(id));
    }
}

/// Bodies of entries removed through [`Shared::delete`] and [`Shared::release`], newest
/// last, bounded in count and bytes: a session that still shows such a message (its
/// EXPUNGE not yet sent, as during FETCH, STORE and SEARCH) reads it from here.
#[derive(Default)]
struct Ghosts {
    bodies: VecDeque<(u64, Arc<Vec<u8>>)>,
    bytes: usize,
}

const MAX_GHOSTS: usize = 256;
const MAX_GHOST_BYTES: usize = 32 * 1024 * 1024;

impl Ghosts {
    fn keep(&mut self, id: u64, body: Vec<u8>) {
        if body.len() > MAX_GHOST_BYTES {
            return;
        }
        self.bytes += body.len();
        self.bodies.push_back((id, Arc::new(body)));
        while self.bodies.len() > MAX_GHOSTS || self.bytes > MAX_GHOST_BYTES {
            match self.bodies.pop_front() {
                Some((_, b)) => self.bytes -= b.len(),
                None => break,
            }
        }
    }

    fn has(&self, id: u64) -> bool {
        self.bodies.iter().any(|(i, _)| *i == id)
    }

    fn get(&self, id: u64) -> Option<Arc<Vec<u8>>> {
        self.bodies
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, b)| b.clone())
    }
}

/// Under [`Shared`]'s lock.
struct Inner {
    /// The store's change broadcast, subscribed at creation so no change is
    /// missed: anything on it (or a lag) drops every cached view.
    store_rx: broadcast::Receiver<()>,
    /// Per lower-cased login. A NOOP or an IDLE tick with nothing changed
    /// answers from here instead of decoding every held entry and the
    /// user's JSON state again.
    cache: HashMap<String, Cached>,
}

struct Cached {
    /// The account the view was computed for: a reloaded users file may
    /// give the same login other addresses.
    account: Account,
    state: UserState,
    /// Shared with the sessions syncing against it: a NOOP copies nothing.
    view: Arc<View>,
}

impl Inner {
    /// Drop every cached view if the quarantine changed since the last look.
    fn refresh(&mut self) {
        let mut changed = false;
        while let Ok(()) | Err(broadcast::error::TryRecvError::Lagged(_)) = self.store_rx.try_recv()
        {
            changed = true;
        }
        if changed {
            self.cache.clear();
        }
    }

    fn cached(&self, account: &Account) -> Option<&Cached> {
        self.cache
            .get(&account.login.to_ascii_lowercase())
            .filter(|c| c.account == *account)
    }
}

fn key(account: &Account) -> Vec<u8> {
    format!("imap/v1/{}", account.login.to_ascii_lowercase()).into_bytes()
}

/// Canonical order: system flags first in a fixed order, then keywords sorted. Flag
/// names are case-insensitive (RFC 3501 2.3.2): `$junk` added to `$Junk` is the same
/// keyword, and the first spelling stays.
pub(crate) fn normalize(flags: &mut Vec<String>) {
    const ORDER: [&str; 5] = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"];
    flags.sort_by_cached_key(|f| {
        (
            ORDER.iter().position(|o| o == f).unwrap_or(ORDER.len()),
            f.to_ascii_lowercase(),
        )
    });
    flags.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    flags.truncate(MAX_FLAGS);
}

/// Apply one flag change to a message's flags.
fn changed_flags(old: &[String], op: FlagOp<'_>) -> Vec<String> {
    let mut new = match op {
        FlagOp::Replace(given) => given.to_vec(),
        FlagOp::Add(given) => {
            let mut f = old.to_vec();
            f.extend(given.iter().cloned());
            f
        }
        FlagOp::Remove(given) => old
            .iter()
            .filter(|f| !given.iter().any(|g| g.eq_ignore_ascii_case(f)))
            .cloned()
            .collect(),
    };
    normalize(&mut new);
    new
}

impl Shared {
    pub(crate) fn new(store: Arc<dyn QuarantineStore>) -> Shared {
        Shared::counting(store, unregistered_counter())
    }

    /// Like [`Shared::new`], counting releases in `releases`.
    pub(crate) fn counting(
        store: Arc<dyn QuarantineStore>,
        releases: prometheus::IntCounter,
    ) -> Shared {
        Shared {
            releases,
            inner: Mutex::new(Inner {
                store_rx: store.subscribe(),
                cache: HashMap::new(),
            }),
            store,
            changes: broadcast::channel(64).0,
            ghosts: Mutex::new(Ghosts::default()),
            summaries: Mutex::new(Summaries::default()),
            summaries_built: AtomicUsize::new(0),
        }
    }

    fn summaries(&self) -> std::sync::MutexGuard<'_, Summaries> {
        self.summaries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The summary of message `id`, from the cache or from its body; `Ok(None)` when
    /// [`Shared::body`] would find nothing (a cached summary is not an excuse to show
    /// a message that is gone).
    pub(crate) fn summary(&self, id: u64) -> QResult<Option<Arc<Summary>>> {
        let cached = self.summaries().map.get(&id).cloned();
        if let Some(s) = cached {
            let held = self.store.contains(id)? || self.ghosts().has(id);
            return Ok(held.then_some(s));
        }
        Ok(self.body(id)?.map(|raw| self.summary_of(id, &raw)))
    }

    /// The summary of message `id` whose octets are `raw` (just read by the caller).
    pub(crate) fn summary_of(&self, id: u64, raw: &[u8]) -> Arc<Summary> {
        if let Some(s) = self.summaries().map.get(&id) {
            return s.clone();
        }
        // Parsed outside the lock: sessions wait only for each other's lookups.
        let s = Arc::new(Summary::of(raw));
        self.summaries_built.fetch_add(1, Ordering::Relaxed);
        self.summaries().keep(id, s.clone());
        s
    }

    /// How many summaries were computed (each a full MIME parse).
    #[cfg(test)]
    pub(crate) fn summaries_built(&self) -> usize {
        self.summaries_built.load(Ordering::Relaxed)
    }

    fn ghosts(&self) -> std::sync::MutexGuard<'_, Ghosts> {
        self.ghosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The held message, or the body of one this process removed lately
    /// (for sessions not yet told of its EXPUNGE); `Ok(None)` if neither.
    pub(crate) fn body(&self, id: u64) -> QResult<Option<Arc<Vec<u8>>>> {
        if let Some(b) = self.store.body(id)? {
            return Ok(Some(Arc::new(b)));
        }
        Ok(self.ghosts().get(id))
    }

    /// Keep the body of an entry about to be removed, for [`Shared::body`].
    fn keep_ghost(&self, id: u64) -> QResult<()> {
        if let Some(b) = self.store.body(id)? {
            self.ghosts().keep(id, b);
        }
        Ok(())
    }

    /// [`QuarantineStore::delete`], keeping the body readable for the other sessions.
    pub(crate) fn delete(&self, id: u64) -> QResult<bool> {
        self.keep_ghost(id)?;
        self.store.delete(id)
    }

    /// [`QuarantineStore::release`], keeping the body readable for the other sessions.
    pub(crate) fn release(&self, id: u64, who: &Releaser) -> QResult<bool> {
        self.keep_ghost(id)?;
        self.store.release(id, who)
    }

    pub(crate) fn subscribe_changes(&self) -> broadcast::Receiver<()> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored state, and whether it is new (nothing stored yet). A store
    /// failure is an error, never a fresh state: that would change
    /// UIDVALIDITY and make every client re-download.
    fn load(&self, account: &Account) -> QResult<(UserState, bool)> {
        let stored = self
            .store
            .get_state(&key(account))?
            .and_then(|v| serde_json::from_slice::<UserState>(&v).ok())
            .filter(|s| s.uidvalidity != 0 && s.uidnext != 0);
        Ok(match stored {
            Some(st) => (st, false),
            None => (
                UserState {
                    uidvalidity: (chrono::Utc::now().timestamp() as u32).max(1),
                    uidnext: 1,
                    ..UserState::default()
                },
                true,
            ),
        })
    }

    fn save(&self, account: &Account, st: &UserState) -> QResult<()> {
        match serde_json::to_vec(st) {
            Ok(v) => self.store.put_state(&key(account), &v),
            Err(_) => Ok(()),
        }
    }

    /// The user's INBOX now: entries they may see, in ascending UID order; new entries get
    /// UIDs, entries gone from the quarantine are forgotten. Answered from the cache while
    /// the quarantine has not changed.
    pub(crate) fn view(&self, account: &Account) -> QResult<Arc<View>> {
        let mut g = self.lock();
        g.refresh();
        if let Some(c) = g.cached(account) {
            return Ok(c.view.clone());
        }
        let (mut st, mut changed) = self.load(account)?;
        let held = self.store.list()?;
        // Summaries of what left the quarantine go (unless still readable as a ghost).
        {
            let ghosts = self.ghosts();
            self.summaries()
                .retain(|id| held.binary_search_by_key(&id, |m| m.id).is_ok() || ghosts.has(id));
        }
        let visible: Vec<HeldMeta> = held.into_iter().filter(|m| account.can_see(m)).collect();
        let before = st.msgs.len();
        st.msgs
            .retain(|id, _| visible.binary_search_by_key(id, |m| m.id).is_ok());
        changed |= st.msgs.len() != before;
        let mut msgs = Vec::with_capacity(visible.len());
        for meta in visible {
            let ms = st.msgs.entry(meta.id).or_insert_with(|| {
                changed = true;
                let uid = st.uidnext;
                st.uidnext = st.uidnext.saturating_add(1);
                MsgState {
                    uid,
                    flags: Vec::new(),
                }
            });
            msgs.push(ViewMsg {
                meta,
                uid: ms.uid,
                flags: ms.flags.clone(),
            });
        }
        msgs.sort_by_key(|m| m.uid);
        if changed {
            self.save(account, &st)?;
        }
        let view = Arc::new(View {
            uidvalidity: st.uidvalidity,
            uidnext: st.uidnext,
            msgs,
        });
        g.cache.insert(
            account.login.to_ascii_lowercase(),
            Cached {
                account: account.clone(),
                state: st,
                view: view.clone(),
            },
        );
        Ok(view)
    }

    /// Apply one flag change to messages `ids`, on the stored state under
    /// the lock, and return each message's resulting flags. Changes, not
    /// whole sets, are applied so that two sessions of one user (a phone and
    /// a desktop) never overwrite each other's flags. Tells the other sessions.
    pub(crate) fn apply_flags(
        &self,
        account: &Account,
        ids: &[u64],
        op: FlagOp<'_>,
    ) -> QResult<HashMap<u64, Vec<String>>> {
        let mut out = HashMap::new();
        {
            let mut g = self.lock();
            g.refresh();
            // Work on a copy: if saving fails, the cache keeps what is stored.
            let mut st = match g.cached(account) {
                Some(c) => c.state.clone(),
                None => self.load(account)?.0,
            };
            let mut changed = false;
            for id in ids {
                let Some(ms) = st.msgs.get_mut(id) else {
                    continue;
                };
                let new = changed_flags(&ms.flags, op);
                if new != ms.flags {
                    ms.flags = new;
                    changed = true;
                }
                out.insert(*id, ms.flags.clone());
            }
            if !changed {
                return Ok(out);
            }
            self.save(account, &st)?;
            let login = account.login.to_ascii_lowercase();
            if let Some(c) = g.cache.get_mut(&login).filter(|c| c.account == *account) {
                for m in &mut Arc::make_mut(&mut c.view).msgs {
                    if let Some(f) = out.get(&m.meta.id) {
                        m.flags = f.clone();
                    }
                }
                c.state = st;
            }
        }
        let _ = self.changes.send(());
        Ok(out)
    }
}

impl Shared {
    /// Read or change the user's stored state under the lock; `f` says
    /// whether it changed anything, and only then is it saved (and cached).
    fn with_state<R>(
        &self,
        account: &Account,
        f: impl FnOnce(&mut UserState) -> (R, bool),
    ) -> QResult<R> {
        let mut g = self.lock();
        g.refresh();
        // Work on a copy: if saving fails, the cache keeps what is stored.
        let mut st = match g.cached(account) {
            Some(c) => c.state.clone(),
            None => self.load(account)?.0,
        };
        let (r, changed) = f(&mut st);
        if changed {
            self.save(account, &st)?;
            let login = account.login.to_ascii_lowercase();
            if let Some(c) = g.cache.get_mut(&login).filter(|c| c.account == *account) {
                c.state = st;
            }
        }
        Ok(r)
    }

    /// The UID above which messages are still `\Recent` for whoever claims
    /// them; with `claim_upto`, this session claims those up to that UID, so
    /// that no other session sees them as recent (EXAMINE claims nothing).
    pub(crate) fn recent_from(&self, account: &Account, claim_upto: Option<u32>) -> QResult<u32> {
        self.with_state(account, |st| {
            let before = st.recent_upto;
            match claim_upto {
                Some(upto) if upto > before => {
                    st.recent_upto = upto;
                    (before, true)
                }
                _ => (before, false),
            }
        })
    }

    /// The folders (canonical names) this user unsubscribed.
    pub(crate) fn unsubscribed(&self, account: &Account) -> QResult<BTreeSet<String>> {
        self.with_state(account, |st| (st.unsubscribed.clone(), false))
    }

    /// SUBSCRIBE (`on`) or UNSUBSCRIBE a folder, by canonical name.
    pub(crate) fn subscribe(&self, account: &Account, folder: &str, on: bool) -> QResult<()> {
        self.with_state(account, |st| {
            let changed = if on {
                st.unsubscribed.remove(folder)
            } else {
                st.unsubscribed.insert(folder.to_string())
            };
            ((), changed)
        })
    }
}

/// A flag change, as STORE gives it.
#[derive(Clone, Copy)]
pub(crate) enum FlagOp<'a> {
    Replace(&'a [String]),
    Add(&'a [String]),
    Remove(&'a [String]),
}

/// A counter nobody scrapes, for cores built outside a gateway (tests, fuzzing).
fn unregistered_counter() -> prometheus::IntCounter {
    prometheus::IntCounter::new("postern_releases_unregistered", "not scraped")
        .unwrap_or_else(|e| panic!("static metric: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::accounts::Role;
    use crate::mailbox::store::MemStore;

    #[test]
    fn keywords_are_case_insensitive() {
        let old = vec!["$Junk".to_string()];
        let new = changed_flags(&old, FlagOp::Add(&["$junk".into(), "\\Seen".into()]));
        assert_eq!(new, vec!["\\Seen".to_string(), "$Junk".to_string()]);
    }

    #[test]
    fn uids_are_stable_and_persist() {
        let mem = Arc::new(MemStore::new());
        let a = Account {
            login: "Alice".into(),
            addresses: vec!["alice@x.test".into()],
            role: Role::User,
        };
        mem.add("s@y", &["alice@x.test", "bob@x.test"], "r", b"x");
        let sh = Shared::new(mem.clone());
        let v1 = sh.view(&a).unwrap();
        assert_eq!(v1.msgs.len(), 1);
        assert_eq!(v1.msgs[0].uid, 1);
        sh.apply_flags(
            &a,
            &[v1.msgs[0].meta.id],
            FlagOp::Replace(&["\\Seen".into()]),
        )
        .unwrap();
        mem.add("s@y", &["alice@x.test"], "r", b"y");
        let sh2 = Shared::new(mem.clone());
        let v2 = sh2.view(&a).unwrap();
        assert_eq!(v2.uidvalidity, v1.uidvalidity);
        assert_eq!(
            v2.msgs.iter().map(|m| m.uid).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(v2.msgs[0].flags, vec!["\\Seen".to_string()]);
        assert_eq!(v2.uidnext, 3);
    }
}
