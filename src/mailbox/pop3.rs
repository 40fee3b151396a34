//! POP3 (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH PLAIN RFC 5034) over the quarantine.
//!
//! [`Pop3Core`] is the sans-I/O protocol core: it takes command lines and returns
//! [`Step`]s (bytes to send, or something the shell must do: TLS, password check, close).
//! Store calls are synchronous and made by the core; sockets and argon2 are the shell's.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use crate::mailbox::MailboxCtx;
use crate::mailbox::accounts::Account;
use crate::mailbox::io::{Conn, Line};
use crate::mailbox::store::QuarantineStore;

/// RFC 2449 allows 255 octets per command; SASL responses may be longer.
const MAX_LINE: usize = 4096;
const MAX_BAD_COMMANDS: u32 = 20;
const MAX_AUTH_FAILURES: u32 = 3;

#[derive(Clone, Debug)]
struct Msg {
    id: u64,
    size: u64,
    deleted: bool,
}

enum State {
    Auth { user: Option<String>, sasl: bool },
    Trans { account: Account, msgs: Vec<Msg> },
    Done,
}

/// What the shell must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send these bytes and read the next command.
    Reply(Vec<u8>),
    /// Send these bytes, then run the TLS handshake.
    StartTls(Vec<u8>),
    /// Check these credentials, then call [`Pop3Core::login_ok`] or [`Pop3Core::login_failed`].
    Login { login: String, password: String },
    /// Send these bytes and close the connection.
    Close(Vec<u8>),
}

pub struct Pop3Core {
    store: Arc<dyn QuarantineStore>,
    hostname: String,
    tls: bool,
    state: State,
    bad: u32,
    auth_failures: u32,
}

fn ok(text: &str) -> Vec<u8> {
    format!("+OK {text}\r\n").into_bytes()
}

fn err(text: &str) -> Vec<u8> {
    format!("-ERR {text}\r\n").into_bytes()
}

/// Dot-stuff `data` and normalise line ends to CRLF; ends with a CRLF.
fn stuff_into(out: &mut Vec<u8>, data: &[u8]) {
    let mut at_line_start = true;
    let mut prev = 0u8;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        at_line_start = b == b'\n';
        prev = b;
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
}

/// The header block and the first `lines` body lines of a message.
fn top_of(data: &[u8], lines: usize) -> &[u8] {
    let hdr_end = header_end(data);
    let mut end = hdr_end;
    let mut n = 0;
    while n < lines && end < data.len() {
        match data[end..].iter().position(|&b| b == b'\n') {
            Some(p) => end += p + 1,
            None => end = data.len(),
        }
        n += 1;
    }
    &data[..end]
}

/// Offset just past the blank line ending the header (or the end of data).
pub(crate) fn header_end(data: &[u8]) -> usize {
    let mut i = 0;
    while i < data.len() {
        let line_end = match data[i..].iter().position(|&b| b == b'\n') {
            Some(p) => i + p + 1,
            None => return data.len(),
        };
        let line = &data[i..line_end];
        if line == b"\n" || line == b"\r\n" {
            return line_end;
        }
        i = line_end;
    }
    data.len()
}

/// Decode a SASL PLAIN response: authzid NUL authcid NUL password.
pub(crate) fn decode_plain(b64: &[u8]) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim_ascii())
        .ok()?;
    let mut parts = raw.split(|&b| b == 0);
    let authz = parts.next()?;
    let authc = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let authc = String::from_utf8(authc.to_vec()).ok()?;
    let pass = String::from_utf8(pass.to_vec()).ok()?;
    if !authz.is_empty() && authz != authc.as_bytes() {
        return None;
    }
    Some((authc, pass))
}

impl Pop3Core {
    pub fn new(store: Arc<dyn QuarantineStore>, hostname: &str, tls: bool) -> Pop3Core {
        Pop3Core {
            store,
            hostname: hostname.to_string(),
            tls,
            state: State::Auth {
                user: None,
                sasl: false,
            },
            bad: 0,
            auth_failures: 0,
        }
    }

    pub fn greeting(&self) -> Vec<u8> {
        ok(&format!("{} POP3 quarantine ready", self.hostname))
    }

    /// Call after the TLS handshake succeeded.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.state = State::Auth {
            user: None,
            sasl: false,
        };
    }

    /// The logged-in account, if any.
    pub fn account(&self) -> Option<&Account> {
        match &self.state {
            State::Trans { account, .. } => Some(account),
            _ => None,
        }
    }

    /// Credentials checked and the maildrop locked: enter the TRANSACTION state.
    pub fn login_ok(&mut self, account: Account) -> Vec<u8> {
        let msgs: Vec<Msg> = self
            .store
            .list()
            .into_iter()
            .filter(|m| account.can_see(m))
            .map(|m| Msg {
                id: m.id,
                size: m.size,
                deleted: false,
            })
            .collect();
        let total: u64 = msgs.iter().map(|m| m.size).sum();
        let reply = ok(&format!(
            "{} has {} held message(s) ({} octets)",
            account.login,
            msgs.len(),
            total
        ));
        self.state = State::Trans { account, msgs };
        reply
    }

    /// Credentials refused. Returns the reply; after too many, the shell should close.
    pub fn login_failed(&mut self) -> Step {
        self.auth_failures += 1;
        self.state = State::Auth {
            user: None,
            sasl: false,
        };
        if self.auth_failures >= MAX_AUTH_FAILURES {
            Step::Close(err(
                "[AUTH] invalid login or password; too many failures, bye",
            ))
        } else {
            Step::Reply(err("[AUTH] invalid login or password"))
        }
    }

    /// The credentials were right but another session holds the maildrop.
    pub fn login_in_use(&mut self) -> Vec<u8> {
        self.state = State::Auth {
            user: None,
            sasl: false,
        };
        err("[IN-USE] maildrop already locked by another session")
    }

    fn capa(&self) -> Vec<u8> {
        let mut s = String::from(
            "+OK capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n",
        );
        if let State::Auth { .. } = self.state {
            if self.tls {
                s.push_str("USER\r\nSASL PLAIN\r\n");
            } else {
                s.push_str("STLS\r\n");
            }
        }
        s.push_str("IMPLEMENTATION Postern\r\n.\r\n");
        s.into_bytes()
    }

    fn bad(&mut self, text: &str) -> Step {
        self.bad += 1;
        if self.bad > MAX_BAD_COMMANDS {
            Step::Close(err("too many bad commands, bye"))
        } else {
            Step::Reply(err(text))
        }
    }

    /// One line was too long.
    pub fn line_too_long(&mut self) -> Step {
        self.bad("line too long")
    }

    /// Handle one command line (without CRLF).
    pub fn handle(&mut self, line: &[u8]) -> Step {
        // A pending SASL exchange takes the line as its response.
        if let State::Auth { sasl: true, .. } = self.state {
            self.state = State::Auth {
                user: None,
                sasl: false,
            };
            if line == b"*" {
                return Step::Reply(err("authentication cancelled"));
            }
            return match decode_plain(line) {
                Some((login, password)) => Step::Login { login, password },
                None => self.bad("malformed SASL PLAIN response"),
            };
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return self.bad("command is not UTF-8");
        };
        let (cmd, args) = match text.split_once(' ') {
            Some((c, a)) => (c, a),
            None => (text, ""),
        };
        let cmd = cmd.to_ascii_uppercase();
        let argv: Vec<&str> = args.split_ascii_whitespace().collect();
        match cmd.as_str() {
            "CAPA" => return Step::Reply(self.capa()),
            "NOOP" if matches!(self.state, State::Trans { .. }) => return Step::Reply(ok("")),
            "QUIT" => return self.quit(),
            _ => {}
        }
        match &mut self.state {
            State::Auth { user, .. } => match cmd.as_str() {
                "STLS" => {
                    if self.tls {
                        self.bad("already using TLS")
                    } else if !args.is_empty() {
                        self.bad("STLS takes no argument")
                    } else {
                        Step::StartTls(ok("begin TLS negotiation"))
                    }
                }
                "USER" | "PASS" | "AUTH" if !self.tls => Step::Reply(err(
                    "[AUTH] command not permitted without TLS; use STLS first",
                )),
                "USER" => {
                    if args.is_empty() {
                        return self.bad("USER needs a name");
                    }
                    *user = Some(args.to_string());
                    Step::Reply(ok("send PASS"))
                }
                "PASS" => match user.take() {
                    // The password is the rest of the line and may contain spaces.
                    Some(login) => Step::Login {
                        login,
                        password: args.to_string(),
                    },
                    None => self.bad("USER first"),
                },
                "AUTH" => {
                    if argv.is_empty() {
                        // RFC 5034: list the mechanisms.
                        return Step::Reply(b"+OK\r\nPLAIN\r\n.\r\n".to_vec());
                    }
                    if !argv[0].eq_ignore_ascii_case("PLAIN") {
                        return Step::Reply(err("unsupported mechanism; PLAIN only"));
                    }
                    match argv.get(1) {
                        Some(&"=") => Step::Reply(err("[AUTH] empty credentials")),
                        Some(ir) => match decode_plain(ir.as_bytes()) {
                            Some((login, password)) => Step::Login { login, password },
                            None => self.bad("malformed SASL PLAIN response"),
                        },
                        None => {
                            self.state = State::Auth {
                                user: None,
                                sasl: true,
                            };
                            Step::Reply(b"+ \r\n".to_vec())
                        }
                    }
                }
                "APOP" => Step::Reply(err("APOP not supported")),
                _ => self.bad("unknown command or not allowed in this state"),
            },
            State::Trans { msgs, .. } => {
                let msg_arg = |i: usize, msgs: &Vec<Msg>| -> Result<usize, Vec<u8>> {
                    let n: usize = argv
                        .get(i)
                        .and_then(|a| a.parse().ok())
                        .ok_or_else(|| err("bad message number"))?;
                    match n.checked_sub(1).and_then(|k| msgs.get(k)) {
                        Some(m) if !m.deleted => Ok(n - 1),
                        Some(_) => Err(err("message is deleted")),
                        None => Err(err("no such message")),
                    }
                };
                match cmd.as_str() {
                    "STAT" => {
                        let live = msgs.iter().filter(|m| !m.deleted);
                        let (n, s) = live.fold((0u64, 0u64), |(n, s), m| (n + 1, s + m.size));
                        Step::Reply(ok(&format!("{n} {s}")))
                    }
                    "LIST" | "UIDL" => {
                        let item = |i: usize, m: &Msg| {
                            if cmd == "LIST" {
                                format!("{} {}", i + 1, m.size)
                            } else {
                                format!("{} q{}", i + 1, m.id)
                            }
                        };
                        if argv.is_empty() {
                            let mut s = String::from("+OK listing follows\r\n");
                            for (i, m) in msgs.iter().enumerate().filter(|(_, m)| !m.deleted) {
                                s.push_str(&item(i, m));
                                s.push_str("\r\n");
                            }
                            s.push_str(".\r\n");
                            Step::Reply(s.into_bytes())
                        } else {
                            match msg_arg(0, msgs) {
                                Ok(i) => Step::Reply(ok(&item(i, &msgs[i]))),
                                Err(e) => Step::Reply(e),
                            }
                        }
                    }
                    "RETR" | "TOP" => {
                        let i = match msg_arg(0, msgs) {
                            Ok(i) => i,
                            Err(e) => return Step::Reply(e),
                        };
                        let lines = if cmd == "TOP" {
                            match argv.get(1).and_then(|a| a.parse::<usize>().ok()) {
                                Some(n) => Some(n),
                                None => return Step::Reply(err("TOP needs a line count")),
                            }
                        } else {
                            None
                        };
                        let Some(body) = self.store.body(msgs[i].id) else {
                            return Step::Reply(err("message is no longer held"));
                        };
                        let data = match lines {
                            Some(n) => top_of(&body, n),
                            None => &body[..],
                        };
                        let mut out = Vec::with_capacity(data.len() + data.len() / 40 + 32);
                        out.extend_from_slice(
                            format!("+OK {} octets\r\n", msgs[i].size).as_bytes(),
                        );
                        stuff_into(&mut out, data);
                        out.extend_from_slice(b".\r\n");
                        Step::Reply(out)
                    }
                    "DELE" => match msg_arg(0, msgs) {
                        Ok(i) => {
                            msgs[i].deleted = true;
                            Step::Reply(ok(&format!("message {} deleted", i + 1)))
                        }
                        Err(e) => Step::Reply(e),
                    },
                    "RSET" => {
                        for m in msgs.iter_mut() {
                            m.deleted = false;
                        }
                        Step::Reply(ok(&format!("{} messages", msgs.len())))
                    }
                    _ => self.bad("unknown command or not allowed in this state"),
                }
            }
            State::Done => Step::Close(Vec::new()),
        }
    }

    /// QUIT: in the TRANSACTION state, enter UPDATE and delete what was marked.
    fn quit(&mut self) -> Step {
        let state = std::mem::replace(&mut self.state, State::Done);
        match state {
            State::Trans { msgs, .. } => {
                let mut n = 0;
                let mut gone = 0;
                for m in msgs.iter().filter(|m| m.deleted) {
                    if self.store.delete(m.id) {
                        n += 1;
                    } else {
                        gone += 1;
                    }
                }
                let extra = if gone > 0 {
                    format!(", {gone} were already gone")
                } else {
                    String::new()
                };
                Step::Close(ok(&format!(
                    "{} signing off ({n} deleted{extra})",
                    self.hostname
                )))
            }
            _ => Step::Close(ok(&format!("{} signing off", self.hostname))),
        }
    }
}

/// Releases a user's POP3 maildrop lock when the session ends.
struct MaildropLock {
    ctx: Arc<MailboxCtx>,
    key: String,
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        let mut locks = self
            .ctx
            .pop3_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        locks.remove(&self.key);
    }
}

/// Run one POP3 session on `conn` (the I/O shell).
pub async fn run_session(
    mut conn: Conn,
    peer: IpAddr,
    ctx: Arc<MailboxCtx>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut core = Pop3Core::new(ctx.store.clone(), &ctx.hostname, conn.tls);
    let mut _lock: Option<MaildropLock> = None;
    conn.write(&core.greeting()).await?;
    let idle: Duration = ctx.limits.pop3_idle;
    loop {
        let line = tokio::select! {
            r = tokio::time::timeout(idle, conn.read_line(MAX_LINE)) => match r {
                Ok(r) => r?,
                Err(_) => {
                    conn.write(&err("autologout; idle for too long")).await?;
                    return Ok(());
                }
            },
            _ = crate::mailbox::io::wait_shutdown(&mut shutdown) => {
                // No UPDATE state: nothing marked is deleted.
                conn.write(&err("server shutting down")).await?;
                return Ok(());
            }
        };
        let step = match line {
            Line::Eof | Line::Shutdown => return Ok(()),
            Line::Timeout => {
                conn.write(&err("autologout; idle for too long")).await?;
                return Ok(());
            }
            Line::TooLong => core.line_too_long(),
            Line::Data(l) => core.handle(&l),
        };
        let step = match step {
            Step::Login { login, password } => {
                match crate::mailbox::check_login(&ctx, peer, "pop3", login, password).await {
                    Some(account) => {
                        let key = account.login.to_ascii_lowercase();
                        let locked = {
                            let mut locks =
                                ctx.pop3_locks.lock().unwrap_or_else(|e| e.into_inner());
                            locks.insert(key.clone())
                        };
                        if locked {
                            _lock = Some(MaildropLock {
                                ctx: ctx.clone(),
                                key,
                            });
                            Step::Reply(core.login_ok(account))
                        } else {
                            Step::Reply(core.login_in_use())
                        }
                    }
                    None => core.login_failed(),
                }
            }
            s => s,
        };
        match step {
            Step::Reply(bytes) => conn.write(&bytes).await?,
            Step::Close(bytes) => {
                if !bytes.is_empty() {
                    conn.write(&bytes).await?;
                }
                conn.shutdown().await;
                return Ok(());
            }
            Step::StartTls(bytes) => {
                conn.write(&bytes).await?;
                // The handshake deadline is the connection's own.
                conn = match conn.starttls(&ctx.tls).await {
                    Ok(c) => c,
                    Err(_) => return Ok(()),
                };
                core.tls_started();
            }
            Step::Login { .. } => conn.write(&err("internal error")).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::accounts::Role;
    use crate::mailbox::store::MemStore;

    fn alice() -> Account {
        Account {
            login: "alice".into(),
            addresses: vec!["alice@example.test".into()],
            role: Role::User,
        }
    }

    fn reply(s: Step) -> String {
        match s {
            Step::Reply(b) | Step::Close(b) | Step::StartTls(b) => {
                String::from_utf8(b).expect("utf8")
            }
            Step::Login { login, password } => format!("LOGIN {login} {password}"),
        }
    }

    #[test]
    fn no_login_before_tls() {
        let store = Arc::new(MemStore::new());
        let mut c = Pop3Core::new(store, "h", false);
        assert!(reply(c.handle(b"USER alice")).starts_with("-ERR"));
        assert!(reply(c.handle(b"AUTH PLAIN AGFsaWNlAHB3")).starts_with("-ERR"));
        let capa = reply(c.handle(b"CAPA"));
        assert!(capa.contains("STLS") && !capa.contains("USER") && !capa.contains("SASL"));
        assert!(matches!(c.handle(b"STLS"), Step::StartTls(_)));
        c.tls_started();
        let capa = reply(c.handle(b"capa"));
        assert!(!capa.contains("STLS") && capa.contains("USER") && capa.contains("SASL PLAIN"));
        assert_eq!(reply(c.handle(b"USER alice")), "+OK send PASS\r\n");
        assert_eq!(
            reply(c.handle(b"PASS pw with space")),
            "LOGIN alice pw with space"
        );
        assert_eq!(
            reply(c.handle(b"AUTH PLAIN AGFsaWNlAHB3")),
            "LOGIN alice pw"
        );
        assert!(reply(c.handle(b"AUTH PLAIN")).starts_with("+ "));
        assert_eq!(reply(c.handle(b"AGFsaWNlAHB3")), "LOGIN alice pw");
    }

    #[test]
    fn transaction_and_update() {
        let store = Arc::new(MemStore::new());
        store.add(
            "s@x",
            &["alice@example.test"],
            "spam",
            b"Subject: a\r\n\r\n.dot\r\nline2\nline3\n",
        );
        store.add(
            "s@x",
            &["bob@example.test"],
            "spam",
            b"Subject: b\r\n\r\nb\r\n",
        );
        store.add(
            "s@x",
            &["ALICE@example.test"],
            "spam",
            b"Subject: c\r\n\r\nc",
        );
        let mut c = Pop3Core::new(store.clone(), "h", true);
        c.login_ok(alice());
        assert_eq!(reply(c.handle(b"STAT")), "+OK 2 47\r\n");
        assert_eq!(
            reply(c.handle(b"UIDL")),
            "+OK listing follows\r\n1 q1\r\n2 q3\r\n.\r\n"
        );
        assert_eq!(
            reply(c.handle(b"RETR 1")),
            "+OK 32 octets\r\nSubject: a\r\n\r\n..dot\r\nline2\r\nline3\r\n.\r\n"
        );
        assert_eq!(
            reply(c.handle(b"TOP 1 1")),
            "+OK 32 octets\r\nSubject: a\r\n\r\n..dot\r\n.\r\n"
        );
        assert_eq!(
            reply(c.handle(b"RETR 2")),
            "+OK 15 octets\r\nSubject: c\r\n\r\nc\r\n.\r\n"
        );
        assert!(reply(c.handle(b"RETR 3")).starts_with("-ERR"));
        assert!(reply(c.handle(b"RETR x")).starts_with("-ERR"));
        assert!(reply(c.handle(b"DELE 1")).starts_with("+OK"));
        assert!(reply(c.handle(b"RETR 1")).starts_with("-ERR"));
        assert!(reply(c.handle(b"RSET")).starts_with("+OK"));
        assert!(reply(c.handle(b"DELE 2")).starts_with("+OK"));
        assert_eq!(reply(c.handle(b"STAT")), "+OK 1 32\r\n");
        assert!(matches!(c.handle(b"QUIT"), Step::Close(_)));
        assert_eq!(store.deleted(), vec![3]);
    }

    #[test]
    fn garbage_is_answered() {
        let store = Arc::new(MemStore::new());
        let mut c = Pop3Core::new(store, "h", true);
        assert!(reply(c.handle(b"\xff\xfe")).starts_with("-ERR"));
        assert!(reply(c.handle(b"")).starts_with("-ERR"));
        assert!(reply(c.handle(b"PASS x")).starts_with("-ERR"));
        assert!(reply(c.handle(b"AUTH PLAIN !!!")).starts_with("-ERR"));
        assert!(reply(c.handle(b"STAT")).starts_with("-ERR"));
    }
}
