//! The sans-I/O IMAP core: complete command bytes in (framed by the shell, literals included),
//! response bytes and [`Step`]s out. This file keeps the session state, the dispatch by
//! state (any, authenticated, selected) and the mailbox sync every command ends with; the
//! commands themselves live one group per file beside it (`auth`, `select`, `fetch`,
//! `search`, `flags`, `copy`, `expunge`, `idle`).
//!
//! Store calls are synchronous and made here, so the shell runs every call into a logged-in
//! core on the blocking pool. A store failure answers `NO [UNAVAILABLE]`, never success.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

use crate::mailbox::accounts::Account;
use crate::mailbox::imap::resp::{msg_flags, tag_of};
use crate::mailbox::imap::select::flag_responses;
use crate::mailbox::imap::state::{Shared, View, ViewMsg};
use crate::mailbox::store::QuarantineError;

const MAX_BAD_COMMANDS: u32 = 50;

/// What the shell must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send and read the next command.
    Reply(Vec<u8>),
    /// Send, then run the TLS handshake and call [`ImapCore::tls_started`].
    StartTls(Vec<u8>),
    /// Check the credentials, then call [`ImapCore::login_result`].
    Login {
        tag: String,
        login: String,
        password: String,
    },
    /// Send `+ ` and pass the client's next line to [`ImapCore::sasl_response`].
    SaslContinue { tag: String },
    /// Send, then wait for `DONE` ([`ImapCore::idle_done`]) while reporting changes
    /// ([`ImapCore::idle_update`]).
    Idle(Vec<u8>),
    /// Send and close the connection.
    Close(Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Folder {
    Inbox,
    /// Drop boxes, always empty: COPY/MOVE into them acts (see `copy`).
    Release,
    ReleaseAllow,
    Block,
}

impl Folder {
    pub(super) const ALL: [Folder; 4] = [
        Folder::Inbox,
        Folder::Release,
        Folder::ReleaseAllow,
        Folder::Block,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Folder::Inbox => "INBOX",
            Folder::Release => "Release",
            Folder::ReleaseAllow => "Release and allow sender",
            Folder::Block => "Block sender",
        }
    }

    /// The name as an IMAP astring: quoted when it has spaces.
    pub(super) fn wire_name(self) -> String {
        let n = self.name();
        if n.contains(' ') {
            format!("\"{n}\"")
        } else {
            n.to_string()
        }
    }
}

/// The selected folder as this session last reported it to the client:
/// sequence numbers are indices into `msgs`, so it changes only by sync.
pub(super) struct Selected {
    pub(super) folder: Folder,
    pub(super) read_only: bool,
    pub(super) msgs: Vec<ViewMsg>,
    /// UIDs that are `\Recent` in this session (RFC 3501 2.3.2): this
    /// session was the first to be told of them.
    pub(super) recent: HashSet<u32>,
    /// The keywords this session announced in FLAGS; a new one in use gets
    /// an untagged FLAGS before the FETCH that shows it (RFC 3501 7.2.6).
    pub(super) keywords: BTreeSet<String>,
    /// The shared view `msgs` last matched entirely (nothing removed left to
    /// report): a sync against the same view has nothing to say and is skipped.
    /// The view is copied on write, so the same `Arc` means the same content;
    /// whatever changes `msgs` outside `sync` clears this.
    pub(super) synced: Option<Arc<View>>,
}

impl Selected {
    /// A message's flags as this session shows them (`\Recent` included).
    pub(super) fn flags_of(&self, m: &ViewMsg) -> String {
        msg_flags(&m.flags, self.recent.contains(&m.uid))
    }

    /// FLAGS and PERMANENTFLAGS again if the messages now use keywords this
    /// session has not announced.
    pub(super) fn announce_keywords(&mut self, out: &mut Vec<u8>) {
        let before = self.keywords.len();
        for m in &self.msgs {
            for f in &m.flags {
                if !f.starts_with('\\') && !self.keywords.iter().any(|k| k.eq_ignore_ascii_case(f))
                {
                    self.keywords.insert(f.clone());
                }
            }
        }
        if self.keywords.len() != before {
            out.extend_from_slice(&flag_responses(&self.keywords, self.read_only));
        }
    }
}

pub(crate) struct ImapCore {
    pub(super) shared: Arc<Shared>,
    pub(super) hostname: String,
    pub(super) tls: bool,
    pub(super) account: Option<Account>,
    pub(super) sel: Option<Selected>,
    pub(super) idle_tag: Option<String>,
    pub(super) bad: u32,
    pub(super) auth_failures: u32,
}

pub(super) fn tagged(tag: &str, status: &str, text: &str) -> Vec<u8> {
    format!("{tag} {status} {text}\r\n").into_bytes()
}

/// The tagged answer to a store failure (RFC 5530 UNAVAILABLE: try later).
pub(super) fn unavailable(tag: &str, what: &str, e: &QuarantineError) -> Vec<u8> {
    tracing::warn!(error = %e, "IMAP {what}: quarantine store failed");
    tagged(
        tag,
        "NO",
        &format!(
            "[UNAVAILABLE] {what} failed: the quarantine store is unavailable, try again later"
        ),
    )
}

pub(super) fn astring_text(a: &AString<'_>) -> String {
    String::from_utf8_lossy(a.as_ref()).into_owned()
}

pub(super) fn folder_of(m: &Mailbox<'_>) -> Option<Folder> {
    match m {
        Mailbox::Inbox => Some(Folder::Inbox),
        Mailbox::Other(o) => {
            let name: &[u8] = o.as_ref();
            // INBOX is case-insensitive (RFC 3501 5.1); so are the others here.
            Folder::ALL
                .into_iter()
                .find(|f| name.eq_ignore_ascii_case(f.name().as_bytes()))
        }
    }
}

fn seq_value(s: &SeqOrUid, max: u32) -> u32 {
    match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => max,
    }
}

/// Whether `v` is in the set; `*` stands for `max` (RFC 3501 9, seq-number).
pub(super) fn set_contains(set: &SequenceSet, v: u32, max: u32) -> bool {
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(x) => seq_value(x, max) == v,
        Sequence::Range(a, b) => {
            let (a, b) = (seq_value(a, max), seq_value(b, max));
            a.min(b) <= v && v <= a.max(b)
        }
    })
}

impl ImapCore {
    pub(crate) fn new(shared: Arc<Shared>, hostname: &str, tls: bool) -> ImapCore {
        ImapCore {
            shared,
            hostname: hostname.to_string(),
            tls,
            account: None,
            sel: None,
            idle_tag: None,
            bad: 0,
            auth_failures: 0,
        }
    }

    /// Whether the next call may touch the store (the shell then runs it on
    /// the blocking pool): only once logged in.
    pub(crate) fn uses_store(&self) -> bool {
        self.account.is_some()
    }

    pub(crate) fn tls_started(&mut self) {
        self.tls = true;
    }

    /// Count a bad command; past the limit the session is closed, so a
    /// client cannot keep a slot busy with garbage.
    pub(super) fn bad(&mut self, tag: Option<&str>, text: &str) -> Step {
        self.bad += 1;
        let line = tagged(tag.unwrap_or("*"), "BAD", text);
        if self.bad > MAX_BAD_COMMANDS {
            let mut out = line;
            out.extend_from_slice(b"* BYE Too many bad commands\r\n");
            Step::Close(out)
        } else {
            Step::Reply(line)
        }
    }

    /// A command line or literal exceeded the bounds.
    pub(crate) fn too_long(&mut self, tag: Option<&str>) -> Step {
        self.bad(tag, "Command line or literal too long")
    }

    /// Handle one complete command (its line(s) and literals, CRLF-terminated).
    pub(crate) fn handle(&mut self, input: &[u8]) -> Step {
        let tag = tag_of(input).map(str::to_string);
        match CommandCodec::new().decode(input) {
            Ok((_, cmd)) => self.command(cmd),
            Err(_) => {
                let text = match &tag {
                    Some(_) => "Unknown command or syntax error",
                    None => "Missing or invalid tag",
                };
                self.bad(tag.as_deref(), text)
            }
        }
    }

    /// Commands valid in any state; then the rest if logged in.
    fn command(&mut self, cmd: Command<'_>) -> Step {
        let tag = cmd.tag.as_ref().to_string();
        match cmd.body {
            body @ (CommandBody::Capability
            | CommandBody::Noop
            | CommandBody::Check
            | CommandBody::Logout
            | CommandBody::StartTLS
            | CommandBody::Login { .. }
            | CommandBody::Id { .. }
            | CommandBody::Authenticate { .. }) => self.any_state(&tag, body),
            _ if self.account.is_none() => Step::Reply(tagged(&tag, "NO", "Log in first")),
            body => self.authenticated(&tag, body),
        }
    }

    /// The authenticated state: folder-level commands; then the rest if a folder is selected.
    fn authenticated(&mut self, tag: &str, body: CommandBody<'_>) -> Step {
        match body {
            CommandBody::Select { mailbox, .. } => self.select(tag, &mailbox, false),
            CommandBody::Examine { mailbox, .. } => self.select(tag, &mailbox, true),
            CommandBody::Create { .. }
            | CommandBody::Delete { .. }
            | CommandBody::Rename { .. }
            | CommandBody::Append { .. } => Step::Reply(tagged(
                tag,
                "NO",
                "[CANNOT] The quarantine has fixed folders only",
            )),
            CommandBody::Subscribe { mailbox } => self.subscribe(tag, &mailbox, true),
            CommandBody::Unsubscribe { mailbox } => self.subscribe(tag, &mailbox, false),
            CommandBody::Namespace => Step::Reply(
                [
                    &b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n"[..],
                    &tagged(tag, "OK", "NAMESPACE completed"),
                ]
                .concat(),
            ),
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &reference, &mailbox_wildcard, false),
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &reference, &mailbox_wildcard, true),
            CommandBody::Status {
                mailbox,
                item_names,
            } => self.status(tag, &mailbox, &item_names),
            CommandBody::Idle => self.idle(tag),
            _ if self.sel.is_none() => Step::Reply(tagged(tag, "NO", "Select a mailbox first")),
            body => self.selected(tag, body),
        }
    }

    /// The selected state: message-level commands.
    fn selected(&mut self, tag: &str, body: CommandBody<'_>) -> Step {
        match body {
            CommandBody::Close => self.close(tag, true),
            CommandBody::Unselect => self.close(tag, false),
            CommandBody::Expunge => self.expunge_cmd(tag, None),
            CommandBody::ExpungeUid { sequence_set } => self.expunge_cmd(tag, Some(&sequence_set)),
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => self.search_cmd(
                tag,
                charset.as_ref().map(AsRef::<str>::as_ref),
                criteria,
                uid,
            ),
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                ..
            } => self.fetch(tag, &sequence_set, macro_or_item_names, uid),
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                ..
            } => self.store(tag, &sequence_set, kind, response, &flags, uid),
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_move(tag, &sequence_set, &mailbox, uid, false),
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_move(tag, &sequence_set, &mailbox, uid, true),
            _ => self.bad(Some(tag), "Command not supported"),
        }
    }

    /// Bring the selected INBOX up to date, reporting differences as untagged responses.
    /// `expunge`: whether EXPUNGE responses may be sent now (not during FETCH/STORE/SEARCH).
    /// Until its EXPUNGE is sent a message removed elsewhere keeps its sequence number and
    /// stays readable (`Shared::body`).
    pub(super) fn sync(&mut self, out: &mut Vec<u8>, expunge: bool) -> Result<(), QuarantineError> {
        let (Some(account), Some(sel)) = (&self.account, &mut self.sel) else {
            return Ok(());
        };
        if sel.folder != Folder::Inbox {
            return Ok(());
        }
        let view = self.shared.view(account)?;
        if sel.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, &view)) {
            return Ok(());
        }
        let by_id: HashMap<u64, &ViewMsg> = view.msgs.iter().map(|m| (m.meta.id, m)).collect();
        if expunge {
            for i in (0..sel.msgs.len()).rev() {
                if !by_id.contains_key(&sel.msgs[i].meta.id) {
                    out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                    let gone = sel.msgs.remove(i);
                    sel.recent.remove(&gone.uid);
                }
            }
        }
        let mut fetches = Vec::new();
        for (i, m) in sel.msgs.iter_mut().enumerate() {
            if let Some(v) = by_id.get(&m.meta.id)
                && v.flags != m.flags
            {
                m.flags = v.flags.clone();
                fetches.push(i);
            }
        }
        let last = sel.msgs.last().map_or(0, |m| m.uid);
        let before = sel.msgs.len();
        sel.msgs
            .extend(view.msgs.iter().filter(|m| m.uid > last).cloned());
        // Keywords first, so that no FETCH shows one the client was not told of.
        sel.announce_keywords(out);
        for i in fetches {
            let m = &sel.msgs[i];
            out.extend_from_slice(
                format!(
                    "* {} FETCH (UID {} FLAGS {})\r\n",
                    i + 1,
                    m.uid,
                    sel.flags_of(m)
                )
                .as_bytes(),
            );
        }
        if sel.msgs.len() != before {
            // The first SELECT session told of a message gets it as \Recent;
            // EXAMINE shows it so but leaves it to the next SELECT.
            let newest = sel.msgs.last().map_or(0, |m| m.uid);
            let claim = (!sel.read_only).then_some(newest);
            let from = self.shared.recent_from(account, claim)?;
            sel.recent.extend(
                sel.msgs[before..]
                    .iter()
                    .map(|m| m.uid)
                    .filter(|&u| u > from),
            );
            out.extend_from_slice(
                format!(
                    "* {} EXISTS\r\n* {} RECENT\r\n",
                    sel.msgs.len(),
                    sel.recent.len()
                )
                .as_bytes(),
            );
        }
        sel.synced = (sel.msgs.len() == view.msgs.len()).then_some(view);
        Ok(())
    }

    /// The sync that ends a command whose own work is done: a store failure
    /// here only delays the updates to the next command, so it is logged,
    /// not answered.
    pub(super) fn sync_after(&mut self, out: &mut Vec<u8>, expunge: bool) {
        if let Err(e) = self.sync(out, expunge) {
            tracing::warn!(error = %e, "IMAP: mailbox updates postponed, the store failed");
        }
    }

    /// Indices (ascending) of the selected messages a set names; for sequence numbers (not
    /// UIDs) a number beyond EXISTS, or `*` in an empty folder, is the client's error and
    /// gets the BAD to answer (RFC 3501 9: a sequence number is never above EXISTS). UID
    /// sets name what exists of them (RFC 3501 6.4.8).
    pub(super) fn resolve_checked(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        uid: bool,
    ) -> Result<Vec<usize>, Step> {
        let n = self.sel.as_ref().map_or(0, |s| s.msgs.len()) as u32;
        if !uid {
            let invalid = |s: &SeqOrUid| match s {
                SeqOrUid::Value(v) => v.get() > n,
                SeqOrUid::Asterisk => n == 0,
            };
            let bad = set.0.as_ref().iter().any(|s| match s {
                Sequence::Single(x) => invalid(x),
                Sequence::Range(a, b) => invalid(a) || invalid(b),
            });
            if bad {
                let text = format!("Invalid message sequence number (the folder has {n})");
                return Err(self.bad(Some(tag), &text));
            }
        }
        Ok(self.resolve(set, uid))
    }

    /// Indices (ascending) of the selected messages a set names.
    pub(super) fn resolve(&self, set: &SequenceSet, uid: bool) -> Vec<usize> {
        let Some(sel) = &self.sel else {
            return Vec::new();
        };
        let n = sel.msgs.len() as u32;
        let max_uid = sel.msgs.last().map_or(0, |m| m.uid);
        (0..sel.msgs.len())
            .filter(|&i| {
                if uid {
                    set_contains(set, sel.msgs[i].uid, max_uid)
                } else {
                    set_contains(set, i as u32 + 1, n)
                }
            })
            .collect()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::accounts::Role;
    use crate::mailbox::imap::select::wildcard_match;
    use crate::mailbox::store::{ListKind, MemStore};

    const MSG: &[u8] = b"From: Eve <eve@evil.test>\r\nTo: alice@example.test\r\nSubject: Win big\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\nBody line\r\n";

    fn alice() -> Account {
        Account {
            login: "alice".into(),
            addresses: vec!["alice@example.test".into()],
            role: Role::User,
        }
    }

    fn text(s: Step) -> String {
        match s {
            Step::Reply(b) | Step::Close(b) | Step::StartTls(b) | Step::Idle(b) => {
                String::from_utf8_lossy(&b).into_owned()
            }
            other => format!("{other:?}"),
        }
    }

    fn session(mem: &Arc<MemStore>) -> (ImapCore, Arc<Shared>) {
        let shared = Arc::new(Shared::new(mem.clone()));
        let mut c = ImapCore::new(shared.clone(), "h", true);
        assert!(matches!(c.login_result("l", Some(alice())), Step::Reply(_)));
        (c, shared)
    }

    #[test]
    fn login_disabled_before_tls() {
        let mem = Arc::new(MemStore::new());
        let mut c = ImapCore::new(Arc::new(Shared::new(mem)), "h", false);
        assert!(String::from_utf8_lossy(&c.greeting()).contains("LOGINDISABLED"));
        assert!(text(c.handle(b"a LOGIN alice pw\r\n")).starts_with("a NO"));
        assert!(text(c.handle(b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n")).starts_with("a NO"));
        assert!(text(c.handle(b"a SELECT INBOX\r\n")).starts_with("a NO"));
        assert!(matches!(c.handle(b"b STARTTLS\r\n"), Step::StartTls(_)));
        c.tls_started();
        assert!(text(c.handle(b"c CAPABILITY\r\n")).contains("AUTH=PLAIN"));
        assert_eq!(
            c.handle(b"d LOGIN alice {2}\r\npw\r\n"),
            Step::Login {
                tag: "d".into(),
                login: "alice".into(),
                password: "pw".into()
            }
        );
        assert_eq!(
            c.handle(b"e AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n"),
            Step::Login {
                tag: "e".into(),
                login: "alice".into(),
                password: "pw".into()
            }
        );
        let r = text(c.handle(b"garbage\r\n"));
        assert!(r.starts_with("garbage BAD"), "{r}");
        assert!(text(c.handle(b"\r\n")).starts_with("* BAD"));
    }

    #[test]
    fn fetch_store_search_expunge() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        mem.add("eve@evil.test", &["bob@example.test"], "spam", MSG);
        mem.add(
            "x@y.test",
            &["alice@example.test"],
            "virus",
            b"Subject: other\r\n\r\nhi\r\n",
        );
        let (mut c, _) = session(&mem);
        let r = text(c.handle(b"s SELECT INBOX\r\n"));
        assert!(
            r.contains("* 2 EXISTS")
                && r.contains("[UIDVALIDITY ")
                && r.contains("s OK [READ-WRITE]"),
            "{r}"
        );
        let r = text(c.handle(
            b"f FETCH 1:* (UID RFC822.SIZE ENVELOPE BODY.PEEK[HEADER.FIELDS (Subject)])\r\n",
        ));
        assert!(r.contains("* 1 FETCH (UID 1 RFC822.SIZE 121 ENVELOPE (\"Thu, 26 Nov 2026 10:00:00 +0000\" \"Win big\""), "{r}");
        assert!(
            r.contains("BODY[HEADER.FIELDS (Subject)] {20}\r\nSubject: Win big\r\n\r\n)"),
            "{r}"
        );
        assert!(!r.contains("\\Seen"));
        let r = text(c.handle(b"f2 UID FETCH 2 (BODY[]<0.4>)\r\n"));
        assert!(
            r.contains("* 2 FETCH (UID 2 BODY[]<0> {4}\r\nSubj FLAGS (\\Seen \\Recent))"),
            "{r}"
        );
        let r = text(c.handle(b"q SEARCH UNSEEN\r\n"));
        assert!(r.contains("* SEARCH 1\r\n"), "{r}");
        let r = text(c.handle(b"q SEARCH FROM eve SUBJECT \"win\"\r\n"));
        assert!(r.contains("* SEARCH 1\r\n"), "{r}");
        let r = text(c.handle(b"q UID SEARCH OR SEEN LARGER 100000\r\n"));
        assert!(r.contains("* SEARCH 2\r\n"), "{r}");
        let r = text(c.handle(b"st STORE 1 +FLAGS (\\Deleted $Junk)\r\n"));
        assert!(
            r.starts_with("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Junk)\r\n")
                && r.contains("* 1 FETCH (FLAGS (\\Deleted $Junk \\Recent))"),
            "{r}"
        );
        let r = text(c.handle(b"x EXPUNGE\r\n"));
        assert!(r.contains("* 1 EXPUNGE\r\nx OK"), "{r}");
        assert_eq!(mem.deleted(), vec![1]);
        let r = text(c.handle(b"m UID MOVE 2 Release\r\n"));
        assert!(r.contains("* 1 EXPUNGE\r\nm OK"), "{r}");
        assert_eq!(mem.released().len(), 1);
        assert_eq!(mem.released()[0].id, 3);
        let r = text(c.handle(b"m2 MOVE 1 Nowhere\r\n"));
        assert!(r.contains("m2 NO [TRYCREATE]"), "{r}");
    }

    /// Two sessions of alice on one shared state, INBOX selected in both.
    fn two_alice_sessions(mem: &Arc<MemStore>) -> (ImapCore, ImapCore) {
        let shared = Arc::new(Shared::new(mem.clone()));
        let mut a = ImapCore::new(shared.clone(), "h", true);
        let mut b = ImapCore::new(shared, "h", true);
        a.login_result("l", Some(alice()));
        b.login_result("l", Some(alice()));
        text(a.handle(b"s SELECT INBOX\r\n"));
        text(b.handle(b"s SELECT INBOX\r\n"));
        (a, b)
    }

    #[test]
    fn sessions_see_each_other() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let (mut a, mut b) = two_alice_sessions(&mem);
        text(a.handle(b"t STORE 1 +FLAGS.SILENT (\\Flagged)\r\n"));
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let r = text(b.handle(b"n NOOP\r\n"));
        assert!(
            r.contains("* 1 FETCH (UID 1 FLAGS (\\Flagged))")
                && r.contains("* 2 EXISTS\r\n* 1 RECENT"),
            "{r}"
        );
        text(a.handle(b"t STORE 1 +FLAGS.SILENT (\\Deleted)\r\n"));
        text(a.handle(b"c CLOSE\r\n"));
        let r = text(b.handle(b"i IDLE\r\n"));
        assert!(r.contains("* 1 EXPUNGE\r\n+ idling\r\n"), "{r}");
        let r = text(a.handle(b"s SELECT INBOX\r\n"));
        assert!(r.contains("* 0 RECENT"), "{r}");
        text(a.handle(b"t STORE 1 +FLAGS.SILENT (\\Seen)\r\n"));
        let r = String::from_utf8_lossy(&b.idle_update()).into_owned();
        // B was the first session told of message 2 (at its NOOP): it is \Recent there.
        assert_eq!(r, "* 1 FETCH (UID 2 FLAGS (\\Seen \\Recent))\r\n");
        let r = String::from_utf8_lossy(&b.idle_done(b"DONE")).into_owned();
        assert_eq!(r, "i OK IDLE terminated\r\n");
    }

    /// A message removed by another process (not through these sessions) cannot be read
    /// before its EXPUNGE is sent: FETCH and content SEARCH say NO [EXPUNGEISSUED] and
    /// send what they could (RFC 2180 4.1.2); one removed over IMAP stays readable.
    #[test]
    fn removed_elsewhere_before_expunge() {
        let mem = Arc::new(MemStore::new());
        let ids = mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let (mut a, mut b) = two_alice_sessions(&mem);
        assert!(crate::mailbox::store::QuarantineStore::delete(mem.as_ref(), ids[0]).unwrap());
        let r = text(b.handle(b"f FETCH 1:2 (UID BODY.PEEK[HEADER.FIELDS (Subject)])\r\n"));
        assert!(
            !r.contains("* 1 FETCH")
                && r.contains("* 2 FETCH (UID 2 ")
                && r.contains("f NO [EXPUNGEISSUED]"),
            "{r}"
        );
        let r = text(b.handle(b"q SEARCH SUBJECT win\r\n"));
        assert!(r.contains("* SEARCH 2\r\nq NO [EXPUNGEISSUED]"), "{r}");
        // Flag keys need no body: still answered.
        assert!(text(b.handle(b"q SEARCH ALL\r\n")).contains("* SEARCH 1 2\r\nq OK"));
        // Expunged over IMAP by A: B reads it until told.
        text(a.handle(b"n NOOP\r\n"));
        text(a.handle(b"t STORE 1 +FLAGS.SILENT (\\Deleted)\r\n"));
        text(a.handle(b"x EXPUNGE\r\n"));
        let r = text(b.handle(b"f FETCH 2 (BODY.PEEK[HEADER.FIELDS (Subject)])\r\n"));
        assert!(r.contains("Subject: Win big") && r.contains("f OK"), "{r}");
        let r = text(b.handle(b"t STORE 1:2 +FLAGS (\\Flagged)\r\n"));
        assert!(
            !r.contains("FETCH") && r.contains("t NO [EXPUNGEISSUED]"),
            "{r}"
        );
        let r = text(b.handle(b"n NOOP\r\n"));
        assert!(r.contains("* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nn OK"), "{r}");
    }

    /// Random and mutated command bytes never panic and always get an answer.
    #[test]
    fn fuzzed_commands_get_answers() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let (mut c, _) = session(&mem);
        text(c.handle(b"s SELECT INBOX\r\n"));
        let seeds: [&[u8]; 8] = [
            b"a FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (A B)]<0.10> BODYSTRUCTURE)\r\n",
            b"a UID SEARCH OR (FROM x SINCE 1-Jan-2020) NOT UID 1:* LARGER 5\r\n",
            b"a STORE 1:* +FLAGS.SILENT (\\Seen $x)\r\n",
            b"a UID COPY 1:5,7 Release\r\n",
            b"a STATUS INBOX (MESSAGES UIDNEXT)\r\n",
            b"a LIST \"\" \"*%*%*%*%*%*%*%\"\r\n",
            b"a FETCH 4294967295:* BODY[1.2.3.MIME]\r\n",
            b"a SEARCH CHARSET KOI8 ALL\r\n",
        ];
        let mut seed: u64 = 0x2545f4914f6cdd1d;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..3000 {
            let mut cmd = seeds[i % seeds.len()].to_vec();
            for _ in 0..(rnd() % 4) {
                let pos = (rnd() as usize) % cmd.len();
                match rnd() % 3 {
                    0 => cmd[pos] = (rnd() % 256) as u8,
                    1 => {
                        cmd.remove(pos);
                    }
                    _ => cmd.insert(pos, b"(){}*%\\\" 0:"[(rnd() % 11) as usize]),
                }
            }
            let r = c.handle(&cmd);
            assert!(!matches!(r, Step::Reply(ref b) if b.is_empty()));
            if c.sel.is_none() {
                text(c.handle(b"s SELECT INBOX\r\n"));
            }
        }
    }

    #[test]
    fn list_and_status() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let (mut c, _) = session(&mem);
        let r = text(c.handle(b"l LIST \"\" *\r\n"));
        assert!(
            r.contains("\"/\" INBOX\r\n") && r.contains("\"/\" Release\r\n"),
            "{r}"
        );
        let r = text(c.handle(b"l LIST \"\" R%\r\n"));
        assert!(!r.contains("INBOX") && r.contains("Release"), "{r}");
        let r = text(c.handle(b"st STATUS INBOX (MESSAGES UNSEEN UIDNEXT)\r\n"));
        assert!(
            r.contains("* STATUS INBOX (MESSAGES 1 UNSEEN 1 UIDNEXT 2)"),
            "{r}"
        );
        assert!(wildcard_match(b"*", b"a/b"));
        assert!(!wildcard_match(b"%", b"a/b"));
        assert!(wildcard_match(b"inbox", b"INBOX"));
    }

    /// The acting drop boxes: listed, empty when selected; COPY/MOVE into
    /// them release and allow, or block and delete; bounces are never listed.
    #[test]
    fn folders_that_act() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        mem.add("pal@good.test", &["alice@example.test"], "spam", MSG);
        mem.add("", &["alice@example.test"], "bounce", MSG);
        let (mut c, _) = session(&mem);
        let r = text(c.handle(b"l LIST \"\" *\r\n"));
        assert!(
            r.contains("\"/\" \"Release and allow sender\"\r\n")
                && r.contains("\"/\" \"Block sender\"\r\n"),
            "{r}"
        );
        let r = text(c.handle(b"e EXAMINE \"block SENDER\"\r\n"));
        assert!(r.contains("* 0 EXISTS") && r.contains("e OK"), "{r}");
        let r = text(c.handle(b"st STATUS \"Release and allow sender\" (MESSAGES)\r\n"));
        assert!(
            r.contains("* STATUS \"Release and allow sender\" (MESSAGES 0)"),
            "{r}"
        );
        text(c.handle(b"s SELECT INBOX\r\n"));
        let r = text(c.handle(b"m UID MOVE 1 \"Block sender\"\r\n"));
        assert!(r.contains("* 1 EXPUNGE\r\nm OK"), "{r}");
        assert_eq!(mem.deleted(), vec![1]);
        let r = text(c.handle(b"c UID COPY 2 \"Release and allow sender\"\r\n"));
        assert!(r.contains("c OK"), "{r}");
        assert_eq!(mem.released()[0].sender, "pal@good.test");
        assert_eq!(mem.releasers()[0].by, "alice");
        let r = text(c.handle(b"b UID MOVE 3 \"Block sender\"\r\n"));
        assert!(r.contains("b OK"), "{r}");
        assert_eq!(
            mem.listed(),
            vec![
                (
                    "alice".to_string(),
                    "eve@evil.test".to_string(),
                    ListKind::Block
                ),
                (
                    "alice".to_string(),
                    "pal@good.test".to_string(),
                    ListKind::Allow
                ),
            ]
        );
        assert_eq!(mem.deleted(), vec![1, 3]);
    }

    /// A failing store answers NO [UNAVAILABLE] and changes nothing.
    #[test]
    fn store_failures_are_unavailable() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let (mut c, _) = session(&mem);
        mem.set_failing(true);
        let r = text(c.handle(b"s SELECT INBOX\r\n"));
        assert!(r.starts_with("s NO [UNAVAILABLE]"), "{r}");
        mem.set_failing(false);
        assert!(text(c.handle(b"s SELECT INBOX\r\n")).contains("s OK"));
        mem.set_failing(true);
        for (cmd, tag) in [
            (&b"f FETCH 1 BODY[]\r\n"[..], "f"),
            (b"q SEARCH BODY x\r\n", "q"),
            (b"t STORE 1 +FLAGS (\\Deleted)\r\n", "t"),
            (b"m MOVE 1 Release\r\n", "m"),
            (b"c COPY 1 Release\r\n", "c"),
        ] {
            let r = text(c.handle(cmd));
            assert!(r.starts_with(&format!("{tag} NO [UNAVAILABLE]")), "{r}");
        }
        // Nothing cached can answer once the quarantine changed.
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let r = text(c.handle(b"n NOOP\r\n"));
        assert!(r.starts_with("n NO [UNAVAILABLE]"), "{r}");
        assert!(mem.released().is_empty() && mem.deleted().is_empty());
        mem.set_failing(false);
        let r = text(c.handle(b"n NOOP\r\n"));
        assert!(r.contains("* 2 EXISTS") && r.contains("n OK"), "{r}");
        let r = text(c.handle(b"m MOVE 1 Release\r\n"));
        assert!(r.contains("* 1 EXPUNGE\r\nm OK"), "{r}");
        assert_eq!(mem.released().len(), 1);
    }

    /// Envelopes, structures, sizes, header fields and header/text SEARCH parse each held
    /// message once for every session of the process; a summary of a message that
    /// has left the quarantine answers nothing.
    #[test]
    fn message_summaries_are_computed_once_for_all_sessions() {
        let mem = Arc::new(MemStore::new());
        let ids = mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let (mut a, mut b) = two_alice_sessions(&mem);
        let shared = a.shared.clone();
        assert_eq!(shared.summaries_built(), 0);
        let r = text(a.handle(b"f FETCH 1:* (ENVELOPE)\r\n"));
        assert!(
            r.matches("\"Win big\"").count() == 2 && r.contains("f OK"),
            "{r}"
        );
        assert_eq!(shared.summaries_built(), 2);
        let r = text(a.handle(b"f FETCH 1:* (ENVELOPE)\r\n"));
        assert!(r.matches("\"Win big\"").count() == 2, "{r}");
        let r = text(b.handle(
            b"f FETCH 2 (BODYSTRUCTURE BODY RFC822.SIZE BODY.PEEK[HEADER.FIELDS (Subject)])\r\n",
        ));
        assert!(
            r.contains(&format!("RFC822.SIZE {}", MSG.len()))
                && r.contains("BODYSTRUCTURE (\"TEXT\" \"PLAIN\"")
                && r.contains("Subject: Win big\r\n\r\n"),
            "{r}"
        );
        let r = text(b.handle(b"q SEARCH SUBJECT WIN FROM eve TEXT \"body LINE\"\r\n"));
        assert!(r.contains("* SEARCH 1 2\r\n"), "{r}");
        let r = text(b.handle(b"q SEARCH SENTON 26-Nov-2026 HEADER Date 2026\r\n"));
        assert!(r.contains("* SEARCH 1 2\r\n"), "{r}");
        let r = text(a.handle(b"f FETCH 1 BODY[]\r\n"));
        assert!(r.contains("Body line") && r.contains("f OK"), "{r}");
        assert_eq!(shared.summaries_built(), 2);
        // Removed by another process before this session was told: what was kept
        // of it does not answer for it (as a read of the store would not).
        assert!(crate::mailbox::store::QuarantineStore::delete(mem.as_ref(), ids[0]).unwrap());
        let r = text(b.handle(b"f FETCH 1:2 (ENVELOPE)\r\n"));
        assert!(
            !r.contains("* 1 FETCH")
                && r.contains("* 2 FETCH")
                && r.contains("f NO [EXPUNGEISSUED]"),
            "{r}"
        );
    }

    /// NOOP and IDLE ticks with nothing changed do not list the store again.
    #[test]
    fn unchanged_mailbox_is_answered_from_the_cache() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let (mut c, _) = session(&mem);
        text(c.handle(b"s SELECT INBOX\r\n"));
        let lists = mem.list_calls();
        for _ in 0..5 {
            assert_eq!(text(c.handle(b"n NOOP\r\n")), "n OK NOOP completed\r\n");
            assert!(c.idle_update().is_empty());
        }
        text(c.handle(b"t STORE 1 +FLAGS.SILENT (\\Flagged)\r\n"));
        assert_eq!(mem.list_calls(), lists);
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let r = text(c.handle(b"n NOOP\r\n"));
        assert!(r.contains("* 2 EXISTS"), "{r}");
        assert_eq!(mem.list_calls(), lists + 1);
    }
}
