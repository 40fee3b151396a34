//! The policy engine over real SMTP: SPF/DKIM/DMARC against a loopback DNS
//! server, every verdict at every stage, runaway and failing scripts, rate
//! limits, reloads, and the `rules test` / `check` commands — all through the
//! real `postern` binary, checked the way a mail admin would check them.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use tokio::net::TcpStream;

use crate::common::*;
use crate::dns::message;

// ---------------------------------------------------------------- helpers

/// `crate::dns::start_dns`, again on a rare port clash: it binds UDP on an
/// ephemeral port and then TCP on the same number, which another socket of
/// the (parallel) tests may hold.
async fn start_dns(records: &[(&str, &str)]) -> std::net::SocketAddr {
    let owned: Vec<(String, String)> = records
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    for _ in 0..5 {
        let records = owned.clone();
        let started = tokio::spawn(async move {
            let refs: Vec<(&str, &str)> = records
                .iter()
                .map(|(n, t)| (n.as_str(), t.as_str()))
                .collect();
            crate::dns::start_dns(&refs).await
        })
        .await;
        if let Ok(addr) = started {
            return addr;
        }
    }
    panic!("could not start the DNS server");
}

/// `Gateway::start`, again when the process could not bind one of its
/// ports: the harness picks free ports by binding and closing them, and a
/// parallel test may take one in between.
async fn start(opts: Opts) -> Gateway {
    for _ in 0..3 {
        if let Ok(gw) = tokio::spawn(Gateway::start(opts.clone())).await {
            return gw;
        }
    }
    Gateway::start(opts).await
}

fn rules(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

/// The value of one sample in Prometheus text output (labels in any order);
/// 0 when the series does not exist (yet).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let got: Vec<(&str, &str)> = l
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if got.len() == labels.len() && labels.iter().all(|l| got.contains(l)) {
            return value.parse().unwrap();
        }
    }
    0.0
}

/// Poll an async condition until it holds or `timeout` passes.
async fn until(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f().await
}

async fn metric_of(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&gw.metrics_text().await, name, labels)
}

/// Connect and say EHLO.
async fn session(gw: &Gateway) -> Client<TcpStream> {
    let mut c = Client::connect(gw.smtp).await;
    let r = c.cmd("EHLO client.test").await;
    assert!(r.starts_with("250"), "EHLO: {r}");
    c
}

/// One whole message in a fresh session; the reply after the final dot.
async fn send(gw: &Gateway, from: &str, to: &str, data: &[u8]) -> String {
    let mut c = session(gw).await;
    let r = c.mail(from, &[to], data).await;
    c.cmd("QUIT").await;
    r
}

/// The header fields of a message, unfolded: (name, value).
fn header_fields(msg: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.to_string(), v.trim().to_string()));
        }
    }
    out
}

/// The values of every `name` field (case-insensitive name).
fn fields(msg: &[u8], name: &str) -> Vec<String> {
    header_fields(msg)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect()
}

/// The one `Authentication-Results` field of this gateway (there must be exactly one).
fn our_auth_results(msg: &[u8]) -> String {
    let ours: Vec<String> = fields(msg, "Authentication-Results")
        .into_iter()
        .filter(|v| {
            v.split(';')
                .next()
                .is_some_and(|id| id.trim().eq_ignore_ascii_case("gw.test"))
        })
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "exactly one Authentication-Results from gw.test: {ours:?}\n{}",
        String::from_utf8_lossy(msg)
    );
    ours[0].clone()
}

/// The delivered message whose Subject is `subject`, waiting for it.
async fn delivered(sink: &Sink, subject: &str) -> Vec<u8> {
    delivered_with(sink, &format!("Subject: {subject}\r\n")).await
}

/// The delivered message that contains `want`, waiting for it.
async fn delivered_with(sink: &Sink, want: &str) -> Vec<u8> {
    let find = || {
        sink.messages()
            .into_iter()
            .find(|g| String::from_utf8_lossy(&g.body).contains(want))
    };
    assert!(
        eventually(Duration::from_secs(10), || find().is_some()).await,
        "{want:?} was not delivered; the sink has {:?}",
        sink.messages()
            .iter()
            .map(|g| fields(&g.body, "Subject"))
            .collect::<Vec<_>>()
    );
    find().unwrap().body
}

fn subjects(sink: &Sink) -> Vec<String> {
    sink.messages()
        .iter()
        .flat_map(|g| fields(&g.body, "Subject"))
        .collect()
}

fn quarantine_list(gw: &Gateway) -> String {
    let (ok, out, err) = gw.admin(&["quarantine", "list"]);
    assert!(ok, "quarantine list failed: {err}");
    out
}

fn queue_list(gw: &Gateway) -> String {
    let (ok, out, err) = gw.admin(&["queue", "list"]);
    assert!(ok, "queue list failed: {err}");
    out
}

fn pid(gw: &Gateway) -> String {
    gw.child.as_ref().expect("running").id().to_string()
}

fn sighup(gw: &Gateway) {
    let st = Command::new("kill")
        .args(["-HUP", &pid(gw)])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Signs `msg` for `domain` (selector `sel`, Ed25519); returns the signed
/// message and the key's DNS TXT record.
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

fn plain(subject: &str) -> Vec<u8> {
    format!("From: <x@remote.test>\r\nTo: <bob@local.test>\r\nSubject: {subject}\r\n\r\nhello")
        .into_bytes()
}

// ---------------------------------------------------------------- 1. SPF

#[tokio::test(flavor = "multi_thread")]
async fn spf_results_are_in_the_header_and_forged_results_are_removed() {
    let dns = start_dns(&[
        ("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
        ("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
        ("soft.test", "v=spf1 ip4:192.0.2.1 ~all"),
    ])
    .await;
    let sink = Sink::start(false).await;
    // No rules: every result is delivered, so the header itself can be read.
    let gw = start(Opts {
        dns: Some(dns),
        ..Opts::sink(sink.port)
    })
    .await;

    for (from, subject, want) in [
        ("alice@pass.test", "spf-pass", "pass"),
        ("alice@soft.test", "spf-soft", "softfail"),
        ("alice@nothing.test", "spf-none", "none"),
    ] {
        let r = send(
            &gw,
            from,
            "bob@local.test",
            message(from, "bob@local.test", subject, "hi").as_bytes(),
        )
        .await;
        assert!(r.starts_with("250 2.0.0"), "{subject}: {r}");
        let body = delivered(&sink, subject).await;
        let ar = our_auth_results(&body);
        assert!(
            ar.starts_with(&format!("gw.test; spf={want} smtp.mailfrom={from};")),
            "{subject}: {ar}"
        );
        // The header name is exactly that, and it follows our Received.
        let names: Vec<String> = header_fields(&body).into_iter().map(|f| f.0).collect();
        assert_eq!(names[0], "Received", "{names:?}");
        assert_eq!(names[1], "Authentication-Results", "{names:?}");
    }

    // A bounce (MAIL FROM:<>) is checked on the HELO name.
    let mut c = Client::connect(gw.smtp).await;
    assert!(c.cmd("EHLO pass.test").await.starts_with("250"));
    let r = c
        .mail(
            "",
            &["bob@local.test"],
            message(
                "mailer-daemon@pass.test",
                "bob@local.test",
                "spf-bounce",
                "x",
            )
            .as_bytes(),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let ar = our_auth_results(&delivered(&sink, "spf-bounce").await);
    assert!(
        ar.starts_with("gw.test; spf=pass smtp.helo=pass.test;"),
        "{ar}"
    );

    // A failing message that carries forged results claiming to be ours.
    let forged = "Authentication-Results: gw.test; spf=pass smtp.mailfrom=ceo@fail.test\r\n\
         Authentication-Results: GW.TEST;\r\n\tdkim=pass header.d=fail.test\r\n\
         Authentication-Results: other.test; spf=pass smtp.mailfrom=ceo@fail.test\r\n\
         From: <ceo@fail.test>\r\nTo: <bob@local.test>\r\nSubject: spf-forged\r\n\r\n\
         Authentication-Results: gw.test; spf=pass (in the body: stays)\r\n";
    let r = send(&gw, "ceo@fail.test", "bob@local.test", forged.as_bytes()).await;
    assert!(r.starts_with("250"), "{r}");
    let body = delivered(&sink, "spf-forged").await;
    let ar = our_auth_results(&body);
    assert!(
        ar.starts_with("gw.test; spf=fail smtp.mailfrom=ceo@fail.test;"),
        "{ar}"
    );
    let all = fields(&body, "Authentication-Results");
    assert_eq!(all.len(), 2, "ours and other.test's: {all:?}");
    assert!(
        all.iter().any(|v| v.starts_with("other.test; spf=pass")),
        "a foreign result is kept: {all:?}"
    );
    assert!(
        !all.iter().any(|v| v.contains("dkim=pass")),
        "the folded forged one is gone: {all:?}"
    );
    assert!(
        String::from_utf8_lossy(&body)
            .contains("\r\n\r\nAuthentication-Results: gw.test; spf=pass (in the body: stays)"),
        "the body is untouched"
    );

    let m = gw.metrics_text().await;
    for (result, n) in [
        ("pass", 2.0),
        ("softfail", 1.0),
        ("none", 1.0),
        ("fail", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                "postern_auth_results_total",
                &[("method", "spf"), ("result", result)]
            ),
            n,
            "spf={result}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spf_fail_is_quarantined_by_the_shipped_rules() {
    let dns = start_dns(&[
        ("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
        ("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
    ])
    .await;
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        dns: Some(dns),
        rules: shipped_rules(),
        ..Opts::sink(sink.port)
    })
    .await;

    let forged = format!(
        "Authentication-Results: gw.test; spf=pass smtp.mailfrom=ceo@fail.test\r\n{}",
        message("ceo@fail.test", "bob@local.test", "pay this invoice", "now")
    );
    let r = send(&gw, "ceo@fail.test", "bob@local.test", forged.as_bytes()).await;
    assert!(
        r.starts_with("250 2.0.0"),
        "the client is told it was accepted: {r}"
    );

    // A good message after it: once that one is delivered, the held one
    // would have been too.
    let r = send(
        &gw,
        "alice@pass.test",
        "bob@local.test",
        message("alice@pass.test", "bob@local.test", "good", "hi").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let body = delivered(&sink, "good").await;
    assert!(
        our_auth_results(&body).starts_with("gw.test; spf=pass smtp.mailfrom=alice@pass.test;")
    );
    assert_eq!(
        fields(&body, "X-Postern-External"),
        ["yes"],
        "30-tag.rhai tags it"
    );

    let list = quarantine_list(&gw);
    assert!(list.contains("1 message(s)"), "{list}");
    assert!(
        list.contains("ceo@fail.test -> bob@local.test  (SPF fail for fail.test)"),
        "{list}"
    );
    assert!(queue_list(&gw).contains("0 message(s)"));
    assert_eq!(subjects(&sink), ["good"], "only the good one was delivered");

    // The held copy carries the real result, not the forged one.
    let id = list
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let (ok, shown, err) = gw.admin(&["quarantine", "show", id]);
    assert!(ok, "{err}");
    assert!(
        shown.contains("Authentication-Results: gw.test; spf=fail"),
        "{shown}"
    );
    assert!(!shown.contains("gw.test; spf=pass"), "{shown}");

    let m = gw.metrics_text().await;
    assert_eq!(
        metric(
            &m,
            "postern_verdicts_total",
            &[("stage", "data"), ("verdict", "quarantine")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "postern_auth_results_total",
            &[("method", "spf"), ("result", "fail")]
        ),
        1.0
    );
}

// ---------------------------------------------------------------- 2. DKIM, DMARC

#[tokio::test(flavor = "multi_thread")]
async fn dkim_pass_and_fail_and_dmarc_reject() {
    let msg = message(
        "alice@signed.test",
        "bob@local.test",
        "signed",
        "the original body",
    );
    let (signed, key_record) = dkim_sign("signed.test", &msg);
    let dns = start_dns(&[
        ("signed.test", "v=spf1 ip4:127.0.0.1 -all"),
        ("sel._domainkey.signed.test", &key_record),
        ("_dmarc.signed.test", "v=DMARC1; p=reject"),
        ("strict.test", "v=spf1 ip4:192.0.2.1 -all"),
        ("_dmarc.strict.test", "v=DMARC1; p=reject"),
        ("careful.test", "v=spf1 ip4:192.0.2.1 -all"),
        ("_dmarc.careful.test", "v=DMARC1; p=quarantine"),
    ])
    .await;
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        dns: Some(dns),
        rules: shipped_rules(),
        ..Opts::sink(sink.port)
    })
    .await;

    let r = send(
        &gw,
        "alice@signed.test",
        "bob@local.test",
        signed.as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let body = delivered(&sink, "signed").await;
    let ar = our_auth_results(&body);
    assert!(
        ar.contains("; dkim=pass header.d=signed.test header.s=sel"),
        "{ar}"
    );
    assert!(
        ar.contains("; dmarc=pass header.from=signed.test policy.dmarc=reject"),
        "{ar}"
    );
    // Delivered byte for byte under the added headers, so the signature
    // still verifies downstream.
    assert!(
        body.ends_with(format!("{signed}\r\n").as_bytes()),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(fields(&body, "DKIM-Signature").len(), 1);

    // The same signature over a body changed in transit. SPF still passes
    // (aligned), so DMARC passes and the shipped rules only add to the score.
    let tampered = signed.replace("the original body", "a changed body");
    let r = send(
        &gw,
        "alice@signed.test",
        "bob@local.test",
        tampered.as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let body = delivered_with(&sink, "a changed body").await;
    let ar = our_auth_results(&body);
    assert!(ar.contains("; dkim=fail"), "{ar}");
    assert!(!ar.contains("dkim=pass"), "{ar}");

    // DMARC p=reject and nothing aligned passes: refused at the end of DATA.
    let mut c = session(&gw).await;
    let r = c
        .mail(
            "ceo@strict.test",
            &["bob@local.test"],
            message("ceo@strict.test", "bob@local.test", "wire money", "now").as_bytes(),
        )
        .await;
    assert_eq!(
        r,
        "550 5.7.1 Message rejected by the DMARC policy of the sender's domain"
    );
    // The session goes on: the next transaction is fine.
    let r = c
        .mail("alice@signed.test", &["bob@local.test"], signed.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 3).await);
    assert_eq!(
        subjects(&sink),
        ["signed", "signed", "signed"],
        "not the DMARC failure"
    );
    assert!(quarantine_list(&gw).contains("0 message(s)"));

    // DMARC p=quarantine: accepted, and held.
    let r = c
        .mail(
            "ceo@careful.test",
            &["bob@local.test"],
            message("ceo@careful.test", "bob@local.test", "gift cards", "now").as_bytes(),
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let list = quarantine_list(&gw);
    assert!(
        list.contains(
            "ceo@careful.test -> bob@local.test  (DMARC failed, the sender's domain asks for quarantine)"
        ),
        "{list}"
    );

    let m = gw.metrics_text().await;
    let dkim = |r| {
        metric(
            &m,
            "postern_auth_results_total",
            &[("method", "dkim"), ("result", r)],
        )
    };
    let dmarc = |r| {
        metric(
            &m,
            "postern_auth_results_total",
            &[("method", "dmarc"), ("result", r)],
        )
    };
    assert_eq!((dkim("pass"), dkim("fail")), (2.0, 1.0));
    assert_eq!(dmarc("fail"), 2.0);
    assert_eq!(
        metric(
            &m,
            "postern_verdicts_total",
            &[("stage", "data"), ("verdict", "reject")]
        ),
        1.0
    );
}

// ---------------------------------------------------------------- 3. verdicts

const VERDICTS: &str = r#"
fn pick(word) {
    switch word {
        "reject" => reject(553, "5.7.1 the rules say no"),
        "tempfail" => tempfail("4.7.0 the rules say later"),
        "quarantine" => quarantine("the rules hold it"),
        "discard" => discard(),
        "accept" => accept(),
        _ => ()
    }
}
fn mail_from(c) { if c.from.starts_with("mf-") { pick(c.from.sub_string(3).split("@")[0]) } }
fn rcpt(c) { if c.rcpt.starts_with("rc-") { pick(c.rcpt.sub_string(3).split("@")[0]) } }
fn data(m) { if m.subject.starts_with("data-") { pick(m.subject.sub_string(5)) } }
"#;

/// Runs after VERDICTS: refuses everything an earlier accept() must shield.
const AFTER_ACCEPT: &str = r#"
fn mail_from(c) { if c.from == "mf-accept@remote.test" { reject(550, "5.7.1 not shielded") } }
fn rcpt(c) { if c.rcpt == "rc-accept@local.test" { reject(550, "5.7.1 not shielded") } }
fn data(m) { if m.subject == "data-accept" { reject(550, "5.7.1 not shielded") } }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn every_verdict_at_mail_rcpt_and_data() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: rules(&[
            ("10-verdicts.rhai", VERDICTS),
            ("20-after.rhai", AFTER_ACCEPT),
        ]),
        ..Opts::sink(sink.port)
    })
    .await;

    // Refusals at MAIL: nothing of the transaction is accepted after it.
    for (word, want) in [
        ("reject", "553 5.7.1 the rules say no"),
        ("tempfail", "451 4.7.0 the rules say later"),
    ] {
        let mut c = session(&gw).await;
        let r = c.cmd(&format!("MAIL FROM:<mf-{word}@remote.test>")).await;
        assert_eq!(r, want);
        let r = c.cmd("RCPT TO:<bob@local.test>").await;
        assert!(r.starts_with("503"), "RCPT after a refused MAIL: {r}");
        let r = c.cmd("DATA").await;
        assert!(r.starts_with("503"), "DATA after a refused MAIL: {r}");
        // The session is still usable.
        let r = c
            .mail(
                "x@remote.test",
                &["bob@local.test"],
                &plain(&format!("after-mf-{word}")),
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    // Refusals at RCPT: that recipient is not taken; with none, no DATA.
    for (word, want) in [
        ("reject", "553 5.7.1 the rules say no"),
        ("tempfail", "451 4.7.0 the rules say later"),
    ] {
        let mut c = session(&gw).await;
        assert!(c.cmd("MAIL FROM:<x@remote.test>").await.starts_with("250"));
        let r = c.cmd(&format!("RCPT TO:<rc-{word}@local.test>")).await;
        assert_eq!(r, want);
        let r = c.cmd("DATA").await;
        assert!(r.starts_with("554"), "DATA without recipients: {r}");
        // One good recipient next to a refused one: only it gets the mail.
        assert!(c.cmd("RSET").await.starts_with("250"));
        assert!(c.cmd("MAIL FROM:<x@remote.test>").await.starts_with("250"));
        assert_eq!(
            c.cmd(&format!("RCPT TO:<rc-{word}@local.test>")).await,
            want
        );
        assert!(c.cmd("RCPT TO:<carol@local.test>").await.starts_with("250"));
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(&plain(&format!("partial-rc-{word}"))).await;
        c.send(b"\r\n.\r\n").await;
        let r = c.reply().await;
        assert!(r.starts_with("250"), "{r}");
        let subject = format!("partial-rc-{word}");
        delivered(&sink, &subject).await;
        let got = sink
            .messages()
            .into_iter()
            .find(|g| fields(&g.body, "Subject") == [subject.as_str()])
            .unwrap();
        assert_eq!(got.rcpts, ["carol@local.test"]);
    }
    // Refusals at the end of DATA.
    let r = send(
        &gw,
        "x@remote.test",
        "bob@local.test",
        &plain("data-reject"),
    )
    .await;
    assert_eq!(r, "553 5.7.1 the rules say no");
    let r = send(
        &gw,
        "x@remote.test",
        "bob@local.test",
        &plain("data-tempfail"),
    )
    .await;
    assert_eq!(r, "451 4.7.0 the rules say later");

    // accept() decides its stage: later scripts are not asked.
    let mut c = session(&gw).await;
    let r = c
        .mail(
            "mf-accept@remote.test",
            &["rc-accept@local.test"],
            &plain("data-accept"),
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");

    // Quarantine and discard: the client always hears 250.
    let cases = [
        (
            "mf-quarantine@remote.test",
            "bob@local.test",
            "held-at-mail",
        ),
        ("x@remote.test", "rc-quarantine@local.test", "held-at-rcpt"),
        ("x@remote.test", "bob@local.test", "data-quarantine"),
        (
            "mf-discard@remote.test",
            "bob@local.test",
            "dropped-at-mail",
        ),
        ("x@remote.test", "rc-discard@local.test", "dropped-at-rcpt"),
        ("x@remote.test", "bob@local.test", "data-discard"),
    ];
    for (from, to, subject) in cases {
        let mut c = session(&gw).await;
        assert!(
            c.cmd(&format!("MAIL FROM:<{from}>"))
                .await
                .starts_with("250 "),
            "{subject}"
        );
        assert!(
            c.cmd(&format!("RCPT TO:<{to}>")).await.starts_with("250 "),
            "{subject}"
        );
        assert!(c.cmd("DATA").await.starts_with("354"), "{subject}");
        c.send(&plain(subject)).await;
        c.send(b"\r\n.\r\n").await;
        let r = c.reply().await;
        assert!(r.starts_with("250 2.0.0"), "{subject}: {r}");
    }

    // A sentinel: once it is delivered, anything queued before it would be too.
    let r = send(&gw, "x@remote.test", "bob@local.test", &plain("sentinel")).await;
    assert!(r.starts_with("250"), "{r}");
    delivered(&sink, "sentinel").await;
    delivered(&sink, "data-accept").await;
    // Wait until every queued message is out, then look at what arrived.
    assert!(
        eventually(Duration::from_secs(10), || queue_list(&gw)
            .contains("0 message(s)"))
        .await,
        "{}",
        queue_list(&gw)
    );
    let mut got = subjects(&sink);
    got.sort();
    assert_eq!(
        got,
        [
            "after-mf-reject",
            "after-mf-tempfail",
            "data-accept",
            "partial-rc-reject",
            "partial-rc-tempfail",
            "sentinel"
        ]
    );

    let list = quarantine_list(&gw);
    assert!(list.contains("3 message(s)"), "{list}");
    for line in [
        "mf-quarantine@remote.test -> bob@local.test  (the rules hold it)",
        "x@remote.test -> rc-quarantine@local.test  (the rules hold it)",
        "x@remote.test -> bob@local.test  (the rules hold it)",
    ] {
        assert!(list.contains(line), "{line}\n{list}");
    }

    let m = gw.metrics_text().await;
    let v = |stage, verdict| {
        metric(
            &m,
            "postern_verdicts_total",
            &[("stage", stage), ("verdict", verdict)],
        )
    };
    // The MAIL stage is labelled "mail".
    for stage in ["mail", "rcpt"] {
        // reject: one alone, and (rcpt) one next to a good recipient.
        let twice = if stage == "rcpt" { 2.0 } else { 1.0 };
        assert_eq!(v(stage, "reject"), twice, "{stage} reject\n{m}");
        assert_eq!(v(stage, "tempfail"), twice, "{stage} tempfail");
        assert_eq!(v(stage, "quarantine"), 1.0, "{stage} quarantine");
        assert_eq!(v(stage, "discard"), 1.0, "{stage} discard");
    }
    // At DATA every finished message counts once with its final verdict.
    assert_eq!(v("data", "reject"), 1.0);
    assert_eq!(v("data", "tempfail"), 1.0);
    assert_eq!(v("data", "quarantine"), 3.0);
    assert_eq!(v("data", "discard"), 3.0);
    // after-mf-*, partial-rc-*, data-accept, sentinel
    assert_eq!(v("data", "accept"), 6.0);
}

/// An explicit `accept()` at connect, MAIL or RCPT is a decision like the
/// others and should show in `postern_verdicts_total`.
#[tokio::test(flavor = "multi_thread")]
async fn explicit_accept_before_data_is_counted() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: rules(&[
            ("05-connect.rhai", "fn connect(c) { accept() }"),
            ("10-verdicts.rhai", VERDICTS),
        ]),
        ..Opts::sink(sink.port)
    })
    .await;
    let r = send(
        &gw,
        "mf-accept@remote.test",
        "rc-accept@local.test",
        &plain("x"),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let conns = connections(&gw).await;
    let m = gw.metrics_text().await;
    let v = |stage| {
        metric(
            &m,
            "postern_verdicts_total",
            &[("stage", stage), ("verdict", "accept")],
        )
    };
    assert_eq!(
        (v("connect"), v("mail"), v("rcpt"), v("data")),
        (conns, 1.0, 1.0, 1.0),
        "{m}"
    );
}

/// The first reply of a connection, read raw, and whether the server then closed.
async fn first_reply_and_close(port: u16) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return true;
            }
            all.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or(false);
    (String::from_utf8_lossy(&all).trim_end().to_string(), closed)
}

async fn connections(gw: &Gateway) -> f64 {
    metric_of(
        gw,
        "postern_smtp_connections_total",
        &[("listener", "relay")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_verdict_at_connect() {
    let sink = Sink::start(false).await;
    for (call, verdict) in [
        ("reject(554, \"5.7.1 not from you\")", "reject"),
        ("tempfail(\"4.7.0 busy, come back\")", "tempfail"),
        ("quarantine(\"held at connect\")", "quarantine"),
        ("discard()", "discard"),
        ("accept()", "accept"),
    ] {
        let script = format!("fn connect(c) {{ if c.ip == \"127.0.0.1\" {{ {call} }} }}");
        let gw = start(Opts {
            rules: vec![("10-connect.rhai".into(), script)],
            ..Opts::sink(sink.port)
        })
        .await;
        let v = async |stage: &str, verdict: &str| {
            metric_of(
                &gw,
                "postern_verdicts_total",
                &[("stage", stage), ("verdict", verdict)],
            )
            .await
        };
        match verdict {
            "reject" | "tempfail" => {
                let (reply, closed) = first_reply_and_close(gw.smtp).await;
                if verdict == "reject" {
                    assert_eq!(reply, "554 5.7.1 not from you");
                } else {
                    // RFC 5321 3.8: a server that must go away says 421.
                    assert_eq!(reply, "421 4.7.0 busy, come back");
                }
                assert!(closed, "the connection is closed after {reply:?}");
                // Every connection was refused (the harness's readiness probe too).
                assert!(
                    until(Duration::from_secs(5), async || {
                        let conns = connections(&gw).await;
                        conns >= 2.0 && v("connect", verdict).await == conns
                    })
                    .await,
                    "{verdict}: {} of {} connections",
                    v("connect", verdict).await,
                    connections(&gw).await
                );
                assert!(queue_list(&gw).contains("0 message(s)"));
                continue;
            }
            _ => {}
        }
        let subject = format!("connect-{verdict}");
        for (i, rcpt) in ["bob@local.test", "carol@local.test"].iter().enumerate() {
            let r = send(
                &gw,
                "x@remote.test",
                rcpt,
                &plain(&format!("{subject}-{i}")),
            )
            .await;
            assert!(r.starts_with("250 2.0.0"), "{verdict}: {r}");
        }
        match verdict {
            // Counted once per connection, and again with each message at DATA.
            "quarantine" | "discard" => {
                assert!(
                    until(Duration::from_secs(5), async || {
                        let conns = connections(&gw).await;
                        conns >= 3.0 && v("connect", verdict).await == conns
                    })
                    .await,
                    "{verdict}: {} of {} connections",
                    v("connect", verdict).await,
                    connections(&gw).await
                );
                assert_eq!(v("data", verdict).await, 2.0, "{verdict}");
            }
            _ => assert_eq!(v("data", "accept").await, 2.0, "{verdict}"),
        }
        match verdict {
            "quarantine" => {
                let list = quarantine_list(&gw);
                assert!(list.contains("2 message(s)"), "{list}");
                assert!(
                    list.contains("x@remote.test -> bob@local.test  (held at connect)"),
                    "{list}"
                );
                assert!(
                    list.contains("x@remote.test -> carol@local.test  (held at connect)"),
                    "{list}"
                );
                assert!(queue_list(&gw).contains("0 message(s)"));
            }
            "discard" => {
                assert!(quarantine_list(&gw).contains("0 message(s)"));
                assert!(queue_list(&gw).contains("0 message(s)"));
            }
            _ => {
                delivered(&sink, &format!("{subject}-0")).await;
                delivered(&sink, &format!("{subject}-1")).await;
            }
        }
    }
    // Only the accepting gateway delivered anything.
    let mut got = subjects(&sink);
    got.sort();
    assert_eq!(got, ["connect-accept-0", "connect-accept-1"]);
}

// ---------------------------------------------------------------- 4. errors

const LOOP: &str = "fn data(m) { if m.subject == \"loop\" { loop {} } }";
const THROW: &str = "fn mail_from(c) { if c.from == \"boom@remote.test\" { throw \"boom from the script\"; } }\n\
                     fn data(m) { if m.subject == \"throw\" { throw \"data went wrong\"; } }";

#[tokio::test(flavor = "multi_thread")]
async fn runaway_script_tempfails_without_holding_up_other_sessions() {
    let sink = Sink::start(false).await;
    let mut gw = start(Opts {
        rules: rules(&[("50-loop.rhai", LOOP)]),
        ..Opts::sink(sink.port)
    })
    .await;
    // Let the loop run into the wall-clock limit rather than the operation
    // count (which ends it in milliseconds): the slowest case for everyone else.
    gw.kill9();
    let cfg = std::fs::read_to_string(gw.config_path()).unwrap();
    assert!(cfg.contains("max_operations = 100000"));
    std::fs::write(
        gw.config_path(),
        cfg.replace("max_operations = 100000", "max_operations = 100000000000"),
    )
    .unwrap();
    gw.spawn().await;

    let started = Instant::now();
    let mut looping = session(&gw).await;
    assert!(
        looping
            .cmd("MAIL FROM:<x@remote.test>")
            .await
            .starts_with("250")
    );
    assert!(
        looping
            .cmd("RCPT TO:<bob@local.test>")
            .await
            .starts_with("250")
    );
    assert!(looping.cmd("DATA").await.starts_with("354"));
    looping.send(&plain("loop")).await;
    looping.send(b"\r\n.\r\n").await;
    let looping = tokio::spawn(async move {
        let r = looping.reply().await;
        (r, started.elapsed(), looping)
    });

    let port = gw.smtp;
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(tokio::spawn(async move {
            let mut c = Client::connect(port).await;
            c.cmd("EHLO other.test").await;
            let r = c
                .mail(
                    "x@remote.test",
                    &["bob@local.test"],
                    &plain(&format!("normal-{i}")),
                )
                .await;
            (r, started.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for o in others {
        let (r, took) = o.await.unwrap();
        assert!(r.starts_with("250 2.0.0"), "{r}");
        slowest = slowest.max(took);
    }
    let (r, took, mut looping) = looping.await.unwrap();
    assert_eq!(
        r,
        "451 4.3.0 Temporary local problem, please try again later"
    );
    assert!(
        slowest < took / 2,
        "the normal sessions took up to {slowest:?}, the runaway was answered after {took:?}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "it ran into the wall-clock limit: {took:?}"
    );
    assert!(
        took < Duration::from_secs(8),
        "the runaway was stopped: {took:?}"
    );
    // Its session is still fine.
    let r = looping
        .mail("x@remote.test", &["bob@local.test"], &plain("after-loop"))
        .await;
    assert!(r.starts_with("250"), "{r}");

    for i in 0..5 {
        delivered(&sink, &format!("normal-{i}")).await;
    }
    delivered(&sink, "after-loop").await;
    assert!(!subjects(&sink).iter().any(|s| s == "loop"));
    assert!(quarantine_list(&gw).contains("0 message(s)"));
    assert_eq!(
        metric_of(
            &gw,
            "postern_rule_errors_total",
            &[("script", "50-loop.rhai")]
        )
        .await,
        1.0
    );
    let log = gw.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("rule error in 50-loop.rhai")),
        "the log names the script:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn script_runtime_errors_tempfail_and_are_counted() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: rules(&[("40-throw.rhai", THROW), ("50-loop.rhai", LOOP)]),
        ..Opts::sink(sink.port)
    })
    .await;

    let mut c = session(&gw).await;
    let r = c.cmd("MAIL FROM:<boom@remote.test>").await;
    assert_eq!(
        r,
        "451 4.3.0 Temporary local problem, please try again later"
    );
    let r = c
        .mail("x@remote.test", &["bob@local.test"], &plain("throw"))
        .await;
    assert_eq!(
        r,
        "451 4.3.0 Temporary local problem, please try again later"
    );
    // The runaway, stopped by the operation limit this time.
    let t = Instant::now();
    let r = c
        .mail("x@remote.test", &["bob@local.test"], &plain("loop"))
        .await;
    assert_eq!(
        r,
        "451 4.3.0 Temporary local problem, please try again later"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let r = c
        .mail("x@remote.test", &["bob@local.test"], &plain("fine"))
        .await;
    assert!(r.starts_with("250"), "{r}");
    delivered(&sink, "fine").await;
    assert_eq!(subjects(&sink), ["fine"]);

    let m = gw.metrics_text().await;
    assert_eq!(
        metric(
            &m,
            "postern_rule_errors_total",
            &[("script", "40-throw.rhai")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "postern_rule_errors_total",
            &[("script", "50-loop.rhai")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "postern_verdicts_total",
            &[("stage", "mail"), ("verdict", "tempfail")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "postern_verdicts_total",
            &[("stage", "data"), ("verdict", "tempfail")]
        ),
        2.0
    );
    let log = gw.log_text();
    for (script, why) in [
        ("40-throw.rhai", "boom from the script"),
        ("40-throw.rhai", "data went wrong"),
        ("50-loop.rhai", ""),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("rule error in {script}")) && l.contains(why)),
            "{script} {why:?} in the log:\n{log}"
        );
    }
}

// ---------------------------------------------------------------- 5. rate limits

#[tokio::test(flavor = "multi_thread")]
async fn per_sender_rate_limit_at_mail_from() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        ratelimits: concat!(
            "[[limit]]\n",
            "name = \"per-sender\"\n",
            "key = \"sender\"\n",
            "rate = \"2/1h\"\n",
            "burst = 2\n",
            "scope = \"inbound\"\n",
        )
        .into(),
        ..Opts::sink(sink.port)
    })
    .await;

    let mut c = session(&gw).await;
    for (from, subject) in [("alice@local.test", "rl-1"), ("Alice+x@local.test", "rl-2")] {
        let r = c.mail(from, &["bob@local.test"], &plain(subject)).await;
        assert!(r.starts_with("250"), "{from}: {r}");
    }
    // The same sender once normalised (case, +tag): over the limit.
    let r = c.cmd("MAIL FROM:<alice+y@LOCAL.test>").await;
    assert!(r.starts_with("450 4.7.1 "), "{r}");
    let secs: u64 = r
        .split("try again in ")
        .nth(1)
        .and_then(|s| s.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no retry hint: {r}"));
    assert!((1..=3600).contains(&secs), "{r}");
    assert_eq!(
        metric_of(&gw, "postern_ratelimited_total", &[("limit", "per-sender")]).await,
        1.0
    );
    // Nothing of that transaction is accepted.
    assert!(c.cmd("RCPT TO:<bob@local.test>").await.starts_with("503"));
    assert!(c.cmd("DATA").await.starts_with("503"));
    // Another sender on the same connection is not affected.
    let r = c
        .mail("bob@local.test", &["carol@local.test"], &plain("rl-other"))
        .await;
    assert!(r.starts_with("250"), "{r}");
    // Nor on a new connection.
    let r = send(&gw, "dave@remote.test", "bob@local.test", &plain("rl-new")).await;
    assert!(r.starts_with("250"), "{r}");

    for s in ["rl-1", "rl-2", "rl-other", "rl-new"] {
        delivered(&sink, s).await;
    }
    assert_eq!(sink.count(), 4);
    let m = gw.metrics_text().await;
    assert_eq!(
        metric(&m, "postern_ratelimited_total", &[("limit", "per-sender")]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "postern_verdicts_total",
            &[("stage", "mail"), ("verdict", "tempfail")]
        ),
        1.0
    );

    // Bounces (MAIL FROM:<>) count by client IP.
    let mut c = session(&gw).await;
    for _ in 0..2 {
        let r = c.cmd("MAIL FROM:<>").await;
        assert!(r.starts_with("250"), "{r}");
        assert!(c.cmd("RSET").await.starts_with("250"));
    }
    let r = c.cmd("MAIL FROM:<>").await;
    assert!(r.starts_with("450 4.7.1 "), "the third bounce: {r}");

    // A reload keeps the counts of an unchanged limit.
    std::fs::write(
        gw.dir.path().join("rules").join("10-noop.rhai"),
        "fn data(m) { }",
    )
    .unwrap();
    sighup(&gw);
    assert!(
        until(Duration::from_secs(5), async || {
            metric_of(&gw, "postern_config_reloads_total", &[("result", "ok")]).await >= 1.0
        })
        .await
    );
    let r = c.cmd("MAIL FROM:<ALICE@local.test>").await;
    assert!(
        r.starts_with("450 4.7.1 "),
        "still limited after a reload: {r}"
    );
    assert_eq!(
        metric_of(&gw, "postern_ratelimited_total", &[("limit", "per-sender")]).await,
        3.0
    );
}

// ---------------------------------------------------------------- 6. reload

/// Write `text` padded to `width` bytes, keeping the file's mtime, so that
/// only SIGHUP (not the file watcher, which compares mtime and length)
/// can notice. Written elsewhere and renamed in: never seen half-written.
fn replace_unnoticed(gw: &Gateway, name: &str, text: &str, width: usize) {
    let path = gw.dir.path().join("rules").join(name);
    let before = std::fs::metadata(&path).unwrap();
    assert_eq!(before.len() as usize, width);
    let tmp = gw.dir.path().join(format!("{name}.new"));
    std::fs::write(&tmp, format!("{text:<width$}")).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);
    std::fs::rename(&tmp, &path).unwrap();
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap()),
        (before.len(), before.modified().unwrap())
    );
}

fn rule_version(v: &str) -> String {
    format!("fn data(m) {{ reject(550, \"5.7.1 rules {v}\") }}")
}

async fn data_reply(gw: &Gateway) -> String {
    send(gw, "x@remote.test", "bob@local.test", &plain("reload")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_a_broken_reload_keeps_the_running_rules() {
    const W: usize = 120;
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: vec![("50-r.rhai".into(), format!("{:<W$}", rule_version("v1")))],
        ..Opts::sink(sink.port)
    })
    .await;
    let reloads = async |result: &str| {
        metric_of(&gw, "postern_config_reloads_total", &[("result", result)]).await
    };
    assert_eq!(data_reply(&gw).await, "550 5.7.1 rules v1");

    // A session opened before the reload keeps the rules it started with.
    let mut early = session(&gw).await;

    replace_unnoticed(&gw, "50-r.rhai", &rule_version("v2"), W);
    sighup(&gw);
    assert!(
        until(Duration::from_secs(5), async || reloads("ok").await == 1.0).await,
        "SIGHUP did not reload:\n{}",
        gw.log_text()
    );
    assert_eq!(data_reply(&gw).await, "550 5.7.1 rules v2");
    let r = early
        .mail("x@remote.test", &["bob@local.test"], &plain("early"))
        .await;
    assert_eq!(r, "550 5.7.1 rules v1", "the open session keeps its set");

    // A broken script: the running rules stay, the log says why and where.
    replace_unnoticed(
        &gw,
        "50-r.rhai",
        "fn data(m) {\n  reject(550, \"5.7.1 rules v3\"\n}",
        W,
    );
    sighup(&gw);
    assert!(
        until(Duration::from_secs(5), async || reloads("error").await
            >= 1.0)
        .await,
        "no failed reload counted:\n{}",
        gw.log_text()
    );
    assert_eq!(reloads("ok").await, 1.0);
    assert_eq!(data_reply(&gw).await, "550 5.7.1 rules v2");
    let log = gw.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("reload failed") && l.contains("50-r.rhai:")),
        "the log names the file (and line):\n{log}"
    );

    // Fixed again: SIGHUP brings it in.
    replace_unnoticed(&gw, "50-r.rhai", &rule_version("v4"), W);
    sighup(&gw);
    assert!(until(Duration::from_secs(5), async || reloads("ok").await == 2.0).await);
    assert_eq!(data_reply(&gw).await, "550 5.7.1 rules v4");
    assert_eq!(sink.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_rule_files_reload_by_themselves() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: vec![("50-r.rhai".into(), rule_version("v1"))],
        ..Opts::sink(sink.port)
    })
    .await;
    let rules_dir = gw.dir.path().join("rules");
    assert_eq!(data_reply(&gw).await, "550 5.7.1 rules v1");

    // A new version of the file: picked up without a signal.
    let tmp = gw.dir.path().join("r.new");
    std::fs::write(&tmp, rule_version("version 2")).unwrap();
    std::fs::rename(&tmp, rules_dir.join("50-r.rhai")).unwrap();
    let t = Instant::now();
    assert!(
        until(Duration::from_secs(6), async || data_reply(&gw).await
            == "550 5.7.1 rules version 2")
        .await,
        "not reloaded after {:?}:\n{}",
        t.elapsed(),
        gw.log_text()
    );

    // A broken new file: counted and logged, the running set stays.
    std::fs::write(&tmp, "fn rcpt(c) {\n  let = 1;\n}\n").unwrap();
    std::fs::rename(&tmp, rules_dir.join("60-broken.rhai")).unwrap();
    assert!(
        until(Duration::from_secs(6), async || {
            metric_of(&gw, "postern_config_reloads_total", &[("result", "error")]).await >= 1.0
        })
        .await,
        "{}",
        gw.log_text()
    );
    assert!(
        gw.log_text()
            .lines()
            .any(|l| l.contains("60-broken.rhai:2"))
    );
    assert_eq!(data_reply(&gw).await, "550 5.7.1 rules version 2");

    // A broken rate-limit file is a failed reload too, named with its line.
    let policies = gw.dir.path().join("policies");
    std::fs::write(
        &tmp,
        "[[limit]]\nname = \"x\"\nkey = \"sender\"\nrate = \"lots\"\n",
    )
    .unwrap();
    std::fs::rename(&tmp, policies.join("ratelimits.toml")).unwrap();
    assert!(
        until(Duration::from_secs(6), async || {
            metric_of(&gw, "postern_config_reloads_total", &[("result", "error")]).await >= 2.0
        })
        .await,
        "{}",
        gw.log_text()
    );
    assert!(
        gw.log_text()
            .lines()
            .any(|l| l.contains("reload failed") && l.contains("ratelimits.toml:4")),
        "{}",
        gw.log_text()
    );
    assert_eq!(data_reply(&gw).await, "550 5.7.1 rules version 2");
    std::fs::write(&tmp, "").unwrap();
    std::fs::rename(&tmp, policies.join("ratelimits.toml")).unwrap();

    // Removing it is a change too.
    std::fs::remove_file(rules_dir.join("60-broken.rhai")).unwrap();
    std::fs::write(&tmp, "fn data(m) { }").unwrap();
    std::fs::rename(&tmp, rules_dir.join("50-r.rhai")).unwrap();
    assert!(
        until(Duration::from_secs(6), async || data_reply(&gw)
            .await
            .starts_with("250"))
        .await,
        "{}",
        gw.log_text()
    );
    delivered(&sink, "reload").await;
}

// ---------------------------------------------------------------- commands

const TRIAGE: &str = r#"
fn rcpt(c) {
    if c.rcpt == "nobody@local.test" { return reject(550, "5.1.1 no such user"); }
}
fn data(m) {
    m.add_header("X-Triage", "seen " + m.rcpt.len());
    m.score(3, "a little suspicious");
    if m.subject.contains("invoice") { return quarantine("looks like invoice fraud"); }
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn rules_test_command_shows_the_decision() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: rules(&[("40-triage.rhai", TRIAGE), ("50-loop.rhai", LOOP)]),
        ..Opts::sink(sink.port)
    })
    .await;
    let eml = gw.dir.path().join("m.eml");
    std::fs::write(
        &eml,
        message("a@remote.test", "c@local.test", "your invoice", "pay now"),
    )
    .unwrap();
    let eml = eml.to_str().unwrap();

    let (ok, out, err) = gw.admin(&[
        "rules",
        "test",
        "--message",
        eml,
        "--from",
        "a@remote.test",
        "--rcpt",
        "c@local.test",
    ]);
    assert!(ok, "{out}\n{err}");
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{out}"))
            .to_string()
    };
    assert_eq!(line("scripts:"), "scripts:   40-triage.rhai, 50-loop.rhai");
    assert_eq!(
        line("verdict:"),
        "verdict:   quarantine: looks like invoice fraud by 40-triage.rhai"
    );
    assert_eq!(line("score:"), "score:     3");
    assert!(out.contains("header:    X-Triage: seen 1"), "{out}");
    assert!(
        out.contains("header:    Authentication-Results: gw.test"),
        "{out}"
    );
    let ms: f64 = line("time:")
        .trim_start_matches("time:")
        .trim()
        .trim_end_matches("ms")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("time: {out}"));
    assert!((0.0..5000.0).contains(&ms), "{out}");

    // Refused at RCPT: DATA is never reached.
    let (ok, out, err) = gw.admin(&[
        "rules",
        "test",
        "--message",
        eml,
        "--from",
        "a@remote.test",
        "--rcpt",
        "nobody@local.test",
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("verdict:   reject 550 5.1.1 no such user by 40-triage.rhai rcpt"),
        "{out}"
    );
    assert!(!out.contains("score:"), "{out}");

    // A plain message: accepted, nobody decided.
    std::fs::write(
        gw.dir.path().join("m.eml"),
        message("a@remote.test", "c@local.test", "lunch", "at noon"),
    )
    .unwrap();
    let (ok, out, _) = gw.admin(&[
        "rules",
        "test",
        "--message",
        eml,
        "--from",
        "a@remote.test",
        "--rcpt",
        "c@local.test",
    ]);
    assert!(ok);
    assert!(
        out.contains("verdict:   accept by (no script decided)"),
        "{out}"
    );

    // A missing message file is an error that names it.
    let (ok, _, err) = gw.admin(&["rules", "test", "--message", "/nonexistent/x.eml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/x.eml"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_the_file_and_line_of_a_broken_rule() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: rules(&[("40-triage.rhai", TRIAGE)]),
        ..Opts::sink(sink.port)
    })
    .await;
    let (ok, out, err) = gw.admin(&["check"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("1 rule script(s)"), "{out}");

    std::fs::write(
        gw.dir.path().join("rules").join("60-broken.rhai"),
        "// a comment\nfn data(m) {\n    if m.subject == \"x\" {\n        let = 1;\n    }\n}\n",
    )
    .unwrap();
    let (ok, out, err) = gw.admin(&["check"]);
    assert!(!ok, "check must fail:\n{out}");
    assert!(
        err.lines().any(|l| l.contains("rules/60-broken.rhai:4:")),
        "file and line:\n{err}"
    );
    assert!(
        !err.contains("40-triage.rhai"),
        "only the broken one: {err}"
    );
}

/// An admin (or logrotate) may send SIGHUP as soon as the gateway answers.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_right_after_start_does_not_kill_the_gateway() {
    let sink = Sink::start(false).await;
    let mut gw = start(Opts::sink(sink.port)).await;
    gw.kill9();
    for attempt in 0..20 {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(gw.config_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", gw.smtp)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "did not start");
            std::thread::sleep(Duration::from_micros(500));
        }
        let _ = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let status = child.try_wait().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            status.is_none(),
            "attempt {attempt}: SIGHUP right after start ended the gateway: {status:?}"
        );
    }
}
