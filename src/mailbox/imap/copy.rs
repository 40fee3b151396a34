//! COPY and MOVE (RFC 6851) into the drop boxes: `Release` re-queues each message for
//! delivery to its recipient (durably, through the store's group commit, once however
//! many sessions ask at the same moment); `Release and allow sender` does that and puts
//! the envelope sender on the user's allow list; `Block sender` puts it on the user's
//! block list and deletes the message. Either way the message leaves the quarantine.
//! Bounces (empty sender) are never listed. Nothing can be copied into INBOX.

use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::sequence::SequenceSet;

use super::core::{Folder, ImapCore, Step, folder_of, tagged, unavailable};
use crate::mailbox::store::{ListKind, QuarantineError, Releaser, Via};

/// What a drop box does to each message put into it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    Release,
    ReleaseAllow,
    Block,
}

impl Act {
    fn done(self) -> &'static str {
        match self {
            Act::Release => "released for delivery",
            Act::ReleaseAllow => "released for delivery, sender allowed",
            Act::Block => "deleted, sender blocked",
        }
    }
}

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
        let act = match folder_of(dest) {
            Some(Folder::Release) => Act::Release,
            Some(Folder::ReleaseAllow) => Act::ReleaseAllow,
            Some(Folder::Block) => Act::Block,
            Some(Folder::Inbox) => {
                return Step::Reply(tagged(
                    tag,
                    "NO",
                    "[CANNOT] Nothing can be added to the quarantine",
                ));
            }
            None => return Step::Reply(tagged(tag, "NO", "[TRYCREATE] No such mailbox")),
        };
        if is_move && self.sel.as_ref().is_some_and(|s| s.read_only) {
            return Step::Reply(tagged(tag, "NO", "[READ-ONLY] Mailbox is read-only"));
        }
        let idxs = match self.resolve_checked(tag, set, uid) {
            Ok(i) => i,
            Err(bad) => return bad,
        };
        let mut out = Vec::new();
        let (acted, failed) = self.act(act, &idxs, is_move, &mut out);
        if let Some(e) = failed {
            // Those handled so far are gone (and, for MOVE, reported); the rest stay.
            let what = format!("{verb} after {acted} message(s)");
            out.extend_from_slice(&unavailable(tag, &what, &e));
            return Step::Reply(out);
        }
        self.sync_after(&mut out, true);
        out.extend_from_slice(&tagged(
            tag,
            "OK",
            &format!("{verb} completed; {acted} message(s) {}", act.done()),
        ));
        Step::Reply(out)
    }

    /// Do `act` to the messages at `idxs` (ascending), stopping at the first
    /// store failure. For MOVE each one handled (acted on, or gone already)
    /// is expunged from the session. Returns on how many this session acted
    /// (a release another session won does not count), and the failure.
    fn act(
        &mut self,
        act: Act,
        idxs: &[usize],
        is_move: bool,
        out: &mut Vec<u8>,
    ) -> (usize, Option<QuarantineError>) {
        let (Some(sel), Some(account)) = (&mut self.sel, &self.account) else {
            return (0, None);
        };
        let who = Releaser {
            by: account.login.clone(),
            via: Via::Imap,
        };
        let mut acted = 0;
        let mut done = Vec::new();
        let mut failed = None;
        for &i in idxs {
            let meta = &sel.msgs[i].meta;
            let r = match act {
                Act::Release => self.shared.release(meta.id, &who),
                Act::ReleaseAllow => self.shared.release(meta.id, &who).and_then(|r| {
                    // Listed even when another session won the release: the
                    // user asked for the sender to be allowed.
                    self.shared
                        .store
                        .list_sender(&account.login, &meta.sender, ListKind::Allow)?;
                    Ok(r)
                }),
                Act::Block => self
                    .shared
                    .store
                    .list_sender(&account.login, &meta.sender, ListKind::Block)
                    .and_then(|_| self.shared.delete(meta.id)),
            };
            match r {
                Ok(r) => {
                    if r {
                        acted += 1;
                        if act != Act::Block {
                            self.shared.releases.inc();
                        }
                        tracing::info!(
                            id = meta.id,
                            action = act.done(),
                            "quarantine entry handled over IMAP"
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
                sel.synced = None;
                sel.recent.remove(&gone.uid);
            }
        }
        (acted, failed)
    }
}
