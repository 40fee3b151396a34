//! Bounded memory under DATA floods: message data beyond a small buffer
//! goes to `data_dir/spool/` while it arrives, the checks read it back
//! within `[smtp] data_memory`, and a message that does not fit is told
//! `452 4.3.1` rather than half accepted.

use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::*;

/// The gateway's resident memory in bytes (Linux: /proc/PID/status VmRSS).
pub fn rss(gw: &Gateway) -> u64 {
    let pid = gw.child.as_ref().map(|c| c.id()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// Bytes in the spool files, and how many there are.
fn spooled(gw: &Gateway) -> (u64, usize) {
    let dir = gw.data_dir().join("spool");
    let mut total = 0;
    let mut n = 0;
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        total += e.metadata().map(|m| m.len()).unwrap_or(0);
        n += 1;
    }
    (total, n)
}

/// A message of about `size` bytes, distinct per `seed`, every line CRLF-ended
/// (so it arrives at the backend exactly as sent, after our headers).
fn message(seed: usize, size: usize) -> Vec<u8> {
    let mut m = format!("From: a{seed}@remote.test\r\nSubject: big {seed}\r\n\r\n").into_bytes();
    let mut i = 0usize;
    while m.len() < size {
        m.extend_from_slice(
            format!("{seed:04} line {i:08} abcdefghijklmnopqrstuvwxyz0123456789\r\n").as_bytes(),
        );
        i += 1;
    }
    m
}

/// Open a transaction and send `data` without the final dot.
async fn start_data(port: u16, seed: usize, data: &[u8]) -> Client<TcpStream> {
    let mut c = Client::connect(port).await;
    assert!(c.cmd("EHLO big.test").await.starts_with("250"));
    let r = c.cmd(&format!("MAIL FROM:<a{seed}@remote.test>")).await;
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("RCPT TO:<u@local.test>").await;
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("DATA").await;
    assert!(r.starts_with("354"), "{r}");
    for chunk in data.chunks(64 * 1024) {
        c.stream().write_all(chunk).await.unwrap();
    }
    c
}

fn delivered_intact(sink: &Sink, data: &[u8]) -> bool {
    sink.messages().iter().any(|g| g.body.ends_with(data))
}

#[tokio::test(flavor = "multi_thread")]
async fn trickling_large_messages_are_spooled_and_every_acknowledged_one_arrives_intact() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts {
        max_message_size: "16MB".into(),
        smtp_extra: "data_memory = \"40MB\"".into(),
        ..Opts::sink(sink.port)
    })
    .await;
    let mut warm = Client::connect(gw.smtp).await;
    assert!(warm.cmd("EHLO warm.test").await.starts_with("250"));
    let r = warm
        .mail(
            "w@remote.test",
            &["u@local.test"],
            b"Subject: warm\r\n\r\nhi",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
    let base = rss(&gw);

    // Eight clients each send 12 MB and then stop, as if trickling.
    const N: usize = 8;
    const SIZE: usize = 12 * 1000 * 1000;
    let bodies: Vec<Vec<u8>> = (0..N).map(|i| message(i, SIZE)).collect();
    let mut clients = Vec::new();
    for (i, b) in bodies.iter().enumerate() {
        clients.push(start_data(gw.smtp, i, b).await);
    }
    let sent = (N * SIZE) as u64;
    let all_read = eventually(Duration::from_secs(30), || {
        let (bytes, files) = spooled(&gw);
        files == N && bytes + (N as u64) * 256 * 1024 >= sent
    })
    .await;
    assert!(
        all_read,
        "spool holds {:?} of {sent} bytes sent",
        spooled(&gw)
    );
    let during = rss(&gw);
    // Held in memory, 96 MB would show; spooled, only small buffers do.
    assert!(
        during.saturating_sub(base) < sent / 3,
        "RSS grew by {} bytes while {sent} bytes of DATA were in flight (base {base})",
        during.saturating_sub(base)
    );

    // Each message ends; its 250 means it is stored, and it arrives intact.
    for c in clients.iter_mut() {
        let r = c.cmd(".").await;
        assert!(r.starts_with("250"), "end of DATA: {r}");
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    assert!(
        eventually(Duration::from_secs(60), || sink.count() == N + 1).await,
        "delivered {} of {}",
        sink.count(),
        N + 1
    );
    for b in &bodies {
        assert!(delivered_intact(&sink, b), "a message arrived changed");
    }
    assert!(
        eventually(Duration::from_secs(10), || spooled(&gw).1 == 0).await,
        "spool files left after the sessions ended: {:?}",
        spooled(&gw)
    );

    // A client that leaves mid-DATA leaves no file behind.
    let gone = start_data(gw.smtp, 99, &message(99, 3_000_000)).await;
    assert!(eventually(Duration::from_secs(10), || spooled(&gw).1 == 1).await);
    drop(gone);
    assert!(
        eventually(Duration::from_secs(10), || spooled(&gw).1 == 0).await,
        "spool file of an abandoned session left: {:?}",
        spooled(&gw)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_data_leaves_spool_files_that_the_next_start_removes() {
    let sink = Sink::start(false).await;
    let mut gw = Gateway::start(Opts {
        max_message_size: "16MB".into(),
        ..Opts::sink(sink.port)
    })
    .await;
    let _c = start_data(gw.smtp, 1, &message(1, 4_000_000)).await;
    assert!(eventually(Duration::from_secs(10), || spooled(&gw).1 == 1).await);
    gw.kill9();
    assert_eq!(spooled(&gw).1, 1, "the file outlives a crash");
    gw.spawn().await;
    assert_eq!(spooled(&gw).1, 0, "start-up empties the spool");
    assert!(Path::new(&gw.data_dir().join("spool")).is_dir());
}

/// A DNS server that never answers: each message's checks then take the
/// whole `[checks] deadline`, holding its memory that long.
fn silent_dns() -> (std::net::UdpSocket, std::net::SocketAddr) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_does_not_fit_the_memory_budget_gets_452_and_is_not_half_taken() {
    let sink = Sink::start(false).await;
    let (_dns, dns) = silent_dns();
    let gw = Gateway::start(Opts {
        max_message_size: "12MB".into(),
        smtp_extra: "data_memory = \"16MB\"".into(),
        dns: Some(dns),
        ..Opts::sink(sink.port)
    })
    .await;
    let (a, b) = (message(1, 10_000_000), message(2, 10_000_000));
    let mut ca = start_data(gw.smtp, 1, &a).await;
    let mut cb = start_data(gw.smtp, 2, &b).await;
    assert!(
        eventually(Duration::from_secs(30), || {
            let (bytes, files) = spooled(&gw);
            files == 2 && bytes + 512 * 1024 >= 20_000_000
        })
        .await
    );
    // Both end at once: 16 MB holds one 10 MB message under its checks, not two.
    ca.send(b".\r\n").await;
    cb.send(b".\r\n").await;
    let (ra, rb) = tokio::join!(ca.reply(), cb.reply());
    let (ok, mut refused, again) = match (ra.starts_with("250"), rb.starts_with("250")) {
        (true, false) => (&a, cb, &b),
        (false, true) => (&b, ca, &a),
        _ => panic!("want one 250 and one 452: {ra} / {rb}"),
    };
    let no = if ra.starts_with("452") { &ra } else { &rb };
    assert!(no.starts_with("452 4.3.1"), "{no}");
    assert!(eventually(Duration::from_secs(30), || sink.count() == 1).await);
    assert!(delivered_intact(&sink, ok));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 1, "the refused message was delivered anyway");

    // Told to try again, the client does, and now it fits.
    let r = refused.cmd("MAIL FROM:<again@remote.test>").await;
    assert!(r.starts_with("250"), "{r}");
    assert!(
        refused
            .cmd("RCPT TO:<u@local.test>")
            .await
            .starts_with("250")
    );
    assert!(refused.cmd("DATA").await.starts_with("354"));
    refused.send(again).await;
    let r = refused.cmd(".").await;
    assert!(r.starts_with("250"), "retry: {r}");
    assert!(eventually(Duration::from_secs(30), || sink.count() == 2).await);
    assert!(delivered_intact(&sink, again));
    assert!(gw.log_plain().contains("no memory for its checks"));
}
