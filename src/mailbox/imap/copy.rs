//! COPY and MOVE (RFC 6851) into `Release`: each message is re-queued for delivery to its
//! recipient (durably, through the store's group commit) and leaves the quarantine.
//! Nothing can be copied into INBOX.

use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::sequence::SequenceSet;

use super::core::{Folder, ImapCore, Step, folder_of, tagged, unavailable};
use crate::mailbox::store::QuarantineError;

impl ImapCore {
    pub(super) fn copy_move(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        dest: &Mailbox<'_>,
        uid: bool,
        is_move: bool,
    ) -> Step {
        let verb = if is_move { "MOVE" } else { "COPY" };
        match folder_of(dest) {
            Some(Folder::Release) => {}
            Some(Folder::Inbox) => {
                return Step::Reply(tagged(
                    tag,
                    "NO",
                    "[CANNOT] Nothing can be added to the quarantine",
                ));
            }
            None => return Step::Reply(tagged(tag, "NO", "[TRYCREATE] No such mailbox")),
        }
        if is_move && self.sel.as_ref().is_some_and(|s| s.read_only) {
            return Step::Reply(tagged(tag, "NO", "[READ-ONLY] Mailbox is read-only"));
        }
        let idxs = match self.resolve_checked(tag, set, uid) {
            Ok(i) => i,
            Err(bad) => return bad,
        };
        let mut out = Vec::new();
        let (released, failed) = self.release(&idxs, is_move, &mut out);
        if let Some(e) = failed {
            // Those released so far are gone (and, for MOVE, reported); the rest stay.
            let what = format!("{verb} after {released} release(s)");
            out.extend_from_slice(&unavailable(tag, &what, &e));
            return Step::Reply(out);
        }
        self.sync_after(&mut out, true);
        out.extend_from_slice(&tagged(
            tag,
            "OK",
            &format!("{verb} completed; {released} message(s) released for delivery"),
        ));
        Step::Reply(out)
    }

    /// Release the messages at `idxs` (ascending), stopping at the first store
    /// failure. For MOVE each one handled (released, or gone already) is
    /// expunged from the session. Returns how many were released, and the failure.
    fn release(
        &mut self,
        idxs: &[usize],
        is_move: bool,
        out: &mut Vec<u8>,
    ) -> (usize, Option<QuarantineError>) {
        let Some(sel) = &mut self.sel else {
            return (0, None);
        };
        let mut released = 0;
        let mut done = Vec::new();
        let mut failed = None;
        for &i in idxs {
            match self.shared.release(sel.msgs[i].meta.id) {
                Ok(r) => {
                    if r {
                        released += 1;
                        self.shared.releases.inc();
                        tracing::info!(
                            id = sel.msgs[i].meta.id,
                            "quarantine entry released over IMAP"
                        );
                    }
                    done.push(i);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if is_move {
            for &i in done.iter().rev() {
                out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                let gone = sel.msgs.remove(i);
                sel.recent.remove(&gone.uid);
            }
        }
        (released, failed)
    }
}
