//! Per-user IMAP state kept in the store's state space: UIDVALIDITY, the next UID, and for each
//! visible quarantine entry its UID and flags. One JSON value per user under `imap/v1/<login>`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::mailbox::accounts::Account;
use crate::mailbox::store::{HeldMeta, QuarantineStore};

/// Keywords and flags per message are bounded so that the state stays small.
pub const MAX_FLAGS: usize = 32;
pub const MAX_FLAG_LEN: usize = 64;

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
}

/// One message as a session sees it.
#[derive(Clone, Debug)]
pub struct ViewMsg {
    pub meta: HeldMeta,
    pub uid: u32,
    /// Sorted, deduplicated.
    pub flags: Vec<String>,
}

/// The INBOX of one user at one moment.
#[derive(Clone, Debug)]
pub struct View {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub msgs: Vec<ViewMsg>,
}

/// Shared by all IMAP sessions of the process: the store, a lock serialising state updates,
/// and a channel that tells sessions that some user's flags changed.
pub struct Shared {
    pub store: Arc<dyn QuarantineStore>,
    lock: Mutex<()>,
    changes: broadcast::Sender<()>,
}

fn key(account: &Account) -> Vec<u8> {
    format!("imap/v1/{}", account.login.to_ascii_lowercase()).into_bytes()
}

/// Canonical order: system flags first in a fixed order, then keywords sorted.
pub fn normalize(flags: &mut Vec<String>) {
    const ORDER: [&str; 5] = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"];
    flags.sort_by_key(|f| {
        (
            ORDER.iter().position(|o| o == f).unwrap_or(ORDER.len()),
            f.clone(),
        )
    });
    flags.dedup();
    flags.truncate(MAX_FLAGS);
}

impl Shared {
    pub fn new(store: Arc<dyn QuarantineStore>) -> Shared {
        Shared {
            store,
            lock: Mutex::new(()),
            changes: broadcast::channel(64).0,
        }
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<()> {
        self.changes.subscribe()
    }

    fn load(&self, account: &Account) -> UserState {
        self.store
            .get_state(&key(account))
            .and_then(|v| serde_json::from_slice::<UserState>(&v).ok())
            .filter(|s| s.uidvalidity != 0 && s.uidnext != 0)
            .unwrap_or_else(|| UserState {
                uidvalidity: (chrono::Utc::now().timestamp() as u32).max(1),
                uidnext: 1,
                msgs: BTreeMap::new(),
            })
    }

    fn save(&self, account: &Account, st: &UserState) {
        if let Ok(v) = serde_json::to_vec(st) {
            self.store.put_state(&key(account), &v);
        }
    }

    /// The user's INBOX now: entries they may see, in ascending UID order; new entries get
    /// UIDs, entries gone from the quarantine are forgotten.
    pub fn view(&self, account: &Account) -> View {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let raw = self.store.get_state(&key(account));
        let mut st = self.load(account);
        let mut changed = raw.is_none();
        let visible: Vec<HeldMeta> = self
            .store
            .list()
            .into_iter()
            .filter(|m| account.can_see(m))
            .collect();
        let before = st.msgs.len();
        st.msgs
            .retain(|id, _| visible.binary_search_by_key(id, |m| m.id).is_ok());
        changed |= st.msgs.len() != before;
        let mut msgs = Vec::with_capacity(visible.len());
        for meta in visible {
            let ms = match st.msgs.get(&meta.id) {
                Some(ms) => ms.clone(),
                None => {
                    let ms = MsgState {
                        uid: st.uidnext,
                        flags: Vec::new(),
                    };
                    st.uidnext = st.uidnext.saturating_add(1);
                    st.msgs.insert(meta.id, ms.clone());
                    changed = true;
                    ms
                }
            };
            msgs.push(ViewMsg {
                meta,
                uid: ms.uid,
                flags: ms.flags,
            });
        }
        msgs.sort_by_key(|m| m.uid);
        if changed {
            self.save(account, &st);
        }
        View {
            uidvalidity: st.uidvalidity,
            uidnext: st.uidnext,
            msgs,
        }
    }

    /// Set the flags of entries (by id); tells the other sessions.
    /// Apply one flag change to messages `ids`, on the stored state under
    /// the lock, and return each message's resulting flags. Changes, not
    /// whole sets, are applied so that two sessions of one user (a phone and
    /// a desktop) never overwrite each other's flags.
    pub fn apply_flags(
        &self,
        account: &Account,
        ids: &[u64],
        op: FlagOp<'_>,
    ) -> HashMap<u64, Vec<String>> {
        let mut out = HashMap::new();
        let mut changed = false;
        {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let mut st = self.load(account);
            for id in ids {
                let Some(ms) = st.msgs.get_mut(id) else {
                    continue;
                };
                let mut new = match op {
                    FlagOp::Replace(given) => given.to_vec(),
                    FlagOp::Add(given) => {
                        let mut f = ms.flags.clone();
                        f.extend(given.iter().cloned());
                        f
                    }
                    FlagOp::Remove(given) => ms
                        .flags
                        .iter()
                        .filter(|f| !given.iter().any(|g| g.eq_ignore_ascii_case(f)))
                        .cloned()
                        .collect(),
                };
                normalize(&mut new);
                if new != ms.flags {
                    ms.flags = new;
                    changed = true;
                }
                out.insert(*id, ms.flags.clone());
            }
            if changed {
                self.save(account, &st);
            }
        }
        if changed {
            let _ = self.changes.send(());
        }
        out
    }

    /// Replace the flags of some messages (tests and migrations).
    pub fn set_flags(&self, account: &Account, updates: &[(u64, Vec<String>)]) {
        for (id, flags) in updates {
            self.apply_flags(account, &[*id], FlagOp::Replace(flags));
        }
    }
}

/// A flag change, as STORE gives it.
#[derive(Clone, Copy)]
pub enum FlagOp<'a> {
    Replace(&'a [String]),
    Add(&'a [String]),
    Remove(&'a [String]),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::accounts::Role;
    use crate::mailbox::store::MemStore;

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
        let v1 = sh.view(&a);
        assert_eq!(v1.msgs.len(), 1);
        assert_eq!(v1.msgs[0].uid, 1);
        sh.set_flags(&a, &[(v1.msgs[0].meta.id, vec!["\\Seen".into()])]);
        mem.add("s@y", &["alice@x.test"], "r", b"y");
        let sh2 = Shared::new(mem.clone());
        let v2 = sh2.view(&a);
        assert_eq!(v2.uidvalidity, v1.uidvalidity);
        assert_eq!(
            v2.msgs.iter().map(|m| m.uid).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(v2.msgs[0].flags, vec!["\\Seen".to_string()]);
        assert_eq!(v2.uidnext, 3);
    }
}
