//! STORE and UID STORE (RFC 3501 6.4.6): flags live in the per-user state, not in the
//! quarantine, and a change is applied to the stored flags so that two sessions of one
//! user never overwrite each other's.

use imap_codec::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_codec::imap_types::sequence::SequenceSet;

use super::core::{ImapCore, Step, tagged, unavailable};
use crate::mailbox::imap::state::{FlagOp, MAX_FLAG_LEN};

/// A flag as we store it; extension flags and overlong keywords are dropped,
/// so the per-user state stays small.
fn flag_string(f: &Flag<'_>) -> Option<String> {
    match f {
        Flag::Extension(_) => None,
        _ => {
            let s = f.to_string();
            (s.len() <= MAX_FLAG_LEN).then_some(s)
        }
    }
}

impl ImapCore {
    pub(super) fn store(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: &[Flag<'_>],
        uid: bool,
    ) -> Step {
        if self.sel.as_ref().is_some_and(|s| s.read_only) {
            return Step::Reply(tagged(tag, "NO", "[READ-ONLY] Mailbox is read-only"));
        }
        let given: Vec<String> = flags.iter().filter_map(flag_string).collect();
        let idxs = match self.resolve_checked(tag, set, uid) {
            Ok(i) => i,
            Err(bad) => return bad,
        };
        let (Some(sel), Some(account)) = (&mut self.sel, &self.account) else {
            return Step::Reply(tagged(tag, "NO", "Select a mailbox first"));
        };
        let op = match kind {
            StoreType::Replace => FlagOp::Replace(&given),
            StoreType::Add => FlagOp::Add(&given),
            StoreType::Remove => FlagOp::Remove(&given),
        };
        // The change is applied to the stored flags, not to this session's
        // copy, so flags another session set meanwhile are kept.
        let ids: Vec<u64> = idxs.iter().map(|&i| sel.msgs[i].meta.id).collect();
        let result = match self.shared.apply_flags(account, &ids, op) {
            Ok(r) => r,
            Err(e) => return Step::Reply(unavailable(tag, "STORE", &e)),
        };
        let mut out = Vec::new();
        // Messages removed elsewhere (their EXPUNGE not yet sent) keep no flags:
        // no FETCH claims a change for them, and the NO says so (RFC 2180 4.2.1).
        let mut missing = false;
        for &idx in &idxs {
            sel.synced = None;
            let m = &mut sel.msgs[idx];
            match result.get(&m.meta.id) {
                Some(flags) => m.flags = flags.clone(),
                None => missing = true,
            }
        }
        // A keyword new to the folder is announced before any FETCH shows it.
        sel.announce_keywords(&mut out);
        for idx in idxs {
            let m = &sel.msgs[idx];
            if response == StoreResponse::Answer && result.contains_key(&m.meta.id) {
                let uid_part = if uid {
                    format!(" UID {}", m.uid)
                } else {
                    String::new()
                };
                out.extend_from_slice(
                    format!(
                        "* {} FETCH (FLAGS {}{uid_part})\r\n",
                        idx + 1,
                        sel.flags_of(m)
                    )
                    .as_bytes(),
                );
            }
        }
        self.sync_after(&mut out, uid);
        if missing {
            out.extend_from_slice(&tagged(
                tag,
                "NO",
                "[EXPUNGEISSUED] Some of the messages were removed meanwhile; the others were changed",
            ));
        } else {
            out.extend_from_slice(&tagged(tag, "OK", "STORE completed"));
        }
        Step::Reply(out)
    }
}
