//! What became of a quarantine entry once it is gone, so a digest link
//! clicked later can say "already released by alice via imap" instead of
//! "not found"; and the one write a digest makes (its mail and the user's
//! digest state, together).
//!
//! The records live in the `state` tree under `gone\0<id>` and are pruned
//! with the quarantine's retention (a link cannot outlive the entry it names
//! by more than that).

use serde::{Deserialize, Serialize};

use super::{QueueEntry, Result, Store, StoreError, decode, encode, id_key, key_id};

const GONE: &[u8] = b"gone\0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    Released,
    Deleted,
}

/// The record of an entry's end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Gone {
    pub(crate) outcome: Outcome,
    pub(crate) by: String,
    /// `imap`, `pop3`, `web`, `cli`, or `retention`.
    pub(crate) via: String,
    /// Unix seconds.
    pub(crate) at: i64,
}

fn gone_key(id: u64) -> Vec<u8> {
    [GONE, &id_key(id)].concat()
}

impl Store {
    /// Remember how entry `id` went (not made durable on its own: it rides
    /// on the next commit, and losing it costs only a vaguer page).
    pub(crate) fn note_gone(&self, id: u64, outcome: Outcome, by: &str, via: &str) -> Result<()> {
        let g = Gone {
            outcome,
            by: by.to_string(),
            via: via.to_string(),
            at: super::now_unix(),
        };
        self.state.insert(gone_key(id), encode(&g))?;
        Ok(())
    }

    pub(crate) fn gone(&self, id: u64) -> Result<Option<Gone>> {
        match self.state.get(gone_key(id))? {
            Some(v) => Ok(Some(decode(&v, id)?)),
            None => Ok(None),
        }
    }

    /// Drop the records of entries gone before `cutoff` (unix seconds).
    pub(crate) fn purge_gone(&self, cutoff: i64) -> Result<usize> {
        let mut n = 0;
        for kv in self.state.scan_prefix(GONE) {
            let (k, v) = kv?;
            let id = key_id(&k[GONE.len()..]).unwrap_or(0);
            let old = match decode::<Gone>(&v, id) {
                Ok(g) => g.at < cutoff,
                Err(_) => true,
            };
            if old {
                self.state.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Queue `entry` with `body` and set `key` to `value` in the state tree,
    /// in one transaction: a digest and the record of what it listed are
    /// written together, so a crash can neither send it twice nor lose it.
    /// Not yet durable: await [`Store::durable`].
    pub(crate) fn enqueue_with_state(
        &self,
        entry: &QueueEntry,
        body: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> Result<()> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let k = id_key(entry.id);
        let encoded = encode(entry);
        (&self.queue, &self.body, &self.state)
            .transaction(|(queue, bodies, state)| {
                bodies.insert(&k, body)?;
                queue.insert(&k, encoded.as_slice())?;
                state.insert(key, value)?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Sled(e),
            })?;
        self.count(None, Some(entry.state));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_s_end_is_remembered_until_purged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.gone(7).unwrap(), None);
        store
            .note_gone(7, Outcome::Released, "alice", "imap")
            .unwrap();
        let g = store.gone(7).unwrap().unwrap();
        assert_eq!(
            (g.outcome, g.by.as_str(), g.via.as_str()),
            (Outcome::Released, "alice", "imap")
        );
        assert_eq!(store.purge_gone(g.at).unwrap(), 0);
        assert_eq!(store.purge_gone(g.at + 1).unwrap(), 1);
        assert_eq!(store.gone(7).unwrap(), None);
    }
}
