//! The IMAP core (imap-codec parsing) over the in-memory quarantine, before
//! and after login. Input: a setup byte, then lines split at `\n` and
//! framed as the shell does (a line ending in `{n}`/`{n+}` takes the next n
//! bytes as a literal). A password starting with `r` is right. Control
//! lines: `\x01` adds held mail, `\x02` a too-long command, `\x03` TLS,
//! `\x04...` a command from bob's own session on the same store.
//! Invariants: no panic; every response ends in CRLF; alice never sees,
//! expunges or releases bob's mail.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use postern::fuzzing::{Imap, ImapShared, ImapStep, Store, imap_literal_suffix};

const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
const SECRET: &[u8] = b"BOB-SECRET";
const MAX_LITERAL: usize = 4096;

/// The next command, framed as the shell frames it.
fn frame<'a>(rest: &mut &'a [u8]) -> Vec<u8> {
    let mut cmd = Vec::new();
    loop {
        let (line, tail) = match rest.iter().position(|&b| b == b'\n') {
            Some(p) => (&rest[..p], &rest[p + 1..]),
            None => (*rest, &rest[rest.len()..]),
        };
        *rest = tail;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        cmd.extend_from_slice(line);
        cmd.extend_from_slice(b"\r\n");
        match imap_literal_suffix(line) {
            Some((n, _)) if n <= MAX_LITERAL && !rest.is_empty() => {
                let n = n.min(rest.len());
                cmd.extend_from_slice(&rest[..n]);
                *rest = &rest[n..];
            }
            _ => return cmd,
        }
    }
}

fn check(r: &[u8], alice: bool) {
    assert!(
        r.is_empty() || r.ends_with(b"\r\n"),
        "{:?}",
        String::from_utf8_lossy(r)
    );
    if alice {
        assert!(
            !r.windows(SECRET.len()).any(|w| w == SECRET),
            "bob's mail shown to alice"
        );
    }
}

struct Session {
    core: Imap,
    login: (&'static str, &'static [&'static str]),
    sasl: Option<String>,
    idle: bool,
    closed: bool,
}

impl Session {
    fn run(&mut self, cmd: &[u8]) {
        if self.closed {
            return;
        }
        let line = cmd.strip_suffix(b"\r\n").unwrap_or(cmd);
        let mut step = if let Some(tag) = self.sasl.take() {
            self.core.sasl_response(&tag, line)
        } else if self.idle {
            self.idle = false;
            let r = self.core.idle_update();
            check(&r, self.login.0 == "alice");
            ImapStep::Reply(self.core.idle_done(line))
        } else {
            self.core.handle(cmd)
        };
        if let ImapStep::Login { tag, password, .. } = &step {
            let who = password.starts_with('r').then_some(self.login);
            step = self.core.login_result(&tag.clone(), who);
        }
        let alice = self.login.0 == "alice";
        match step {
            ImapStep::Reply(r) | ImapStep::StartTls(r) => check(&r, alice),
            ImapStep::Idle(r) => {
                check(&r, alice);
                self.idle = true;
            }
            ImapStep::SaslContinue { tag } => self.sasl = Some(tag),
            ImapStep::Close(r) => {
                check(&r, alice);
                self.closed = true;
            }
            ImapStep::Login { .. } => panic!("Login answered with Login"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut rest)) = data.split_first() else {
        return;
    };
    // The marker in alice's own input comes back in BAD answers and
    // literals she sent: that is no leak.
    if data.windows(6).any(|w| w.eq_ignore_ascii_case(b"SECRET")) {
        return;
    }
    let store = Arc::new(Store::new());
    store.add(
        "eve@evil.test",
        &[ALICE],
        "spam",
        b"Subject: a\r\nFrom: <eve@evil.test>\r\n\r\nhello\r\n",
    );
    let mut bobs = store.add(
        "eve@evil.test",
        &[BOB],
        "spam",
        b"Subject: BOB-SECRET\r\n\r\nBOB-SECRET\r\n",
    );
    bobs.push(
        store.add(
            "eve@evil.test",
            &[BOB, ALICE],
            "virus",
            b"Subject: shared\r\n\r\nboth\r\n",
        )[0],
    );
    let shared = ImapShared::new(store.clone());
    let tls = setup & 1 != 0;
    let new = |login| Session {
        core: Imap::new(&shared, tls),
        login,
        sasl: None,
        idle: false,
        closed: false,
    };
    let mut alice = new(("alice", &[ALICE]));
    let mut bob = new(("bob", &[BOB]));
    check(&alice.core.greeting(), true);
    if setup & 2 != 0 {
        // Already logged in: the fuzzer starts in the selected-state commands.
        alice.core.login_result("a", Some(("alice", &[ALICE])));
        alice.run(b"s SELECT INBOX\r\n");
    }
    while !rest.is_empty() && !alice.closed {
        match rest[0] {
            0x01 => {
                rest = &rest[1..];
                if rest.first().is_some_and(|b| b & 1 == 0) {
                    bobs.extend(store.add(
                        "z@z.test",
                        &[BOB],
                        "spam",
                        b"Subject: BOB-SECRET\r\n\r\nx\r\n",
                    ));
                } else {
                    store.add("z@z.test", &[ALICE], "spam", b"Subject: new\r\n\r\nx\r\n");
                }
            }
            0x02 => {
                rest = &rest[1..];
                if let ImapStep::Close(_) = alice.core.too_long(Some("t")) {
                    return;
                }
            }
            0x03 => {
                rest = &rest[1..];
                alice.core.tls_started();
            }
            0x04 => {
                rest = &rest[1..];
                let cmd = frame(&mut rest);
                bob.run(&cmd);
            }
            _ => {
                let cmd = frame(&mut rest);
                alice.run(&cmd);
            }
        }
    }
    let _ = alice.core.logged_in();
    // Bob's own session may delete or release his mail; alice's may not.
    // Only bob's session is allowed to touch `bobs`, so replay attributions:
    if bob.core.logged_in() {
        return;
    }
    for id in store.deleted() {
        assert!(!bobs.contains(&id), "alice expunged bob's entry {id}");
    }
    for m in store.released() {
        assert!(
            m.recipient.eq_ignore_ascii_case(ALICE),
            "released {}'s mail",
            m.recipient
        );
    }
});
