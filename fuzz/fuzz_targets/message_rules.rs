//! The message → rule object conversion (`m` in `data(m)`, mail-parser) and
//! the header helpers (`headers::scan`, `body_start`, the authserv-id
//! parser, the forged `Authentication-Results` strip) on arbitrary bytes.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use postern::fuzzing::{
    authserv_id, body_start, header_fields_only, header_name_value, header_scan, rule_message,
    strip_forged_auth_results,
};
use postern::policy::{CheckResults, ConnInfo, TxInfo};

const HOST: &str = "mx.local.test";

fuzz_target!(|msg: &[u8]| {
    // headers::scan: fields in order, inside the header section.
    let (fields, header_end, body) = header_scan(msg);
    assert!(header_end <= body && body <= msg.len());
    assert_eq!(body, body_start(msg));
    assert_eq!(header_fields_only(msg), &msg[..header_end]);
    let mut pos = 0;
    for &(start, colon, end) in &fields {
        assert_eq!(start, pos, "fields are contiguous");
        assert!(start < end && end <= header_end);
        assert!(colon >= start && colon <= end);
        pos = end;
        let (name, value) = header_name_value(msg, start, colon, end);
        assert!(name.len() <= end - start && value.len() <= end - start);
        if name.eq_ignore_ascii_case(b"Authentication-Results") {
            let id = authserv_id(value);
            // A token has no space or ';'; a quoted-string (RFC 8601 2.2:
            // authserv-id = value) may hold anything, and then only fails to
            // match our names.
            if !value.contains(&b'"') {
                assert!(
                    !id.contains(char::is_whitespace) && !id.contains(';'),
                    "{id:?}"
                );
            }
        }
    }
    assert_eq!(pos, header_end);

    // The strip removes whole fields of ours and nothing else.
    let stripped = strip_forged_auth_results(msg, &[HOST]);
    assert!(stripped.len() <= msg.len());
    assert!(
        stripped.ends_with(&msg[header_end..]),
        "the body is untouched"
    );
    let (after, _, _) = header_scan(&stripped);
    for &(start, colon, end) in &after {
        let (name, value) = header_name_value(&stripped, start, colon, end);
        if name.eq_ignore_ascii_case(b"Authentication-Results") {
            assert!(
                !authserv_id(value).eq_ignore_ascii_case(HOST),
                "a forged A-R survived"
            );
        }
    }
    assert_eq!(
        &*strip_forged_auth_results(&stripped, &[HOST]),
        &*stripped,
        "strip is idempotent"
    );

    // What the scripts read.
    let tx = TxInfo {
        conn: ConnInfo {
            ip: IpAddr::from([192, 0, 2, 1]),
            port: 2525,
            tls: false,
        },
        helo: "c.test".into(),
        from: "a@b.test".into(),
        auth_user: None,
        rcpts: vec!["x@local.test".into()],
        submission: false,
        trusted: false,
    };
    let checks = CheckResults {
        spf: "pass".into(),
        dkim: "fail".into(),
        dmarc: "none".into(),
        dmarc_policy: "none".into(),
    };
    let m = rule_message(&tx, msg, &checks);
    for (name, value) in &m.headers {
        assert_eq!(*name, name.to_ascii_lowercase());
        assert!(!value.contains(['\r', '\n']), "unfolded: {value:?}");
    }
    assert!(m.body.len() <= 1 << 20);
    let _ = (m.subject, m.attachments);
});
