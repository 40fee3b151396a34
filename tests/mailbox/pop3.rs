//! POP3 against Python's poplib over real sockets.

use std::sync::Arc;

use crate::common::*;
use postern::mailbox::store::{MemStore, QuarantineStore};

const SCRIPT: &str = r#"
import poplib, socket, ssl, sys, json
port, port_s, pw, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl._create_unverified_context()
out = {}
if mode == "refuse":
    p = poplib.POP3("127.0.0.1", port)
    out["capa_before"] = sorted(p.capa().keys())
    try:
        p.user("alice@example.test"); out["user_before_tls"] = "accepted"
    except poplib.error_proto as e:
        out["user_before_tls"] = str(e)
    p.stls(context=ctx)
    out["capa_after"] = sorted(p.capa().keys())
    try:
        p.user("alice@example.test"); p.pass_("wrong"); out["wrong"] = "accepted"
    except poplib.error_proto as e:
        out["wrong"] = str(e)
    import base64
    out["auth_plain"] = p._shortcmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0" + pw.encode()).decode()).decode()
    out["stat_after_auth"] = list(p.stat())
    p.quit()
elif mode == "read_drop":
    p = poplib.POP3("127.0.0.1", port)
    p.stls(context=ctx)
    p.user("alice@example.test"); p.pass_(pw)
    out["stat"] = list(p.stat())
    out["uidl"] = [x.decode() for x in p.uidl()[1]]
    resp, lines, octets = p.retr(1)
    out["retr"] = [l.decode() for l in lines]
    out["top"] = [l.decode() for l in p.top(1, 0)[1]]
    p.dele(1)
    try:
        q = poplib.POP3_SSL("127.0.0.1", port_s, context=ctx)
        q.user("alice@example.test"); q.pass_(pw); out["second"] = "accepted"
    except poplib.error_proto as e:
        out["second"] = str(e)
    p.sock.close()  # dropped: no QUIT
elif mode == "dele_quit":
    p = poplib.POP3_SSL("127.0.0.1", port_s, context=ctx)
    p.user("alice@example.test"); p.pass_(pw)
    out["stat"] = list(p.stat())
    p.dele(1)
    out["quit"] = p.quit().decode()
print(json.dumps(out))
"#;

async fn run(s: &Servers, mode: &str) -> serde_json::Value {
    let out = python(
        SCRIPT,
        vec![
            s.pop3.port().to_string(),
            s.pop3s.port().to_string(),
            PASSWORD.to_string(),
            mode.to_string(),
        ],
    )
    .await;
    serde_json::from_str(out.trim()).expect("json from python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_tls_required_then_dele_quit_deletes_and_drop_does_not() {
    let store = Arc::new(MemStore::new());
    store.add(
        "spam@evil.test",
        &["alice@example.test", "bob@example.test"],
        "spam",
        &held_message("one", "alice@example.test"),
    );
    store.add(
        "spam@evil.test",
        &["SALES@example.test"],
        "spam",
        &held_message("two", "sales@example.test"),
    );
    let s = start(store.clone()).await;

    let v = run(&s, "refuse").await;
    let before: Vec<String> = serde_json::from_value(v["capa_before"].clone()).unwrap();
    assert!(
        before.contains(&"STLS".to_string())
            && !before.contains(&"USER".to_string())
            && !before.contains(&"SASL".to_string()),
        "{v}"
    );
    assert!(
        v["user_before_tls"].as_str().unwrap().starts_with("b'-ERR"),
        "{v}"
    );
    let after: Vec<String> = serde_json::from_value(v["capa_after"].clone()).unwrap();
    assert!(
        after.contains(&"USER".to_string())
            && after.contains(&"SASL".to_string())
            && !after.contains(&"STLS".to_string()),
        "{v}"
    );
    assert!(v["wrong"].as_str().unwrap().contains("-ERR [AUTH]"), "{v}");
    assert!(v["auth_plain"].as_str().unwrap().starts_with("+OK"), "{v}");
    assert_eq!(v["stat_after_auth"][0], 2, "{v}");

    let v = run(&s, "read_drop").await;
    assert_eq!(v["stat"][0], 2, "{v}");
    assert_eq!(v["uidl"], serde_json::json!(["1 q1", "2 q3"]));
    let retr: Vec<String> = serde_json::from_value(v["retr"].clone()).unwrap();
    assert!(
        retr.contains(&"Subject: one".to_string())
            && retr.contains(&".leading dot line".to_string()),
        "{retr:?}"
    );
    let top: Vec<String> = serde_json::from_value(v["top"].clone()).unwrap();
    assert_eq!(top.last().map(String::as_str), Some(""), "{top:?}");
    assert!(!top.iter().any(|l| l.contains("Buy now")));
    assert!(v["second"].as_str().unwrap().contains("[IN-USE]"), "{v}");
    // The dropped session deleted nothing.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(store.deleted().is_empty());

    let v = run(&s, "dele_quit").await;
    assert_eq!(v["stat"][0], 2, "{v}");
    assert!(v["quit"].as_str().unwrap().starts_with("+OK"), "{v}");
    assert_eq!(store.deleted(), vec![1]);
    // bob's copy (id 2) is untouched
    assert_eq!(
        store
            .list()
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        vec![2, 3]
    );

    let logins = &s.ctx.logins;
    assert!(logins.with_label_values(&["pop3", "fail"]).get() >= 1);
    assert!(logins.with_label_values(&["pop3", "ok"]).get() >= 2);
    s.stop().await;
}
