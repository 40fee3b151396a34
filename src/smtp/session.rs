//! The SMTP session state machine, without I/O.
//!
//! The shell ([`super::server`]) hands it one complete command line at a
//! time and performs the [`Action`] it returns. Parsing is smtp-proto's; the
//! states, limits and reply codes are ours.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, Error as ProtoError, Request};

use crate::config::{BareNewline, RelayConfig, VerifyRecipients};
use crate::mail::{self, Enhanced, Envelope, Reply};
use crate::mailbox::accounts::{Account, owns};
use crate::policy::relay::{self, RcptDecision};
use crate::policy::{ConnInfo, Decision, StageTrace, TxInfo, Verdict};
pub(crate) use crate::verify::Verified;

pub(crate) use crate::mail::Rcpt;

/// Which listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    /// Port 25: mail from the world (and relaying for trusted networks).
    Relay,
    /// Port 587: STARTTLS, then AUTH.
    Submission,
    /// Port 465: implicit TLS, then AUTH.
    Submissions,
}

impl ListenerKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            ListenerKind::Relay => "relay",
            ListenerKind::Submission => "submission",
            ListenerKind::Submissions => "submissions",
        }
    }
}

/// What every session of a listener shares.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub(crate) hostname: String,
    pub(crate) relay: RelayConfig,
    pub(crate) max_message_size: u64,
    pub(crate) max_recipients: usize,
    /// STARTTLS can be offered (a certificate is loaded).
    pub(crate) tls_available: bool,
    /// `[smtp] received_auth_user`: name the login in `Received:`.
    pub(crate) received_auth_user: bool,
    /// `[smtp] bare_newline`: applies to command lines as to DATA.
    pub(crate) bare_newline: BareNewline,
}

/// What the shell must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send these reply bytes and read the next command.
    Reply(Vec<u8>),
    /// Send these bytes, then start TLS (discarding anything the client pipelined).
    StartTls(Vec<u8>),
    /// Send the 354, then read the message up to the final dot.
    Data(Vec<u8>),
    /// Send these bytes and close the connection.
    Close(Vec<u8>),
    /// Ask the rules about this command ([`Session::tx_info`] says what),
    /// then hand the decision to [`Session::policy_answer`].
    Policy(Check),
    /// Check these credentials (argon2, off the runtime), then hand the
    /// account found, if any, to [`Session::auth_result`].
    Auth(Credentials),
    /// The rules took this local recipient: ask `[relay] verify_recipients`
    /// whether it exists, then hand the answer to [`Session::verify_answer`].
    Verify(String),
}

/// A login and password from AUTH, to be checked by the shell.
#[derive(PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) login: String,
    pub(crate) password: String,
}

/// Never prints the password (actions end up in test failures and logs).
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("login", &self.login)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// A SASL exchange waiting for the client's next line (RFC 4954).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sasl {
    /// `AUTH PLAIN` without an initial response: `334 ` was sent.
    Plain,
    /// `AUTH LOGIN`: the username was asked for.
    LoginUser,
    /// `AUTH LOGIN`: the password was asked for.
    LoginPass(String),
}

/// A command waiting for the rules' decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    Mail,
    Rcpt(Rcpt),
}

/// A quarantine or discard decided before DATA, with the script that said it.
type Sticky = (Verdict, Option<String>);

/// The envelope being built between MAIL and the end of DATA.
#[derive(Debug, Clone, Default)]
pub(crate) struct Transaction {
    pub(crate) from: String,
    pub(crate) rcpts: Vec<Rcpt>,
    pub(crate) declared_size: u64,
    /// A quarantine or discard decided before DATA, applied to the message.
    pub(crate) sticky: Option<(Verdict, Option<String>)>,
    /// A `hold` rate limit this transaction went over: the message is
    /// accepted and kept in the queue's held state.
    pub(crate) hold: Option<String>,
    /// What the rules said at connect, MAIL and each RCPT (the decision trace).
    pub(crate) trace: Vec<StageTrace>,
}

/// What [`Transaction::into_parts`] hands on besides the envelope.
pub(crate) struct Stuck {
    /// The verdict decided before DATA that sticks to the message.
    pub(crate) sticky: Option<(Verdict, Option<String>)>,
    /// The `hold` limit the transaction went over.
    pub(crate) hold: Option<String>,
    /// The stages before DATA, for the decision trace.
    pub(crate) trace: Vec<StageTrace>,
}

impl Transaction {
    /// The envelope for the intake, and what sticks to it.
    pub(crate) fn into_parts(self) -> (Envelope, Stuck) {
        (
            Envelope {
                from: self.from,
                rcpts: self.rcpts,
                declared_size: self.declared_size,
            },
            Stuck {
                sticky: self.sticky,
                hold: self.hold,
                trace: self.trace,
            },
        )
    }
}

/// Too many protocol errors in one session and we hang up.
const MAX_ERRORS: u32 = 20;
/// Failed AUTHs in one session before we hang up (the shared budget in
/// `policy::login_guard` covers guessing across sessions).
const MAX_AUTH_FAILURES: u32 = 3;
/// Longest base64 text of one AUTH step: a login and a password fit many
/// times over; anything longer is not a PLAIN or LOGIN credential.
const MAX_AUTH_LINE: usize = 1024;

pub(crate) struct Session {
    cfg: Arc<SessionConfig>,
    kind: ListenerKind,
    ip: IpAddr,
    /// The client's port.
    port: u16,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    /// The login of the authenticated user.
    auth_user: Option<String>,
    /// Their `addresses` (lower-cased): the only senders they may use.
    addresses: Vec<String>,
    /// A SASL exchange in progress.
    sasl: Option<Sasl>,
    auth_failures: u32,
    tx: Option<Transaction>,
    errors: u32,
    /// The last decision taken, as `(verdict, stage)`, for the verdict metric;
    /// the shell takes it after each command.
    verdict: Option<(&'static str, &'static str)>,
    /// A MAIL command waiting for the rules.
    pending_mail: Option<Transaction>,
    /// A quarantine or discard decided at connect: applies to every message.
    session_sticky: Option<(Verdict, Option<String>)>,
    /// What the `connect` functions said, the first stage of every trace.
    connect_trace: Option<StageTrace>,
    /// A RCPT the rules took, waiting for recipient verification, with
    /// the quarantine or discard they decided.
    pending_rcpt: Option<(Rcpt, Option<Sticky>)>,
}

pub(crate) use crate::mail::reply::line as reply;

/// One SASL step's base64 as UTF-8 text; `=` is the empty response
/// (RFC 4954 4). `None` for bad base64 or text that is not UTF-8.
fn decode(b64: &str) -> Option<String> {
    if b64 == "=" {
        return Some(String::new());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// What is wrong with the bytes of one command line, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineFault {
    /// The line ended in LF alone.
    BareLf,
    /// A CR inside the line, not part of its CRLF.
    BareCr,
    /// A NUL byte: never part of SMTP text (RFC 5321 4.1.2).
    Nul,
}

/// Looks at one line as the shell framed it (up to and including its
/// first LF; a line without one is taken as it is).
fn line_fault(line: &[u8]) -> Option<LineFault> {
    let (content, bare_lf) = match line.strip_suffix(b"\n") {
        Some(l) => match l.strip_suffix(b"\r") {
            Some(c) => (c, false),
            None => (l, true),
        },
        None => (line, false),
    };
    if content.contains(&b'\r') {
        Some(LineFault::BareCr)
    } else if content.contains(&0) {
        Some(LineFault::Nul)
    } else if bare_lf {
        Some(LineFault::BareLf)
    } else {
        None
    }
}

/// MAIL parameters of extensions we do not advertise (RFC 5321 4.1.1.11:
/// 555). SIZE, BODY=7BIT/8BITMIME, SMTPUTF8 and AUTH= stay accepted.
fn unadvertised_mail(from: &smtp_proto::MailFrom<Cow<'_, str>>) -> bool {
    use smtp_proto::*;
    const FLAGS: u64 = MAIL_BODY_BINARYMIME
        | MAIL_RET_FULL
        | MAIL_RET_HDRS
        | MAIL_REQUIRETLS
        | MAIL_CONPERM
        | MAIL_BY_NOTIFY
        | MAIL_BY_RETURN
        | MAIL_BY_TRACE;
    from.flags & FLAGS != 0
        || from.env_id.is_some()
        || from.trans_id.is_some()
        || from.solicit.is_some()
        || from.mtrk.is_some()
        || from.by != 0
        || from.hold_for != 0
        || from.hold_until != 0
        || from.mt_priority != 0
}

/// RCPT parameters of extensions we do not advertise (DSN, CONNEG, RRVS).
fn unadvertised_rcpt(to: &smtp_proto::RcptTo<Cow<'_, str>>) -> bool {
    use smtp_proto::*;
    const FLAGS: u64 = RCPT_NOTIFY_SUCCESS
        | RCPT_NOTIFY_FAILURE
        | RCPT_NOTIFY_DELAY
        | RCPT_NOTIFY_NEVER
        | RCPT_CONNEG
        | RCPT_RRVS_REJECT
        | RCPT_RRVS_CONTINUE;
    to.flags & FLAGS != 0 || to.orcpt.is_some() || to.rrvs != 0
}

fn not_offered() -> Vec<u8> {
    reply(
        555,
        Enhanced::new(5, 5, 4),
        "Parameter of an extension not offered here (DSN and others are not supported)",
    )
}

/// Whether an EHLO name can stand as the From-domain of `Received:`: an
/// address literal, or dot-separated labels of letters, digits, `-` and
/// `_` (underscores and single labels are common in the wild).
fn helo_is_domain(h: &str) -> bool {
    if let Some(lit) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return !lit.is_empty()
            && lit
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":.-".contains(&b));
    }
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Whether a command line is `DATA` (any case, trailing spaces).
fn is_data(line: &[u8]) -> bool {
    let l = line.strip_suffix(b"\r\n").unwrap_or(line).trim_ascii();
    l.eq_ignore_ascii_case(b"DATA")
}

/// Whether a RCPT line's path is `<>` (after `RCPT TO:` and any spaces).
fn null_path(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let rest = &line[colon + 1..];
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    rest[start..].starts_with(b"<>")
}

impl Session {
    pub(crate) fn new(
        cfg: Arc<SessionConfig>,
        kind: ListenerKind,
        peer: std::net::SocketAddr,
        tls: bool,
    ) -> Session {
        Session {
            cfg,
            kind,
            ip: peer.ip(),
            port: peer.port(),
            tls,
            helo: None,
            esmtp: false,
            auth_user: None,
            addresses: Vec::new(),
            sasl: None,
            auth_failures: 0,
            tx: None,
            errors: 0,
            verdict: None,
            pending_mail: None,
            session_sticky: None,
            connect_trace: None,
            pending_rcpt: None,
        }
    }

    pub(crate) fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// A transaction is open (MAIL accepted, message not yet taken).
    pub(crate) fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// The last `(verdict, stage)` decided, once, for the verdict metric.
    pub(crate) fn take_verdict(&mut self) -> Option<(&'static str, &'static str)> {
        self.verdict.take()
    }

    /// The client as the intake and the logs see it.
    pub(crate) fn peer(&self) -> mail::Peer {
        mail::Peer {
            ip: self.ip,
            port: self.port,
            helo: self.helo.clone().unwrap_or_default(),
            tls: self.tls,
            auth_user: self.auth_user.clone(),
            listener: self.kind.label(),
        }
    }

    fn greeting(&self) -> Vec<u8> {
        Reply::plain(220, format!("{} ESMTP Postern", self.cfg.hostname)).to_bytes()
    }

    /// The rules decided at connect: greet, or refuse and close. A
    /// quarantine or discard sticks to every message of the session.
    pub(crate) fn connected(&mut self, d: Decision) -> Action {
        if !d.trace.calls.is_empty() {
            self.connect_trace = Some(d.trace.clone());
        }
        match d.verdict {
            Some(Verdict::Reject(r)) => {
                self.verdict = Some(("reject", "connect"));
                Action::Close(r.to_bytes())
            }
            // RFC 5321 3.8: a server that must go away says 421 and closes.
            Some(Verdict::Tempfail(r)) => {
                self.verdict = Some(("tempfail", "connect"));
                Action::Close(Reply { code: 421, ..r }.to_bytes())
            }
            Some(Verdict::Accept) => {
                self.verdict = Some(("accept", "connect"));
                Action::Reply(self.greeting())
            }
            Some(v @ (Verdict::Quarantine { .. } | Verdict::Discard)) => {
                self.verdict = Some((v.word(), "connect"));
                self.session_sticky = Some((v, d.script));
                Action::Reply(self.greeting())
            }
            None => Action::Reply(self.greeting()),
        }
    }

    /// The TLS handshake succeeded: RFC 3207 says forget everything said before.
    pub(crate) fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.sasl = None;
    }

    /// The addresses the authenticated user may send as (envelope and
    /// header From); `None` when nobody authenticated.
    pub(crate) fn sender_addresses(&self) -> Option<Vec<String>> {
        self.auth_user.as_ref().map(|_| self.addresses.clone())
    }

    /// The shell read a line longer than it accepts: answer it, and end a
    /// SASL exchange it was part of (RFC 4954: 500 5.5.6).
    pub(crate) fn line_too_long(&mut self) -> Vec<u8> {
        if self.sasl.take().is_some() {
            return reply(
                500,
                Enhanced::new(5, 5, 6),
                "Authentication exchange line is too long",
            );
        }
        reply(500, Enhanced::new(5, 5, 2), "Line too long")
    }

    /// Are we the submission service (AUTH required)?
    fn submission(&self) -> bool {
        self.kind != ListenerKind::Relay
    }

    /// The client may relay to any domain.
    pub(crate) fn may_relay(&self) -> bool {
        self.auth_user.is_some() || self.cfg.relay.is_trusted(self.ip)
    }

    /// Count a protocol error; after too many, hang up.
    fn error(&mut self, bytes: Vec<u8>) -> Action {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            let mut b = bytes;
            b.extend(reply(
                421,
                Enhanced::new(4, 7, 0),
                "Too many errors, closing connection",
            ));
            return Action::Close(b);
        }
        Action::Reply(bytes)
    }

    /// Handle one complete command line (CRLF included), with nothing
    /// pipelined after it.
    #[cfg(test)]
    pub(crate) fn command(&mut self, line: &[u8]) -> Action {
        self.command_with(line, false)
    }

    /// Handle one complete command line (CRLF included); `pipelined`:
    /// the client already sent more bytes after it.
    pub(crate) fn command_with(&mut self, line: &[u8], pipelined: bool) -> Action {
        let normalized;
        let line = match line_fault(line) {
            None => line,
            Some(fault) => match self.line_fault(fault, line) {
                Ok(l) => {
                    normalized = l;
                    &normalized[..]
                }
                Err(action) => return action,
            },
        };
        if let Some(state) = self.sasl.take() {
            return self.sasl_line(state, line);
        }
        // RFC 2920 3.1: DATA ends a group; a client must wait for the 354.
        // Bytes already here are message data sent blind, the way spam
        // software (and smuggling payloads) write. Like Postfix's
        // `smtpd_forbid_unauth_pipelining` (on by default since 3.9), an
        // unauthenticated, untrusted client is told and disconnected,
        // whether or not the DATA would have been accepted, so nothing it
        // sent is read as a message or as commands.
        if pipelined && !self.may_relay() && is_data(line) {
            return Action::Close(reply(
                554,
                Enhanced::new(5, 5, 0),
                "Error: SMTP protocol synchronization (data sent before the 354)",
            ));
        }
        let mut it = line.iter();
        let req = match Request::parse(&mut it) {
            Ok(r) => r,
            Err(e) => return self.parse_error(e),
        };
        match req {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Lhlo { .. } => {
                self.error(reply(500, Enhanced::new(5, 5, 1), "This is SMTP, not LMTP"))
            }
            // DSN (RFC 3461) is not advertised: its parameters are ones we
            // cannot implement, which RFC 5321 4.1.1.11 answers with 555.
            Request::Mail { from } if unadvertised_mail(&from) => self.error(not_offered()),
            Request::Rcpt { to } if unadvertised_rcpt(&to) => self.error(not_offered()),
            // smtp-proto reads `<>` and `<postmaster>` both as "": only the
            // second is a recipient (RFC 5321 4.1.1.3 needs a forward-path).
            Request::Rcpt { to } if to.address.is_empty() && null_path(line) => self.error(reply(
                501,
                Enhanced::new(5, 1, 3),
                "A null path <> is not a recipient",
            )),
            Request::Mail { from } => self.mail(from.address, from.size as u64),
            Request::Rcpt { to } => self.rcpt(to.address),
            Request::Data => self.data(),
            Request::Rset => {
                self.tx = None;
                Action::Reply(reply(250, Enhanced::new(2, 0, 0), "Ok"))
            }
            Request::Noop { .. } => Action::Reply(reply(250, Enhanced::new(2, 0, 0), "Ok")),
            Request::Quit => Action::Close(reply(221, Enhanced::new(2, 0, 0), "Bye")),
            Request::Vrfy { .. } => Action::Reply(reply(
                252,
                Enhanced::new(2, 5, 0),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Request::Help { .. } => Action::Reply(reply(
                214,
                Enhanced::new(2, 0, 0),
                if self.submission() {
                    "Commands: EHLO HELO AUTH MAIL RCPT DATA RSET NOOP QUIT STARTTLS"
                } else {
                    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS"
                },
            )),
            Request::StartTls => {
                if self.tls {
                    self.error(reply(503, Enhanced::new(5, 5, 1), "TLS already active"))
                } else if !self.cfg.tls_available {
                    self.error(reply(502, Enhanced::new(5, 5, 1), "STARTTLS not available"))
                } else if self.tx.is_some() {
                    self.error(reply(
                        503,
                        Enhanced::new(5, 5, 1),
                        "STARTTLS not allowed during a transaction",
                    ))
                } else {
                    Action::StartTls(reply(220, Enhanced::new(2, 0, 0), "Ready to start TLS"))
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response),
            Request::Bdat { .. } => {
                self.error(reply(502, Enhanced::new(5, 5, 1), "CHUNKING not supported"))
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error(reply(
                502,
                Enhanced::new(5, 5, 1),
                "Command not implemented",
            )),
        }
    }

    /// A command line with a bare CR or LF or a NUL in it. Under
    /// `reject`, a bare CR or LF is answered as Postfix's
    /// `smtpd_forbid_bare_newline = reject` does (`550 5.5.2 Error: bare
    /// <LF> received`, then disconnect), so nothing after it is read. Under
    /// `normalize`, a bare LF ends the command like CRLF (the line given
    /// back); a bare CR is never taken as a space or a line end: the line
    /// is refused (500 5.5.2) and the session goes on. A NUL is refused the
    /// same way in both modes. Any of them ends a SASL exchange.
    fn line_fault(&mut self, fault: LineFault, line: &[u8]) -> Result<Vec<u8>, Action> {
        let reject = self.cfg.bare_newline == BareNewline::Reject;
        let refused = match fault {
            LineFault::BareLf if !reject => {
                let mut l = line.strip_suffix(b"\n").unwrap_or(line).to_vec();
                l.extend_from_slice(b"\r\n");
                return Ok(l);
            }
            LineFault::BareLf | LineFault::BareCr if reject => {
                let what = if fault == LineFault::BareLf {
                    "LF"
                } else {
                    "CR"
                };
                return Err(Action::Close(reply(
                    550,
                    Enhanced::new(5, 5, 2),
                    &format!("Error: bare <{what}> received"),
                )));
            }
            LineFault::BareCr => "Bare CR in a command line",
            _ => "NUL in a command line",
        };
        self.sasl = None;
        Err(self.error(reply(500, Enhanced::new(5, 5, 2), refused)))
    }

    fn parse_error(&mut self, e: ProtoError) -> Action {
        let r = match e {
            ProtoError::UnknownCommand => {
                reply(500, Enhanced::new(5, 5, 2), "Command not recognised")
            }
            ProtoError::SyntaxError { syntax } => {
                reply(501, Enhanced::new(5, 5, 4), &format!("Syntax: {syntax}"))
            }
            ProtoError::InvalidSenderAddress => {
                reply(501, Enhanced::new(5, 1, 7), "Bad sender address syntax")
            }
            ProtoError::InvalidRecipientAddress => {
                reply(501, Enhanced::new(5, 1, 3), "Bad recipient address syntax")
            }
            ProtoError::InvalidParameter { param } => reply(
                501,
                Enhanced::new(5, 5, 4),
                &format!("Invalid parameter {}", mail::token(param)),
            ),
            ProtoError::UnsupportedParameter { param } => reply(
                555,
                Enhanced::new(5, 5, 4),
                &format!("Unsupported parameter {}", mail::token(&param)),
            ),
            _ => reply(500, Enhanced::new(5, 5, 2), "Syntax error"),
        };
        self.error(r)
    }

    fn hello(&mut self, host: Cow<'_, str>, esmtp: bool) -> Action {
        self.helo = Some(mail::token(&host));
        self.esmtp = esmtp;
        self.tx = None;
        let host = &self.cfg.hostname;
        if !esmtp {
            return Action::Reply(Reply::plain(250, host).to_bytes());
        }
        let mut caps = vec![
            format!("{host} greets {}", self.ip),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.cfg.tls_available && !self.tls {
            caps.push("STARTTLS".into());
        }
        // RFC 4954 14: never offer a password mechanism in the clear.
        if self.submission() && self.tls {
            caps.push("AUTH PLAIN LOGIN".into());
        }
        let mut out = Vec::new();
        let n = caps.len();
        for (i, c) in caps.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            out.extend(format!("250{sep}{c}\r\n").into_bytes());
        }
        Action::Reply(out)
    }

    fn mail(&mut self, from: Cow<'_, str>, size: u64) -> Action {
        if self.helo.is_none() {
            return self.error(reply(
                503,
                Enhanced::new(5, 5, 1),
                "Send EHLO or HELO first",
            ));
        }
        if self.tx.is_some() {
            return self.error(reply(503, Enhanced::new(5, 5, 1), "Nested MAIL command"));
        }
        if size > self.cfg.max_message_size {
            return Action::Reply(reply(
                552,
                Enhanced::new(5, 3, 4),
                "Message size exceeds fixed maximum",
            ));
        }
        if !from.is_empty() && relay::split(&from).is_none() {
            return self.error(reply(
                501,
                Enhanced::new(5, 1, 7),
                "Bad sender address syntax",
            ));
        }
        if self.submission()
            && let Some(refusal) = self.sender_refusal(&from)
        {
            return self.error(refusal);
        }
        self.pending_mail = Some(Transaction {
            from: from.into_owned(),
            rcpts: Vec::new(),
            declared_size: size,
            sticky: self.session_sticky.clone(),
            hold: None,
            trace: self.connect_trace.iter().cloned().collect(),
        });
        Action::Policy(Check::Mail)
    }

    /// On the submission ports: TLS, then AUTH, then only the user's own
    /// addresses (SPEC "Submission"); trusted networks get no pass here.
    fn sender_refusal(&self, from: &str) -> Option<Vec<u8>> {
        if !self.tls {
            return Some(reply(
                530,
                Enhanced::new(5, 7, 0),
                "Must issue a STARTTLS command first",
            ));
        }
        if self.auth_user.is_none() {
            return Some(reply(
                530,
                Enhanced::new(5, 7, 0),
                "Authentication required",
            ));
        }
        // Users do not send bounces; only Postern does (straight into its queue).
        if from.is_empty() {
            return Some(reply(
                553,
                Enhanced::new(5, 7, 1),
                "The null sender <> is not for authenticated users",
            ));
        }
        if !owns(&self.addresses, from) {
            return Some(reply(
                553,
                Enhanced::new(5, 7, 1),
                &format!("Sender address <{}> is not one of yours", mail::token(from)),
            ));
        }
        None
    }

    /// `AUTH mechanism [initial-response]` (RFC 4954), PLAIN and LOGIN only.
    fn auth(&mut self, mechanism: u64, initial: &str) -> Action {
        if !self.submission() {
            return self.error(reply(
                502,
                Enhanced::new(5, 5, 1),
                "AUTH not available on this port; use submission",
            ));
        }
        if !self.tls {
            return self.error(reply(
                538,
                Enhanced::new(5, 7, 11),
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self.auth_user.is_some() {
            return self.error(reply(503, Enhanced::new(5, 5, 1), "Already authenticated"));
        }
        if self.tx.is_some() {
            return self.error(reply(
                503,
                Enhanced::new(5, 5, 1),
                "AUTH not allowed during a transaction",
            ));
        }
        if !self.esmtp {
            return self.error(reply(503, Enhanced::new(5, 5, 1), "Send EHLO first"));
        }
        if initial.len() > MAX_AUTH_LINE {
            return self.error(reply(
                500,
                Enhanced::new(5, 5, 6),
                "Authentication exchange line is too long",
            ));
        }
        match mechanism {
            AUTH_PLAIN if initial.is_empty() => {
                self.sasl = Some(Sasl::Plain);
                Action::Reply(b"334 \r\n".to_vec())
            }
            AUTH_PLAIN => self.plain(initial),
            AUTH_LOGIN if initial.is_empty() => {
                self.sasl = Some(Sasl::LoginUser);
                Action::Reply(b"334 VXNlcm5hbWU6\r\n".to_vec())
            }
            AUTH_LOGIN => self.login_user(initial),
            _ => self.error(reply(
                504,
                Enhanced::new(5, 5, 4),
                "Unrecognized authentication type; use PLAIN or LOGIN",
            )),
        }
    }

    /// A client line inside a SASL exchange (`state` is what we asked for).
    fn sasl_line(&mut self, state: Sasl, line: &[u8]) -> Action {
        let text = line.strip_suffix(b"\r\n").unwrap_or(line).trim_ascii();
        if text.len() > MAX_AUTH_LINE {
            return self.error(reply(
                500,
                Enhanced::new(5, 5, 6),
                "Authentication exchange line is too long",
            ));
        }
        if text == b"*" {
            return self.error(reply(
                501,
                Enhanced::new(5, 7, 0),
                "Authentication cancelled",
            ));
        }
        let Ok(text) = std::str::from_utf8(text) else {
            return self.bad_base64();
        };
        match state {
            Sasl::Plain => self.plain(text),
            Sasl::LoginUser => self.login_user(text),
            Sasl::LoginPass(login) => match decode(text) {
                Some(password) => Action::Auth(Credentials { login, password }),
                None => self.bad_base64(),
            },
        }
    }

    /// A PLAIN message: `authzid NUL authcid NUL password` (RFC 4616).
    fn plain(&mut self, b64: &str) -> Action {
        let Some(msg) = decode(b64) else {
            return self.bad_base64();
        };
        let mut parts = msg.split('\0');
        let (Some(authz), Some(login), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error(reply(
                501,
                Enhanced::new(5, 5, 2),
                "Malformed PLAIN credentials",
            ));
        };
        // Acting for another identity is not something users may do here.
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(login) {
            return self.auth_result(None);
        }
        Action::Auth(Credentials {
            login: login.to_string(),
            password: password.to_string(),
        })
    }

    /// The username of AUTH LOGIN; asks for the password.
    fn login_user(&mut self, b64: &str) -> Action {
        let Some(login) = decode(b64) else {
            return self.bad_base64();
        };
        self.sasl = Some(Sasl::LoginPass(login));
        Action::Reply(b"334 UGFzc3dvcmQ6\r\n".to_vec())
    }

    fn bad_base64(&mut self) -> Action {
        self.error(reply(
            501,
            Enhanced::new(5, 5, 2),
            "Invalid base64 data in AUTH",
        ))
    }

    /// The shell checked the credentials of [`Action::Auth`]: `account` is
    /// who they belong to, `None` for a wrong login or password.
    pub(crate) fn auth_result(&mut self, account: Option<Account>) -> Action {
        match account {
            Some(a) => {
                self.auth_user = Some(a.login);
                self.addresses = a.addresses;
                Action::Reply(reply(
                    235,
                    Enhanced::new(2, 7, 0),
                    "Authentication successful",
                ))
            }
            None => {
                self.auth_failures += 1;
                let refused = reply(
                    535,
                    Enhanced::new(5, 7, 8),
                    "Authentication credentials invalid",
                );
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    let mut b = refused;
                    b.extend(reply(
                        421,
                        Enhanced::new(4, 7, 0),
                        "Too many failed authentications, closing connection",
                    ));
                    return Action::Close(b);
                }
                Action::Reply(refused)
            }
        }
    }

    /// The login budget refused the AUTH unchecked: `454 4.7.0` (RFC 4954:
    /// temporary authentication failure), so a client retries later; it
    /// counts as a failure of this session, which ends after a few.
    pub(crate) fn auth_refused(&mut self) -> Action {
        self.auth_failures += 1;
        let mut b = reply(
            454,
            Enhanced::new(4, 7, 0),
            "Too many failed authentications from your address; try again later",
        );
        if self.auth_failures >= MAX_AUTH_FAILURES {
            b.extend(reply(
                421,
                Enhanced::new(4, 7, 0),
                "Too many failed authentications, closing connection",
            ));
            return Action::Close(b);
        }
        Action::Reply(b)
    }

    /// Notes that the transaction went over a `hold` rate limit at `check`.
    pub(crate) fn hold(&mut self, check: &Check, limit: String) {
        let tx = match check {
            Check::Mail => self.pending_mail.as_mut(),
            Check::Rcpt(_) => self.tx.as_mut(),
        };
        if let Some(tx) = tx {
            tx.hold.get_or_insert(limit);
        }
    }

    fn rcpt(&mut self, to: Cow<'_, str>) -> Action {
        let may_relay = self.may_relay();
        let max = self.cfg.max_recipients;
        let postmaster = self
            .cfg
            .relay
            .domains
            .first()
            .map(|d| format!("postmaster@{d}"));
        let Some(tx) = self.tx.as_mut() else {
            return self.error(reply(503, Enhanced::new(5, 5, 1), "Need MAIL before RCPT"));
        };
        if tx.rcpts.len() >= max {
            return Action::Reply(reply(452, Enhanced::new(4, 5, 3), "Too many recipients"));
        }
        // smtp-proto turns the bare `<postmaster>` (RFC 5321 4.1.1.3) into "".
        let address = if to.is_empty() {
            match postmaster {
                Some(p) => p,
                None => {
                    return self.error(reply(550, Enhanced::new(5, 1, 1), "No postmaster here"));
                }
            }
        } else {
            to.into_owned()
        };
        match relay::decide(&self.cfg.relay, &address, may_relay) {
            RcptDecision::Local | RcptDecision::Outbound
                if tx
                    .rcpts
                    .iter()
                    .any(|r| r.address.eq_ignore_ascii_case(&address)) =>
            {
                Action::Reply(reply(
                    250,
                    Enhanced::new(2, 1, 5),
                    "Ok (duplicate recipient)",
                ))
            }
            d @ (RcptDecision::Local | RcptDecision::Outbound) => {
                Action::Policy(Check::Rcpt(Rcpt {
                    address,
                    local: d == RcptDecision::Local,
                }))
            }
            RcptDecision::Refuse(r) => {
                self.verdict = Some(("reject", "rcpt"));
                self.error(r.to_bytes())
            }
        }
    }

    fn data(&mut self) -> Action {
        match &self.tx {
            None => self.error(reply(503, Enhanced::new(5, 5, 1), "Need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => {
                self.error(reply(554, Enhanced::new(5, 5, 1), "No valid recipients"))
            }
            Some(_) => {
                Action::Data(Reply::plain(354, "End data with <CR><LF>.<CR><LF>").to_bytes())
            }
        }
    }

    /// What the rules see for `check` (or, with `None`, for the message).
    pub(crate) fn tx_info(&self, check: Option<&Check>) -> TxInfo {
        let tx = match check {
            Some(Check::Mail) => self.pending_mail.as_ref(),
            _ => self.tx.as_ref(),
        };
        TxInfo {
            conn: self.conn_info(),
            helo: self.helo.clone().unwrap_or_default(),
            from: tx.map(|t| t.from.clone()).unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            rcpts: tx
                .map(|t| t.rcpts.iter().map(|r| r.address.clone()).collect())
                .unwrap_or_default(),
            submission: self.kind != ListenerKind::Relay,
            trusted: self.may_relay(),
        }
    }

    pub(crate) fn conn_info(&self) -> ConnInfo {
        ConnInfo {
            ip: self.ip,
            port: self.port,
            tls: self.tls,
        }
    }

    /// The rules decided on a MAIL or RCPT: finish the command.
    pub(crate) fn policy_answer(&mut self, check: Check, d: Decision) -> Action {
        let stage = match check {
            Check::Mail => "mail",
            Check::Rcpt(_) => "rcpt",
        };
        if !d.trace.calls.is_empty() {
            let tx = match check {
                Check::Mail => self.pending_mail.as_mut(),
                Check::Rcpt(_) => self.tx.as_mut(),
            };
            if let Some(tx) = tx {
                tx.trace.push(d.trace.clone());
            }
        }
        match d.verdict {
            Some(Verdict::Reject(r)) | Some(Verdict::Tempfail(r)) => {
                self.verdict = Some((if r.code >= 500 { "reject" } else { "tempfail" }, stage));
                if matches!(check, Check::Mail) {
                    self.pending_mail = None;
                }
                Action::Reply(r.to_bytes())
            }
            other => {
                let sticky = match other {
                    Some(v @ (Verdict::Quarantine { .. } | Verdict::Discard)) => {
                        self.verdict = Some((v.word(), stage));
                        Some((v, d.script))
                    }
                    Some(Verdict::Accept) => {
                        self.verdict = Some(("accept", stage));
                        None
                    }
                    _ => None,
                };
                match check {
                    Check::Mail => {
                        let mut tx = self.pending_mail.take().unwrap_or_default();
                        if sticky.is_some() {
                            tx.sticky = sticky;
                        }
                        self.tx = Some(tx);
                        Action::Reply(reply(250, Enhanced::new(2, 1, 0), "Ok"))
                    }
                    // Only mail from outside: its sender may be forged, so a
                    // later bounce would be backscatter. Trusted and
                    // authenticated clients keep queueing while the
                    // backend is down.
                    Check::Rcpt(r)
                        if r.local
                            && !self.may_relay()
                            && self.cfg.relay.verify_recipients != VerifyRecipients::Off =>
                    {
                        let address = r.address.clone();
                        self.pending_rcpt = Some((r, sticky));
                        Action::Verify(address)
                    }
                    Check::Rcpt(r) => match self.tx.as_mut() {
                        Some(tx) => {
                            if sticky.is_some() && tx.sticky.is_none() {
                                tx.sticky = sticky;
                            }
                            tx.rcpts.push(r);
                            Action::Reply(reply(250, Enhanced::new(2, 1, 5), "Ok"))
                        }
                        None => Action::Reply(reply(
                            503,
                            Enhanced::new(5, 5, 1),
                            "Need MAIL before RCPT",
                        )),
                    },
                }
            }
        }
    }

    /// The shell verified the recipient of [`Action::Verify`]: add it, or
    /// refuse it (550 5.1.1 unknown, 451 4.4.3 when nobody could say).
    pub(crate) fn verify_answer(&mut self, answer: Verified) -> Action {
        let Some((r, sticky)) = self.pending_rcpt.take() else {
            return Action::Reply(reply(503, Enhanced::new(5, 5, 1), "No recipient pending"));
        };
        match answer {
            Verified::Known => match self.tx.as_mut() {
                Some(tx) => {
                    if sticky.is_some() && tx.sticky.is_none() {
                        tx.sticky = sticky;
                    }
                    tx.rcpts.push(r);
                    Action::Reply(reply(250, Enhanced::new(2, 1, 5), "Ok"))
                }
                None => Action::Reply(reply(503, Enhanced::new(5, 5, 1), "Need MAIL before RCPT")),
            },
            Verified::Unknown => {
                self.verdict = Some(("reject", "rcpt"));
                let text = format!(
                    "<{}>: Recipient address rejected: user unknown",
                    mail::token(&r.address)
                );
                self.error(reply(550, Enhanced::new(5, 1, 1), &text))
            }
            Verified::Unavailable => {
                self.verdict = Some(("tempfail", "rcpt"));
                Action::Reply(reply(
                    451,
                    Enhanced::new(4, 4, 3),
                    "Recipient verification unavailable, try again later",
                ))
            }
        }
    }

    /// The message has been read (or refused); the transaction is over either way.
    pub(crate) fn take_transaction(&mut self) -> Option<Transaction> {
        self.tx.take()
    }

    /// The `with` word of the Received header (RFC 3848).
    pub(crate) fn protocol(&self) -> &'static str {
        match (self.esmtp, self.tls, self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        }
    }

    /// The trace header prepended to every accepted message (RFC 5321 4.4),
    /// stamped `now` (the clock is the caller's, so tests can fix it).
    pub(crate) fn received_header(
        &self,
        id: &str,
        tx: &Transaction,
        now: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let ip = match self.ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        // The EHLO name is the client's to choose. We accept any (as
        // Postfix does unless reject_invalid_helo_hostname is set: real
        // senders say odd things, and rules see the name as given), but
        // only a domain or address literal is written as the From-domain;
        // anything else goes into a comment with `(`, `)`, `\` and `;`
        // replaced, so `EHLO x; Tue, 1 Jan 2030` cannot end the clause
        // early and supply its own date.
        let from = match self.helo.as_deref() {
            Some(h) if helo_is_domain(h) => format!("{h} ([{ip}])"),
            Some(h) => {
                let safe: String = h
                    .chars()
                    .map(|c| if "()\\;".contains(c) { '?' } else { c })
                    .collect();
                format!("[{ip}] (helo={safe})")
            }
            None => format!("unknown ([{ip}])"),
        };
        let for_clause = match tx.rcpts.as_slice() {
            [one] => format!("\r\n\tfor <{}>", mail::token(&one.address)),
            _ => String::new(),
        };
        // Hidden by default: the login is half a password guess.
        let auth = match &self.auth_user {
            Some(login) if self.cfg.received_auth_user => {
                let safe: String = mail::token(login)
                    .chars()
                    .map(|c| if "()\\".contains(c) { '?' } else { c })
                    .collect();
                format!("\r\n\t(authenticated as {safe})")
            }
            _ => String::new(),
        };
        format!(
            "Received: from {from}{auth}\r\n\tby {} (Postern) with {} id {id}{for_clause};\r\n\t{}\r\n",
            self.cfg.hostname,
            self.protocol(),
            now.to_rfc2822()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(trusted: bool) -> Session {
        let cfg = SessionConfig {
            hostname: "mx.test".into(),
            relay: RelayConfig {
                domains: vec!["local.test".into()],
                networks: if trusted {
                    vec!["127.0.0.0/8".parse().unwrap()]
                } else {
                    vec![]
                },
                verify_recipients: crate::config::VerifyRecipients::Off,
                recipients: Default::default(),
            },
            max_message_size: 1000,
            max_recipients: 2,
            tls_available: true,
            received_auth_user: false,
            bare_newline: BareNewline::Reject,
        };
        Session::new(
            Arc::new(cfg),
            ListenerKind::Relay,
            "127.0.0.1:4000".parse().unwrap(),
            false,
        )
    }

    /// Run a command, answering any policy question with "no objection".
    fn cmd(s: &mut Session, line: &[u8]) -> Action {
        match s.command(line) {
            Action::Policy(c) => s.policy_answer(c, Decision::pass()),
            a => a,
        }
    }

    fn text(a: Action) -> String {
        match a {
            Action::Reply(b) | Action::StartTls(b) | Action::Data(b) | Action::Close(b) => {
                String::from_utf8(b).unwrap()
            }
            Action::Policy(c) => format!("policy {c:?}"),
            Action::Auth(c) => format!("auth {c:?}"),
            Action::Verify(a) => format!("verify {a}"),
        }
    }

    #[test]
    fn a_local_recipient_is_verified_after_the_rules() {
        let mut s = session(false);
        Arc::make_mut(&mut s.cfg).relay.verify_recipients = VerifyRecipients::Backend;
        cmd(&mut s, b"EHLO c.test\r\n");
        assert!(text(cmd(&mut s, b"MAIL FROM:<a@far.test>\r\n")).starts_with("250"));
        let a = cmd(&mut s, b"RCPT TO:<Ghost@local.test>\r\n");
        assert_eq!(a, Action::Verify("Ghost@local.test".into()));
        let r = text(s.verify_answer(Verified::Unknown));
        assert_eq!(
            r,
            "550 5.1.1 <Ghost@local.test>: Recipient address rejected: user unknown\r\n"
        );
        assert!(matches!(
            cmd(&mut s, b"RCPT TO:<bob@local.test>\r\n"),
            Action::Verify(_)
        ));
        assert!(text(s.verify_answer(Verified::Unavailable)).starts_with("451 4.4.3 "));
        assert!(matches!(
            cmd(&mut s, b"RCPT TO:<bob@local.test>\r\n"),
            Action::Verify(_)
        ));
        assert!(text(s.verify_answer(Verified::Known)).starts_with("250 2.1.5"));
        // Only bob was taken.
        assert_eq!(s.tx_info(None).rcpts, vec!["bob@local.test".to_string()]);
        // An answer nobody asked for changes nothing.
        assert!(text(s.verify_answer(Verified::Known)).starts_with("503"));
        // A trusted client is not asked about (its bounces are not backscatter).
        let mut t = session(true);
        Arc::make_mut(&mut t.cfg).relay.verify_recipients = VerifyRecipients::Backend;
        cmd(&mut t, b"EHLO c.test\r\n");
        cmd(&mut t, b"MAIL FROM:<a@far.test>\r\n");
        assert!(text(cmd(&mut t, b"RCPT TO:<x@local.test>\r\n")).starts_with("250"));
    }

    #[test]
    fn transaction_flow_and_null_sender() {
        let mut s = session(false);
        assert!(text(cmd(&mut s, b"EHLO c.test\r\n")).contains("PIPELINING"));
        assert!(text(cmd(&mut s, b"MAIL FROM:<> SIZE=10\r\n")).starts_with("250"));
        assert!(text(cmd(&mut s, b"RCPT TO:<a@local.test>\r\n")).starts_with("250"));
        assert!(text(cmd(&mut s, b"RCPT TO:<a@other.test>\r\n")).starts_with("550 5.7.1"));
        assert!(matches!(cmd(&mut s, b"DATA\r\n"), Action::Data(_)));
        let tx = s.take_transaction().unwrap();
        assert_eq!(tx.from, "");
        assert_eq!(tx.rcpts.len(), 1);
        assert!(text(cmd(&mut s, b"MAIL FROM:<x@y.test>\r\n")).starts_with("250"));
    }

    #[test]
    fn limits_and_order() {
        let mut s = session(true);
        assert!(text(cmd(&mut s, b"MAIL FROM:<a@b.test>\r\n")).starts_with("503"));
        cmd(&mut s, b"HELO c\r\n");
        assert!(text(cmd(&mut s, b"MAIL FROM:<a@b.test> SIZE=5000\r\n")).starts_with("552"));
        assert!(text(cmd(&mut s, b"RCPT TO:<a@b.test>\r\n")).starts_with("503"));
        cmd(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert!(text(cmd(&mut s, b"RCPT TO:<a@x.test>\r\n")).starts_with("250"));
        assert!(text(cmd(&mut s, b"RCPT TO:<b@x.test>\r\n")).starts_with("250"));
        assert!(text(cmd(&mut s, b"RCPT TO:<c@x.test>\r\n")).starts_with("452"));
        assert!(text(cmd(&mut s, b"FOO\r\n")).starts_with("500"));
        assert!(matches!(cmd(&mut s, b"QUIT\r\n"), Action::Close(_)));
    }

    #[test]
    fn quoted_and_routed_tricks_refused() {
        let mut s = session(false);
        cmd(&mut s, b"EHLO c\r\n");
        cmd(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        for t in [
            &b"RCPT TO:<\"user@other.test\"@local.test>\r\n"[..],
            b"RCPT TO:<@local.test:user@other.test>\r\n",
            b"RCPT TO:<user%other.test@local.test>\r\n",
            b"RCPT TO:<user@[127.0.0.1]>\r\n",
        ] {
            let r = text(cmd(&mut s, t));
            assert!(r.starts_with('5'), "{} -> {r}", String::from_utf8_lossy(t));
        }
        assert!(s.tx.as_ref().unwrap().rcpts.is_empty());
    }

    fn session_with(bare: BareNewline, trusted: bool) -> Session {
        let mut cfg = session(trusted).cfg.as_ref().clone();
        cfg.bare_newline = bare;
        Session::new(
            Arc::new(cfg),
            ListenerKind::Relay,
            "127.0.0.1:4000".parse().unwrap(),
            false,
        )
    }

    #[test]
    fn bare_newlines_in_commands_under_reject_close() {
        for line in [
            &b"EHLO c\n"[..],
            b"EHLO c\rMAIL FROM:<a@b.test>\r\n",
            b"RSET\r\r\n",
        ] {
            let mut s = session_with(BareNewline::Reject, false);
            let a = s.command(line);
            assert!(
                matches!(&a, Action::Close(b) if b.starts_with(b"550 5.5.2")),
                "{line:?}: {a:?}"
            );
        }
        // NUL is no line end: refused, the session goes on.
        let mut s = session_with(BareNewline::Reject, false);
        assert!(text(s.command(b"EHLO c\0x\r\n")).starts_with("500 5.5.2"));
        assert!(text(s.command(b"EHLO c\r\n")).starts_with("250"));
    }

    #[test]
    fn bare_newlines_in_commands_under_normalize() {
        let mut s = session_with(BareNewline::Normalize, false);
        // A bare LF ends the command.
        assert!(text(s.command(b"EHLO c\n")).starts_with("250"));
        assert!(text(cmd(&mut s, b"MAIL FROM:<a@b.test>\n")).starts_with("250"));
        // A bare CR is never a space: `RCPT TO:<x>\rRCPT TO:<y>` is one refused line.
        let r = text(s.command(b"RCPT TO:<a@local.test>\rRCPT TO:<b@local.test>\r\n"));
        assert!(r.starts_with("500 5.5.2"), "{r}");
        assert!(s.tx.as_ref().unwrap().rcpts.is_empty());
        assert!(text(cmd(&mut s, b"RCPT TO:<a@local.test>\n")).starts_with("250"));
    }

    #[test]
    fn data_pipelined_before_354_closes_untrusted_clients() {
        for trusted in [false, true] {
            let mut s = session(trusted);
            cmd(&mut s, b"EHLO c\r\n");
            cmd(&mut s, b"MAIL FROM:<a@b.test>\r\n");
            // MAIL and RCPT pipelined (RFC 2920) are fine.
            assert!(matches!(
                s.command_with(b"RCPT TO:<a@local.test>\r\n", true),
                Action::Policy(_)
            ));
            s.policy_answer(
                Check::Rcpt(Rcpt {
                    address: "a@local.test".into(),
                    local: true,
                }),
                Decision::pass(),
            );
            let a = s.command_with(b"DATA\r\n", true);
            if trusted {
                assert!(matches!(a, Action::Data(_)), "{a:?}");
            } else {
                assert!(
                    matches!(&a, Action::Close(b) if b.starts_with(b"554 5.5.0")),
                    "{a:?}"
                );
            }
        }
        // Also when the DATA would be refused: the data is never read as commands.
        let mut s = session(false);
        cmd(&mut s, b"EHLO c\r\n");
        assert!(matches!(
            s.command_with(b"data\r\n", true),
            Action::Close(_)
        ));
    }

    #[test]
    fn received_writes_only_a_domain_as_the_from_domain() {
        for (helo, from) in [
            (
                "mail_1.example.test",
                "from mail_1.example.test ([127.0.0.1])",
            ),
            ("localhost", "from localhost ([127.0.0.1])"),
            ("[192.0.2.1]", "from [192.0.2.1] ([127.0.0.1])"),
            (
                "x;?Tue,?1?Jan?2030",
                "from [127.0.0.1] (helo=x??Tue,?1?Jan?2030)",
            ),
            ("a(b)\\c", "from [127.0.0.1] (helo=a?b??c)"),
        ] {
            let mut s = session(false);
            cmd(&mut s, format!("EHLO {helo}\r\n").as_bytes());
            let h = s.received_header("ID", &Transaction::default(), chrono::Utc::now());
            assert!(
                h.starts_with(&format!("Received: {from}\r\n")),
                "{helo}: {h}"
            );
        }
    }

    #[test]
    fn errors_eventually_close() {
        let mut s = session(false);
        let mut closed = false;
        for _ in 0..MAX_ERRORS {
            if let Action::Close(_) = cmd(&mut s, b"BOGUS\r\n") {
                closed = true;
            }
        }
        assert!(closed);
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn session() -> Session {
        let cfg = SessionConfig {
            hostname: "mx.test".into(),
            relay: RelayConfig {
                domains: vec!["local.test".into()],
                networks: vec![],
                verify_recipients: crate::config::VerifyRecipients::Off,
                recipients: Default::default(),
            },
            max_message_size: 1000,
            max_recipients: 5,
            tls_available: false,
            received_auth_user: false,
            bare_newline: BareNewline::Reject,
        };
        Session::new(
            Arc::new(cfg),
            ListenerKind::Relay,
            "192.0.2.1:4000".parse().unwrap(),
            false,
        )
    }

    #[test]
    fn connect_verdicts_greet_refuse_or_stick() {
        let mut s = session();
        let d = |v| Decision {
            verdict: Some(v),
            script: Some("00-x.rhai".into()),
            function: Some("connect".into()),
            ..Decision::default()
        };
        assert!(
            matches!(s.connected(Decision::pass()), Action::Reply(g) if g.starts_with(b"220 mx.test"))
        );
        let tempfail = Verdict::Tempfail(Reply::new(451, Enhanced::new(4, 7, 0), "busy"));
        // RFC 5321 3.8: a tempfail at connect is 421 and a close.
        assert_eq!(
            s.connected(d(tempfail)),
            Action::Close(b"421 4.7.0 busy\r\n".to_vec())
        );
        assert_eq!(s.take_verdict(), Some(("tempfail", "connect")));
        let reject = Verdict::Reject(Reply::new(554, Enhanced::new(5, 7, 1), "go away"));
        assert!(matches!(s.connected(d(reject)), Action::Close(b) if b.starts_with(b"554 5.7.1")));
        let mut s = session();
        let q = Verdict::Quarantine {
            reason: "listed".into(),
        };
        assert!(matches!(s.connected(d(q)), Action::Reply(_)));
        s.command(b"HELO c\r\n");
        let Action::Policy(c) = s.command(b"MAIL FROM:<a@b.test>\r\n") else {
            panic!()
        };
        s.policy_answer(c, Decision::pass());
        assert!(matches!(
            s.tx.as_ref().and_then(|t| t.sticky.as_ref()),
            Some((Verdict::Quarantine { .. }, Some(sc))) if sc == "00-x.rhai"
        ));
    }

    #[test]
    fn reject_at_mail_leaves_no_transaction() {
        let mut s = session();
        s.command(b"HELO c\r\n");
        let Action::Policy(c) = s.command(b"MAIL FROM:<a@b.test>\r\n") else {
            panic!()
        };
        assert_eq!(s.tx_info(Some(&c)).from, "a@b.test");
        let d = Decision {
            verdict: Some(Verdict::Tempfail(crate::mail::Reply::new(
                450,
                crate::mail::Enhanced::new(4, 7, 1),
                "slow down",
            ))),
            script: None,
            function: None,
            ..Decision::default()
        };
        assert_eq!(
            s.policy_answer(c, d),
            Action::Reply(reply(450, Enhanced::new(4, 7, 1), "slow down"))
        );
        assert!(s.tx.is_none());
        assert_eq!(s.verdict, Some(("tempfail", "mail")));
    }

    #[test]
    fn quarantine_at_rcpt_sticks_to_the_transaction() {
        let mut s = session();
        s.command(b"HELO c\r\n");
        let Action::Policy(c) = s.command(b"MAIL FROM:<a@b.test>\r\n") else {
            panic!()
        };
        s.policy_answer(c, Decision::pass());
        let Action::Policy(c) = s.command(b"RCPT TO:<x@local.test>\r\n") else {
            panic!()
        };
        let d = Decision {
            verdict: Some(Verdict::Quarantine {
                reason: "looks odd".into(),
            }),
            script: Some("50-x.rhai".into()),
            function: Some("rcpt".into()),
            ..Decision::default()
        };
        assert!(matches!(s.policy_answer(c, d), Action::Reply(r) if r.starts_with(b"250")));
        let tx = s.tx.as_ref().unwrap();
        assert_eq!(tx.rcpts.len(), 1);
        assert!(
            matches!(tx.sticky, Some((Verdict::Quarantine { .. }, Some(ref sc))) if sc == "50-x.rhai")
        );
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;
    use crate::mailbox::accounts::Role;

    fn session(kind: ListenerKind, tls: bool, show_login: bool) -> Session {
        let cfg = SessionConfig {
            hostname: "mx.test".into(),
            relay: RelayConfig {
                domains: vec!["local.test".into()],
                networks: vec!["127.0.0.0/8".parse().unwrap()],
                verify_recipients: crate::config::VerifyRecipients::Off,
                recipients: Default::default(),
            },
            max_message_size: 1000,
            max_recipients: 5,
            tls_available: true,
            received_auth_user: show_login,
            bare_newline: BareNewline::Reject,
        };
        Session::new(Arc::new(cfg), kind, "127.0.0.1:4000".parse().unwrap(), tls)
    }

    fn text(a: Action) -> String {
        match a {
            Action::Reply(b) | Action::Close(b) => String::from_utf8(b).unwrap(),
            other => format!("{other:?}"),
        }
    }

    fn alice() -> Account {
        Account {
            login: "alice@local.test".into(),
            addresses: vec!["alice@local.test".into()],
            role: Role::User,
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn before_tls_no_auth_and_no_mail() {
        let mut s = session(ListenerKind::Submission, false, false);
        let ehlo = text(s.command(b"EHLO c\r\n"));
        assert!(
            ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
            "{ehlo}"
        );
        assert!(text(s.command(b"AUTH PLAIN AGEAYg==\r\n")).starts_with("538 5.7.11"));
        // Trusted network or not: 530.
        assert!(text(s.command(b"MAIL FROM:<a@local.test>\r\n")).starts_with("530 5.7.0"));
        s.tls_started();
        let ehlo = text(s.command(b"EHLO c\r\n"));
        assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
        assert!(
            text(s.command(b"MAIL FROM:<a@local.test>\r\n")).contains("Authentication required")
        );
    }

    #[test]
    fn authenticated_users_may_pipeline_data_and_a_bare_cr_ends_sasl() {
        let mut cfg = session(ListenerKind::Submissions, true, false)
            .cfg
            .as_ref()
            .clone();
        cfg.relay.networks.clear();
        let new = || {
            Session::new(
                Arc::new(cfg.clone()),
                ListenerKind::Submissions,
                "192.0.2.7:4000".parse().unwrap(),
                true,
            )
        };
        let mut s = new();
        s.command(b"EHLO c\r\n");
        s.auth_result(Some(alice()));
        let Action::Policy(c) = s.command(b"MAIL FROM:<alice@local.test>\r\n") else {
            panic!("MAIL")
        };
        s.policy_answer(c, Decision::pass());
        let Action::Policy(c) = s.command(b"RCPT TO:<x@far.test>\r\n") else {
            panic!("RCPT")
        };
        s.policy_answer(c, Decision::pass());
        assert!(matches!(s.command_with(b"DATA\r\n", true), Action::Data(_)));
        // Before AUTH the same client is refused and disconnected.
        let mut s = new();
        s.command(b"EHLO c\r\n");
        assert!(matches!(
            s.command_with(b"DATA\r\n", true),
            Action::Close(_)
        ));
        // A bare CR in an AUTH continuation line closes (reject mode).
        let mut s = new();
        s.command(b"EHLO c\r\n");
        assert_eq!(text(s.command(b"AUTH LOGIN\r\n")), "334 VXNlcm5hbWU6\r\n");
        assert!(text(s.command(b"YWxpY2U=\rQUIT\r\n")).starts_with("550 5.5.2"));
    }

    #[test]
    fn plain_login_binding_and_errors() {
        let mut s = session(ListenerKind::Submissions, true, false);
        assert!(
            text(s.command(b"AUTH PLAIN\r\n")).starts_with("503"),
            "EHLO first"
        );
        s.command(b"EHLO c\r\n");
        assert!(text(s.command(b"AUTH X-UNKNOWN\r\n")).starts_with("504 5.5.4"));
        assert!(text(s.command(b"AUTH PLAIN %%%\r\n")).starts_with("501 5.5.2"));
        assert!(text(s.command(b"AUTH PLAIN =\r\n")).starts_with("501 5.5.2"));
        assert_eq!(text(s.command(b"AUTH LOGIN\r\n")), "334 VXNlcm5hbWU6\r\n");
        assert!(text(s.command(b"*\r\n")).starts_with("501"));
        let long = format!("AUTH PLAIN {}\r\n", "A".repeat(MAX_AUTH_LINE + 4));
        assert!(text(s.command(long.as_bytes())).starts_with("500 5.5.6"));
        // PLAIN in a continuation; the password never shows in Debug.
        assert_eq!(text(s.command(b"AUTH PLAIN\r\n")), "334 \r\n");
        let line = format!("{}\r\n", b64("\0alice@local.test\0s3cret"));
        let a = s.command(line.as_bytes());
        assert!(!format!("{a:?}").contains("s3cret"));
        assert_eq!(
            a,
            Action::Auth(Credentials {
                login: "alice@local.test".into(),
                password: "s3cret".into()
            })
        );
        assert!(text(s.auth_result(Some(alice()))).starts_with("235 2.7.0"));
        assert!(text(s.command(b"AUTH LOGIN\r\n")).starts_with("503 5.5.1"));
        assert!(text(s.command(b"MAIL FROM:<bob@local.test>\r\n")).starts_with("553 5.7.1"));
        assert!(text(s.command(b"MAIL FROM:<>\r\n")).starts_with("553 5.7.1"));
        assert!(matches!(
            s.command(b"MAIL FROM:<ALICE+x@local.test>\r\n"),
            Action::Policy(Check::Mail)
        ));
        assert_eq!(s.protocol(), "ESMTPSA");
        assert_eq!(
            s.sender_addresses(),
            Some(vec!["alice@local.test".to_string()])
        );
    }

    #[test]
    fn login_with_initial_response_and_three_failures_close() {
        let mut s = session(ListenerKind::Submission, true, false);
        s.command(b"EHLO c\r\n");
        for i in 0..MAX_AUTH_FAILURES {
            let line = format!("AUTH LOGIN {}\r\n", b64("alice@local.test"));
            assert_eq!(text(s.command(line.as_bytes())), "334 UGFzc3dvcmQ6\r\n");
            let pw = format!("{}\r\n", b64("wrong"));
            assert!(matches!(s.command(pw.as_bytes()), Action::Auth(_)));
            match s.auth_result(None) {
                Action::Reply(r) if i + 1 < MAX_AUTH_FAILURES => {
                    assert!(r.starts_with(b"535 5.7.8"))
                }
                Action::Close(r) => {
                    assert_eq!(i + 1, MAX_AUTH_FAILURES);
                    assert!(String::from_utf8(r).unwrap().contains("421 4.7.0"));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_long_line_ends_the_exchange() {
        let mut s = session(ListenerKind::Submission, true, false);
        s.command(b"EHLO c\r\n");
        s.command(b"AUTH LOGIN\r\n");
        assert!(s.line_too_long().starts_with(b"500 5.5.6"));
        // The next line is a command again, not a SASL answer.
        assert!(text(s.command(b"NOOP\r\n")).starts_with("250"));
    }

    #[test]
    fn relay_port_never_authenticates() {
        let mut s = session(ListenerKind::Relay, true, false);
        let ehlo = text(s.command(b"EHLO c\r\n"));
        assert!(!ehlo.contains("AUTH"), "{ehlo}");
        assert!(text(s.command(b"AUTH PLAIN AGEAYg==\r\n")).starts_with("502"));
    }

    #[test]
    fn received_hides_the_login_unless_asked() {
        for show in [false, true] {
            let mut s = session(ListenerKind::Submission, true, show);
            s.command(b"EHLO c\r\n");
            s.auth_result(Some(alice()));
            let tx = Transaction {
                from: "alice@local.test".into(),
                ..Transaction::default()
            };
            let h = s.received_header("ID", &tx, chrono::Utc::now());
            assert!(h.contains("with ESMTPSA"), "{h}");
            assert_eq!(
                h.contains("(authenticated as alice@local.test)"),
                show,
                "{h}"
            );
        }
    }

    /// Random command lines (AUTH in every form, with random base64 and
    /// raw bytes, mixed with the other commands) never panic the session,
    /// and every reply is a well-formed SMTP reply.
    #[test]
    fn property_random_commands_and_auth_exchanges() {
        use crate::testing::{Rng, scaled};
        let (rounds, seed) = scaled(3000, 0x5eed_a07d_0000_0001);
        let mut rng = Rng(seed);
        let words: [&[u8]; 14] = [
            b"EHLO c",
            b"HELO c",
            b"AUTH PLAIN",
            b"AUTH LOGIN",
            b"AUTH CRAM-MD5",
            b"AUTH",
            b"MAIL FROM:<alice@local.test>",
            b"MAIL FROM:<>",
            b"RCPT TO:<x@far.test>",
            b"RCPT TO:<bob@local.test>",
            b"RSET",
            b"NOOP",
            b"*",
            b"DATA",
        ];
        let b64 = base64::engine::general_purpose::STANDARD;
        for round in 0..rounds {
            let kind = [
                ListenerKind::Relay,
                ListenerKind::Submission,
                ListenerKind::Submissions,
            ][rng.below(3)];
            let mut s = session(kind, rng.below(2) == 0, rng.below(2) == 0);
            for _ in 0..rng.below(12) {
                let mut line: Vec<u8> = match rng.below(4) {
                    0 => words[rng.below(words.len())].to_vec(),
                    1 => {
                        // A word plus a base64 argument of random bytes.
                        let raw: Vec<u8> = (0..rng.below(40))
                            .map(|_| rng.pick(b"\0a@.:\xff "))
                            .collect();
                        let mut l = words[rng.below(words.len())].to_vec();
                        l.push(b' ');
                        l.extend_from_slice(base64::Engine::encode(&b64, raw).as_bytes());
                        l
                    }
                    2 => {
                        // A bare SASL answer: base64 of user\0pass shapes, or junk.
                        let raw: Vec<u8> = (0..rng.below(30))
                            .map(|_| rng.pick(b"\0alice@local.test"))
                            .collect();
                        base64::Engine::encode(&b64, raw).into_bytes()
                    }
                    _ => (0..rng.below(60))
                        .map(|_| rng.pick(b"AUTH PLAIN=+/\0\r\n\xff:<>@"))
                        .collect(),
                };
                line.extend_from_slice(b"\r\n");
                let action = s.command(&line);
                let action = match action {
                    Action::Auth(_) => {
                        let who = (rng.below(2) == 0).then(alice);
                        s.auth_result(who)
                    }
                    Action::Policy(check) => s.policy_answer(check, Decision::default()),
                    other => other,
                };
                match action {
                    Action::Reply(r) | Action::Close(r) | Action::StartTls(r) | Action::Data(r) => {
                        let ok = r.len() >= 5
                            && r[..3].iter().all(u8::is_ascii_digit)
                            && (r[3] == b' ' || r[3] == b'-')
                            && r.ends_with(b"\r\n");
                        assert!(
                            ok,
                            "round {round}: {:?} -> {:?}",
                            String::from_utf8_lossy(&line),
                            String::from_utf8_lossy(&r)
                        );
                    }
                    Action::Auth(_) | Action::Policy(_) | Action::Verify(_) => {}
                }
                if rng.below(8) == 0 {
                    let _ = s.line_too_long();
                }
            }
        }
    }

    #[test]
    fn null_recipient_and_dsn_parameters_are_refused() {
        let mut s = session(ListenerKind::Relay, false, false);
        s.command(b"EHLO c\r\n");
        assert!(matches!(
            s.command(b"MAIL FROM:<a@far.test>\r\n"),
            Action::Policy(Check::Mail)
        ));
        s.policy_answer(Check::Mail, Decision::default());
        // RFC 5321 4.1.1.3: a forward-path is never null.
        assert!(text(s.command(b"RCPT TO:<>\r\n")).starts_with("501 5.1.3"));
        assert!(text(s.command(b"RCPT TO: <>\r\n")).starts_with("501 5.1.3"));
        // <postmaster> is a recipient.
        assert!(matches!(
            s.command(b"RCPT TO:<postmaster>\r\n"),
            Action::Policy(Check::Rcpt(_))
        ));
        // DSN is not advertised: 555 for its parameters (RFC 5321 4.1.1.11).
        for line in [
            &b"RCPT TO:<bob@local.test> NOTIFY=SUCCESS,FAILURE\r\n"[..],
            b"RCPT TO:<bob@local.test> NOTIFY=NEVER\r\n",
            b"RCPT TO:<bob@local.test> ORCPT=rfc822;bob@local.test\r\n",
        ] {
            let r = text(s.command(line));
            assert!(
                r.starts_with("555 5.5.4"),
                "{}: {r}",
                String::from_utf8_lossy(line)
            );
        }
        s.command(b"RSET\r\n");
        for line in [
            &b"MAIL FROM:<a@far.test> RET=HDRS\r\n"[..],
            b"MAIL FROM:<a@far.test> ENVID=QQ314159\r\n",
        ] {
            let r = text(s.command(line));
            assert!(
                r.starts_with("555 5.5.4"),
                "{}: {r}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
