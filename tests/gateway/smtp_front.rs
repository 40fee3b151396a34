//! The SMTP front as a client sees it: relay control, smuggling, limits, TLS.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn open_relay_tricks_are_refused() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    assert!(c.cmd("EHLO attacker.test").await.starts_with("250"));
    assert!(
        c.cmd("MAIL FROM:<spammer@attacker.test>")
            .await
            .starts_with("250")
    );
    for trick in [
        "victim@other.test",
        "victim%other.test@local.test",
        "victim!other.test@local.test",
        "\"victim@other.test\"@local.test",
        "@local.test:victim@other.test",
        "@local.test,@x.test:victim@other.test",
        "victim@other.test@local.test",
        "victim@[127.0.0.1]",
        "victim@local.test.",
        "victim@other.test.",
        "victim@local.test.other.test",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{trick}>")).await;
        assert!(r.starts_with('5'), "RCPT TO:<{trick}> was answered {r}");
    }
    let r = c.cmd("DATA").await;
    assert!(r.starts_with("554"), "DATA without recipients: {r}");
    // A real local recipient is still fine in the same session.
    assert!(c.cmd("RCPT TO:<bob@local.test>").await.starts_with("250"));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_network_relays_to_any_domain() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.networks = vec!["127.0.0.0/8".into()];
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO inside.test").await;
    let r = c
        .mail(
            "app@inside.test",
            &["someone@far.test"],
            b"Subject: out\r\n\r\nhi",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(eventually(Duration::from_secs(5), || sink.count() == 1).await);
    assert_eq!(
        sink.messages()[0].rcpts,
        vec!["someone@far.test".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smuggled_commands_stay_inside_one_refused_message() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    // Under the default `bare_newline = "reject"` (issue 7) a bare CR or LF
    // in DATA is answered 521 5.5.2 at once and the connection closes, so
    // nothing after it can be read as a command.
    for payload in [
        &b"Subject: a\r\n\r\nhello\n.\nMAIL FROM:<evil@attacker.test>\nRCPT TO:<victim@local.test>\nDATA\nsmuggled\n.\n"[..],
        b"Subject: b\r\n\r\nhello\r\n.\rMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@local.test>\r\nDATA\r\nsmuggled",
        b"Subject: c\r\n\r\nhello\r\n\n.\r\nRCPT TO:<victim@local.test>",
    ] {
        let mut c = Client::connect(gw.smtp).await;
        c.cmd("EHLO c.test").await;
        assert!(c.cmd("MAIL FROM:<a@local.test>").await.starts_with("250"));
        assert!(c.cmd("RCPT TO:<bob@local.test>").await.starts_with("250"));
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(payload).await;
        let _ = c.stream().write_all(b"\r\n.\r\n").await;
        let r = c.reply().await;
        assert!(r.starts_with("521 5.5.2"), "smuggling payload answered {r}");
        assert_eq!(c.reply().await, "EOF", "the connection closes after 521");
    }
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    // The session is back in a clean state: a normal message goes through.
    let r = c
        .mail(
            "a@local.test",
            &["bob@local.test"],
            b"Subject: fine\r\n\r\nok",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("QUIT").await.starts_with("221"));
    assert!(eventually(Duration::from_secs(5), || sink.count() == 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = sink.messages();
    assert_eq!(got.len(), 1, "only the clean message may be delivered");
    assert!(String::from_utf8_lossy(&got[0].body).contains("Subject: fine"));
    assert!(got.iter().all(|g| g.from != "evil@attacker.test"));
}

#[tokio::test(flavor = "multi_thread")]
async fn overlong_line_gets_500_and_the_session_survives() {
    let gw = Gateway::start(Opts::default()).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let long = format!("NOOP {}", "x".repeat(100_000));
    let r = c.cmd(&long).await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    assert!(c.cmd("NOOP").await.starts_with("250"));
    let long_rcpt = format!("RCPT TO:<{}@local.test>", "y".repeat(5000));
    c.cmd("MAIL FROM:<a@local.test>").await;
    assert!(c.cmd(&long_rcpt).await.starts_with("500"));
    assert!(c.cmd("RSET").await.starts_with("250"));
}

#[tokio::test(flavor = "multi_thread")]
async fn size_and_recipient_limits() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.max_message_size = "10KB".into();
    opts.max_recipients = 3;
    let gw = Gateway::start(opts).await;
    let mut c = Client::connect(gw.smtp).await;
    let ehlo = c.cmd("EHLO c.test").await;
    for cap in [
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    ] {
        assert!(ehlo.contains(cap), "EHLO lacks {cap}: {ehlo}");
    }
    assert!(
        c.cmd("MAIL FROM:<a@local.test> SIZE=20000")
            .await
            .starts_with("552")
    );
    assert!(
        c.cmd("MAIL FROM:<a@local.test> SIZE=2000 BODY=8BITMIME")
            .await
            .starts_with("250")
    );
    for i in 0..3 {
        assert!(
            c.cmd(&format!("RCPT TO:<u{i}@local.test>"))
                .await
                .starts_with("250")
        );
    }
    assert!(c.cmd("RCPT TO:<u9@local.test>").await.starts_with("452"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(&vec![b'z'; 20_000]).await;
    c.send(b"\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("552"));
    // Rejected at the end of DATA: the next transaction is answered normally.
    let r = c
        .mail("", &["u1@local.test"], b"Subject: small\r\n\r\nok")
        .await;
    assert!(r.starts_with("250"), "null sender after a reject: {r}");
    assert!(c.cmd("QUIT").await.starts_with("221"));
    assert!(eventually(Duration::from_secs(5), || sink.count() == 1).await);
    assert_eq!(sink.messages()[0].from, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_limit_and_idle_timeout() {
    let gw = Gateway::start(Opts {
        max_connections: 2,
        idle_timeout: "3s".into(),
        ..Opts::default()
    })
    .await;
    // The harness's readiness probe is a session too: let it end first.
    let mut idle = false;
    for _ in 0..100 {
        if gw
            .metrics_text()
            .await
            .contains("postern_smtp_sessions_active{listener=\"relay\"} 0")
        {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle, "the readiness probe's session never ended");
    let _a = Client::connect(gw.smtp).await;
    let _b = Client::connect(gw.smtp).await;
    let mut third = tokio::net::TcpStream::connect(("127.0.0.1", gw.smtp))
        .await
        .unwrap();
    let mut buf = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut third, &mut buf)
        .await
        .unwrap();
    assert!(
        buf.starts_with("421 4.7.0"),
        "excess connection got {buf:?}"
    );
    // The two idle sessions are closed after the idle timeout.
    let mut a = _a;
    let r = a.reply().await;
    assert!(r.starts_with("421 4.4.2"), "idle session got {r}");
    // And a new one is welcome again, once the closed sessions have left
    // (each may linger a moment after its 421).
    let mut greeted = String::new();
    for _ in 0..50 {
        let mut d = tokio::net::TcpStream::connect(("127.0.0.1", gw.smtp))
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::io::AsyncReadExt::read(&mut d, &mut buf)
            .await
            .unwrap_or(0);
        greeted = String::from_utf8_lossy(&buf[..n]).into_owned();
        if greeted.starts_with("220") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        greeted.starts_with("220"),
        "after the idle timeout: {greeted:?}"
    );
}

/// Python's smtplib, an implementation nobody here wrote: STARTTLS, many
/// messages, 8-bit bodies, delivered byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn python_smtplib_relays_many_messages_intact() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let port = gw.smtp.to_string();
    let script = r#"
import smtplib, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
sent = 0
for conn in range(4):
    s = smtplib.SMTP('127.0.0.1', port, timeout=20)
    s.ehlo('py.test')
    s.starttls(context=ctx)
    s.ehlo('py.test')
    for i in range(25):
        n = conn * 25 + i
        body = ('Subject: msg %d\r\nFrom: py@local.test\r\n\r\nline one %d\r\n.leading dot\r\n'
                'caf\u00e9 na\u00efve \u00fcber\r\n' % (n, n)).encode('utf-8') + bytes(range(128, 256)) + b'\r\n'
        s.sendmail('py@local.test', ['bob@local.test'], body, mail_options=['BODY=8BITMIME'])
        sent += 1
    s.quit()
print(sent)
"#;
    let out = tokio::task::spawn_blocking(move || python(script, &[&port]))
        .await
        .unwrap();
    assert_eq!(out.trim(), "100");
    assert!(
        eventually(Duration::from_secs(15), || sink.count() == 100).await,
        "only {} of 100 arrived",
        sink.count()
    );
    let mut seen = std::collections::HashSet::new();
    for g in sink.messages() {
        let body = g.body;
        // Our trace header comes first, then the bytes exactly as sent.
        assert!(
            body.starts_with(b"Received: from py.test"),
            "{}",
            String::from_utf8_lossy(&body[..80])
        );
        assert!(String::from_utf8_lossy(&body).contains("with ESMTPS"));
        let start = body.windows(9).position(|w| w == b"Subject: ").unwrap();
        let rest = &body[start..];
        let subject_end = rest.iter().position(|&b| b == b'\r').unwrap();
        let subject = String::from_utf8_lossy(&rest[9..subject_end]).to_string();
        let n: usize = subject.trim_start_matches("msg ").parse().unwrap();
        let mut expected = format!(
            "Subject: msg {n}\r\nFrom: py@local.test\r\n\r\nline one {n}\r\n.leading dot\r\ncafé naïve über\r\n"
        )
        .into_bytes();
        expected.extend(128u8..=255);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(rest, &expected[..], "message {n} changed in transit");
        assert!(seen.insert(n), "message {n} delivered twice");
    }
    assert_eq!(seen.len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_listener_speaks_tls() {
    let sink = Sink::start(false).await;
    // Submission wants AUTH: a user to log in as.
    let gw = Gateway::start(Opts {
        users: vec![(
            "py@local.test".into(),
            "py-pw".into(),
            vec!["py@local.test".into()],
            "user".into(),
        )],
        ..Opts::sink(sink.port)
    })
    .await;
    let port = gw.submissions.to_string();
    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP_SSL('127.0.0.1', int(sys.argv[1]), context=ctx, timeout=10)
code, caps = s.ehlo('py.test')
assert b'STARTTLS' not in caps, caps
s.login('py@local.test', 'py-pw')
s.sendmail('py@local.test', ['bob@local.test'], b'From: py@local.test\r\nSubject: tls\r\n\r\nover 465\r\n')
s.quit()
print('ok')
"#;
    let out = tokio::task::spawn_blocking(move || python(script, &[&port]))
        .await
        .unwrap();
    assert_eq!(out.trim(), "ok");
    assert!(eventually(Duration::from_secs(5), || sink.count() == 1).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_discards_pipelined_plaintext() {
    let gw = Gateway::start(Opts::default()).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    // CVE-2011-0411: commands sent in the clear after STARTTLS must not be run inside TLS.
    c.send(b"STARTTLS\r\nRSET\r\n").await;
    let r = c.reply().await;
    assert!(r.starts_with("220"), "{r}");
    // The server now expects a TLS ClientHello; it must not answer the RSET.
    let extra = tokio::time::timeout(Duration::from_millis(500), c.reply()).await;
    assert!(
        extra.is_err() || extra.as_deref() == Ok("EOF"),
        "answered pipelined plaintext: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn null_recipient_and_dsn_parameters_get_their_rfc_answers() {
    let gw = Gateway::start(Opts::default()).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c.cmd("MAIL FROM:<a@far.test> RET=FULL").await;
    assert!(r.starts_with("555 5.5.4"), "{r}");
    let r = c.cmd("MAIL FROM:<a@far.test>").await;
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("RCPT TO:<>").await;
    assert!(r.starts_with("501 5.1.3"), "{r}");
    let r = c.cmd("RCPT TO:<bob@local.test> NOTIFY=FAILURE").await;
    assert!(r.starts_with("555 5.5.4"), "{r}");
    let r = c.cmd("RCPT TO:<bob@local.test>").await;
    assert!(r.starts_with("250"), "the session goes on: {r}");
}
