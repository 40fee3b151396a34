//! Delivery as the backend sees it: retries, bounces, Maildir, LMTP, reuse.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;

fn subjects(sink: &Sink) -> Vec<String> {
    sink.messages()
        .iter()
        .filter_map(|g| {
            let t = String::from_utf8_lossy(&g.body).to_string();
            t.lines()
                .find(|l| l.starts_with("Subject: "))
                .map(|l| l["Subject: ".len()..].to_string())
        })
        .collect()
}

/// Send one message to several recipients, wait for the sink to get two
/// messages (the delivered copy and a DSN), and return them in that order.
async fn delivered_and_bounced(
    gw: &Gateway,
    sink: &Sink,
    helo: &str,
    from: &str,
    to: &[&str],
    body: &[u8],
) -> (Got, Got) {
    let mut c = Client::connect(gw.smtp).await;
    c.cmd(&format!("EHLO {helo}")).await;
    let r = c.mail(from, to, body).await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        eventually(Duration::from_secs(10), || sink.count() == 2).await,
        "log:\n{}",
        gw.log_text()
    );
    let got = sink.messages();
    let original = got
        .iter()
        .find(|g| g.from == from)
        .expect("the delivered copy")
        .clone();
    let dsn = got
        .iter()
        .find(|g| g.from.is_empty())
        .expect("a DSN from <>")
        .clone();
    (original, dsn)
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_tempfail_then_accept_delivers_everything_once() {
    let sink = Sink::start(false).await;
    sink.tempfail_data.store(4, Ordering::SeqCst);
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    for i in 0..6 {
        let r = c
            .mail(
                "a@local.test",
                &["bob@local.test"],
                format!("Subject: m{i}\r\n\r\nbody {i}").as_bytes(),
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT").await;
    assert!(
        eventually(Duration::from_secs(20), || sink.count() == 6).await,
        "{} of 6 arrived; log:\n{}",
        sink.count(),
        gw.log_text()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut s = subjects(&sink);
    s.sort();
    assert_eq!(
        s,
        (0..6).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "each exactly once"
    );
    assert_eq!(sink.tempfail_data.load(Ordering::SeqCst), 0);
    let m = gw.metrics_text().await;
    assert!(
        m.contains("postern_delivery_attempts_total{result=\"tempfail\",tls=\"no\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("postern_delivery_attempts_total{result=\"ok\",tls=\"no\"} 6"),
        "{m}"
    );
    // Nothing left in the queue.
    let (ok, out, _) = gw.admin(&["queue", "list"]);
    assert!(ok && out.contains("0 message(s)"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_550_bounces_a_dsn_to_the_sender() {
    let sink = Sink::start(false).await;
    sink.reject.lock().unwrap().push("nobody@local.test".into());
    // Without RCPT-time verification, so the backend refuses at delivery.
    let gw = Gateway::start(Opts {
        relay_extra: "verify_recipients = \"off\"".into(),
        ..Opts::sink(sink.port)
    })
    .await;
    let (original, dsn) = delivered_and_bounced(
        &gw,
        &sink,
        "c.test",
        "sender@local.test",
        &["nobody@local.test", "bob@local.test"],
        b"Subject: to a ghost\r\nMessage-ID: <ghost-1@local.test>\r\n\r\nboo",
    )
    .await;
    assert_eq!(original.rcpts, vec!["bob@local.test".to_string()]);
    assert_eq!(dsn.rcpts, vec!["sender@local.test".to_string()]);
    let t = String::from_utf8_lossy(&dsn.body);
    assert!(
        t.contains("multipart/report; report-type=delivery-status"),
        "{t}"
    );
    assert!(
        t.contains("Final-Recipient: rfc822; nobody@local.test"),
        "{t}"
    );
    assert!(t.contains("Status: 5.1.1"), "{t}");
    assert!(
        t.contains("Message-ID: <ghost-1@local.test>"),
        "original headers missing: {t}"
    );
    assert!(
        !t.contains("bob@local.test"),
        "delivered recipient listed as failed: {t}"
    );
    let m = gw.metrics_text().await;
    assert!(m.contains("postern_bounces_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bounces_are_never_bounced() {
    let sink = Sink::start(false).await;
    sink.reject.lock().unwrap().push("nobody@local.test".into());
    // Without RCPT-time verification, so the backend refuses at delivery.
    let gw = Gateway::start(Opts {
        relay_extra: "verify_recipients = \"off\"".into(),
        ..Opts::sink(sink.port)
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail("", &["nobody@local.test"], b"Subject: a bounce\r\n\r\nx")
        .await;
    assert!(r.starts_with("250"), "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.count(), 0, "a DSN was sent for a bounce");
    let (_, out, _) = gw.admin(&["queue", "list"]);
    assert!(out.contains("0 message(s)"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_messages_bounce_with_4_4_7() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    // Mail for local.test goes to a dead port; the DSN to an outside sender goes to the sink.
    opts.route = "smtp://127.0.0.1:9".into();
    opts.max_age = "2s".into();
    opts.networks = vec!["127.0.0.0/8".into()];
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail(
            "someone@far.test",
            &["bob@local.test"],
            b"Subject: slow\r\n\r\nx",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        eventually(Duration::from_secs(15), || sink.count() == 1).await,
        "no DSN; log:\n{}",
        gw.log_text()
    );
    let t = String::from_utf8_lossy(&sink.messages()[0].body).to_string();
    assert!(
        t.contains("Status: 4.4.7") || t.contains("Status: 5.4.7"),
        "{t}"
    );
    assert!(t.contains("expired"), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn maildir_gets_one_copy_per_recipient() {
    let gw = Gateway::start(Opts::default()).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let body = "Subject: to two\r\n\r\nsame bytes for both \u{263A}\r\n..not a dot line";
    let r = c
        .mail(
            "a@local.test",
            &["ann@local.test", "Ben@Local.Test"],
            body.as_bytes(),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let ok = eventually(Duration::from_secs(5), || {
        gw.maildir_files("ann@local.test").len() == 1
            && gw.maildir_files("ben@local.test").len() == 1
    })
    .await;
    assert!(ok, "log:\n{}", gw.log_text());
    let a = gw.maildir_files("ann@local.test").remove(0);
    let b = gw.maildir_files("ben@local.test").remove(0);
    assert_eq!(a, b);
    assert!(a.ends_with("same bytes for both \u{263A}\r\n.not a dot line\r\n".as_bytes()));
    assert_eq!(
        read_dir_count(&gw.data_dir().join("maildir/ann@local.test/tmp")),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_results_are_per_recipient() {
    let sink = Sink::start(true).await;
    sink.reject.lock().unwrap().push("gone@local.test".into());
    let mut opts = Opts::sink(sink.port);
    opts.route = format!("lmtp://127.0.0.1:{}", sink.port);
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail(
            "s@local.test",
            &["ann@local.test", "gone@local.test", "ben@local.test"],
            b"Subject: lmtp\r\n\r\nx",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    // The message for ann and ben, then the DSN for gone back to s@local.test.
    assert!(
        eventually(Duration::from_secs(10), || sink.count() == 2).await,
        "log:\n{}",
        gw.log_text()
    );
    let got = sink.messages();
    let msg = got.iter().find(|g| g.from == "s@local.test").unwrap();
    assert_eq!(
        msg.rcpts,
        vec!["ann@local.test".to_string(), "ben@local.test".to_string()]
    );
    let dsn = got.iter().find(|g| g.from.is_empty()).unwrap();
    let t = String::from_utf8_lossy(&dsn.body);
    assert!(
        t.contains("Final-Recipient: rfc822; gone@local.test"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_to_the_backend_are_reused() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    for i in 0..30 {
        let r = c
            .mail(
                "a@local.test",
                &["bob@local.test"],
                format!("Subject: r{i}\r\n\r\nx").as_bytes(),
            )
            .await;
        assert!(r.starts_with("250"));
        // Sequential sends: each finds the previous connection idle in the pool.
        let want = i + 1;
        assert!(eventually(Duration::from_secs(5), || sink.count() == want).await);
    }
    let conns = sink.connections.load(Ordering::SeqCst);
    assert!(conns <= 2, "{conns} backend connections for 30 messages");
}

/// Outbound mail from a trusted client goes to the recipient domain's MX,
/// found through the configured DNS server (never the system resolver):
/// the preferred MX first, the next one when it does not answer; a domain
/// that does not exist bounces.
#[tokio::test(flavor = "multi_thread")]
async fn outbound_mail_follows_the_mx_records() {
    use std::net::Ipv4Addr;
    let sink = Sink::start(false).await;
    // mx1 (preferred) is 127.0.0.2, where nothing listens on the sink's port;
    // mx2 is 127.0.0.1, where the sink listens.
    let dns = crate::dns::start_dns_with(
        &[],
        &[
            ("far.test", 10, "mx1.far.test"),
            ("far.test", 20, "mx2.far.test"),
        ],
        &[
            ("mx1.far.test", Ipv4Addr::new(127, 0, 0, 2)),
            ("mx2.far.test", Ipv4Addr::new(127, 0, 0, 1)),
        ],
    )
    .await;
    // Trusted clients skip SPF/DKIM/DMARC, so the DNS server is only asked for MX and A.
    let mut opts = Opts::sink(sink.port);
    opts.outbound = "mx".into();
    opts.networks = vec!["127.0.0.0/8".into()];
    opts.dns = Some(dns);
    opts.mx_port = Some(sink.port);
    let gw = Gateway::start(opts).await;
    let (out, dsn) = delivered_and_bounced(
        &gw,
        &sink,
        "inside.test",
        "app@local.test",
        &["someone@far.test", "ghost@nowhere.test"],
        b"Subject: via mx\r\n\r\nhi",
    )
    .await;
    assert_eq!(out.rcpts, vec!["someone@far.test".to_string()]);
    let t = String::from_utf8_lossy(&dsn.body);
    assert!(
        t.contains("ghost@nowhere.test") && t.contains("5.1.2"),
        "{t}"
    );
}
