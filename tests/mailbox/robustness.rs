//! Malformed and hostile input over raw sockets: answered with BAD/-ERR, session continues.

use std::sync::Arc;

use crate::common::*;
use postern::mailbox::store::MemStore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn line(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut s = String::new();
    r.read_line(&mut s).await.expect("read");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_garbage_long_lines_and_big_literals() {
    let s = start(Arc::new(MemStore::new())).await;
    let tcp = tokio::net::TcpStream::connect(s.imap)
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let mut rd = BufReader::new(rd);
    assert!(
        line(&mut rd)
            .await
            .starts_with("* OK [CAPABILITY IMAP4rev1")
    );

    wr.write_all(b"a1 FROBNICATE\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("a1 BAD"));
    wr.write_all(b"\x00\xff\xfe garbage ((( \r\n")
        .await
        .unwrap();
    assert!(line(&mut rd).await.starts_with("* BAD"));
    let mut long = b"a2 NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 100_000));
    long.extend_from_slice(b"\r\n");
    wr.write_all(&long).await.unwrap();
    assert!(line(&mut rd).await.contains("BAD"));
    wr.write_all(b"a3 LOGIN {999999999}\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("a3 BAD"));
    wr.write_all(b"a4 FETCH 1:* (FLAGS\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("a4 BAD"));
    wr.write_all(b"a5 SELECT INBOX\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("a5 NO"));
    wr.write_all(b"a6 LOGIN {5}\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("+ "));
    wr.write_all(b"alice x\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("a6 NO [PRIVACYREQUIRED]"));
    wr.write_all(b"a7 NOOP\r\n").await.unwrap();
    assert_eq!(line(&mut rd).await, "a7 OK NOOP completed\r\n");
    wr.write_all(b"a8 LOGOUT\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("* BYE"));
    assert!(line(&mut rd).await.starts_with("a8 OK"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_garbage_and_long_lines() {
    let s = start(Arc::new(MemStore::new())).await;
    let tcp = tokio::net::TcpStream::connect(s.pop3)
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let mut rd = BufReader::new(rd);
    assert!(line(&mut rd).await.starts_with("+OK"));
    wr.write_all(b"\xff\xfe\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("-ERR"));
    let mut long = b"USER ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 100_000));
    long.extend_from_slice(b"\r\n");
    wr.write_all(&long).await.unwrap();
    assert!(line(&mut rd).await.starts_with("-ERR"));
    wr.write_all(b"PASS x\r\nRETR 1\r\nAUTH PLAIN AGEAYg==\r\n")
        .await
        .unwrap();
    assert!(line(&mut rd).await.starts_with("-ERR"));
    assert!(line(&mut rd).await.starts_with("-ERR"));
    assert!(line(&mut rd).await.starts_with("-ERR [AUTH]"));
    wr.write_all(b"QUIT\r\n").await.unwrap();
    assert!(line(&mut rd).await.starts_with("+OK"));
    s.stop().await;
}

/// Commands pipelined after STARTTLS in clear text must not be executed inside TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_discards_pipelined_plaintext() {
    use tokio::io::AsyncReadExt;
    let s = start(Arc::new(MemStore::new())).await;
    let mut tcp = tokio::net::TcpStream::connect(s.imap)
        .await
        .expect("connect");
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"* OK"));
    tcp.write_all(b"a STARTTLS\r\nb CAPABILITY\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"a OK Begin TLS negotiation now\r\n");
    let tls = tls_client(tcp).await;
    let (rd, mut wr) = tokio::io::split(tls);
    let mut rd = BufReader::new(rd);
    wr.write_all(b"c CAPABILITY\r\n").await.unwrap();
    let mut l = String::new();
    rd.read_line(&mut l).await.unwrap();
    assert!(
        l.starts_with("* CAPABILITY") && l.contains("AUTH=PLAIN"),
        "{l}"
    );
    l.clear();
    rd.read_line(&mut l).await.unwrap();
    assert_eq!(l, "c OK CAPABILITY completed\r\n");
    s.stop().await;
}
