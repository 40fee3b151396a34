//! Folder commands: SELECT/EXAMINE, LIST/LSUB, STATUS, CLOSE/UNSELECT. The folders are fixed:
//! `INBOX` (the held entries the user may see) and the drop boxes `Release`, `Release and
//! allow sender` and `Block sender` (always empty: COPY/MOVE into them acts).

use std::collections::{BTreeSet, HashSet};

use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::status::StatusDataItemName;

use super::core::{Folder, ImapCore, Selected, Step, folder_of, tagged, unavailable};
use crate::mailbox::imap::state::ViewMsg;

const SYSTEM_FLAGS: &str = "\\Answered \\Flagged \\Deleted \\Seen \\Draft";

/// `* FLAGS` with the keywords in use, and PERMANENTFLAGS (RFC 3501 7.2.6): the same list,
/// plus `\*` (any new keyword is kept) unless the folder is read-only.
pub(super) fn flag_responses(keywords: &BTreeSet<String>, read_only: bool) -> Vec<u8> {
    let mut flags = SYSTEM_FLAGS.to_string();
    for k in keywords {
        flags.push(' ');
        flags.push_str(k);
    }
    let perm = if read_only {
        String::new()
    } else {
        format!("{flags} \\*")
    };
    format!("* FLAGS ({flags})\r\n* OK [PERMANENTFLAGS ({perm})] Flags permitted\r\n").into_bytes()
}

/// The keywords (flags without a backslash) the messages use, each once
/// whatever its case (flag names are case-insensitive).
fn keywords_of(msgs: &[ViewMsg]) -> BTreeSet<String> {
    let mut seen = std::collections::HashSet::new();
    msgs.iter()
        .flat_map(|m| m.flags.iter())
        .filter(|f| !f.starts_with('\\') && seen.insert(f.to_ascii_lowercase()))
        .cloned()
        .collect()
}

/// A folder as a user sees it now.
struct FolderView {
    folder: Folder,
    msgs: Vec<ViewMsg>,
    uidvalidity: u32,
    uidnext: u32,
}

/// `*` and `%` wildcard match (RFC 3501 LIST), iterative, no backtracking blow-up.
pub(super) fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    // dp[j]: pattern[..i] matches name[..j]
    let mut dp = vec![false; name.len() + 1];
    dp[0] = true;
    for &p in pattern {
        let mut next = vec![false; name.len() + 1];
        match p {
            b'*' | b'%' => {
                let mut any = false;
                for j in 0..=name.len() {
                    if p == b'%' && j > 0 && name[j - 1] == b'/' {
                        any = false;
                    }
                    any = any || dp[j];
                    next[j] = any;
                }
            }
            _ => {
                for j in 0..name.len() {
                    next[j + 1] = dp[j] && name[j].eq_ignore_ascii_case(&p);
                }
            }
        }
        dp = next;
    }
    dp[name.len()]
}

/// The untagged responses that open a folder (RFC 3501 6.3.1).
fn select_responses(
    v: &FolderView,
    keywords: &BTreeSet<String>,
    recent: usize,
    read_only: bool,
) -> Vec<u8> {
    let mut out = flag_responses(keywords, read_only);
    out.extend_from_slice(format!("* {} EXISTS\r\n* {recent} RECENT\r\n", v.msgs.len()).as_bytes());
    if let Some(i) = v
        .msgs
        .iter()
        .position(|m| !m.flags.iter().any(|f| f == "\\Seen"))
    {
        out.extend_from_slice(format!("* OK [UNSEEN {}] First unseen\r\n", i + 1).as_bytes());
    }
    out.extend_from_slice(
        format!(
            "* OK [UIDVALIDITY {}] UIDs valid\r\n* OK [UIDNEXT {}] Predicted next UID\r\n",
            v.uidvalidity, v.uidnext
        )
        .as_bytes(),
    );
    out
}

impl ImapCore {
    /// The messages, UIDVALIDITY and UIDNEXT of a folder as this user sees
    /// it (the drop boxes are always empty); or the NO to answer.
    fn folder_view(
        &self,
        tag: &str,
        verb: &str,
        mailbox: &Mailbox<'_>,
    ) -> Result<FolderView, Step> {
        let Some(folder) = folder_of(mailbox) else {
            return Err(Step::Reply(tagged(
                tag,
                "NO",
                "[NONEXISTENT] No such mailbox",
            )));
        };
        let Some(account) = &self.account else {
            return Err(Step::Reply(tagged(tag, "NO", "Log in first")));
        };
        Ok(match folder {
            Folder::Inbox => {
                let v = self
                    .shared
                    .view(account)
                    .map_err(|e| Step::Reply(unavailable(tag, verb, &e)))?;
                FolderView {
                    folder,
                    msgs: v.msgs.clone(),
                    uidvalidity: v.uidvalidity,
                    uidnext: v.uidnext,
                }
            }
            Folder::Release | Folder::ReleaseAllow | Folder::Block => FolderView {
                folder,
                msgs: Vec::new(),
                uidvalidity: 1,
                uidnext: 1,
            },
        })
    }

    /// SELECT (`read_only` false) or EXAMINE. A failed SELECT leaves no folder selected.
    pub(super) fn select(&mut self, tag: &str, mailbox: &Mailbox<'_>, read_only: bool) -> Step {
        self.sel = None;
        let (code, verb) = if read_only {
            ("[READ-ONLY]", "EXAMINE")
        } else {
            ("[READ-WRITE]", "SELECT")
        };
        let v = match self.folder_view(tag, verb, mailbox) {
            Ok(v) => v,
            Err(step) => return step,
        };
        // SELECT claims what no session was told of yet as \Recent; EXAMINE
        // shows the same messages as recent and leaves them to the next SELECT.
        let newest = v.msgs.last().map(|m| m.uid);
        let recent: HashSet<u32> = match (&self.account, v.folder, newest) {
            (Some(account), Folder::Inbox, Some(newest)) => {
                let claim = (!read_only).then_some(newest);
                let from = match self.shared.recent_from(account, claim) {
                    Ok(f) => f,
                    Err(e) => return Step::Reply(unavailable(tag, verb, &e)),
                };
                v.msgs.iter().map(|m| m.uid).filter(|&u| u > from).collect()
            }
            _ => HashSet::new(),
        };
        let keywords = keywords_of(&v.msgs);
        let mut out = select_responses(&v, &keywords, recent.len(), read_only);
        out.extend_from_slice(&tagged(tag, "OK", &format!("{code} {verb} completed")));
        self.sel = Some(Selected {
            folder: v.folder,
            read_only,
            msgs: v.msgs,
            recent,
            keywords,
            synced: None,
        });
        Step::Reply(out)
    }

    pub(super) fn list(
        &mut self,
        tag: &str,
        reference: &Mailbox<'_>,
        pattern: &ListMailbox<'_>,
        lsub: bool,
    ) -> Step {
        let verb = if lsub { "LSUB" } else { "LIST" };
        let reference: Vec<u8> = match reference {
            Mailbox::Inbox => b"INBOX".to_vec(),
            Mailbox::Other(o) => AsRef::<[u8]>::as_ref(o).to_vec(),
        };
        let pat: &[u8] = match pattern {
            ListMailbox::Token(t) => t.as_ref(),
            ListMailbox::String(s) => s.as_ref(),
        };
        let unsubscribed = match (&self.account, lsub) {
            (Some(account), true) => match self.shared.unsubscribed(account) {
                Ok(u) => u,
                Err(e) => return Step::Reply(unavailable(tag, verb, &e)),
            },
            _ => BTreeSet::new(),
        };
        let mut out = Vec::new();
        if pat.is_empty() {
            // RFC 3501 6.3.8: an empty pattern asks for the hierarchy delimiter.
            if !lsub {
                out.extend_from_slice(b"* LIST (\\Noselect) \"/\" \"\"\r\n");
            }
        } else if pat.len() <= 256 && reference.len() <= 256 {
            let mut full = reference.clone();
            full.extend_from_slice(pat);
            for f in Folder::ALL {
                let name = f.name();
                if wildcard_match(&full, name.as_bytes()) && !unsubscribed.contains(name) {
                    out.extend_from_slice(
                        format!("* {verb} (\\HasNoChildren) \"/\" {}\r\n", f.wire_name())
                            .as_bytes(),
                    );
                }
            }
        }
        out.extend_from_slice(&tagged(tag, "OK", &format!("{verb} completed")));
        Step::Reply(out)
    }

    /// SUBSCRIBE (`on`) and UNSUBSCRIBE: per user, kept in the store with the
    /// flags. Only the existing folders can be subscribed (RFC 3501 6.3.6
    /// lets a server refuse others); UNSUBSCRIBE of a name that is no folder
    /// answers OK, as there is nothing subscribed under it.
    pub(super) fn subscribe(&mut self, tag: &str, mailbox: &Mailbox<'_>, on: bool) -> Step {
        let verb = if on { "SUBSCRIBE" } else { "UNSUBSCRIBE" };
        let Some(folder) = folder_of(mailbox) else {
            return Step::Reply(if on {
                tagged(tag, "NO", "[NONEXISTENT] No such mailbox")
            } else {
                tagged(tag, "OK", "UNSUBSCRIBE completed")
            });
        };
        let Some(account) = &self.account else {
            return Step::Reply(tagged(tag, "NO", "Log in first"));
        };
        match self.shared.subscribe(account, folder.name(), on) {
            Ok(()) => Step::Reply(tagged(tag, "OK", &format!("{verb} completed"))),
            Err(e) => Step::Reply(unavailable(tag, verb, &e)),
        }
    }

    pub(super) fn status(
        &mut self,
        tag: &str,
        mailbox: &Mailbox<'_>,
        items: &[StatusDataItemName],
    ) -> Step {
        let v = match self.folder_view(tag, "STATUS", mailbox) {
            Ok(v) => v,
            Err(step) => return step,
        };
        // What a SELECT now would get as \Recent.
        let recent = match (&self.account, v.folder) {
            (Some(account), Folder::Inbox) => match self.shared.recent_from(account, None) {
                Ok(from) => v.msgs.iter().filter(|m| m.uid > from).count(),
                Err(e) => return Step::Reply(unavailable(tag, "STATUS", &e)),
            },
            _ => 0,
        };
        let count = |f: &str| {
            v.msgs
                .iter()
                .filter(|m| m.flags.iter().any(|x| x == f))
                .count()
        };
        let mut parts = Vec::new();
        for item in items {
            let s = match item {
                StatusDataItemName::Messages => format!("MESSAGES {}", v.msgs.len()),
                StatusDataItemName::Recent => format!("RECENT {recent}"),
                StatusDataItemName::UidNext => format!("UIDNEXT {}", v.uidnext),
                StatusDataItemName::UidValidity => format!("UIDVALIDITY {}", v.uidvalidity),
                StatusDataItemName::Unseen => format!("UNSEEN {}", v.msgs.len() - count("\\Seen")),
                StatusDataItemName::Deleted => format!("DELETED {}", count("\\Deleted")),
                #[allow(unreachable_patterns)]
                _ => continue,
            };
            parts.push(s);
        }
        let mut out = format!(
            "* STATUS {} ({})\r\n",
            v.folder.wire_name(),
            parts.join(" ")
        )
        .into_bytes();
        out.extend_from_slice(&tagged(tag, "OK", "STATUS completed"));
        Step::Reply(out)
    }

    /// CLOSE (`expunge`: silently delete the \Deleted messages first) or UNSELECT.
    /// The folder is closed either way (a partial expunge without EXPUNGE
    /// responses would leave this session's sequence numbers wrong); if the
    /// store failed, NO says that some \Deleted messages are still held.
    pub(super) fn close(&mut self, tag: &str, expunge: bool) -> Step {
        let mut res = Ok(());
        if expunge {
            let mut ignored = Vec::new();
            res = self.expunge(None, &mut ignored);
        }
        self.sel = None;
        if let Err(e) = res {
            return Step::Reply(unavailable(tag, "CLOSE", &e));
        }
        let verb = if expunge { "CLOSE" } else { "UNSELECT" };
        Step::Reply(tagged(tag, "OK", &format!("{verb} completed")))
    }
}
