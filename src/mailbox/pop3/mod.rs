//! POP3 (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH PLAIN RFC 5034) over the quarantine.
//!
//! [`Pop3Core`] is the sans-I/O protocol core: it takes command lines, parses them into a
//! typed [`command::Command`], hands them to the handler of the current state
//! (AUTHORIZATION, TRANSACTION, UPDATE) and returns [`Step`]s (bytes to send, or something
//! the shell must do: TLS, password check, close). Store calls are synchronous and made by
//! the core, which is why the shell ([`shell`]) runs the store-touching calls on the
//! blocking pool; sockets and argon2 are the shell's. A store failure answers
//! `-ERR [SYS/TEMP]`, never "no longer held".

mod command;
mod shell;

use std::sync::Arc;

use base64::Engine;

use crate::mailbox::accounts::Account;
use crate::mailbox::store::QuarantineStore;
use command::{Command, SyntaxError};

pub(crate) use shell::run_session;

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

impl State {
    fn auth() -> State {
        State::Auth {
            user: None,
            sasl: false,
        }
    }
}

/// What the shell must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send these bytes and read the next command.
    Reply(Vec<u8>),
    /// Send these bytes, then run the TLS handshake.
    StartTls(Vec<u8>),
    /// Check these credentials, then call [`Pop3Core::login_ok`] or [`Pop3Core::login_failed`].
    Login { login: String, password: String },
    /// Send these bytes and close the connection.
    Close(Vec<u8>),
}

pub(crate) struct Pop3Core {
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

/// The store failed: RFC 3206's "try again later", never "no such message".
fn sys_temp(text: &str) -> Vec<u8> {
    err(&format!("[SYS/TEMP] {text}; try again later"))
}

/// The header block and the first `lines` body lines of a message.
fn top_of(data: &[u8], lines: usize) -> &[u8] {
    let hdr_end = crate::mail::headers::body_start(data);
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
    pub(crate) fn new(store: Arc<dyn QuarantineStore>, hostname: &str, tls: bool) -> Pop3Core {
        Pop3Core {
            store,
            hostname: hostname.to_string(),
            tls,
            state: State::auth(),
            bad: 0,
            auth_failures: 0,
        }
    }

    pub(crate) fn greeting(&self) -> Vec<u8> {
        ok(&format!("{} POP3 quarantine ready", self.hostname))
    }

    /// Call after the TLS handshake succeeded.
    pub(crate) fn tls_started(&mut self) {
        self.tls = true;
        self.state = State::auth();
    }

    /// The logged-in account, if any.
    pub(crate) fn account(&self) -> Option<&Account> {
        match &self.state {
            State::Trans { account, .. } => Some(account),
            _ => None,
        }
    }

    /// Whether the next command may touch the store (the shell then runs it
    /// on the blocking pool): only once logged in.
    pub(crate) fn uses_store(&self) -> bool {
        matches!(self.state, State::Trans { .. })
    }

    /// Credentials checked and the maildrop locked: enter the TRANSACTION state.
    /// Lists the store (blocking). If the store fails the session stays in
    /// AUTHORIZATION (see [`Pop3Core::account`]) and the shell must unlock.
    pub(crate) fn login_ok(&mut self, account: Account) -> Vec<u8> {
        let listed = match self.store.list() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "POP3 login: cannot list the maildrop");
                self.state = State::auth();
                return sys_temp("cannot open the maildrop");
            }
        };
        let msgs: Vec<Msg> = listed
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
    pub(crate) fn login_failed(&mut self) -> Step {
        self.auth_failures += 1;
        self.state = State::auth();
        if self.auth_failures >= MAX_AUTH_FAILURES {
            Step::Close(err(
                "[AUTH] invalid login or password; too many failures, bye",
            ))
        } else {
            Step::Reply(err("[AUTH] invalid login or password"))
        }
    }

    /// The login budget refused the attempt unchecked: a temporary
    /// problem (RFC 3206 `SYS/TEMP`), so a client retries later rather
    /// than asking its user for a new password as `[AUTH]` would.
    pub(crate) fn login_refused(&mut self) -> Step {
        self.state = State::auth();
        Step::Reply(err(
            "[SYS/TEMP] too many failed logins from your address; try again later",
        ))
    }

    /// The credentials were right but another session holds the maildrop.
    pub(crate) fn login_in_use(&mut self) -> Vec<u8> {
        self.state = State::auth();
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

    /// Count a bad command; past the limit the session is closed, so a
    /// client cannot keep a slot busy with garbage.
    fn bad(&mut self, text: &str) -> Step {
        self.bad += 1;
        if self.bad > MAX_BAD_COMMANDS {
            Step::Close(err("too many bad commands, bye"))
        } else {
            Step::Reply(err(text))
        }
    }

    /// One line was too long.
    pub(crate) fn line_too_long(&mut self) -> Step {
        self.bad("line too long")
    }

    /// Handle one command line (without CRLF).
    pub(crate) fn handle(&mut self, line: &[u8]) -> Step {
        // A pending SASL exchange takes the line as its response, not as a command.
        if let State::Auth { sasl: true, .. } = self.state {
            self.state = State::auth();
            return self.sasl_response(line);
        }
        let cmd = match command::parse(line) {
            Ok(c) => c,
            Err(e) => return self.bad(e.text()),
        };
        match cmd {
            Command::Capa => return Step::Reply(self.capa()),
            Command::Quit => return self.update(),
            _ => {}
        }
        match self.state {
            State::Auth { .. } => self.authorization(cmd),
            State::Trans { .. } => self.transaction(cmd),
            State::Done => Step::Close(Vec::new()),
        }
    }

    fn sasl_response(&mut self, line: &[u8]) -> Step {
        if line == b"*" {
            return Step::Reply(err("authentication cancelled"));
        }
        match decode_plain(line) {
            Some((login, password)) => Step::Login { login, password },
            None => self.bad("malformed SASL PLAIN response"),
        }
    }

    /// The AUTHORIZATION state: TLS first, then USER/PASS or AUTH PLAIN.
    fn authorization(&mut self, cmd: Command) -> Step {
        let needs_tls = matches!(
            cmd,
            Command::User(_) | Command::Pass(_) | Command::Auth { .. }
        );
        if needs_tls && !self.tls {
            return Step::Reply(err(
                "[AUTH] command not permitted without TLS; use STLS first",
            ));
        }
        match cmd {
            Command::Stls if self.tls => self.bad("already using TLS"),
            Command::Stls => Step::StartTls(ok("begin TLS negotiation")),
            Command::User(name) => {
                self.state = State::Auth {
                    user: Some(name),
                    sasl: false,
                };
                Step::Reply(ok("send PASS"))
            }
            Command::Pass(password) => match &mut self.state {
                State::Auth { user, .. } => match user.take() {
                    Some(login) => Step::Login { login, password },
                    None => self.bad("USER first"),
                },
                _ => self.bad("USER first"),
            },
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial),
            Command::Apop => Step::Reply(err("APOP not supported")),
            _ => self.bad(SyntaxError::Unknown.text()),
        }
    }

    /// AUTH (RFC 5034): PLAIN only, with or without an initial response.
    fn auth(&mut self, mechanism: Option<String>, initial: Option<String>) -> Step {
        let Some(mechanism) = mechanism else {
            // RFC 5034: AUTH alone lists the mechanisms.
            return Step::Reply(b"+OK\r\nPLAIN\r\n.\r\n".to_vec());
        };
        if !mechanism.eq_ignore_ascii_case("PLAIN") {
            return Step::Reply(err("unsupported mechanism; PLAIN only"));
        }
        match initial.as_deref() {
            Some("=") => Step::Reply(err("[AUTH] empty credentials")),
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

    /// The TRANSACTION state: read and mark; nothing is deleted before QUIT.
    fn transaction(&mut self, cmd: Command) -> Step {
        let State::Trans { msgs, .. } = &mut self.state else {
            return self.bad(SyntaxError::Unknown.text());
        };
        match cmd {
            Command::Noop => Step::Reply(ok("")),
            Command::Stat => {
                let live = msgs.iter().filter(|m| !m.deleted);
                let (n, s) = live.fold((0u64, 0u64), |(n, s), m| (n + 1, s + m.size));
                Step::Reply(ok(&format!("{n} {s}")))
            }
            Command::List(n) => {
                Step::Reply(listing(msgs, n, |i, m| format!("{} {}", i + 1, m.size)))
            }
            Command::Uidl(n) => {
                Step::Reply(listing(msgs, n, |i, m| format!("{} q{}", i + 1, m.id)))
            }
            Command::Retr(n) => self.retrieve(n, None),
            Command::Top { msg, lines } => self.retrieve(msg, Some(lines)),
            Command::Dele(n) => Step::Reply(match live_index(msgs, n) {
                Ok(i) => {
                    msgs[i].deleted = true;
                    ok(&format!("message {} deleted", i + 1))
                }
                Err(e) => e,
            }),
            Command::Rset => {
                for m in msgs.iter_mut() {
                    m.deleted = false;
                }
                Step::Reply(ok(&format!("{} messages", msgs.len())))
            }
            _ => self.bad(SyntaxError::Unknown.text()),
        }
    }

    /// RETR (`lines: None`) or TOP: the message dot-stuffed, read from the store.
    fn retrieve(&mut self, n: u32, lines: Option<usize>) -> Step {
        let State::Trans { msgs, .. } = &self.state else {
            return self.bad(SyntaxError::Unknown.text());
        };
        let i = match live_index(msgs, n) {
            Ok(i) => i,
            Err(e) => return Step::Reply(e),
        };
        let body = match self.store.body(msgs[i].id) {
            Ok(Some(b)) => b,
            Ok(None) => return Step::Reply(err("message is no longer held")),
            Err(e) => {
                tracing::warn!(error = %e, "POP3: cannot read a held message");
                return Step::Reply(sys_temp("cannot read the message now"));
            }
        };
        let data = match lines {
            Some(n) => top_of(&body, n),
            None => &body[..],
        };
        let mut out = Vec::with_capacity(data.len() + data.len() / 40 + 32);
        out.extend_from_slice(format!("+OK {} octets\r\n", msgs[i].size).as_bytes());
        // RFC 1939 3: byte-stuffed, CRLF lines, ending with the dot line.
        crate::smtp::data::dot_stuff(data, &mut out);
        Step::Reply(out)
    }

    /// QUIT. From TRANSACTION this is the UPDATE state: delete what was
    /// marked. If the store fails for any, the answer is `-ERR` (RFC 1939
    /// 6), so the client does not believe they are gone.
    fn update(&mut self) -> Step {
        let state = std::mem::replace(&mut self.state, State::Done);
        let State::Trans { msgs, .. } = state else {
            return Step::Close(ok(&format!("{} signing off", self.hostname)));
        };
        let (mut n, mut gone, mut failed) = (0, 0, 0);
        for m in msgs.iter().filter(|m| m.deleted) {
            match self.store.delete(m.id) {
                Ok(true) => n += 1,
                Ok(false) => gone += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "POP3 UPDATE: delete failed");
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            return Step::Close(sys_temp(&format!(
                "{n} deleted, {failed} could not be deleted"
            )));
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
}

/// The index of message number `n` if it exists and is not marked deleted,
/// or the `-ERR` to send.
fn live_index(msgs: &[Msg], n: u32) -> Result<usize, Vec<u8>> {
    let i = (n as usize).checked_sub(1);
    match i.and_then(|k| msgs.get(k)) {
        Some(m) if !m.deleted => Ok(n as usize - 1),
        Some(_) => Err(err("message is deleted")),
        None => Err(err("no such message")),
    }
}

/// LIST / UIDL: one message (`Some(n)`) or a multi-line listing of the live ones.
fn listing(msgs: &[Msg], n: Option<u32>, item: impl Fn(usize, &Msg) -> String) -> Vec<u8> {
    let Some(n) = n else {
        let mut s = String::from("+OK listing follows\r\n");
        for (i, m) in msgs.iter().enumerate().filter(|(_, m)| !m.deleted) {
            s.push_str(&item(i, m));
            s.push_str("\r\n");
        }
        s.push_str(".\r\n");
        return s.into_bytes();
    };
    match live_index(msgs, n) {
        Ok(i) => ok(&item(i, &msgs[i])),
        Err(e) => e,
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

    /// A failing store is "try again later", never "gone" and never a silent success.
    #[test]
    fn store_failures_are_sys_temp() {
        let store = Arc::new(MemStore::new());
        store.add(
            "s@x",
            &["alice@example.test"],
            "spam",
            b"Subject: a\r\n\r\nx\r\n",
        );
        let mut c = Pop3Core::new(store.clone(), "h", true);
        store.set_failing(true);
        let r = String::from_utf8(c.login_ok(alice())).expect("utf8");
        assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
        assert!(c.account().is_none() && !c.uses_store());
        store.set_failing(false);
        assert!(c.login_ok(alice()).starts_with(b"+OK"));
        store.set_failing(true);
        let r = reply(c.handle(b"RETR 1"));
        assert!(
            r.starts_with("-ERR [SYS/TEMP]") && !r.contains("no longer held"),
            "{r}"
        );
        assert!(reply(c.handle(b"DELE 1")).starts_with("+OK"));
        let r = reply(c.handle(b"QUIT"));
        assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
        assert!(store.deleted().is_empty());
        store.set_failing(false);
        assert_eq!(store.list().map(|l| l.len()).ok(), Some(1));
    }
}
