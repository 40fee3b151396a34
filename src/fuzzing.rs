//! Thin wrappers over the crate-private cores, for the cargo-fuzz targets in
//! `fuzz/` only (compiled with `--cfg fuzzing`, never in a release): the
//! cores stay `pub(crate)`, and the targets drive them through this one
//! door. No logic here beyond building the values the cores take.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::config::{BareNewline, Config, RelayConfig};
use crate::mail::{Enhanced, headers};
use crate::mailbox::accounts::{Account, Role};
use crate::mailbox::imap::core::{ImapCore, Step as IStep};
use crate::mailbox::imap::state::Shared;
use crate::mailbox::pop3::{Pop3Core, Step as PStep};
use crate::mailbox::store::MemStore;
use crate::policy::{CheckResults, Decision, ListHits, Problem, ScanResults, TxInfo, Verdict};
use crate::smtp::data;
use crate::smtp::session::{Action, Check, ListenerKind, Session, SessionConfig};
use crate::store::{RcptStatus, Recipient};

/// A test account: its login and the addresses it owns (lower-cased).
fn account(login: &str, addresses: &[&str]) -> Account {
    Account {
        login: login.to_string(),
        addresses: addresses.iter().map(|a| a.to_ascii_lowercase()).collect(),
        role: Role::User,
    }
}

// ---- SMTP session ----------------------------------------------------------

/// [`Action`], with the check kept opaque for [`SmtpSession::policy_answer`].
#[derive(Debug)]
pub enum SmtpStep {
    Reply(Vec<u8>),
    StartTls(Vec<u8>),
    Data(Vec<u8>),
    Close(Vec<u8>),
    Policy(SmtpCheck),
    Auth {
        login: String,
        password: String,
    },
    /// The core asks whether this local recipient exists (recipient verification).
    Verify(String),
}

/// A MAIL or RCPT waiting for the rules.
#[derive(Debug)]
pub struct SmtpCheck(Check);

impl SmtpCheck {
    /// The recipient asked about and whether it is in our domains (`None` for MAIL).
    pub fn rcpt(&self) -> Option<(&str, bool)> {
        match &self.0 {
            Check::Mail => None,
            Check::Rcpt(r) => Some((&r.address, r.local)),
        }
    }
}

fn smtp_step(a: Action) -> SmtpStep {
    match a {
        Action::Reply(b) => SmtpStep::Reply(b),
        Action::StartTls(b) => SmtpStep::StartTls(b),
        Action::Data(b) => SmtpStep::Data(b),
        Action::Close(b) => SmtpStep::Close(b),
        Action::Policy(c) => SmtpStep::Policy(SmtpCheck(c)),
        Action::Auth(c) => SmtpStep::Auth {
            login: c.login,
            password: c.password,
        },
        Action::Verify(a) => SmtpStep::Verify(a),
    }
}

/// `smtp::session::Session` on one listener.
pub struct SmtpSession(Session);

/// The envelope a transaction handed to the intake.
pub struct SmtpEnvelope {
    pub from: String,
    /// (address, in our domains)
    pub rcpts: Vec<(String, bool)>,
    /// The `Received:` header the intake prepends.
    pub received: String,
}

impl SmtpSession {
    /// `listener`: 0 relay (25), 1 submission (587), 2 submissions (465).
    /// `trusted`: the peer (127.0.0.1) is in `[relay] networks`.
    pub fn new(
        listener: u8,
        domains: &[&str],
        trusted: bool,
        tls: bool,
        tls_available: bool,
        max_recipients: usize,
    ) -> SmtpSession {
        let kind = match listener % 3 {
            0 => ListenerKind::Relay,
            1 => ListenerKind::Submission,
            _ => ListenerKind::Submissions,
        };
        let cfg = SessionConfig {
            hostname: "mx.local.test".into(),
            relay: RelayConfig {
                domains: domains.iter().map(|d| d.to_string()).collect(),
                networks: if trusted {
                    vec!["127.0.0.0/8".parse().expect("literal net")]
                } else {
                    Vec::new()
                },
                ..RelayConfig::default()
            },
            max_message_size: 10_000,
            max_recipients,
            tls_available,
            received_auth_user: true,
            bare_newline: BareNewline::Reject,
        };
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("literal addr");
        SmtpSession(Session::new(Arc::new(cfg), kind, peer, tls))
    }

    pub fn connected(&mut self, verdict: Option<Verdict>) -> SmtpStep {
        smtp_step(self.0.connected(decision(verdict)))
    }

    pub fn command(&mut self, line: &[u8]) -> SmtpStep {
        smtp_step(self.0.command_with(line, false))
    }

    /// `pipelined`: the client already sent more bytes after this line.
    pub fn command_with(&mut self, line: &[u8], pipelined: bool) -> SmtpStep {
        smtp_step(self.0.command_with(line, pipelined))
    }

    pub fn policy_answer(&mut self, check: SmtpCheck, verdict: Option<Verdict>) -> SmtpStep {
        smtp_step(self.0.policy_answer(check.0, decision(verdict)))
    }

    /// A `hold` rate limit went over at this check.
    pub fn hold(&mut self, check: &SmtpCheck) {
        self.0.hold(&check.0, "fuzz".into());
    }

    /// The password check: `Some` logs in as `login` owning `addresses`.
    /// `pick` 0: the recipient exists, 1: unknown, else the backend could not say.
    pub fn verify_answer(&mut self, pick: u8) -> SmtpStep {
        let answer = match pick % 3 {
            0 => crate::verify::Verified::Known,
            1 => crate::verify::Verified::Unknown,
            _ => crate::verify::Verified::Unavailable,
        };
        smtp_step(self.0.verify_answer(answer))
    }

    pub fn auth_result(&mut self, who: Option<(&str, &[&str])>) -> SmtpStep {
        smtp_step(
            self.0
                .auth_result(who.map(|(login, addrs)| account(login, addrs))),
        )
    }

    pub fn tls_started(&mut self) {
        self.0.tls_started();
    }

    pub fn line_too_long(&mut self) -> Vec<u8> {
        self.0.line_too_long()
    }

    pub fn may_relay(&self) -> bool {
        self.0.may_relay()
    }

    pub fn authenticated(&self) -> bool {
        self.0.sender_addresses().is_some()
    }

    /// The transaction the intake takes after the 354 (or a refused message).
    pub fn take_transaction(&mut self) -> Option<SmtpEnvelope> {
        let t = self.0.take_transaction()?;
        let received = self.0.received_header("FUZZ", &t, chrono::Utc::now());
        Some(SmtpEnvelope {
            from: t.from,
            rcpts: t.rcpts.into_iter().map(|r| (r.address, r.local)).collect(),
            received,
        })
    }
}

fn decision(verdict: Option<Verdict>) -> Decision {
    Decision {
        verdict,
        script: Some("fuzz.rhai".into()),
        ..Decision::default()
    }
}

// ---- DATA decoder and dot-stuffing -----------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    NeedMore,
    End,
    BareNewline,
}

/// `smtp::data::DataDecoder`.
pub struct DataDecoder(data::DataDecoder);

impl DataDecoder {
    /// `normalize`: `bare_newline = "normalize"`, else `"reject"`.
    pub fn new(normalize: bool, max_size: usize) -> DataDecoder {
        let bare = if normalize {
            BareNewline::Normalize
        } else {
            BareNewline::Reject
        };
        DataDecoder(data::DataDecoder::new(bare, max_size))
    }

    /// (consumed, status)
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, DataStatus) {
        let f = self.0.feed(input, out);
        let status = match f.status {
            data::Status::NeedMore => DataStatus::NeedMore,
            data::Status::End => DataStatus::End,
            data::Status::BareNewline => DataStatus::BareNewline,
        };
        (f.consumed, status)
    }

    pub fn too_big(&self) -> bool {
        self.0.too_big()
    }
}

pub fn dot_stuff(body: &[u8], out: &mut Vec<u8>) {
    data::dot_stuff(body, out);
}

/// `smtp::data::DotStuffer`.
pub struct DotStuffer(data::DotStuffer);

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer(data::DotStuffer::new())
    }
}

impl DotStuffer {
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.0.feed(chunk, out);
    }

    pub fn finish(self, out: &mut Vec<u8>) {
        self.0.finish(out);
    }
}

// ---- POP3 and IMAP over the in-memory store ---------------------------------

pub use crate::mailbox::store::MemStore as Store;

/// `mailbox::pop3::Step`.
#[derive(Debug)]
pub enum Pop3Step {
    Reply(Vec<u8>),
    StartTls(Vec<u8>),
    Login { login: String, password: String },
    Close(Vec<u8>),
}

/// `mailbox::pop3::Pop3Core`.
pub struct Pop3(Pop3Core);

fn pop3_step(s: PStep) -> Pop3Step {
    match s {
        PStep::Reply(b) => Pop3Step::Reply(b),
        PStep::StartTls(b) => Pop3Step::StartTls(b),
        PStep::Login { login, password } => Pop3Step::Login { login, password },
        PStep::Close(b) => Pop3Step::Close(b),
    }
}

impl Pop3 {
    pub fn new(store: Arc<MemStore>, tls: bool) -> Pop3 {
        Pop3(Pop3Core::new(store, "mx.local.test", tls))
    }

    pub fn greeting(&self) -> Vec<u8> {
        self.0.greeting()
    }

    /// One command line, without CRLF.
    pub fn handle(&mut self, line: &[u8]) -> Pop3Step {
        pop3_step(self.0.handle(line))
    }

    pub fn login_ok(&mut self, login: &str, addresses: &[&str]) -> Vec<u8> {
        self.0.login_ok(account(login, addresses))
    }

    pub fn login_failed(&mut self) -> Pop3Step {
        pop3_step(self.0.login_failed())
    }

    pub fn login_in_use(&mut self) -> Vec<u8> {
        self.0.login_in_use()
    }

    pub fn line_too_long(&mut self) -> Pop3Step {
        pop3_step(self.0.line_too_long())
    }

    pub fn tls_started(&mut self) {
        self.0.tls_started();
    }

    pub fn logged_in(&self) -> bool {
        self.0.account().is_some()
    }
}

/// `mailbox::imap::core::Step`.
#[derive(Debug)]
pub enum ImapStep {
    Reply(Vec<u8>),
    StartTls(Vec<u8>),
    Login {
        tag: String,
        login: String,
        password: String,
    },
    SaslContinue {
        tag: String,
    },
    Idle(Vec<u8>),
    Close(Vec<u8>),
}

fn imap_step(s: IStep) -> ImapStep {
    match s {
        IStep::Reply(b) => ImapStep::Reply(b),
        IStep::StartTls(b) => ImapStep::StartTls(b),
        IStep::Login {
            tag,
            login,
            password,
        } => ImapStep::Login {
            tag,
            login,
            password,
        },
        IStep::SaslContinue { tag } => ImapStep::SaslContinue { tag },
        IStep::Idle(b) => ImapStep::Idle(b),
        IStep::Close(b) => ImapStep::Close(b),
    }
}

/// The state every IMAP session of one server shares.
pub struct ImapShared(Arc<Shared>);

impl ImapShared {
    pub fn new(store: Arc<MemStore>) -> ImapShared {
        ImapShared(Arc::new(Shared::new(store)))
    }
}

/// `mailbox::imap::core::ImapCore`.
pub struct Imap(ImapCore);

impl Imap {
    pub fn new(shared: &ImapShared, tls: bool) -> Imap {
        Imap(ImapCore::new(shared.0.clone(), "mx.local.test", tls))
    }

    pub fn greeting(&self) -> Vec<u8> {
        self.0.greeting()
    }

    /// One complete command (line(s) and literals, CRLF-terminated).
    pub fn handle(&mut self, input: &[u8]) -> ImapStep {
        imap_step(self.0.handle(input))
    }

    pub fn login_result(&mut self, tag: &str, who: Option<(&str, &[&str])>) -> ImapStep {
        imap_step(
            self.0
                .login_result(tag, who.map(|(login, addrs)| account(login, addrs))),
        )
    }

    pub fn sasl_response(&mut self, tag: &str, line: &[u8]) -> ImapStep {
        imap_step(self.0.sasl_response(tag, line))
    }

    pub fn idle_update(&mut self) -> Vec<u8> {
        self.0.idle_update()
    }

    pub fn idle_done(&mut self, line: &[u8]) -> Vec<u8> {
        self.0.idle_done(line)
    }

    pub fn too_long(&mut self, tag: Option<&str>) -> ImapStep {
        imap_step(self.0.too_long(tag))
    }

    pub fn tls_started(&mut self) {
        self.0.tls_started();
    }

    pub fn logged_in(&self) -> bool {
        self.0.uses_store()
    }
}

/// The shell's framing: `{n}` or `{n+}` at the end of a line.
pub fn imap_literal_suffix(line: &[u8]) -> Option<(usize, bool)> {
    crate::mailbox::imap::shell::literal_suffix(line)
}

// ---- message → rule object, header helpers ----------------------------------

/// What `Msg::build` gathered for the scripts, in numbers.
#[derive(Debug)]
pub struct RuleMessage {
    pub subject: String,
    /// (lower-cased name, unfolded value)
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub attachments: usize,
}

pub fn rule_message(tx: &TxInfo, message: &[u8], checks: &CheckResults) -> RuleMessage {
    let auth = crate::policy::AuthOutcome::fixed("mx.local.test", checks);
    let m = crate::policy::RuleMsg::build(
        tx,
        message,
        &auth,
        &ScanResults::default(),
        ListHits::default(),
    );
    RuleMessage {
        subject: m.data.subject.to_string(),
        headers: m
            .data
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), v.to_string()))
            .collect(),
        body: m.data.body.to_string(),
        attachments: m.data.attachments.len(),
    }
}

/// `headers::scan`: each field as (start, colon, end), then header end and body start.
pub fn header_scan(msg: &[u8]) -> (Vec<(usize, usize, usize)>, usize, usize) {
    let h = headers::scan(msg);
    let fields = h.fields.iter().map(|f| (f.start, f.colon, f.end)).collect();
    (fields, h.header_end, h.body_start)
}

pub fn header_name_value(msg: &[u8], start: usize, colon: usize, end: usize) -> (&[u8], &[u8]) {
    let f = headers::Field { start, end, colon };
    (f.name(msg), f.value(msg))
}

pub fn header_fields_only(msg: &[u8]) -> &[u8] {
    headers::header_fields_only(msg)
}

pub fn body_start(msg: &[u8]) -> usize {
    headers::body_start(msg)
}

pub fn authserv_id(value: &[u8]) -> String {
    crate::policy::authserv_id(value)
}

pub use crate::policy::strip_forged_auth_results;

// ---- DSN ------------------------------------------------------------------

/// One failed recipient: address, remote MTA, status (class.subject.detail), diagnostic.
pub struct DsnFailure {
    pub address: String,
    pub remote: Option<String>,
    pub status: (u8, u16, u16),
    pub diagnostic: String,
}

pub fn dsn(
    hostname: &str,
    sender: &str,
    queue_id: &str,
    arrival_unix: i64,
    failures: &[DsnFailure],
    original: &[u8],
) -> Vec<u8> {
    let rcpts: Vec<Recipient> = failures
        .iter()
        .map(|f| Recipient {
            address: f.address.clone(),
            status: RcptStatus::Failed,
            last_reply: None,
            remote: f.remote.clone(),
            tls: None,
        })
        .collect();
    let list: Vec<crate::delivery::dsn::Failure<'_>> = failures
        .iter()
        .zip(&rcpts)
        .map(|(f, r)| crate::delivery::dsn::Failure {
            recipient: r,
            status: Enhanced::new(f.status.0, f.status.1, f.status.2),
            diagnostic: f.diagnostic.clone(),
        })
        .collect();
    crate::delivery::dsn::build(hostname, sender, queue_id, arrival_unix, &list, original)
}

// ---- config and policy files ----------------------------------------------

/// `Config::from_str` as if read from `path`: the problems, or none.
pub fn config_problems(text: &str, path: &Path) -> Vec<Problem> {
    match Config::from_str(text, path) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    }
}

/// `ratelimits.toml` parsing: the problems, or how many limits.
pub fn ratelimits(text: &str, path: &Path) -> Result<usize, Vec<Problem>> {
    crate::policy::parse_ratelimits(path, text).map(|l| l.len())
}

/// `users.toml` parsing: the error text, or how many accounts.
pub fn users(text: &str) -> Result<usize, String> {
    crate::mailbox::accounts::Accounts::parse(text, "users.toml")
        .map(|a| a.len())
        .map_err(|e| e.to_string())
}

/// The rule-suite cases of `dir` (read from files, as `rules test` does).
pub fn suite_cases(dir: &Path) -> Result<usize, Vec<Problem>> {
    crate::policy::suite::load(dir, "local.test").map(|c| c.len())
}

// ---- digest links ------------------------------------------------------------

/// Check `token` (the path segment a web client sends) against a fixed key;
/// `Some(login, id, action)` when it verifies.
pub fn link_verify(token: &str, now: i64) -> Option<(String, u64, &'static str)> {
    let key = crate::quarantine::links::LinkKey::from_bytes(&[42; 32]);
    key.verify(token, now)
        .ok()
        .map(|l| (l.login, l.id, l.action.as_str()))
}

/// Sign a link for `login` under the fixed key of [`link_verify`].
pub fn link_sign(login: &str, id: u64, action: u8, expires: i64) -> String {
    use crate::quarantine::links::{Action, Link, LinkKey};
    let action = Action::ALL[usize::from(action) % Action::ALL.len()];
    LinkKey::from_bytes(&[42; 32]).sign(&Link {
        login: login.to_string(),
        id,
        action,
        expires,
    })
}
