//! Recipient verification at RCPT time and no backscatter (issue 8):
//! unknown users are refused while the client is there, the backend is
//! asked once per address (cached), a backend that cannot answer gives 451,
//! the `list` mode reloads, and bounces that would be backscatter are dropped.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{Client, Gateway, Opts, Sink, eventually, free_port};

/// The value of the series of `name` whose labels include every one of `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> Option<u64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits (up to 10 s) for `postern_dsn_suppressed_total{reason="outside_sender"}` to read 1.
async fn one_bounce_dropped_for_an_outside_sender(gw: &Gateway) -> bool {
    for _ in 0..100 {
        let m = gw.metrics_text().await;
        let n = series(
            &m,
            "postern_dsn_suppressed_total",
            &["reason=\"outside_sender\""],
        );
        if n == Some(1) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn outsider(gw: &Gateway) -> Client<tokio::net::TcpStream> {
    let mut c = Client::connect(gw.smtp).await;
    let r = c.cmd("EHLO far.test").await;
    assert!(r.starts_with("250"), "{r}");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_user_is_refused_at_rcpt_once_asked_and_nothing_bounces() {
    let sink = Sink::start(false).await;
    sink.reject.lock().unwrap().push("ghost@local.test".into());
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = outsider(&gw).await;
    assert!(
        c.cmd("MAIL FROM:<forged@far.test>")
            .await
            .starts_with("250")
    );
    let r = c.cmd("RCPT TO:<ghost@local.test>").await;
    assert_eq!(
        r,
        "550 5.1.1 <ghost@local.test>: Recipient address rejected: user unknown"
    );
    let r = c.cmd("RCPT TO:<bob@local.test>").await;
    assert!(r.starts_with("250 2.1.5"), "{r}");
    // Both answers are cached: asking again opens no backend connection.
    let probes = sink.connections.load(Ordering::SeqCst);
    assert_eq!(probes, 2, "one probe per address");
    let r = c.cmd("RCPT TO:<Ghost@Local.Test>").await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(c.cmd("RSET").await.starts_with("250"));
    let r = c
        .mail(
            "forged@far.test",
            &["bob@local.test"],
            b"Subject: hi\r\n\r\nx",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        eventually(Duration::from_secs(10), || sink.count() == 1).await,
        "log:\n{}",
        gw.log_text()
    );
    // Only bob's message reached the backend; no DSN went anywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].rcpts, vec!["bob@local.test".to_string()]);
    let (ok, out, _) = gw.admin(&["queue", "list"]);
    assert!(ok && out.contains("0 message(s)"), "{out}");
    let m = gw.metrics_text().await;
    let v = |res: &str, cached: &str| {
        series(
            &m,
            "postern_recipient_verify_total",
            &[
                &format!("result=\"{res}\""),
                &format!("cached=\"{cached}\""),
            ],
        )
    };
    assert_eq!(v("unknown", "false"), Some(1), "{m}");
    assert_eq!(v("unknown", "true"), Some(1), "{m}");
    assert_eq!(v("ok", "false"), Some(1), "{m}");
    assert_eq!(v("ok", "true"), Some(1), "{m}");
    assert_eq!(series(&m, "postern_bounces_total", &[]), Some(0), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_cannot_answer_gives_451_and_is_asked_again() {
    let port = free_port();
    let gw = Gateway::start(Opts::sink(port)).await;
    let mut c = outsider(&gw).await;
    assert!(c.cmd("MAIL FROM:<a@far.test>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<bob@local.test>").await;
    assert_eq!(
        r,
        "451 4.4.3 Recipient verification unavailable, try again later"
    );
    // Nothing was accepted.
    let r = c.cmd("DATA").await;
    assert!(r.starts_with("554"), "{r}");
    // The failure was not cached: once the backend is up, bob is taken.
    let sink = Sink::start_on(port, false).await;
    let r = c.cmd("RCPT TO:<bob@local.test>").await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(sink.connections.load(Ordering::SeqCst), 1);
    let m = gw.metrics_text().await;
    assert_eq!(
        series(
            &m,
            "postern_recipient_verify_total",
            &["result=\"tempfail\"", "cached=\"false\""]
        ),
        Some(1),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_mode_takes_listed_addresses_and_catch_alls_and_reloads() {
    let lists = tempfile::tempdir().unwrap();
    let file = lists.path().join("recipients.txt");
    std::fs::write(
        &file,
        "# who we have\nAlice@Local.Test\ncarol@local.test # for now\n",
    )
    .unwrap();
    let gw = Gateway::start(Opts {
        relay_extra: format!(
            "verify_recipients = \"list\"\nrecipients = \"{}\"",
            file.display()
        ),
        ..Opts::default()
    })
    .await;
    let (ok, out, err) = gw.admin(&["check"]);
    assert!(
        ok && out.contains("recipients.txt: 2 recipient entries"),
        "{out}{err}"
    );
    let mut c = outsider(&gw).await;
    assert!(c.cmd("MAIL FROM:<a@far.test>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<alice+news@local.test>").await;
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("RCPT TO:<bob@local.test>").await;
    assert!(r.starts_with("550 5.1.1 <bob@local.test>"), "{r}");
    // Now a catch-all for the domain: bob and anyone else are taken.
    std::fs::write(&file, "@local.test\n").unwrap();
    let mut taken = false;
    // Each refusal is a protocol error (20 end the session): ask slowly.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = c.cmd("RCPT TO:<bob@local.test>").await;
        if r.starts_with("250") {
            taken = true;
            break;
        }
    }
    assert!(taken, "the list did not reload; log:\n{}", gw.log_text());
    let r = c.cmd("RCPT TO:<anyone@local.test>").await;
    assert!(r.starts_with("250"), "{r}");
    // A broken file keeps the list in use, and `check` names file and line.
    std::fs::write(&file, "alice@local.test\nnot an address\n").unwrap();
    let (ok, _, err) = gw.admin(&["check"]);
    assert!(!ok && err.contains("recipients.txt:2:"), "{err}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = c.cmd("RCPT TO:<dave@local.test>").await;
    assert!(
        r.starts_with("250"),
        "the catch-all went with a broken file: {r}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_recipients_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("postern.toml");
    std::fs::write(
        &cfg,
        "[relay]\ndomains = [\"local.test\"]\nverify_recipients = \"list\"\nrecipients = \"gone.txt\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::common::BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("postern.toml:4: [relay] recipients:")
            && err.contains("gone.txt cannot be read"),
        "{err}"
    );
}

/// Verification off, so an unknown user is only found at delivery: the
/// bounce to an outside sender of mail from outside is dropped and counted;
/// one to a sender in our domains still goes.
#[tokio::test(flavor = "multi_thread")]
async fn no_bounce_goes_to_an_outside_sender_of_mail_from_outside() {
    let sink = Sink::start(false).await;
    sink.reject.lock().unwrap().push("ghost@local.test".into());
    let gw = Gateway::start(Opts {
        relay_extra: "verify_recipients = \"off\"".into(),
        ..Opts::sink(sink.port)
    })
    .await;
    let mut c = outsider(&gw).await;
    let r = c
        .mail(
            "forged@far.test",
            &["ghost@local.test"],
            b"Subject: x\r\n\r\nx",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        one_bounce_dropped_for_an_outside_sender(&gw).await,
        "log:\n{}",
        gw.log_text()
    );
    let (_, out, _) = gw.admin(&["queue", "list"]);
    assert!(out.contains("0 message(s)"), "{out}");
    assert_eq!(sink.count(), 0, "{:?}", sink.messages());
    // A sender of ours gets the bounce.
    let r = c
        .mail(
            "me@local.test",
            &["ghost@local.test"],
            b"Subject: y\r\n\r\ny",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        eventually(Duration::from_secs(10), || sink.count() == 1).await,
        "log:\n{}",
        gw.log_text()
    );
    assert_eq!(sink.messages()[0].rcpts, vec!["me@local.test".to_string()]);
    assert!(
        gw.log_plain().contains("bounce dropped"),
        "{}",
        gw.log_plain()
    );
}

/// Mail from outside that was quarantined and then released keeps its
/// origin: when the backend refuses it at delivery, the bounce to the
/// outside sender is dropped as for mail that was never held.
#[tokio::test(flavor = "multi_thread")]
async fn a_released_message_from_outside_gets_no_bounce_to_an_outside_sender() {
    let sink = Sink::start(false).await;
    sink.reject.lock().unwrap().push("ghost@local.test".into());
    let gw = Gateway::start(Opts {
        relay_extra: "verify_recipients = \"off\"".into(),
        rules: vec![(
            "hold.rhai".into(),
            r#"fn data(m) { if m.subject == "[hold]" { return quarantine("held"); } }"#.into(),
        )],
        ..Opts::sink(sink.port)
    })
    .await;
    let mut c = outsider(&gw).await;
    let r = c
        .mail(
            "forged@far.test",
            &["ghost@local.test"],
            b"Subject: [hold]\r\n\r\nx",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let (id, list) = gw.first_held();
    assert!(list.contains("ghost@local.test"), "not held: {list}");
    let (ok, out, err) = gw.admin(&["quarantine", "release", &id]);
    assert!(ok, "release {id}: {out}{err}");
    assert!(
        one_bounce_dropped_for_an_outside_sender(&gw).await,
        "log:\n{}",
        gw.log_text()
    );
    let (_, out, _) = gw.admin(&["queue", "list"]);
    assert!(out.contains("0 message(s)"), "{out}");
    assert_eq!(sink.count(), 0, "{:?}", sink.messages());
}

/// A backend that takes its time over RCPT (300 ms) and knows only bob;
/// counts its connections.
async fn slow_backend() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let _ = w.write_all(b"220 slow.test\r\n").await;
                let mut line = String::new();
                while r.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    let cmd = line.to_ascii_uppercase();
                    let answer: &[u8] = if cmd.starts_with("RCPT") {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if cmd.contains("<BOB@") {
                            b"250 ok\r\n"
                        } else {
                            b"550 5.1.1 no such user\r\n"
                        }
                    } else if cmd.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        break;
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(answer).await.is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    (port, connections)
}

/// 20 sessions ask for one unknown address at the same moment: the backend
/// is probed once, and every session gets the 550.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_asking_for_one_address_at_once_share_one_probe() {
    let (port, connections) = slow_backend().await;
    let gw = Gateway::start(Opts::sink(port)).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = outsider(&gw).await;
        let r = c.cmd("MAIL FROM:<someone@far.test>").await;
        assert!(r.starts_with("250"), "{r}");
        clients.push(c);
    }
    let answers = futures::future::join_all(
        clients
            .iter_mut()
            .map(|c| c.cmd("RCPT TO:<ghost@local.test>")),
    )
    .await;
    for a in &answers {
        assert!(a.starts_with("550 5.1.1"), "{answers:?}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one probe for 20 askers; log:\n{}",
        gw.log_text()
    );
    let m = gw.metrics_text().await;
    let unknown = |cached: &str| {
        series(
            &m,
            "postern_recipient_verify_total",
            &["result=\"unknown\"", &format!("cached=\"{cached}\"")],
        )
    };
    assert_eq!(unknown("false"), Some(1), "{m}");
    assert_eq!(unknown("true"), Some(19), "{m}");
}
