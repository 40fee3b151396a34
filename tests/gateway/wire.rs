//! SMTP protocol details an outside probe found (issue 8): bare newlines
//! in command lines, data pipelined before the 354, NUL bytes and long
//! lines in DATA, forged Authentication-Results, the EHLO name in
//! Received, unadvertised parameters, rules switched off by volume.

use std::time::Duration;

use crate::common::*;

/// Waits until the gateway has had time to deliver anything it accepted:
/// a clean message sent after the probes is delivered, so everything
/// accepted before it has been too (one connection, one destination).
async fn settle(gw: &Gateway, sink: &Sink, before: usize) {
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail(
            "a@far.test",
            &["bob@local.test"],
            b"Subject: marker\r\n\r\nok",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(eventually(Duration::from_secs(10), || sink.count() > before).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn subjects(sink: &Sink) -> Vec<String> {
    sink.messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.body).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_newlines_in_commands_close_under_reject() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    for probe in [
        &b"EHLO c.test\n"[..],
        b"EHLO c.test\r\nMAIL FROM:<a@far.test>\n",
        // A bare CR is not a space: no second RCPT hides behind it.
        b"EHLO c.test\r\nMAIL FROM:<a@far.test>\r\nRCPT TO:<bob@local.test>\rRCPT TO:<x@far.test>\r\n",
    ] {
        let mut c = Client::connect(gw.smtp).await;
        c.send(probe).await;
        let mut last = String::new();
        for _ in 0..4 {
            let r = c.reply().await;
            if r == "EOF" {
                break;
            }
            last = r;
        }
        assert!(last.starts_with("550 5.5.2"), "{probe:?}: {last}");
        assert_eq!(c.reply().await, "EOF");
    }
    // NUL in a command: refused, the session goes on.
    let mut c = Client::connect(gw.smtp).await;
    let r = c.cmd("EHLO c\0.test").await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    assert!(c.cmd("EHLO c.test").await.starts_with("250"));
    settle(&gw, &sink, 0).await;
    assert_eq!(subjects(&sink), vec!["marker"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_newlines_in_commands_under_normalize() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.smtp_extra = "bare_newline = \"normalize\"".into();
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    // A bare LF ends a command.
    c.send(b"EHLO c.test\n").await;
    assert!(c.reply().await.starts_with("250"));
    c.send(b"MAIL FROM:<a@far.test>\n").await;
    assert!(c.reply().await.starts_with("250"));
    // A bare CR is refused, never read as a space or a line end.
    c.send(b"RCPT TO:<bob@local.test>\rRCPT TO:<carol@local.test>\r\n")
        .await;
    let r = c.reply().await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    c.send(b"RCPT TO:<bob@local.test>\n").await;
    assert!(c.reply().await.starts_with("250"));
    c.send(b"DATA\n").await;
    assert!(c.reply().await.starts_with("354"));
    c.send(b"Subject: lf\r\n\r\nhi\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
    assert_eq!(sink.messages()[0].rcpts, vec!["bob@local.test".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn data_pipelined_before_354_is_refused_for_untrusted_clients() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    c.send(
        b"MAIL FROM:<a@far.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\nSubject: blind\r\n\r\nhi\r\n.\r\n",
    )
    .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    let r = c.reply().await;
    assert!(r.starts_with("554 5.5.0"), "{r}");
    assert_eq!(c.reply().await, "EOF");
    // RFC 2920 pipelining (MAIL, RCPT, DATA in one write, then wait) works.
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    c.send(b"MAIL FROM:<a@far.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("354"));
    c.send(b"Subject: waited\r\n\r\nhi\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    settle(&gw, &sink, 1).await;
    let mut got = subjects(&sink);
    got.sort();
    assert_eq!(got, vec!["marker", "waited"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_clients_may_pipeline_data() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.networks = vec!["127.0.0.0/8".into()];
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    c.send(
        b"MAIL FROM:<a@far.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\nSubject: blind\r\n\r\nhi\r\n.\r\nQUIT\r\n",
    )
    .await;
    for want in ["250", "250", "354", "250", "221"] {
        let r = c.reply().await;
        assert!(r.starts_with(want), "{want}: {r}");
    }
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn nul_bytes_and_long_lines_in_data_are_refused_by_default() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail(
            "a@far.test",
            &["bob@local.test"],
            b"Subject: nul\r\n\r\na\0b",
        )
        .await;
    assert!(r.starts_with("554 5.6.0"), "{r}");
    let long = format!("Subject: long\r\n\r\n{}", "x".repeat(200_000));
    let r = c
        .mail("a@far.test", &["bob@local.test"], long.as_bytes())
        .await;
    assert!(r.starts_with("554 5.6.0"), "{r}");
    // 998 octets is the limit, not over it.
    let edge = format!("Subject: edge\r\n\r\n{}", "x".repeat(998));
    let r = c
        .mail("a@far.test", &["bob@local.test"], edge.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    settle(&gw, &sink, 1).await;
    let mut got = subjects(&sink);
    got.sort();
    assert_eq!(got, vec!["edge", "marker"], "nothing refused was delivered");
}

#[tokio::test(flavor = "multi_thread")]
async fn nul_bytes_stripped_and_long_lines_accepted_when_configured() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.smtp_extra = "nul_bytes = \"strip\"\nlong_lines = \"accept\"".into();
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let long = format!("Subject: nul\r\n\r\na\0b\r\n{}", "y".repeat(5000));
    let r = c
        .mail("a@far.test", &["bob@local.test"], long.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
    let body = &sink.messages()[0].body;
    assert!(!body.contains(&0), "a NUL was delivered");
    let text = String::from_utf8_lossy(body);
    assert!(text.contains("ab\r\n"), "{text}");
    assert!(text.contains(&"y".repeat(5000)));
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_authentication_results_variants_are_stripped() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.checks_extra = "authserv_ids = [\"filter.gw.test\"]".into();
    let gw = Gateway::start(opts).await;
    let forged = [
        "Authentication-Results: gw.test.; spf=pass",
        "Authentication-Results: GW.Test; dkim=pass",
        "Authentication-Results: (trust me) gw.test; dmarc=pass",
        "Authentication-Results:\r\n gw.test\r\n ; spf=pass",
        "Authentication-Results: gw.test 1; spf=pass",
        "Authentication-Results: \"gw.test\"; spf=pass",
        "Authentication-Results: filter.gw.test.; spf=pass",
    ];
    let mut msg = forged.join("\r\n");
    msg.push_str("\r\nAuthentication-Results: other.test; spf=pass\r\nSubject: ar\r\n\r\nhi");
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail("a@far.test", &["bob@local.test"], msg.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
    let body = String::from_utf8_lossy(&sink.messages()[0].body).into_owned();
    let parsed = mail_parser::MessageParser::default()
        .parse(body.as_bytes())
        .unwrap();
    let ars: Vec<String> = parsed
        .header_values("Authentication-Results")
        .filter_map(|v| v.as_text().map(str::to_string))
        .collect();
    assert!(ars.iter().any(|a| a.contains("other.test")), "{body}");
    // Only ours is left naming us: the one we added (it says `none`, the
    // checks are off here), with no `=pass` from the client.
    let ours: Vec<&String> = ars.iter().filter(|a| !a.contains("other.test")).collect();
    assert_eq!(ours.len(), 1, "{body}");
    assert!(!ours[0].contains("=pass"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ehlo_name_cannot_forge_the_received_date() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    let r = c.cmd("EHLO x; Tue, 1 Jan 2030 00:00:00 +0000").await;
    assert!(r.starts_with("250"), "{r}");
    let r = c
        .mail(
            "a@far.test",
            &["bob@local.test"],
            b"Subject: helo\r\n\r\nhi",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
    let body = sink.messages()[0].body.clone();
    let parsed = mail_parser::MessageParser::default().parse(&body).unwrap();
    let received = parsed.received().expect("a Received header");
    let date = received.date.expect("a date in Received");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (date.to_timestamp() - now).abs() < 3600,
        "Received date {date} is not ours: {}",
        String::from_utf8_lossy(&body)
    );
    let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert!(
        received.from_ip == Some(ip) || received.from == Some(mail_parser::Host::IpAddr(ip)),
        "{received:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn parameters_of_unadvertised_extensions_get_555() {
    let gw = Gateway::start(Opts::default()).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    for line in [
        "MAIL FROM:<a@far.test> BODY=BINARYMIME",
        "MAIL FROM:<a@far.test> REQUIRETLS",
        "MAIL FROM:<a@far.test> MT-PRIORITY=3",
        "MAIL FROM:<a@far.test> HOLDFOR=60",
    ] {
        let r = c.cmd(line).await;
        assert!(r.starts_with("555 5.5.4"), "{line}: {r}");
    }
    let r = c
        .cmd("MAIL FROM:<a@far.test> SIZE=100 BODY=8BITMIME SMTPUTF8")
        .await;
    assert!(r.starts_with("250"), "{r}");
    for line in [
        "RCPT TO:<bob@local.test> CONNEG",
        "RCPT TO:<bob@local.test> RRVS=2014-04-03T23:01:00Z",
        "RCPT TO:<bob@local.test> ORCPT=rfc822;bob@local.test",
    ] {
        let r = c.cmd(line).await;
        assert!(r.starts_with("555 5.5.4"), "{line}: {r}");
    }
    assert!(c.cmd("RCPT TO:<bob@local.test>").await.starts_with("250"));
}

/// A message with 5 000 tiny attachments and then `invoice.exe`.
fn many_parts() -> Vec<u8> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests/many-parts-exe.eml");
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exe_behind_5000_attachments_is_quarantined_even_with_on_error_accept() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.rules = shipped_rules();
    opts.on_error = "accept".into();
    opts.max_message_size = "2MB".into();
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail("billing@outside.test", &["bob@local.test"], &many_parts())
        .await;
    assert!(r.starts_with("250"), "{r}");
    let (ok, out, err) = gw.admin(&["quarantine", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("executable attachment: invoice.exe"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 0, "the executable was delivered");
}
