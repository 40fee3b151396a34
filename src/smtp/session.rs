//! The SMTP session state machine, without I/O.
//!
//! The shell ([`super::server`]) hands it one complete command line at a
//! time and performs the [`Action`] it returns. Parsing is smtp-proto's; the
//! states, limits and reply codes are ours.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use smtp_proto::{Error as ProtoError, Request};

use crate::config::RelayConfig;
use crate::mail::{self, Enhanced, Envelope, Reply};
use crate::policy::relay::{self, RcptDecision};
use crate::policy::{ConnInfo, Decision, TxInfo, Verdict};

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
}

/// A command waiting for the rules' decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    Mail,
    Rcpt(Rcpt),
}

/// The envelope being built between MAIL and the end of DATA.
#[derive(Debug, Clone, Default)]
pub(crate) struct Transaction {
    pub(crate) from: String,
    pub(crate) rcpts: Vec<Rcpt>,
    pub(crate) declared_size: u64,
    /// A quarantine or discard decided before DATA, applied to the message.
    pub(crate) sticky: Option<(Verdict, Option<String>)>,
}

impl Transaction {
    /// The envelope for the intake, and the verdict that sticks to it.
    pub(crate) fn into_parts(self) -> (Envelope, Option<(Verdict, Option<String>)>) {
        (
            Envelope {
                from: self.from,
                rcpts: self.rcpts,
                declared_size: self.declared_size,
            },
            self.sticky,
        )
    }
}

/// Too many protocol errors in one session and we hang up.
const MAX_ERRORS: u32 = 20;

pub(crate) struct Session {
    cfg: Arc<SessionConfig>,
    kind: ListenerKind,
    ip: IpAddr,
    /// The client's port.
    port: u16,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    auth_user: Option<String>,
    tx: Option<Transaction>,
    errors: u32,
    /// The last decision taken, as `(verdict, stage)`, for the verdict metric;
    /// the shell takes it after each command.
    verdict: Option<(&'static str, &'static str)>,
    /// A MAIL command waiting for the rules.
    pending_mail: Option<Transaction>,
    /// A quarantine or discard decided at connect: applies to every message.
    session_sticky: Option<(Verdict, Option<String>)>,
}

pub(crate) use crate::mail::reply::line as reply;

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
            tx: None,
            errors: 0,
            verdict: None,
            pending_mail: None,
            session_sticky: None,
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

    /// Handle one complete command line (CRLF included).
    pub(crate) fn command(&mut self, line: &[u8]) -> Action {
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
                "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS",
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
            Request::Auth { .. } => {
                self.error(reply(502, Enhanced::new(5, 5, 1), "AUTH not available"))
            }
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
        self.pending_mail = Some(Transaction {
            from: from.into_owned(),
            rcpts: Vec::new(),
            declared_size: size,
            sticky: self.session_sticky.clone(),
        });
        Action::Policy(Check::Mail)
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
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let ip = match self.ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        let for_clause = match tx.rcpts.as_slice() {
            [one] => format!("\r\n\tfor <{}>", mail::token(&one.address)),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ([{ip}])\r\n\tby {} (Postern) with {} id {id}{for_clause};\r\n\t{}\r\n",
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
            },
            max_message_size: 1000,
            max_recipients: 2,
            tls_available: true,
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
        }
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
            },
            max_message_size: 1000,
            max_recipients: 5,
            tls_available: false,
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
        };
        assert!(matches!(s.policy_answer(c, d), Action::Reply(r) if r.starts_with(b"250")));
        let tx = s.tx.as_ref().unwrap();
        assert_eq!(tx.rcpts.len(), 1);
        assert!(
            matches!(tx.sticky, Some((Verdict::Quarantine { .. }, Some(ref sc))) if sc == "50-x.rhai")
        );
    }
}
