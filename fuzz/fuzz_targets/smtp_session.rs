//! The SMTP session core over arbitrary command lines and arbitrary rule
//! and password answers. Input: 4 setup bytes, then lines split at `\n`
//! (each sent with CRLF, as the shell frames them); each line's first byte
//! also picks the answer to a policy or auth question it raises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::fuzzing::{SmtpSession, SmtpStep};
use postern::mail::{Enhanced, Reply};
use postern::policy::Verdict;

const DOMAINS: &[&str] = &["local.test", "Other.Local.test"];

fn verdict(b: u8) -> Option<Verdict> {
    match b % 7 {
        0 | 1 => None,
        2 => Some(Verdict::Accept),
        3 => Some(Verdict::Reject(Reply::new(
            550,
            Enhanced::new(5, 7, 1),
            "no\r\nx",
        ))),
        4 => Some(Verdict::Tempfail(Reply::new(
            451,
            Enhanced::new(4, 7, 1),
            "later",
        ))),
        5 => Some(Verdict::Quarantine {
            reason: "fuzz".into(),
        }),
        _ => Some(Verdict::Discard),
    }
}

/// Every reply is one or more `DDD[ -]text\r\n` lines, no bare CR or LF.
fn well_formed(r: &[u8]) {
    assert!(r.ends_with(b"\r\n"), "{:?}", String::from_utf8_lossy(r));
    for line in r[..r.len() - 2].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            !line.contains(&b'\r'),
            "bare CR: {:?}",
            String::from_utf8_lossy(r)
        );
        assert!(line.len() >= 4, "{:?}", String::from_utf8_lossy(r));
        assert!(line[..3].iter().all(u8::is_ascii_digit));
        assert!(line[3] == b' ' || line[3] == b'-');
    }
    // Every LF is preceded by CR.
    for (i, &b) in r.iter().enumerate() {
        if b == b'\n' {
            assert!(
                i > 0 && r[i - 1] == b'\r',
                "bare LF: {:?}",
                String::from_utf8_lossy(r)
            );
        }
    }
}

fn reply_of(s: &SmtpStep) -> Option<&[u8]> {
    match s {
        SmtpStep::Reply(b) | SmtpStep::StartTls(b) | SmtpStep::Data(b) | SmtpStep::Close(b) => {
            Some(b)
        }
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (setup, rest) = data.split_at(4);
    let listener = setup[0] % 3;
    let trusted = setup[1] & 1 != 0;
    let tls = setup[1] & 2 != 0;
    let tls_available = setup[1] & 4 != 0;
    let max_rcpts = 1 + (setup[2] % 4) as usize;
    let mut s = SmtpSession::new(listener, DOMAINS, trusted, tls, tls_available, max_rcpts);
    let first = s.connected(verdict(setup[3]));
    if let Some(r) = reply_of(&first) {
        well_formed(r);
    }
    if matches!(first, SmtpStep::Close(_)) {
        return;
    }
    for raw in rest.split(|&b| b == b'\n') {
        let pick = raw.first().copied().unwrap_or(0);
        let mut line = raw.strip_suffix(b"\r").unwrap_or(raw).to_vec();
        if pick == b'~' {
            well_formed(&s.line_too_long());
            continue;
        }
        if pick == b'^' {
            s.tls_started();
            continue;
        }
        line.extend_from_slice(b"\r\n");
        let mut step = s.command_with(&line, pick & 0x20 != 0);
        // Answer what the core asks (an AUTH answer may be a reply only).
        while let SmtpStep::Policy(_) | SmtpStep::Auth { .. } | SmtpStep::Verify(_) = step {
            step = match step {
                SmtpStep::Policy(check) => {
                    if let Some((addr, local)) = check.rcpt() {
                        // Relay protection: an outside domain reaches the
                        // rules only for a client that may relay.
                        assert!(
                            local || s.may_relay(),
                            "relay rcpt {addr} for an untrusted client"
                        );
                    }
                    if pick & 0x40 != 0 {
                        s.hold(&check);
                    }
                    s.policy_answer(check, verdict(pick.rotate_left(3)))
                }
                SmtpStep::Verify(_) => s.verify_answer(pick >> 2),
                _ => {
                    let who =
                        (pick & 1 == 0).then_some(("alice@local.test", &["alice@local.test"][..]));
                    s.auth_result(who)
                }
            };
        }
        if let Some(r) = reply_of(&step) {
            well_formed(r);
        }
        match step {
            SmtpStep::Data(_) => {
                // The 354 only with MAIL and at least one accepted RCPT;
                // the intake takes the transaction (and would answer 250).
                let tx = s.take_transaction().expect("354 without a transaction");
                assert!(!tx.rcpts.is_empty(), "354 without recipients");
                for (addr, local) in &tx.rcpts {
                    if !local {
                        assert!(s.may_relay(), "relayed to {addr} for an untrusted client");
                    }
                    let domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
                    let ours = DOMAINS.iter().any(|d| d.eq_ignore_ascii_case(domain));
                    assert_eq!(*local, ours, "{addr}: local={local}");
                }
                crlf_only(tx.received.as_bytes());
                assert!(tx.received.starts_with("Received: ") && tx.received.ends_with("\r\n"));
            }
            SmtpStep::Close(_) => return,
            _ => {}
        }
    }
});

/// CR only before LF, LF only after CR.
fn crlf_only(b: &[u8]) {
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\n' => assert!(
                i > 0 && b[i - 1] == b'\r',
                "bare LF: {:?}",
                String::from_utf8_lossy(b)
            ),
            b'\r' => assert_eq!(
                b.get(i + 1),
                Some(&b'\n'),
                "bare CR: {:?}",
                String::from_utf8_lossy(b)
            ),
            _ => {}
        }
    }
}
