//! SPF, DKIM and DMARC against a real DNS server on 127.0.0.1.

use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine as _;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use postern::config::{ChecksConfig, DnsConfig, DurationStr, RulesConfig};
use postern::mail::Enhanced;
use postern::policy::{Policy, Verdict};

/// Signs `msg` for `domain` with selector `sel`; returns the signed message
/// and the DKIM TXT record.
fn dkim_sign(domain: &str, msg: &str) -> (String, String) {
    let pkcs8 = Ed25519Key::generate_pkcs8().expect("keygen");
    let key = Ed25519Key::from_pkcs8_der(&pkcs8).expect("key");
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    let sig = DkimSigner::from_key(key)
        .domain(domain)
        .selector("sel")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(msg.as_bytes())
        .expect("sign");
    (
        format!("{}{}", sig.to_header(), msg),
        format!("v=DKIM1; k=ed25519; p={public}"),
    )
}

async fn policy_with_dns(records: &[(&str, &str)], dirs: &Dirs) -> Policy {
    let dns = start_dns(records).await;
    dirs.load(RulesConfig::default(), ChecksConfig::default(), vec![dns])
        .unwrap_or_else(|p| panic!("load: {p:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_pass_fail_softfail_none() {
    let dirs = Dirs::new(&[], "");
    let policy = policy_with_dns(
        &[
            ("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
            ("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
            ("soft.test", "v=spf1 ip4:192.0.2.1 ~all"),
            ("neutral.test", "v=spf1 ?all"),
        ],
        &dirs,
    )
    .await;
    let set = policy.current();
    for (domain, want) in [
        ("pass.test", "pass"),
        ("fail.test", "fail"),
        ("soft.test", "softfail"),
        ("neutral.test", "neutral"),
        ("nothing.test", "none"),
    ] {
        let from = format!("someone@{domain}");
        let t = tx("127.0.0.1", "client.test", &from, &["bob@example.test"]);
        let msg = message(&from, "bob@example.test", "hi", "hello");
        let started = Instant::now();
        let out = set.data(&t, msg.as_bytes()).await;
        assert_eq!(out.spf, want, "{domain}: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{domain} took {:?}",
            started.elapsed()
        );
        let (name, value) = &out.headers[0];
        assert_eq!(name, "Authentication-Results");
        assert!(
            value.starts_with(&format!(
                "mx.postern.test; spf={want} smtp.mailfrom={from}; dkim=none; dmarc="
            )),
            "{value}"
        );
        assert_eq!(out.verdict, Verdict::Accept);
    }
    // Bounces are checked on the HELO identity.
    let t = tx("127.0.0.1", "pass.test", "", &["bob@example.test"]);
    let out = set
        .data(
            &t,
            message("mailer-daemon@pass.test", "bob@example.test", "bounce", "x").as_bytes(),
        )
        .await;
    assert_eq!(out.spf, "pass");
    assert!(
        out.headers[0].1.contains("smtp.helo=pass.test"),
        "{}",
        out.headers[0].1
    );
    let m = &policy.metrics().auth_results;
    assert_eq!(m.with_label_values(&["spf", "pass"]).get(), 2);
    assert_eq!(m.with_label_values(&["spf", "fail"]).get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_verifies_and_breaks_with_changed_body() {
    let dirs = Dirs::new(&[], "");
    let msg = message(
        "alice@signed.test",
        "bob@example.test",
        "signed",
        "the original body",
    );
    let (signed, key_record) = dkim_sign("signed.test", &msg);
    let policy = policy_with_dns(
        &[
            ("signed.test", "v=spf1 ip4:127.0.0.1 -all"),
            ("sel._domainkey.signed.test", &key_record),
            ("_dmarc.signed.test", "v=DMARC1; p=reject"),
        ],
        &dirs,
    )
    .await;
    let set = policy.current();
    let t = tx(
        "127.0.0.1",
        "client.test",
        "alice@signed.test",
        &["bob@example.test"],
    );
    let out = set.data(&t, signed.as_bytes()).await;
    assert_eq!(
        (out.spf.as_str(), out.dkim.as_str(), out.dmarc.as_str()),
        ("pass", "pass", "pass"),
        "{out:?}"
    );
    let ar = &out.headers[0].1;
    assert!(
        ar.contains("dkim=pass header.d=signed.test header.s=sel"),
        "{ar}"
    );
    assert!(
        ar.contains("dmarc=pass header.from=signed.test policy.dmarc=reject"),
        "{ar}"
    );

    // Same signature, body changed in transit.
    let tampered = signed.replace("the original body", "a changed body");
    // From another IP, so SPF does not rescue DMARC either.
    let t = tx(
        "192.0.2.7",
        "client.test",
        "alice@signed.test",
        &["bob@example.test"],
    );
    let out = set.data(&t, tampered.as_bytes()).await;
    assert_eq!(out.dkim, "fail", "{out:?}");
    assert_eq!(out.spf, "fail");
    assert_eq!(out.dmarc, "fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_reject_and_spf_fail_with_shipped_rules() {
    let dns = start_dns(&[
        ("strict.test", "v=spf1 ip4:192.0.2.1 -all"),
        ("_dmarc.strict.test", "v=DMARC1; p=reject"),
        ("loose.test", "v=spf1 ip4:192.0.2.1 -all"),
        ("good.test", "v=spf1 ip4:127.0.0.1 -all"),
    ])
    .await;
    let policy = Policy::load(
        RulesConfig {
            dir: shipped_rules(),
            ..RulesConfig::default()
        },
        shipped_policies(),
        ChecksConfig::default(),
        DnsConfig {
            nameservers: vec![dns],
        },
        "mx.postern.test",
    )
    .unwrap_or_else(|p| panic!("shipped set: {p:?}"));
    let set = policy.current();

    let t = tx(
        "127.0.0.1",
        "client.test",
        "ceo@strict.test",
        &["bob@example.test"],
    );
    let out = set
        .data(
            &t,
            message("ceo@strict.test", "bob@example.test", "wire money", "now").as_bytes(),
        )
        .await;
    assert_eq!(out.dmarc, "fail");
    assert!(
        matches!(&out.verdict, Verdict::Reject(r) if r.code == 550 && r.enhanced == Some(Enhanced::new(5, 7, 1))),
        "{out:?}"
    );
    assert_eq!(out.script.as_deref(), Some("10-auth.rhai"));

    // SPF fail without DMARC record: quarantine.
    let t = tx(
        "127.0.0.1",
        "client.test",
        "x@loose.test",
        &["bob@example.test"],
    );
    let out = set
        .data(
            &t,
            message("x@loose.test", "bob@example.test", "hi", "x").as_bytes(),
        )
        .await;
    assert!(
        matches!(&out.verdict, Verdict::Quarantine { reason } if reason.contains("SPF fail")),
        "{out:?}"
    );

    // A good message passes and is tagged as external.
    let t = tx(
        "127.0.0.1",
        "client.test",
        "x@good.test",
        &["bob@example.test"],
    );
    let out = set
        .data(
            &t,
            message("x@good.test", "bob@example.test", "hi", "x").as_bytes(),
        )
        .await;
    assert_eq!(out.verdict, Verdict::Accept, "{out:?}");
    assert!(
        out.headers
            .contains(&("X-Postern-External".to_string(), "yes".to_string()))
    );

    // An executable attachment is held.
    let with_exe = "From: <x@good.test>\r\nTo: <bob@example.test>\r\nSubject: invoice\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"Invoice.PDF.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n";
    let out = set.data(&t, with_exe.as_bytes()).await;
    assert!(
        matches!(&out.verdict, Verdict::Quarantine { reason } if reason.contains("Invoice.PDF.exe")),
        "{out:?}"
    );
    assert_eq!(out.script.as_deref(), Some("20-attachments.rhai"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_dns_gives_temperror_within_the_deadline() {
    let (addr, _socket) = silent_dns().await;
    let dirs = Dirs::new(&[], "");
    let checks = ChecksConfig {
        deadline: DurationStr(Duration::from_millis(800)),
        ..ChecksConfig::default()
    };
    let policy = dirs
        .load(RulesConfig::default(), checks, vec![addr])
        .unwrap_or_else(|p| panic!("{p:?}"));
    let t = tx(
        "127.0.0.1",
        "client.test",
        "a@slow.test",
        &["bob@example.test"],
    );
    let started = Instant::now();
    let out = policy
        .current()
        .data(
            &t,
            message("a@slow.test", "bob@example.test", "x", "y").as_bytes(),
        )
        .await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert_eq!(out.spf, "temperror", "{out:?}");
    assert_eq!(out.dmarc, "temperror", "{out:?}");
}
