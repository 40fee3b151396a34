//! A failing quarantine store over real sockets: POP3 answers `-ERR [SYS/TEMP]`, IMAP
//! `NO [UNAVAILABLE]`; nothing is reported gone, deleted or released that was not.

use std::sync::Arc;

use crate::common::*;
use postern::mailbox::store::{MemStore, QuarantineStore};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

type Client = BufReader<TlsStream>;

async fn connect(addr: std::net::SocketAddr) -> Client {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    BufReader::new(tls_client(tcp).await)
}

async fn line(c: &mut Client) -> String {
    let mut s = String::new();
    c.read_line(&mut s).await.expect("read");
    s
}

async fn send(c: &mut Client, cmd: &str) -> String {
    c.get_mut()
        .write_all(format!("{cmd}\r\n").as_bytes())
        .await
        .expect("write");
    line(c).await
}

/// Send a tagged IMAP command; all lines up to and including the tagged one.
async fn imap(c: &mut Client, tag: &str, cmd: &str) -> String {
    c.get_mut()
        .write_all(format!("{tag} {cmd}\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    loop {
        let l = line(c).await;
        assert!(!l.is_empty(), "connection closed after {out}");
        out.push_str(&l);
        if l.starts_with(&format!("{tag} ")) {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_store_failure_is_sys_temp_and_deletes_nothing() {
    let store = Arc::new(MemStore::new());
    store.add(
        "spam@evil.test",
        &["alice@example.test"],
        "spam",
        &held_message("one", "alice@example.test"),
    );
    let s = start(store.clone()).await;

    let mut c = connect(s.pop3s).await;
    assert!(line(&mut c).await.starts_with("+OK"));
    store.set_failing(true);
    assert!(
        send(&mut c, "USER alice@example.test")
            .await
            .starts_with("+OK")
    );
    let r = send(&mut c, &format!("PASS {PASSWORD}")).await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    // The failed login left the maildrop unlocked: the same session logs in now.
    store.set_failing(false);
    assert!(
        send(&mut c, "USER alice@example.test")
            .await
            .starts_with("+OK")
    );
    let r = send(&mut c, &format!("PASS {PASSWORD}")).await;
    assert!(r.starts_with("+OK"), "{r}");

    store.set_failing(true);
    let r = send(&mut c, "RETR 1").await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert!(send(&mut c, "DELE 1").await.starts_with("+OK"));
    let r = send(&mut c, "QUIT").await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    store.set_failing(false);
    assert!(store.deleted().is_empty());
    assert_eq!(store.list().expect("list").len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_store_failure_is_unavailable_and_releases_nothing() {
    let store = Arc::new(MemStore::new());
    store.add(
        "spam@evil.test",
        &["alice@example.test"],
        "spam",
        &held_message("one", "alice@example.test"),
    );
    let s = start(store.clone()).await;

    let mut c = connect(s.imaps).await;
    assert!(line(&mut c).await.starts_with("* OK"));
    let r = imap(
        &mut c,
        "l",
        &format!("LOGIN alice@example.test \"{PASSWORD}\""),
    )
    .await;
    assert!(r.starts_with("l OK"), "{r}");
    store.set_failing(true);
    let r = imap(&mut c, "s", "SELECT INBOX").await;
    assert!(r.starts_with("s NO [UNAVAILABLE]"), "{r}");
    store.set_failing(false);
    assert!(
        imap(&mut c, "s", "SELECT INBOX")
            .await
            .contains("* 1 EXISTS")
    );

    store.set_failing(true);
    for (tag, cmd) in [
        ("f", "FETCH 1 BODY[]"),
        ("m", "MOVE 1 Release"),
        ("t", "STORE 1 +FLAGS (\\Deleted)"),
    ] {
        let r = imap(&mut c, tag, cmd).await;
        assert!(r.starts_with(&format!("{tag} NO [UNAVAILABLE]")), "{r}");
    }
    store.add(
        "spam@evil.test",
        &["alice@example.test"],
        "spam",
        &held_message("two", "alice@example.test"),
    );
    let r = imap(&mut c, "n", "NOOP").await;
    assert!(r.starts_with("n NO [UNAVAILABLE]"), "{r}");
    assert!(store.released().is_empty() && store.deleted().is_empty());

    store.set_failing(false);
    let r = imap(&mut c, "n", "NOOP").await;
    assert!(r.contains("* 2 EXISTS") && r.contains("n OK"), "{r}");
    let r = imap(&mut c, "m", "MOVE 1 Release").await;
    assert!(r.contains("* 1 EXPUNGE") && r.contains("m OK"), "{r}");
    assert_eq!(store.released().len(), 1);
    assert!(imap(&mut c, "o", "LOGOUT").await.contains("o OK"));
    s.stop().await;
}
