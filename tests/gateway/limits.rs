//! The waits and caps of the shared connection layer, over real sockets:
//! TLS handshakes, idle and DATA deadlines, per-IP caps and rates, the
//! mailbox overload replies, and the bare-newline policy.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;

/// Connect from a chosen loopback source address (127.0.0.x are all ours).
async fn connect_from(src: &str, port: u16) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap()
}

/// Read until the server closes (or `limit` passes); what it said, and when it closed.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Some(start.elapsed()),
                );
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), None),
        }
    }
}

/// The first line the server sends.
async fn first_line(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => got.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_handshakes_that_never_finish_are_dropped_without_locking_out_port_25() {
    let gw = Gateway::start(Opts {
        smtp_extra: "handshake_timeout = \"2s\"".into(),
        ..Opts::default()
    })
    .await;
    // Silent clients on the implicit-TLS port: they never send a ClientHello.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(
            TcpStream::connect(("127.0.0.1", gw.submissions))
                .await
                .unwrap(),
        );
    }
    // A client that stalls after STARTTLS.
    let mut stalled = Client::connect(gw.smtp).await;
    stalled.cmd("EHLO c.test").await;
    assert!(stalled.cmd("STARTTLS").await.starts_with("220"));
    // Meanwhile port 25 greets and serves others at once.
    let t = Instant::now();
    let mut fresh = Client::connect(gw.smtp).await;
    assert!(fresh.cmd("NOOP").await.starts_with("250"));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    for s in &mut silent {
        let (said, closed) = until_closed(s, Duration::from_secs(8)).await;
        let closed = closed.expect("a silent TLS client must be dropped");
        assert!(said.is_empty(), "said {said:?} in clear text on a TLS port");
        assert!(closed < Duration::from_secs(6), "closed after {closed:?}");
    }
    let (_, closed) = until_closed(stalled.stream(), Duration::from_secs(8)).await;
    assert!(
        closed.is_some(),
        "a client stalled after STARTTLS must be dropped"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_dripping_a_byte_at_a_time_is_cut_off_at_idle_timeout() {
    let gw = Gateway::start(Opts {
        idle_timeout: "3s".into(),
        ..Opts::default()
    })
    .await;
    let mut s = TcpStream::connect(("127.0.0.1", gw.smtp)).await.unwrap();
    assert!(first_line(&mut s).await.starts_with("220"));
    let (mut r, mut w) = s.into_split();
    let start = Instant::now();
    // Never silent: a byte every 300 ms, never a complete line.
    let drip = tokio::spawn(async move {
        for b in b"NOOP ".iter().cycle().take(60) {
            if w.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(15), r.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let took = start.elapsed();
    drip.abort();
    let said = String::from_utf8_lossy(&got);
    assert!(
        said.starts_with("421 4.4.2"),
        "dripping client got {said:?}"
    );
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(7),
        "cut off after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn data_slower_than_data_timeout_gets_421() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts {
        smtp_extra: "data_timeout = \"3s\"".into(),
        ..Opts::sink(sink.port)
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    assert!(c.cmd("MAIL FROM:<a@far.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@local.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    let start = Instant::now();
    let mut said = String::new();
    for i in 0..40 {
        // A complete line every 250 ms: never idle, always slow.
        if c.stream()
            .write_all(format!("line {i}\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), c.stream().read(&mut buf)).await
        {
            said.push_str(&String::from_utf8_lossy(&buf[..n]));
            break;
        }
    }
    let took = start.elapsed();
    assert!(said.starts_with("421 4.4.2"), "slow DATA got {said:?}");
    assert!(took < Duration::from_secs(7), "after {took:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 0, "a timed-out message must not be delivered");
}

#[tokio::test(flavor = "multi_thread")]
async fn per_ip_cap_and_rate_answer_421_and_spare_other_addresses() {
    let gw = Gateway::start(Opts {
        networks: vec!["127.0.0.3/32".into()],
        smtp_extra: "max_connections_per_ip = 3\nconnection_rate_per_ip = \"6/1m\"".into(),
        ..Opts::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", gw.smtp).await;
        assert!(first_line(&mut s).await.starts_with("220"));
        held.push(s);
    }
    let mut over = connect_from("127.0.0.1", gw.smtp).await;
    let (said, closed) = until_closed(&mut over, Duration::from_secs(5)).await;
    assert!(
        said.starts_with("421 4.7.0"),
        "fourth from one IP got {said:?}"
    );
    assert!(closed.is_some());
    // Another address is welcome meanwhile.
    let mut other = connect_from("127.0.0.2", gw.smtp).await;
    assert!(first_line(&mut other).await.starts_with("220"));
    // A trusted network is not held to the per-IP cap.
    let mut trusted = Vec::new();
    for _ in 0..5 {
        let mut s = connect_from("127.0.0.3", gw.smtp).await;
        assert!(first_line(&mut s).await.starts_with("220"));
        trusted.push(s);
    }
    // The rate: 127.0.0.2 has used 1 of its 6 per minute; 5 more pass (one
    // at a time, under the cap), the next is refused.
    drop(other);
    for i in 0..5 {
        let mut s = connect_from("127.0.0.2", gw.smtp).await;
        let line = first_line(&mut s).await;
        assert!(line.starts_with("220"), "connection {i}: {line}");
    }
    let mut fast = connect_from("127.0.0.2", gw.smtp).await;
    let (said, _) = until_closed(&mut fast, Duration::from_secs(5)).await;
    assert!(said.starts_with("421 4.7.0"), "over the rate got {said:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mailbox_listeners_answer_the_overload_in_their_protocol() {
    let gw = Gateway::start(Opts {
        quarantine_extra: "max_connections = 3\nmax_connections_per_ip = 2".into(),
        ..Opts::default()
    })
    .await;
    let mut a = connect_from("127.0.0.1", gw.pop3).await;
    assert!(first_line(&mut a).await.starts_with("+OK"));
    let mut b = connect_from("127.0.0.1", gw.imap).await;
    assert!(first_line(&mut b).await.starts_with("* OK"));
    // Per IP, across POP3 and IMAP.
    let mut c = connect_from("127.0.0.1", gw.imap).await;
    let (said, closed) = until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(said.starts_with("* BYE [UNAVAILABLE]"), "IMAP got {said:?}");
    assert!(closed.is_some());
    let mut d = connect_from("127.0.0.1", gw.pop3).await;
    let (said, _) = until_closed(&mut d, Duration::from_secs(5)).await;
    assert!(said.starts_with("-ERR [SYS/TEMP]"), "POP3 got {said:?}");
    // The total: one more from another address fits, then the group is full.
    let mut e = connect_from("127.0.0.2", gw.pop3).await;
    assert!(first_line(&mut e).await.starts_with("+OK"));
    let mut f = connect_from("127.0.0.2", gw.pop3).await;
    let (said, _) = until_closed(&mut f, Duration::from_secs(5)).await;
    assert!(
        said.starts_with("-ERR [SYS/TEMP]"),
        "POP3 (full) got {said:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_lf_in_data_gets_521_at_once_under_reject() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    assert!(c.cmd("MAIL FROM:<a@far.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@local.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    // No final dot: the answer must come at once, not at the end.
    c.send(b"Subject: a\r\n\r\nhello\n.\nMAIL FROM:<evil@attacker.test>\n")
        .await;
    let r = c.reply().await;
    assert!(r.starts_with("521 5.5.2"), "bare LF answered {r}");
    let (_, closed) = until_closed(c.stream(), Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the connection must close after 521");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_lf_under_normalize_is_one_message_of_crlf_text() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts {
        smtp_extra: "bare_newline = \"normalize\"".into(),
        ..Opts::sink(sink.port)
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail(
            "a@far.test",
            &["bob@local.test"],
            b"Subject: n\r\n\r\nhello\n.\nMAIL FROM:<evil@attacker.test>\nRCPT TO:<victim@local.test>\nDATA\nsmuggled\r.\r\nend",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("NOOP").await.starts_with("250"), "session in step");
    assert!(eventually(Duration::from_secs(5), || sink.count() == 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = sink.messages();
    assert_eq!(got.len(), 1, "never split into two messages");
    assert_eq!(got[0].from, "a@far.test");
    let body = &got[0].body;
    let text = String::from_utf8_lossy(body);
    assert!(text.contains("hello\r\n"), "{text}");
    assert!(
        text.contains("MAIL FROM:<evil@attacker.test>\r\n"),
        "{text}"
    );
    assert!(text.contains("smuggled\r\n"), "{text}");
    for (i, &b) in body.iter().enumerate() {
        if b == b'\n' {
            assert_eq!(body.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_mailbox_clients_are_closed_at_login_timeout_but_logged_in_ones_stay() {
    let gw = Gateway::start(Opts {
        quarantine_extra: "login_timeout = \"2s\"".into(),
        users: vec![(
            "alice".into(),
            "alice-pw".into(),
            vec!["alice@local.test".into()],
            "user".into(),
        )],
        ..Opts::default()
    })
    .await;
    let mut pop = connect_from("127.0.0.1", gw.pop3).await;
    assert!(first_line(&mut pop).await.starts_with("+OK"));
    let mut imap = connect_from("127.0.0.1", gw.imap).await;
    assert!(first_line(&mut imap).await.starts_with("* OK"));
    let (said, closed) = until_closed(&mut pop, Duration::from_secs(30)).await;
    assert!(closed.is_some(), "a silent POP3 client was not closed");
    assert!(said.starts_with("-ERR login timeout"), "{said}");
    let (said, closed) = until_closed(&mut imap, Duration::from_secs(30)).await;
    assert!(closed.is_some(), "a silent IMAP client was not closed");
    assert!(said.starts_with("* BYE Login timeout"), "{said}");

    // Logged in (POP3S), a client may pause past login_timeout.
    let out = tokio::task::spawn_blocking({
        let port = gw.pop3s.to_string();
        move || {
            python(
                r#"
import poplib, ssl, sys, time
ctx = ssl._create_unverified_context()
p = poplib.POP3_SSL('127.0.0.1', int(sys.argv[1]), context=ctx)
p.user('alice'); p.pass_('alice-pw')
time.sleep(3)
print('stat', p.stat()[0])
p.quit()
"#,
                &[&port],
            )
        }
    })
    .await
    .unwrap();
    assert!(out.contains("stat 0"), "{out}");
}
