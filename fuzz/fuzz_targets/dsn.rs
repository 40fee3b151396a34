//! DSN generation for arbitrary original messages, diagnostics and
//! addresses, read back by mail-parser. Input: NUL-separated fields:
//! sender, then (recipient, remote MTA, diagnostic) triples, and the last
//! field is the original message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_parser::{MessageParser, MimeHeaders};
use postern::fuzzing::{DsnFailure, dsn};

fuzz_target!(|data: &[u8]| {
    let mut parts: Vec<&[u8]> = data.splitn(8, |&b| b == 0).collect();
    let Some(original) = parts.pop() else {
        return;
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let sender = parts
        .first()
        .map(|s| text(s))
        .unwrap_or_else(|| "s@a.test".into());
    let mut failures = Vec::new();
    for (i, f) in parts
        .iter()
        .skip(1)
        .collect::<Vec<_>>()
        .chunks(3)
        .enumerate()
    {
        failures.push(DsnFailure {
            address: text(f[0]),
            remote: f.get(1).map(|r| text(r)).filter(|r| !r.is_empty()),
            status: (5, (i % 8) as u16, 1),
            diagnostic: f
                .get(2)
                .map(|d| text(d))
                .unwrap_or_else(|| "550 5.1.1 no".into()),
        });
    }
    if failures.is_empty() {
        failures.push(DsnFailure {
            address: "x@y.test".into(),
            remote: None,
            status: (5, 1, 1),
            diagnostic: "550 5.1.1 no such user".into(),
        });
    }
    let out = dsn(
        "mx.local.test",
        &sender,
        "00AB12",
        1_700_000_000,
        &failures,
        original,
    );

    // Wire form: CRLF only, no line over 998 octets (RFC 5322 2.1.1).
    for (i, &c) in out.iter().enumerate() {
        match c {
            b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "bare LF at {i}"),
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            _ => {}
        }
    }
    for line in out.split(|&b| b == b'\n') {
        assert!(line.len() <= 999, "a line of {} octets", line.len());
    }

    // Structure: multipart/report with a message/delivery-status part.
    let m = MessageParser::default()
        .parse(&out)
        .expect("the DSN parses");
    let ct = m.content_type().expect("Content-Type");
    assert!(ct.ctype().eq_ignore_ascii_case("multipart"));
    assert!(
        ct.subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    );
    let status = m.parts.iter().any(|p| {
        p.content_type().is_some_and(|c| {
            c.ctype().eq_ignore_ascii_case("message")
                && c.subtype()
                    .is_some_and(|s| s.eq_ignore_ascii_case("delivery-status"))
        })
    });
    assert!(status, "no message/delivery-status part");
    assert!(m.parts.len() >= 4, "text, status, headers under the report");
});
