//! EXPUNGE and UID EXPUNGE (RFC 3501 6.4.3, UIDPLUS RFC 4315): `\Deleted` messages are
//! deleted from the quarantine itself, not just from this user's view.

use imap_codec::imap_types::sequence::SequenceSet;

use super::core::{Folder, ImapCore, Step, set_contains, tagged, unavailable};
use crate::mailbox::store::QuarantineError;

impl ImapCore {
    /// Delete the \Deleted messages (within `uids` when given) from the quarantine; report
    /// each as EXPUNGE into `out`. Stops at the first store failure: what was deleted
    /// so far is reported, the rest stays selected.
    pub(super) fn expunge(
        &mut self,
        uids: Option<&SequenceSet>,
        out: &mut Vec<u8>,
    ) -> Result<(), QuarantineError> {
        let Some(sel) = &mut self.sel else {
            return Ok(());
        };
        if sel.read_only || sel.folder != Folder::Inbox {
            return Ok(());
        }
        let max_uid = sel.msgs.last().map_or(0, |m| m.uid);
        for i in (0..sel.msgs.len()).rev() {
            let m = &sel.msgs[i];
            let marked = m.flags.iter().any(|f| f == "\\Deleted");
            let in_set = uids.is_none_or(|s| set_contains(s, m.uid, max_uid));
            if marked && in_set {
                // Ok(false): gone already (released or deleted elsewhere); expunged either way.
                self.shared.delete(m.meta.id)?;
                out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                let gone = sel.msgs.remove(i);
                sel.synced = None;
                sel.recent.remove(&gone.uid);
            }
        }
        Ok(())
    }

    pub(super) fn expunge_cmd(&mut self, tag: &str, uids: Option<&SequenceSet>) -> Step {
        if self.sel.as_ref().is_some_and(|s| s.read_only) {
            return Step::Reply(tagged(tag, "NO", "[READ-ONLY] Mailbox is read-only"));
        }
        let mut out = Vec::new();
        if let Err(e) = self.expunge(uids, &mut out) {
            out.extend_from_slice(&unavailable(tag, "EXPUNGE", &e));
            return Step::Reply(out);
        }
        self.sync_after(&mut out, true);
        out.extend_from_slice(&tagged(tag, "OK", "EXPUNGE completed"));
        Step::Reply(out)
    }
}
