//! The POP3 core over the in-memory quarantine, before and after login.
//! Input: a setup byte, then command lines split at `\n`. A password that
//! starts with `r` is right (alice), `u` is right but the maildrop is in
//! use, anything else is wrong. A line starting with `\x01` adds a held
//! message (alice's or bob's) between commands, as another session would.
//! Invariants: no panic; every reply is `+OK`/`-ERR`/`+ ` and CRLF-only;
//! alice never sees, deletes or releases bob's mail.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use postern::fuzzing::{Pop3, Pop3Step, Store};

const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
const SECRET: &[u8] = b"BOB-SECRET";

fn store() -> (Arc<Store>, Vec<u64>) {
    let s = Arc::new(Store::new());
    s.add(
        "eve@evil.test",
        &[ALICE],
        "spam",
        b"Subject: a\r\n\r\n.dot\r\nline2\r\n",
    );
    let mut bobs = s.add(
        "eve@evil.test",
        &[BOB],
        "spam",
        b"Subject: BOB-SECRET\r\n\r\nBOB-SECRET\r\n",
    );
    s.add(
        "x@y.test",
        &["Alice@Example.test"],
        "virus",
        b"Subject: c\r\n\r\nc",
    );
    // One body held for both: entry ids [bob's, alice's].
    bobs.push(
        s.add(
            "eve@evil.test",
            &[BOB, ALICE],
            "spam",
            b"Subject: shared\r\n\r\nboth\r\n",
        )[0],
    );
    (s, bobs)
}

fn check(r: &[u8]) {
    assert!(
        r.is_empty() || r.starts_with(b"+OK") || r.starts_with(b"-ERR") || r == b"+ \r\n",
        "{:?}",
        String::from_utf8_lossy(r)
    );
    assert!(r.is_empty() || r.ends_with(b"\r\n"));
    for (i, &c) in r.iter().enumerate() {
        match c {
            b'\n' => assert!(
                i > 0 && r[i - 1] == b'\r',
                "bare LF: {:?}",
                String::from_utf8_lossy(r)
            ),
            b'\r' => assert_eq!(
                r.get(i + 1),
                Some(&b'\n'),
                "bare CR: {:?}",
                String::from_utf8_lossy(r)
            ),
            _ => {}
        }
    }
    assert!(
        !r.windows(SECRET.len()).any(|w| w == SECRET),
        "bob's mail shown"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, rest)) = data.split_first() else {
        return;
    };
    let (store, mut bobs) = store();
    let mut c = Pop3::new(store.clone(), setup & 1 != 0);
    check(&c.greeting());
    for raw in rest.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        match line.first() {
            Some(0x01) => {
                if line.len() % 2 == 0 {
                    bobs.extend(store.add(
                        "z@z.test",
                        &[BOB],
                        "spam",
                        b"Subject: BOB-SECRET\r\n\r\nx\r\n",
                    ));
                } else {
                    store.add("z@z.test", &[ALICE], "spam", b"Subject: new\r\n\r\nx\r\n");
                }
                continue;
            }
            Some(0x02) => {
                if let Pop3Step::Close(_) = c.line_too_long() {
                    return;
                }
                continue;
            }
            Some(0x03) => {
                c.tls_started();
                continue;
            }
            _ => {}
        }
        let mut step = c.handle(line);
        if let Pop3Step::Login { login, password } = step {
            let _ = login;
            step = match password.as_bytes().first() {
                Some(b'r') => Pop3Step::Reply(c.login_ok("alice", &[ALICE])),
                Some(b'u') => Pop3Step::Reply(c.login_in_use()),
                _ => c.login_failed(),
            };
        }
        match step {
            Pop3Step::Reply(r) | Pop3Step::StartTls(r) => check(&r),
            Pop3Step::Close(r) => {
                check(&r);
                break;
            }
            Pop3Step::Login { .. } => panic!("Login answered with Login"),
        }
    }
    for id in store.deleted() {
        assert!(!bobs.contains(&id), "alice deleted bob's entry {id}");
    }
    for m in store.released() {
        assert!(
            m.recipient.eq_ignore_ascii_case(ALICE),
            "released {}'s mail",
            m.recipient
        );
    }
});
