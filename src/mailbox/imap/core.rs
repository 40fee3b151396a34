//! The sans-I/O IMAP core: complete command bytes in (framed by the shell, literals included),
//! response bytes and [`Step`]s out. Store calls are synchronous and made here.

use std::collections::HashMap;
use std::sync::Arc;

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItemName, Section,
};
use imap_codec::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_codec::imap_types::status::StatusDataItemName;

use crate::mailbox::accounts::Account;
use crate::mailbox::imap::message::{self, Parsed};
use crate::mailbox::imap::resp::{self, flag_list, internal_date, is_atom_char, tag_of};
use crate::mailbox::imap::state::{FlagOp, MAX_FLAG_LEN, Shared, ViewMsg, normalize};

const MAX_BAD_COMMANDS: u32 = 50;
const MAX_AUTH_FAILURES: u32 = 3;
const SYSTEM_FLAGS: &str = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)";

/// What the shell must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
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
enum Folder {
    Inbox,
    Release,
}

impl Folder {
    fn name(self) -> &'static str {
        match self {
            Folder::Inbox => "INBOX",
            Folder::Release => "Release",
        }
    }
}

struct Selected {
    folder: Folder,
    read_only: bool,
    msgs: Vec<ViewMsg>,
}

pub struct ImapCore {
    shared: Arc<Shared>,
    hostname: String,
    tls: bool,
    account: Option<Account>,
    sel: Option<Selected>,
    idle_tag: Option<String>,
    bad: u32,
    auth_failures: u32,
}

fn tagged(tag: &str, status: &str, text: &str) -> Vec<u8> {
    format!("{tag} {status} {text}\r\n").into_bytes()
}

fn astring_text(a: &AString<'_>) -> String {
    String::from_utf8_lossy(a.as_ref()).into_owned()
}

fn folder_of(m: &Mailbox<'_>) -> Option<Folder> {
    match m {
        Mailbox::Inbox => Some(Folder::Inbox),
        Mailbox::Other(o) => {
            let name: &[u8] = o.as_ref();
            if name.eq_ignore_ascii_case(b"INBOX") {
                Some(Folder::Inbox)
            } else if name.eq_ignore_ascii_case(b"Release") {
                Some(Folder::Release)
            } else {
                None
            }
        }
    }
}

fn seq_value(s: &SeqOrUid, max: u32) -> u32 {
    match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => max,
    }
}

fn set_contains(set: &SequenceSet, v: u32, max: u32) -> bool {
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(x) => seq_value(x, max) == v,
        Sequence::Range(a, b) => {
            let (a, b) = (seq_value(a, max), seq_value(b, max));
            a.min(b) <= v && v <= a.max(b)
        }
    })
}

/// `*` and `%` wildcard match (RFC 3501 LIST), iterative, no backtracking blow-up.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
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

fn flag_string(f: &Flag<'_>) -> Option<String> {
    match f {
        Flag::Extension(_) => None,
        _ => {
            let s = f.to_string();
            (s.len() <= MAX_FLAG_LEN).then_some(s)
        }
    }
}

fn section_label(section: Option<&Section<'_>>) -> String {
    let part = |p: &imap_codec::imap_types::fetch::Part| -> String {
        p.0.as_ref()
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(".")
    };
    let with = |p: Option<&imap_codec::imap_types::fetch::Part>, s: &str| match p {
        Some(p) => format!("{}.{s}", part(p)),
        None => s.to_string(),
    };
    let names = |v: &imap_codec::imap_types::core::Vec1<AString<'_>>| -> String {
        v.as_ref()
            .iter()
            .map(|a| {
                let b: &[u8] = a.as_ref();
                if !b.is_empty() && b.iter().all(|&c| is_atom_char(c)) {
                    String::from_utf8_lossy(b).into_owned()
                } else {
                    let mut o = Vec::new();
                    resp::string(&mut o, b);
                    String::from_utf8_lossy(&o).into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    match section {
        None => String::new(),
        Some(Section::Part(p)) => part(p),
        Some(Section::Header(p)) => with(p.as_ref(), "HEADER"),
        Some(Section::HeaderFields(p, n)) => {
            with(p.as_ref(), &format!("HEADER.FIELDS ({})", names(n)))
        }
        Some(Section::HeaderFieldsNot(p, n)) => {
            with(p.as_ref(), &format!("HEADER.FIELDS.NOT ({})", names(n)))
        }
        Some(Section::Text(p)) => with(p.as_ref(), "TEXT"),
        Some(Section::Mime(p)) => format!("{}.MIME", part(p)),
    }
}

fn needs_body(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(needs_body),
        SearchKey::Not(k) => needs_body(k),
        SearchKey::Or(a, b) => needs_body(a) || needs_body(b),
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::Header(..)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_) => true,
        _ => false,
    }
}

fn contains_ci(hay: &str, needle: &AString<'_>) -> bool {
    let needle = astring_text(needle).to_lowercase();
    hay.to_lowercase().contains(&needle)
}

struct SearchCtx<'a> {
    seq: u32,
    max_seq: u32,
    max_uid: u32,
    msg: &'a ViewMsg,
    parsed: Option<&'a Parsed<'a>>,
}

fn eval(key: &SearchKey<'_>, c: &SearchCtx<'_>) -> bool {
    let has = |f: &str| c.msg.flags.iter().any(|x| x.eq_ignore_ascii_case(f));
    let hdr = |name: &str| c.parsed.map(|p| p.header_text(name)).unwrap_or_default();
    let internal = chrono::DateTime::from_timestamp(c.msg.meta.received_unix, 0)
        .unwrap_or_default()
        .date_naive();
    let sent = c
        .parsed
        .and_then(|p| p.sent_unix())
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|d| d.date_naive());
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().all(|k| eval(k, c)),
        SearchKey::SequenceSet(set) => set_contains(set, c.seq, c.max_seq),
        SearchKey::Uid(set) => set_contains(set, c.msg.uid, c.max_uid),
        SearchKey::All => true,
        SearchKey::Answered => has("\\Answered"),
        SearchKey::Unanswered => !has("\\Answered"),
        SearchKey::Deleted => has("\\Deleted"),
        SearchKey::Undeleted => !has("\\Deleted"),
        SearchKey::Draft => has("\\Draft"),
        SearchKey::Undraft => !has("\\Draft"),
        SearchKey::Flagged => has("\\Flagged"),
        SearchKey::Unflagged => !has("\\Flagged"),
        SearchKey::Seen => has("\\Seen"),
        SearchKey::Unseen => !has("\\Seen"),
        SearchKey::Keyword(k) => has(k.as_ref()),
        SearchKey::Unkeyword(k) => !has(k.as_ref()),
        // This server keeps no \Recent: nothing is recent, so nothing is new.
        SearchKey::New | SearchKey::Recent => false,
        SearchKey::Old => true,
        SearchKey::Before(d) => internal < *d.as_ref(),
        SearchKey::On(d) => internal == *d.as_ref(),
        SearchKey::Since(d) => internal >= *d.as_ref(),
        SearchKey::SentBefore(d) => sent.is_some_and(|s| s < *d.as_ref()),
        SearchKey::SentOn(d) => sent.is_some_and(|s| s == *d.as_ref()),
        SearchKey::SentSince(d) => sent.is_some_and(|s| s >= *d.as_ref()),
        SearchKey::Larger(n) => c.msg.meta.size > u64::from(*n),
        SearchKey::Smaller(n) => c.msg.meta.size < u64::from(*n),
        SearchKey::Not(k) => !eval(k, c),
        SearchKey::Or(a, b) => eval(a, c) || eval(b, c),
        SearchKey::From(s) => contains_ci(&hdr("From"), s),
        SearchKey::To(s) => contains_ci(&hdr("To"), s),
        SearchKey::Cc(s) => contains_ci(&hdr("Cc"), s),
        SearchKey::Bcc(s) => contains_ci(&hdr("Bcc"), s),
        SearchKey::Subject(s) => contains_ci(&hdr("Subject"), s),
        SearchKey::Header(name, value) => {
            let h = hdr(&astring_text(name));
            let raw = c.parsed.map(|p| p.header()).unwrap_or_default();
            let present = !message::header_fields(raw, &[name.as_ref()], false)
                .trim_ascii()
                .is_empty();
            present && contains_ci(&h, value)
        }
        SearchKey::Body(s) => c.parsed.is_some_and(|p| contains_ci(&p.body_text(), s)),
        SearchKey::Text(s) => c.parsed.is_some_and(|p| {
            contains_ci(&String::from_utf8_lossy(p.header()), s) || contains_ci(&p.body_text(), s)
        }),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

impl ImapCore {
    pub fn new(shared: Arc<Shared>, hostname: &str, tls: bool) -> ImapCore {
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

    pub fn account(&self) -> Option<&Account> {
        self.account.as_ref()
    }

    fn capabilities(&self) -> String {
        let mut c = String::from("IMAP4rev1 SASL-IR IDLE UIDPLUS MOVE UNSELECT");
        if self.account.is_none() {
            if self.tls {
                c.push_str(" AUTH=PLAIN");
            } else {
                c.push_str(" STARTTLS LOGINDISABLED");
            }
        }
        c
    }

    pub fn greeting(&self) -> Vec<u8> {
        format!(
            "* OK [CAPABILITY {}] {} IMAP quarantine ready\r\n",
            self.capabilities(),
            self.hostname
        )
        .into_bytes()
    }

    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    fn bad(&mut self, tag: Option<&str>, text: &str) -> Step {
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
    pub fn too_long(&mut self, tag: Option<&str>) -> Step {
        self.bad(tag, "Command line or literal too long")
    }

    /// Handle one complete command (its line(s) and literals, CRLF-terminated).
    pub fn handle(&mut self, input: &[u8]) -> Step {
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

    pub fn login_result(&mut self, tag: &str, account: Option<Account>) -> Step {
        match account {
            Some(a) => {
                self.account = Some(a);
                Step::Reply(tagged(
                    tag,
                    "OK",
                    &format!("[CAPABILITY {}] Logged in", self.capabilities()),
                ))
            }
            None => {
                self.auth_failures += 1;
                let mut out = tagged(tag, "NO", "[AUTHENTICATIONFAILED] Invalid credentials");
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    out.extend_from_slice(b"* BYE Too many failed logins\r\n");
                    Step::Close(out)
                } else {
                    Step::Reply(out)
                }
            }
        }
    }

    /// The client's reply to `+ ` during AUTHENTICATE PLAIN.
    pub fn sasl_response(&mut self, tag: &str, line: &[u8]) -> Step {
        if line == b"*" {
            return Step::Reply(tagged(tag, "BAD", "Authentication cancelled"));
        }
        match crate::mailbox::pop3::decode_plain(line) {
            Some((login, password)) => Step::Login {
                tag: tag.to_string(),
                login,
                password,
            },
            None => self.bad(Some(tag), "Malformed SASL PLAIN response"),
        }
    }

    /// Untagged updates while idling (call when the store or some user's flags changed).
    pub fn idle_update(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.sync(&mut out, true);
        out
    }

    /// The line that ended IDLE.
    pub fn idle_done(&mut self, line: &[u8]) -> Vec<u8> {
        let tag = self.idle_tag.take().unwrap_or_else(|| "*".to_string());
        if line.trim_ascii().eq_ignore_ascii_case(b"DONE") {
            let mut out = self.idle_update();
            out.extend_from_slice(&tagged(&tag, "OK", "IDLE terminated"));
            out
        } else {
            tagged(&tag, "BAD", "Expected DONE")
        }
    }

    /// Bring the selected INBOX up to date, reporting differences as untagged responses.
    /// `expunge`: whether EXPUNGE responses may be sent now (not during FETCH/STORE/SEARCH).
    fn sync(&mut self, out: &mut Vec<u8>, expunge: bool) {
        let (Some(account), Some(sel)) = (&self.account, &mut self.sel) else {
            return;
        };
        if sel.folder != Folder::Inbox {
            return;
        }
        let view = self.shared.view(account);
        let by_id: HashMap<u64, &ViewMsg> = view.msgs.iter().map(|m| (m.meta.id, m)).collect();
        if expunge {
            for i in (0..sel.msgs.len()).rev() {
                if !by_id.contains_key(&sel.msgs[i].meta.id) {
                    out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                    sel.msgs.remove(i);
                }
            }
        }
        for (i, m) in sel.msgs.iter_mut().enumerate() {
            if let Some(v) = by_id.get(&m.meta.id)
                && v.flags != m.flags
            {
                m.flags = v.flags.clone();
                out.extend_from_slice(
                    format!(
                        "* {} FETCH (UID {} FLAGS {})\r\n",
                        i + 1,
                        m.uid,
                        flag_list(&m.flags)
                    )
                    .as_bytes(),
                );
            }
        }
        let last = sel.msgs.last().map_or(0, |m| m.uid);
        let before = sel.msgs.len();
        sel.msgs
            .extend(view.msgs.iter().filter(|m| m.uid > last).cloned());
        if sel.msgs.len() != before {
            out.extend_from_slice(format!("* {} EXISTS\r\n", sel.msgs.len()).as_bytes());
        }
    }

    /// Indices (ascending) of the selected messages a set names.
    fn resolve(&self, set: &SequenceSet, uid: bool) -> Vec<usize> {
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

    fn command(&mut self, cmd: Command<'_>) -> Step {
        let tag = cmd.tag.as_ref().to_string();
        let tag = tag.as_str();
        let authed = self.account.is_some();
        let is_lsub = matches!(cmd.body, CommandBody::Lsub { .. });
        let is_close = matches!(cmd.body, CommandBody::Close);
        let is_check = matches!(cmd.body, CommandBody::Check);
        match cmd.body {
            CommandBody::Capability => {
                let mut out = format!("* CAPABILITY {}\r\n", self.capabilities()).into_bytes();
                out.extend_from_slice(&tagged(tag, "OK", "CAPABILITY completed"));
                Step::Reply(out)
            }
            CommandBody::Noop | CommandBody::Check => {
                let mut out = Vec::new();
                self.sync(&mut out, true);
                let verb = if is_check { "CHECK" } else { "NOOP" };
                out.extend_from_slice(&tagged(tag, "OK", &format!("{verb} completed")));
                Step::Reply(out)
            }
            CommandBody::Logout => {
                let mut out = format!("* BYE {} logging out\r\n", self.hostname).into_bytes();
                out.extend_from_slice(&tagged(tag, "OK", "LOGOUT completed"));
                Step::Close(out)
            }
            CommandBody::StartTLS => {
                if self.tls {
                    self.bad(Some(tag), "TLS already active")
                } else if authed {
                    self.bad(Some(tag), "STARTTLS only before login")
                } else {
                    Step::StartTls(tagged(tag, "OK", "Begin TLS negotiation now"))
                }
            }
            CommandBody::Login { username, password } => {
                if authed {
                    return self.bad(Some(tag), "Already logged in");
                }
                if !self.tls {
                    return Step::Reply(tagged(
                        tag,
                        "NO",
                        "[PRIVACYREQUIRED] LOGIN is disabled until STARTTLS",
                    ));
                }
                let (Ok(login), Ok(password)) = (
                    String::from_utf8(username.as_ref().to_vec()),
                    String::from_utf8(password.declassify().as_ref().to_vec()),
                ) else {
                    return self.login_result(tag, None);
                };
                Step::Login {
                    tag: tag.to_string(),
                    login,
                    password,
                }
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if authed {
                    return self.bad(Some(tag), "Already logged in");
                }
                if !self.tls {
                    return Step::Reply(tagged(
                        tag,
                        "NO",
                        "[PRIVACYREQUIRED] Authentication is disabled until STARTTLS",
                    ));
                }
                if mechanism != AuthMechanism::Plain {
                    return Step::Reply(tagged(tag, "NO", "Unsupported mechanism; PLAIN only"));
                }
                match initial_response {
                    Some(ir) => {
                        // imap-codec has decoded the base64 already.
                        let b64 = base64::Engine::encode(
                            &base64::engine::general_purpose::STANDARD,
                            ir.declassify().as_ref(),
                        );
                        self.sasl_response(tag, b64.as_bytes())
                    }
                    None => Step::SaslContinue {
                        tag: tag.to_string(),
                    },
                }
            }
            _ if !authed => Step::Reply(tagged(tag, "NO", "Log in first")),
            CommandBody::Select { mailbox, .. } => self.select(tag, &mailbox, false),
            CommandBody::Examine { mailbox, .. } => self.select(tag, &mailbox, true),
            CommandBody::Create { .. }
            | CommandBody::Delete { .. }
            | CommandBody::Rename { .. }
            | CommandBody::Append { .. } => Step::Reply(tagged(
                tag,
                "NO",
                "[CANNOT] The quarantine has the fixed folders INBOX and Release",
            )),
            CommandBody::Subscribe { .. } | CommandBody::Unsubscribe { .. } => {
                Step::Reply(tagged(tag, "OK", "Done"))
            }
            CommandBody::List {
                reference,
                mailbox_wildcard,
            }
            | CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &reference, &mailbox_wildcard, is_lsub),
            CommandBody::Status {
                mailbox,
                item_names,
            } => self.status(tag, &mailbox, &item_names),
            CommandBody::Idle => {
                let mut out = Vec::new();
                self.sync(&mut out, true);
                out.extend_from_slice(b"+ idling\r\n");
                self.idle_tag = Some(tag.to_string());
                Step::Idle(out)
            }
            _ if self.sel.is_none() => Step::Reply(tagged(tag, "NO", "Select a mailbox first")),
            CommandBody::Close | CommandBody::Unselect => {
                let close = is_close;
                if close {
                    let mut ignored = Vec::new();
                    self.expunge(None, &mut ignored);
                }
                self.sel = None;
                Step::Reply(tagged(
                    tag,
                    "OK",
                    if close {
                        "CLOSE completed"
                    } else {
                        "UNSELECT completed"
                    },
                ))
            }
            CommandBody::Expunge => self.expunge_cmd(tag, None),
            CommandBody::ExpungeUid { sequence_set } => self.expunge_cmd(tag, Some(&sequence_set)),
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => {
                if let Some(cs) = charset {
                    let cs: &str = cs.as_ref();
                    if !["US-ASCII", "UTF-8"]
                        .iter()
                        .any(|c| c.eq_ignore_ascii_case(cs))
                    {
                        return Step::Reply(tagged(
                            tag,
                            "NO",
                            "[BADCHARSET (US-ASCII UTF-8)] Unsupported charset",
                        ));
                    }
                }
                let key = SearchKey::And(criteria);
                self.search(tag, &key, uid)
            }
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
}

impl ImapCore {
    /// The messages, UIDVALIDITY and UIDNEXT of a folder as this user sees
    /// it (Release is a drop box and always empty); or the NO to answer.
    fn folder_view(
        &self,
        tag: &str,
        mailbox: &Mailbox<'_>,
    ) -> Result<(Folder, Vec<ViewMsg>, u32, u32), Step> {
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
                let v = self.shared.view(account);
                (folder, v.msgs, v.uidvalidity, v.uidnext)
            }
            Folder::Release => (folder, Vec::new(), 1, 1),
        })
    }

    fn select(&mut self, tag: &str, mailbox: &Mailbox<'_>, read_only: bool) -> Step {
        self.sel = None;
        let (folder, msgs, uidvalidity, uidnext) = match self.folder_view(tag, mailbox) {
            Ok(v) => v,
            Err(step) => return step,
        };
        let mut out = format!("* FLAGS {SYSTEM_FLAGS}\r\n").into_bytes();
        let perm = if read_only {
            "()".to_string()
        } else {
            "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)".to_string()
        };
        out.extend_from_slice(
            format!("* OK [PERMANENTFLAGS {perm}] Flags permitted\r\n").as_bytes(),
        );
        out.extend_from_slice(format!("* {} EXISTS\r\n* 0 RECENT\r\n", msgs.len()).as_bytes());
        if let Some(i) = msgs
            .iter()
            .position(|m| !m.flags.iter().any(|f| f == "\\Seen"))
        {
            out.extend_from_slice(format!("* OK [UNSEEN {}] First unseen\r\n", i + 1).as_bytes());
        }
        out.extend_from_slice(
            format!("* OK [UIDVALIDITY {uidvalidity}] UIDs valid\r\n* OK [UIDNEXT {uidnext}] Predicted next UID\r\n")
                .as_bytes(),
        );
        let (code, verb) = if read_only {
            ("[READ-ONLY]", "EXAMINE")
        } else {
            ("[READ-WRITE]", "SELECT")
        };
        out.extend_from_slice(&tagged(tag, "OK", &format!("{code} {verb} completed")));
        self.sel = Some(Selected {
            folder,
            read_only,
            msgs,
        });
        Step::Reply(out)
    }

    fn list(
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
        let mut out = Vec::new();
        if pat.is_empty() {
            if !lsub {
                out.extend_from_slice(b"* LIST (\\Noselect) \"/\" \"\"\r\n");
            }
        } else if pat.len() <= 256 && reference.len() <= 256 {
            let mut full = reference.clone();
            full.extend_from_slice(pat);
            for name in ["INBOX", "Release"] {
                if wildcard_match(&full, name.as_bytes()) {
                    out.extend_from_slice(
                        format!("* {verb} (\\HasNoChildren) \"/\" {name}\r\n").as_bytes(),
                    );
                }
            }
        }
        out.extend_from_slice(&tagged(tag, "OK", &format!("{verb} completed")));
        Step::Reply(out)
    }

    fn status(&mut self, tag: &str, mailbox: &Mailbox<'_>, items: &[StatusDataItemName]) -> Step {
        let (folder, msgs, uidvalidity, uidnext) = match self.folder_view(tag, mailbox) {
            Ok(v) => v,
            Err(step) => return step,
        };
        let count = |f: &str| {
            msgs.iter()
                .filter(|m| m.flags.iter().any(|x| x == f))
                .count()
        };
        let mut parts = Vec::new();
        for item in items {
            let s = match item {
                StatusDataItemName::Messages => format!("MESSAGES {}", msgs.len()),
                StatusDataItemName::Recent => "RECENT 0".to_string(),
                StatusDataItemName::UidNext => format!("UIDNEXT {uidnext}"),
                StatusDataItemName::UidValidity => format!("UIDVALIDITY {uidvalidity}"),
                StatusDataItemName::Unseen => format!("UNSEEN {}", msgs.len() - count("\\Seen")),
                StatusDataItemName::Deleted => format!("DELETED {}", count("\\Deleted")),
                #[allow(unreachable_patterns)]
                _ => continue,
            };
            parts.push(s);
        }
        let mut out = format!("* STATUS {} ({})\r\n", folder.name(), parts.join(" ")).into_bytes();
        out.extend_from_slice(&tagged(tag, "OK", "STATUS completed"));
        Step::Reply(out)
    }

    /// Delete the \Deleted messages (within `uids` when given) from the quarantine; report
    /// each as EXPUNGE into `out`.
    fn expunge(&mut self, uids: Option<&SequenceSet>, out: &mut Vec<u8>) {
        let Some(sel) = &mut self.sel else { return };
        if sel.read_only || sel.folder != Folder::Inbox {
            return;
        }
        let max_uid = sel.msgs.last().map_or(0, |m| m.uid);
        for i in (0..sel.msgs.len()).rev() {
            let m = &sel.msgs[i];
            let marked = m.flags.iter().any(|f| f == "\\Deleted");
            let in_set = uids.is_none_or(|s| set_contains(s, m.uid, max_uid));
            if marked && in_set {
                self.shared.store.delete(m.meta.id);
                out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                sel.msgs.remove(i);
            }
        }
    }

    fn expunge_cmd(&mut self, tag: &str, uids: Option<&SequenceSet>) -> Step {
        if self.sel.as_ref().is_some_and(|s| s.read_only) {
            return Step::Reply(tagged(tag, "NO", "[READ-ONLY] Mailbox is read-only"));
        }
        let mut out = Vec::new();
        self.expunge(uids, &mut out);
        self.sync(&mut out, true);
        out.extend_from_slice(&tagged(tag, "OK", "EXPUNGE completed"));
        Step::Reply(out)
    }

    fn search(&mut self, tag: &str, key: &SearchKey<'_>, uid: bool) -> Step {
        let mut out = Vec::new();
        let Some(sel) = &self.sel else {
            return Step::Reply(tagged(tag, "NO", "Select a mailbox first"));
        };
        let body = needs_body(key);
        let max_seq = sel.msgs.len() as u32;
        let max_uid = sel.msgs.last().map_or(0, |m| m.uid);
        let mut hits = Vec::new();
        for (i, m) in sel.msgs.iter().enumerate() {
            let raw = if body {
                self.shared.store.body(m.meta.id)
            } else {
                None
            };
            let parsed = raw.as_deref().map(message::parse);
            let c = SearchCtx {
                seq: i as u32 + 1,
                max_seq,
                max_uid,
                msg: m,
                parsed: parsed.as_ref(),
            };
            if eval(key, &c) {
                hits.push(if uid { m.uid } else { i as u32 + 1 });
            }
        }
        out.extend_from_slice(b"* SEARCH");
        for h in hits {
            out.extend_from_slice(format!(" {h}").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        self.sync(&mut out, uid);
        out.extend_from_slice(&tagged(tag, "OK", "SEARCH completed"));
        Step::Reply(out)
    }

    fn fetch(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        what: MacroOrMessageDataItemNames<'_>,
        uid: bool,
    ) -> Step {
        let mut items: Vec<MessageDataItemName<'_>> = match what {
            MacroOrMessageDataItemNames::Macro(m) => {
                let mut v = vec![
                    MessageDataItemName::Flags,
                    MessageDataItemName::InternalDate,
                    MessageDataItemName::Rfc822Size,
                ];
                match m {
                    Macro::Fast => {}
                    Macro::All => v.push(MessageDataItemName::Envelope),
                    Macro::Full => {
                        v.push(MessageDataItemName::Envelope);
                        v.push(MessageDataItemName::Body);
                    }
                    _ => {}
                }
                v
            }
            MacroOrMessageDataItemNames::MessageDataItemNames(v) => v,
        };
        if uid && !items.contains(&MessageDataItemName::Uid) {
            items.insert(0, MessageDataItemName::Uid);
        }
        let needs_body = items.iter().any(|i| {
            !matches!(
                i,
                MessageDataItemName::Uid
                    | MessageDataItemName::Flags
                    | MessageDataItemName::InternalDate
            )
        });
        let marks_seen = items.iter().any(|i| {
            matches!(
                i,
                MessageDataItemName::BodyExt { peek: false, .. }
                    | MessageDataItemName::Rfc822
                    | MessageDataItemName::Rfc822Text
                    | MessageDataItemName::Binary { peek: false, .. }
            )
        });
        let idxs = self.resolve(set, uid);
        let Some(sel) = &mut self.sel else {
            return Step::Reply(tagged(tag, "NO", "Select a mailbox first"));
        };
        let mut out = Vec::new();
        let mut seen_updates = Vec::new();
        for idx in idxs {
            let m = &mut sel.msgs[idx];
            let raw = if needs_body {
                match self.shared.store.body(m.meta.id) {
                    Some(b) => Some(b),
                    // Released or deleted elsewhere; its EXPUNGE comes at the next sync.
                    None => continue,
                }
            } else {
                None
            };
            let parsed = raw.as_deref().map(message::parse);
            let mut flags_changed = false;
            if marks_seen && !sel.read_only && !m.flags.iter().any(|f| f == "\\Seen") {
                m.flags.push("\\Seen".to_string());
                normalize(&mut m.flags);
                seen_updates.push(m.meta.id);
                flags_changed = true;
            }
            let mut line = format!("* {} FETCH (", idx + 1).into_bytes();
            let mut first = true;
            let mut sep = |line: &mut Vec<u8>| {
                if !first {
                    line.push(b' ');
                }
                first = false;
            };
            let empty: &[u8] = &[];
            for item in &items {
                match item {
                    MessageDataItemName::Uid => {
                        sep(&mut line);
                        line.extend_from_slice(format!("UID {}", m.uid).as_bytes());
                    }
                    MessageDataItemName::Flags => {
                        sep(&mut line);
                        line.extend_from_slice(format!("FLAGS {}", flag_list(&m.flags)).as_bytes());
                    }
                    MessageDataItemName::InternalDate => {
                        sep(&mut line);
                        line.extend_from_slice(
                            format!("INTERNALDATE {}", internal_date(m.meta.received_unix))
                                .as_bytes(),
                        );
                    }
                    MessageDataItemName::Rfc822Size => {
                        sep(&mut line);
                        let n = raw.as_ref().map_or(m.meta.size, |r| r.len() as u64);
                        line.extend_from_slice(format!("RFC822.SIZE {n}").as_bytes());
                    }
                    MessageDataItemName::Envelope => {
                        sep(&mut line);
                        line.extend_from_slice(b"ENVELOPE ");
                        line.extend_from_slice(
                            &parsed.as_ref().map(|p| p.envelope()).unwrap_or_default(),
                        );
                    }
                    MessageDataItemName::BodyStructure | MessageDataItemName::Body => {
                        let ext = matches!(item, MessageDataItemName::BodyStructure);
                        sep(&mut line);
                        line.extend_from_slice(if ext { b"BODYSTRUCTURE " } else { b"BODY " });
                        line.extend_from_slice(
                            &parsed
                                .as_ref()
                                .map(|p| p.structure(ext))
                                .unwrap_or_default(),
                        );
                    }
                    MessageDataItemName::Rfc822 => {
                        sep(&mut line);
                        line.extend_from_slice(b"RFC822 ");
                        resp::literal(&mut line, parsed.as_ref().map_or(empty, |p| p.raw()));
                    }
                    MessageDataItemName::Rfc822Header => {
                        sep(&mut line);
                        line.extend_from_slice(b"RFC822.HEADER ");
                        resp::literal(&mut line, parsed.as_ref().map_or(empty, |p| p.header()));
                    }
                    MessageDataItemName::Rfc822Text => {
                        sep(&mut line);
                        line.extend_from_slice(b"RFC822.TEXT ");
                        resp::literal(&mut line, parsed.as_ref().map_or(empty, |p| p.text()));
                    }
                    MessageDataItemName::BodyExt {
                        section, partial, ..
                    } => {
                        sep(&mut line);
                        let data = parsed
                            .as_ref()
                            .map(|p| p.section(section.as_ref()))
                            .unwrap_or_default();
                        line.extend_from_slice(
                            format!("BODY[{}]", section_label(section.as_ref())).as_bytes(),
                        );
                        let slice: &[u8] = match partial {
                            Some((start, len)) => {
                                line.extend_from_slice(format!("<{start}>").as_bytes());
                                let s = (*start as usize).min(data.len());
                                let e = s.saturating_add(len.get() as usize).min(data.len());
                                &data[s..e]
                            }
                            None => &data,
                        };
                        line.push(b' ');
                        resp::literal(&mut line, slice);
                    }
                    // BINARY is not advertised; ignore its items.
                    _ => {}
                }
            }
            if flags_changed && !items.contains(&MessageDataItemName::Flags) {
                sep(&mut line);
                line.extend_from_slice(format!("FLAGS {}", flag_list(&m.flags)).as_bytes());
            }
            line.extend_from_slice(b")\r\n");
            out.extend_from_slice(&line);
        }
        if let Some(account) = &self.account {
            // Only \Seen is added: other flags another session set stay.
            self.shared
                .apply_flags(account, &seen_updates, FlagOp::Add(&["\\Seen".to_string()]));
        }
        self.sync(&mut out, uid);
        out.extend_from_slice(&tagged(tag, "OK", "FETCH completed"));
        Step::Reply(out)
    }

    fn store(
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
        let idxs = self.resolve(set, uid);
        let Some(sel) = &mut self.sel else {
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
        let result = match &self.account {
            Some(account) => self.shared.apply_flags(account, &ids, op),
            None => HashMap::new(),
        };
        let mut out = Vec::new();
        for idx in idxs {
            let m = &mut sel.msgs[idx];
            if let Some(flags) = result.get(&m.meta.id) {
                m.flags = flags.clone();
            }
            if response == StoreResponse::Answer {
                let uid_part = if uid {
                    format!(" UID {}", m.uid)
                } else {
                    String::new()
                };
                out.extend_from_slice(
                    format!(
                        "* {} FETCH (FLAGS {}{uid_part})\r\n",
                        idx + 1,
                        flag_list(&m.flags)
                    )
                    .as_bytes(),
                );
            }
        }
        self.sync(&mut out, uid);
        out.extend_from_slice(&tagged(tag, "OK", "STORE completed"));
        Step::Reply(out)
    }

    fn copy_move(
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
        let idxs = self.resolve(set, uid);
        let Some(sel) = &mut self.sel else {
            return Step::Reply(tagged(tag, "NO", "Select a mailbox first"));
        };
        let mut released = 0;
        for &i in &idxs {
            if self.shared.store.release(sel.msgs[i].meta.id) {
                released += 1;
                tracing::info!(
                    id = sel.msgs[i].meta.id,
                    "quarantine entry released over IMAP"
                );
            }
        }
        let mut out = Vec::new();
        if is_move {
            for &i in idxs.iter().rev() {
                out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                sel.msgs.remove(i);
            }
        }
        self.sync(&mut out, true);
        out.extend_from_slice(&tagged(
            tag,
            "OK",
            &format!("{verb} completed; {released} message(s) released for delivery"),
        ));
        Step::Reply(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::accounts::Role;
    use crate::mailbox::store::MemStore;

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
            r.contains("* 2 FETCH (UID 2 BODY[]<0> {4}\r\nSubj FLAGS (\\Seen))"),
            "{r}"
        );
        let r = text(c.handle(b"q SEARCH UNSEEN\r\n"));
        assert!(r.contains("* SEARCH 1\r\n"), "{r}");
        let r = text(c.handle(b"q SEARCH FROM eve SUBJECT \"win\"\r\n"));
        assert!(r.contains("* SEARCH 1\r\n"), "{r}");
        let r = text(c.handle(b"q UID SEARCH OR SEEN LARGER 100000\r\n"));
        assert!(r.contains("* SEARCH 2\r\n"), "{r}");
        let r = text(c.handle(b"st STORE 1 +FLAGS (\\Deleted $Junk)\r\n"));
        assert!(r.contains("* 1 FETCH (FLAGS (\\Deleted $Junk))"), "{r}");
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

    #[test]
    fn sessions_see_each_other() {
        let mem = Arc::new(MemStore::new());
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let shared = Arc::new(Shared::new(mem.clone()));
        let mut a = ImapCore::new(shared.clone(), "h", true);
        let mut b = ImapCore::new(shared.clone(), "h", true);
        a.login_result("l", Some(alice()));
        b.login_result("l", Some(alice()));
        text(a.handle(b"s SELECT INBOX\r\n"));
        text(b.handle(b"s SELECT INBOX\r\n"));
        text(a.handle(b"t STORE 1 +FLAGS.SILENT (\\Flagged)\r\n"));
        mem.add("eve@evil.test", &["alice@example.test"], "spam", MSG);
        let r = text(b.handle(b"n NOOP\r\n"));
        assert!(
            r.contains("* 1 FETCH (UID 1 FLAGS (\\Flagged))") && r.contains("* 2 EXISTS"),
            "{r}"
        );
        text(a.handle(b"t STORE 1 +FLAGS.SILENT (\\Deleted)\r\n"));
        text(a.handle(b"c CLOSE\r\n"));
        let r = text(b.handle(b"i IDLE\r\n"));
        assert!(r.contains("* 1 EXPUNGE\r\n+ idling\r\n"), "{r}");
        text(a.handle(b"s SELECT INBOX\r\n"));
        text(a.handle(b"t STORE 1 +FLAGS.SILENT (\\Seen)\r\n"));
        let r = String::from_utf8_lossy(&b.idle_update()).into_owned();
        assert_eq!(r, "* 1 FETCH (UID 2 FLAGS (\\Seen))\r\n");
        let r = String::from_utf8_lossy(&b.idle_done(b"DONE")).into_owned();
        assert_eq!(r, "i OK IDLE terminated\r\n");
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
}
