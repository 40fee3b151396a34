//! IMAP against Python's imaplib and the async-imap crate over real sockets.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use futures::TryStreamExt;
use postern::mailbox::store::{MemStore, QuarantineStore};

const SCRIPT: &str = r#"
import imaplib, socket, ssl, sys, json, re
port, port_s, pw, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl._create_unverified_context()
out = {}
def dec(x):
    if isinstance(x, (tuple, list)):
        return [dec(y) for y in x]
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    return x
if mode == "main":
    # Raw socket: LOGIN before STARTTLS is refused.
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    out["greeting"] = f.readline().decode()
    s.sendall(b"a1 LOGIN alice@example.test x\r\n")
    out["raw_login"] = f.readline().decode()
    s.close()
    M = imaplib.IMAP4("127.0.0.1", port)
    out["caps_before"] = sorted(M.capabilities)
    try:
        M.login("alice@example.test", pw); out["login_before_tls"] = "accepted"
    except imaplib.IMAP4.error as e:
        out["login_before_tls"] = str(e)
    M.starttls(ssl_context=ctx)
    out["caps_after"] = sorted(M.capabilities)
    M.login("alice@example.test", pw)
    out["list"] = dec(M.list()[1])
    typ, data = M.select("INBOX")
    out["exists"] = int(data[0])
    typ, data = M.fetch("1:*", "(UID FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER])")
    out["headers_first"] = dec(data)
    typ, data = M.fetch("1:*", "(FLAGS)")
    out["flags_after_peek"] = dec(data)
    typ, data = M.uid("FETCH", "1", "(BODY[])")
    out["full"] = dec(data)
    typ, data = M.fetch("1", "(FLAGS)")
    out["flags_after_body"] = dec(data)
    out["search_unseen"] = dec(M.search(None, "UNSEEN")[1])
    out["search_subject"] = dec(M.uid("SEARCH", None, 'SUBJECT "two"')[1])
    out["search_from_since"] = dec(M.search(None, 'FROM', '"spam@evil"', 'SINCE', '1-Jan-2020')[1])
    out["search_not_before"] = dec(M.search(None, 'NOT BEFORE 1-Jan-2020 SMALLER 100000')[1])
    out["partial"] = dec(M.fetch("1", "(BODY.PEEK[]<0.5> BODY.PEEK[1] BODY.PEEK[HEADER.FIELDS (SUBJECT TO)])")[1])
    out["move"] = dec(M.uid("MOVE", "2", "Release"))
    out["store"] = dec(M.store("1", "+FLAGS", "(\\Deleted)"))
    out["expunge"] = dec(M.expunge())
    out["status"] = dec(M.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)")[1])
    M.logout()
    # AUTHENTICATE PLAIN with a continuation (no SASL-IR) on the implicit-TLS port.
    M = imaplib.IMAP4_SSL("127.0.0.1", port_s, ssl_context=ctx)
    out["authenticate"] = dec(M.authenticate("PLAIN", lambda _: b"\0alice@example.test\0" + pw.encode()))
    M.logout()
elif mode == "count":
    user = sys.argv[5]
    M = imaplib.IMAP4_SSL("127.0.0.1", port_s, ssl_context=ctx)
    M.login(user, pw)
    typ, data = M.select("INBOX")
    out["exists"] = int(data[0])
    typ, data = M.fetch("1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])") if out["exists"] else ("OK", [])
    out["fetch"] = dec(data)
    out["uidvalidity"] = dec(M.response("UIDVALIDITY")[1])
    if len(sys.argv) > 6 and sys.argv[6] == "flag":
        M.store("1", "+FLAGS", "(\\Flagged $Checked)")
    M.logout()
print(json.dumps(out))
"#;

async fn run(s: &Servers, args: &[&str]) -> serde_json::Value {
    let mut v = vec![
        s.imap.port().to_string(),
        s.imaps.port().to_string(),
        PASSWORD.to_string(),
    ];
    v.extend(args.iter().map(|a| a.to_string()));
    let out = python(SCRIPT, v).await;
    serde_json::from_str(out.trim()).expect("json from python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_headers_first_then_body_move_expunge() {
    let store = Arc::new(MemStore::new());
    store.add(
        "spam@evil.test",
        &["alice@example.test", "bob@example.test"],
        "spam",
        &held_message("one", "alice@example.test"),
    );
    store.add(
        "spam@evil.test",
        &["sales@example.test"],
        "rule",
        &held_message("two", "sales@example.test"),
    );
    store.add(
        "spam@evil.test",
        &["alice@example.test"],
        "rule",
        &held_message("three", "alice@example.test"),
    );
    let s = start(store.clone()).await;
    let v = run(&s, &["main"]).await;
    let vs = v.to_string();

    assert!(
        v["greeting"].as_str().unwrap().contains("LOGINDISABLED"),
        "{vs}"
    );
    assert!(
        v["raw_login"].as_str().unwrap().starts_with("a1 NO"),
        "{vs}"
    );
    assert!(
        !v["login_before_tls"].as_str().unwrap().contains("accepted"),
        "{vs}"
    );
    let caps_before = v["caps_before"].to_string();
    assert!(
        caps_before.contains("LOGINDISABLED") && caps_before.contains("STARTTLS"),
        "{caps_before}"
    );
    let caps_after = v["caps_after"].to_string();
    assert!(
        caps_after.contains("AUTH=PLAIN") && !caps_after.contains("LOGINDISABLED"),
        "{caps_after}"
    );
    let list = v["list"].to_string();
    assert!(list.contains("INBOX") && list.contains("Release"), "{list}");
    assert_eq!(v["exists"], 3);

    let hf = v["headers_first"].to_string();
    assert!(hf.contains("ENVELOPE (\\\"Thu, 26 Nov 2026 10:00:00 +0000\\\" \\\"one\\\" ((\\\"Spammer\\\" NIL \\\"spam\\\" \\\"evil.test\\\"))"), "{hf}");
    assert!(
        hf.contains("BODYSTRUCTURE ((\\\"TEXT\\\" \\\"PLAIN\\\""),
        "{hf}"
    );
    assert!(hf.contains("\\\"MIXED\\\""), "{hf}");
    assert!(hf.contains("Subject: two"), "{hf}");
    let size = held_message("one", "alice@example.test").len();
    assert!(hf.contains(&format!("RFC822.SIZE {size}")), "{hf}");
    assert!(!v["flags_after_peek"].to_string().contains("Seen"), "{vs}");

    let full = v["full"].to_string();
    assert!(
        full.contains("Buy now.") && full.contains(".leading dot line"),
        "{full}"
    );
    assert!(
        v["flags_after_body"].to_string().contains("\\\\Seen"),
        "{vs}"
    );
    assert_eq!(v["search_unseen"], serde_json::json!(["2 3"]));
    assert_eq!(v["search_subject"], serde_json::json!(["2"]));
    assert_eq!(v["search_from_since"], serde_json::json!(["1 2 3"]));
    assert_eq!(v["search_not_before"], serde_json::json!(["1 2 3"]));
    let partial = v["partial"].to_string();
    assert!(
        partial.contains("BODY[]<0> {5}") && partial.contains("\"From:\"")
            || partial.contains("From:"),
        "{partial}"
    );
    assert!(
        partial.contains("Buy now.\\r\\n.leading dot line"),
        "{partial}"
    );
    assert!(
        partial.contains("To: alice@example.test\\r\\nSubject: one"),
        "{partial}"
    );

    assert_eq!(v["move"][0], "OK", "{vs}");
    assert_eq!(store.released().len(), 1);
    assert_eq!(store.released()[0].recipient, "sales@example.test");
    assert_eq!(v["expunge"][0], "OK", "{vs}");
    assert_eq!(store.deleted(), vec![1]);
    // bob's entry for the same message is still held
    assert!(
        store
            .list()
            .unwrap()
            .iter()
            .any(|m| m.recipient == "bob@example.test")
    );
    assert_eq!(
        v["status"],
        serde_json::json!(["INBOX (MESSAGES 1 UIDNEXT 4 UNSEEN 1)"])
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_admin_and_restart_keeps_uids_and_flags() {
    let store = Arc::new(MemStore::new());
    hold(&store, "for-alice", "alice@example.test");
    hold(&store, "for-bob", "bob@example.test");
    hold(&store, "for-carol", "carol@example.test");
    let s = start(store.clone()).await;

    let a = run(&s, &["count", "alice@example.test", "flag"]).await;
    assert_eq!(a["exists"], 1, "{a}");
    assert!(
        a["fetch"].to_string().contains("for-alice") && !a["fetch"].to_string().contains("for-bob")
    );
    let b = run(&s, &["count", "bob@example.test"]).await;
    assert_eq!(b["exists"], 1, "{b}");
    assert!(b["fetch"].to_string().contains("for-bob"));
    let adm = run(&s, &["count", "admin"]).await;
    assert_eq!(adm["exists"], 3, "{adm}");
    s.stop().await;

    // A new context (a restart) on the same store keeps UIDVALIDITY, UIDs and flags.
    hold(&store, "later", "alice@example.test");
    let s = start(store.clone()).await;
    let a2 = run(&s, &["count", "alice@example.test"]).await;
    assert_eq!(a2["uidvalidity"], a["uidvalidity"], "{a} {a2}");
    let f = a2["fetch"].to_string();
    assert!(f.contains("UID 1 FLAGS (\\\\Flagged $Checked)"), "{f}");
    // Held since the last session: \Recent for this one (RFC 3501 2.3.2).
    assert!(f.contains("UID 2 FLAGS (\\\\Recent)"), "{f}");
    assert!(s.ctx.logins.with_label_values(&["imap", "ok"]).get() >= 1);
    s.stop().await;
}

async fn rust_client(addr: std::net::SocketAddr) -> async_imap::Client<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut client = async_imap::Client::new(tls_client(tcp).await);
    let _greeting = client.read_response().await.expect("greeting");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_imap_fetch_move_and_idle() {
    let store = Arc::new(MemStore::new());
    hold(&store, "first", "alice@example.test");
    hold(&store, "second", "alice@example.test");
    let s = start(store.clone()).await;

    // Wrong password is refused and counted.
    let c = rust_client(s.imaps).await;
    assert!(c.login("alice@example.test", "nope").await.is_err());
    assert_eq!(s.ctx.logins.with_label_values(&["imap", "fail"]).get(), 1);

    let c = rust_client(s.imaps).await;
    let mut sess = login_alice(c).await;
    let mbox = sess.select("INBOX").await.expect("select");
    assert_eq!(mbox.exists, 2);
    let fetches: Vec<_> = sess
        .fetch(
            "1:*",
            "(UID RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER])",
        )
        .await
        .expect("fetch")
        .try_collect()
        .await
        .expect("fetch stream");
    assert_eq!(fetches.len(), 2);
    let env = fetches[0].envelope().expect("envelope");
    assert_eq!(env.subject.as_deref(), Some(&b"first"[..]));
    let from = env.from.as_ref().expect("from");
    assert_eq!(from[0].mailbox.as_deref(), Some(&b"spam"[..]));
    assert!(fetches[0].bodystructure().is_some());
    assert!(
        fetches[0]
            .header()
            .expect("header")
            .starts_with(b"From: Spammer")
    );
    assert_eq!(fetches[1].uid, Some(2));

    let bodies: Vec<_> = sess
        .uid_fetch("2", "BODY[]")
        .await
        .expect("fetch")
        .try_collect()
        .await
        .expect("stream");
    assert!(bodies[0].body().expect("body").ends_with(b"--XYZ--\r\n"));

    sess.uid_mv("1", "Release").await.expect("move");
    assert_eq!(store.released().len(), 1);
    assert_eq!(store.released()[0].id, 1);

    // IDLE: a message held meanwhile is announced.
    let mut idle = sess.idle();
    idle.init().await.expect("idle init");
    let (wait, _stop) = idle.wait_with_timeout(Duration::from_secs(10));
    let store2 = store.clone();
    let adder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store2.add(
            "spam@evil.test",
            &["alice@example.test"],
            "spam",
            &held_message("third", "alice@example.test"),
        );
    });
    let r = wait.await.expect("idle wait");
    assert!(
        matches!(r, async_imap::extensions::idle::IdleResponse::NewData(_)),
        "{r:?}"
    );
    adder.await.expect("adder");
    let mut sess = idle.done().await.expect("done");
    let uids = sess.uid_search("ALL").await.expect("search");
    assert_eq!(uids.len(), 2);
    assert!(uids.contains(&3));
    sess.logout().await.expect("logout");
    s.stop().await;
}

/// Two clients of one user (a phone and a desktop) set different flags on
/// the same message: neither may wipe the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_do_not_overwrite_each_others_flags() {
    let store = Arc::new(MemStore::new());
    hold(&store, "shared", "alice@example.test");
    let s = start(store.clone()).await;
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let c = rust_client(s.imaps).await;
        let mut sess = login_alice(c).await;
        sess.select("INBOX").await.expect("select");
        sessions.push(sess);
    }
    let flags_of = |f: &async_imap::types::Fetch| -> Vec<String> {
        f.flags().map(|fl| format!("{fl:?}")).collect()
    };
    let a: Vec<_> = sessions[0]
        .store("1", "+FLAGS (\\Flagged)")
        .await
        .expect("store a")
        .try_collect()
        .await
        .expect("store a stream");
    assert!(flags_of(&a[0]).iter().any(|f| f.contains("Flagged")));
    // B's copy of the flags is stale; its +FLAGS must still keep A's \Flagged.
    let b: Vec<_> = sessions[1]
        .store("1", "+FLAGS (\\Answered)")
        .await
        .expect("store b")
        .try_collect()
        .await
        .expect("store b stream");
    let fb = b
        .iter()
        .map(flags_of)
        .find(|f| f.iter().any(|x| x.contains("Answered")))
        .expect("a FETCH with B's flag");
    assert!(
        fb.iter().any(|f| f.contains("Flagged")),
        "B's STORE wiped A's flag: {fb:?}"
    );
    // And BODY[] in A adds \Seen without dropping B's \Answered.
    let _: Vec<_> = sessions[0]
        .fetch("1", "BODY[]")
        .await
        .expect("fetch")
        .try_collect()
        .await
        .expect("fetch stream");
    let c = rust_client(s.imaps).await;
    let mut fresh = login_alice(c).await;
    fresh.select("INBOX").await.expect("select");
    let f: Vec<_> = fresh
        .fetch("1", "FLAGS")
        .await
        .expect("fetch")
        .try_collect()
        .await
        .expect("fetch stream");
    let flags = flags_of(&f[0]);
    for want in ["Flagged", "Answered", "Seen"] {
        assert!(
            flags.iter().any(|x| x.contains(want)),
            "{want} lost: {flags:?}"
        );
    }
    s.stop().await;
}

/// Hold one message for one recipient, as a rule would.
fn hold(store: &MemStore, subject: &str, to: &str) {
    store.add("spam@evil.test", &[to], "spam", &held_message(subject, to));
}

async fn login_alice(c: async_imap::Client<TlsStream>) -> async_imap::Session<TlsStream> {
    c.login("alice@example.test", PASSWORD)
        .await
        .map_err(|(e, _)| e)
        .expect("login")
}
