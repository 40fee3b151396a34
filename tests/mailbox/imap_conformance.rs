//! IMAP conformance items an independent compliance tester found (issue 10, item 4), each
//! checked with Python's imaplib or a raw TLS socket against the real servers.

use std::sync::Arc;

use crate::common::*;
use postern::mailbox::store::MemStore;

/// Helpers shared by every mode; `mode` picks the scenario. Prints one JSON object.
const SCRIPT: &str = r#"
import imaplib, socket, ssl, sys, json, re
port_s, pw, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl._create_unverified_context()
imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))
out = {}
def dec(x):
    if isinstance(x, (tuple, list)):
        return [dec(y) for y in x]
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    return x
def login(user="alice@example.test"):
    M = imaplib.IMAP4_SSL("127.0.0.1", port_s, ssl_context=ctx)
    M.login(user, pw)
    return M
def untagged(M, name):
    return dec(M.untagged_responses.pop(name, []))
def attempt(f):
    try:
        return dec(f())
    except imaplib.IMAP4.error as e:
        return "error: " + str(e)
class Raw:
    def __init__(self):
        self.s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port_s)), server_hostname="localhost")
        self.f = self.s.makefile("rb")
        self.greeting = self.f.readline().decode()
    def send(self, data):
        self.s.sendall(data)
    def until(self, tag):
        """Lines up to the one tagged `tag` (or EOF), literals inlined."""
        lines = []
        while True:
            l = self.f.readline()
            if not l:
                lines.append("<EOF>")
                return lines
            lines.append(l.decode("utf-8", "replace"))
            m = re.search(rb"\{(\d+)\}\r\n$", l)
            if m:
                lines.append(self.f.read(int(m.group(1))).decode("utf-8", "replace"))
                continue
            if l.startswith(tag.encode() + b" "):
                return lines
    def cmd(self, tag, rest):
        self.send(tag.encode() + b" " + rest + b"\r\n")
        return self.until(tag)

if mode == "keywords":
    A, B = login(), login()
    out["select_a"] = [dec(A.select("INBOX"))]
    out["flags_a"] = untagged(A, "FLAGS")
    B.select("INBOX")
    untagged(B, "FLAGS")
    A.store("1", "+FLAGS", "($Phishing)")
    out["flags_after_store"] = untagged(A, "FLAGS")
    out["perm_after_store"] = untagged(A, "OK")
    B.noop()
    out["flags_b_noop"] = untagged(B, "FLAGS")
    out["fetch_b_noop"] = untagged(B, "FETCH")
    C = login()
    C.select("INBOX")
    out["flags_c"] = untagged(C, "FLAGS")
    out["perm_c"] = untagged(C, "OK")
    for M in (A, B, C):
        M.logout()
elif mode == "toolong":
    r = Raw()
    out["line"] = r.cmd("x1", b"NOOP " + b"A" * 20000)
    out["after_line"] = r.cmd("x2", b"NOOP")
    out["sync_literal"] = r.cmd("x3", b"LOGIN {200000}")
    out["after_literal"] = r.cmd("x4", b"CAPABILITY")
    r.send(b"x5 LOGIN {18+}\r\nalice@example.test {13+}\r\ncorrect horse\r\n")
    out["literal_plus"] = r.until("x5")
    r.send(b"x6 NOOP " + b"B" * 9000 + b" {3}\r\n")
    out["long_sync_literal_line"] = r.until("x6")
    out["after_long_sync"] = r.cmd("x7", b"NOOP")
    r.send(b"x8 ID {300000+}\r\n")
    out["non_sync_literal"] = r.until("x8")
    out["then"] = dec(r.f.readline())
elif mode == "recent":
    M = login()
    out["status"] = dec(M.status("INBOX", "(MESSAGES RECENT)")[1])
    out["select"] = [dec(M.select("INBOX"))]
    out["recent"] = untagged(M, "RECENT")
    out["search_recent"] = dec(M.search(None, "RECENT")[1])
    out["search_new"] = dec(M.search(None, "NEW")[1])
    out["search_old"] = dec(M.search(None, "OLD")[1])
    out["fetch_flags"] = dec(M.fetch("1:*", "(FLAGS)")[1])
    M.fetch("1", "(BODY[])")
    out["search_new_after_read"] = dec(M.search(None, "NEW")[1])
    # A second session at the same time: nothing is recent for it.
    N = login()
    N.select("INBOX")
    out["recent_second"] = untagged(N, "RECENT")
    out["search_recent_second"] = dec(N.search(None, "RECENT")[1])
    out["search_old_second"] = dec(N.search(None, "OLD")[1])
    N.logout()
    M.logout()
elif mode == "recent_again":
    E = login()
    E.select("INBOX", readonly=True)
    out["recent_examine"] = untagged(E, "RECENT")
    E.logout()
    M = login()
    M.select("INBOX")
    out["recent"] = untagged(M, "RECENT")
    out["search_recent"] = dec(M.uid("SEARCH", None, "RECENT")[1])
    M.logout()
elif mode == "ghost":
    A, B = login(), login()
    A.select("INBOX")
    B.select("INBOX")
    A.store("1", "+FLAGS", "(\\Deleted)")
    out["expunge_a"] = dec(A.expunge())
    A.uid("MOVE", "2", "Release")
    out["fetch_b"] = dec(B.fetch("1:2", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    out["expunge_before_told"] = untagged(B, "EXPUNGE")
    out["search_b"] = dec(B.search(None, "SUBJECT", "gone"))
    out["search_b_moved"] = dec(B.search(None, "SUBJECT", "moved"))
    B.noop()
    out["expunge_at_noop"] = untagged(B, "EXPUNGE")
    out["exists_after"] = dec(B.search(None, "ALL")[1])
    A.logout()
    B.logout()
elif mode == "search_sent":
    M = login()
    M.select("INBOX")
    for k in ["SENTON 27-Nov-2026", "SENTBEFORE 27-Nov-2026", "SENTSINCE 27-Nov-2026", "SENTON 26-Nov-2026"]:
        out[k] = dec(M.search(None, k)[1])
    M.logout()
elif mode == "mime":
    M = login()
    M.select("INBOX")
    out["envelope"] = dec(M.fetch("1", "(ENVELOPE)")[1])
    out["text"] = dec(M.fetch("1", "(BODY.PEEK[1.TEXT])")[1])
    M.logout()
elif mode == "subscribe":
    M = login()
    out["lsub0"] = dec(M.lsub()[1])
    out["unsub"] = dec(M.unsubscribe("Release"))
    out["lsub1"] = dec(M.lsub()[1])
    out["sub_nowhere"] = attempt(lambda: M.subscribe("Nowhere"))
    out["list"] = dec(M.list()[1])
    M.logout()
    M = login("bob@example.test")
    out["lsub_bob"] = dec(M.lsub()[1])
    M.logout()
elif mode == "subscribe_after_restart":
    M = login()
    out["lsub"] = dec(M.lsub()[1])
    out["sub"] = dec(M.subscribe("Release"))
    out["lsub_after"] = dec(M.lsub()[1])
    M.logout()
elif mode == "seqnums":
    M = login()
    M.select("INBOX")
    out["fetch_beyond"] = attempt(lambda: M.fetch("3", "(FLAGS)"))
    out["fetch_range_beyond"] = attempt(lambda: M.fetch("1:5", "(FLAGS)"))
    out["store_beyond"] = attempt(lambda: M.store("7", "+FLAGS", "(\\Seen)"))
    out["copy_beyond"] = attempt(lambda: M.copy("4", "Release"))
    out["fetch_ok"] = attempt(lambda: M.fetch("1:*", "(UID)"))
    out["uid_fetch_beyond"] = attempt(lambda: M.uid("FETCH", "1:99", "(UID)"))
    M.logout()
    M = login("bob@example.test")
    M.select("INBOX")
    out["empty_fetch_star"] = attempt(lambda: M.fetch("1:*", "(FLAGS)"))
    out["empty_uid_fetch_star"] = attempt(lambda: M.uid("FETCH", "1:*", "(FLAGS)"))
    out["empty_search"] = attempt(lambda: M.search(None, "ALL"))
    M.logout()
elif mode == "caps":
    M = login()
    out["caps"] = dec(M.capability())
    out["id"] = dec(M._simple_command("ID", '("name" "imaplib")'))
    out["id_data"] = untagged(M, "ID")
    out["namespace"] = dec(M.namespace())
    M.select("INBOX")
    out["unselect"] = dec(M._simple_command("UNSELECT"))
    out["fetch_unselected"] = attempt(lambda: M.fetch("1", "(UID)"))
    out["create"] = attempt(lambda: M.create("New"))
    out["append"] = attempt(lambda: M.append("INBOX", None, None, b"Subject: x\r\n\r\nx\r\n"))
    out["rename"] = attempt(lambda: M.rename("INBOX", "Other"))
    out["delete"] = attempt(lambda: M.delete("Release"))
    M.logout()
print(json.dumps(out))
"#;

async fn run(s: &Servers, mode: &str) -> serde_json::Value {
    let args = vec![
        s.imaps.port().to_string(),
        PASSWORD.to_string(),
        mode.to_string(),
    ];
    let out = python(SCRIPT, args).await;
    serde_json::from_str(out.trim()).expect("json from python")
}

fn hold(store: &MemStore, subject: &str) {
    let to = "alice@example.test";
    store.add("spam@evil.test", &[to], "spam", &held_message(subject, to));
}

fn hold_raw(store: &MemStore, raw: &str) {
    store.add(
        "spam@evil.test",
        &["alice@example.test"],
        "spam",
        raw.as_bytes(),
    );
}

/// Keywords set with STORE are in FLAGS and PERMANENTFLAGS: as an untagged FLAGS when
/// first used (to the storing session and, at its next command, to another), and at SELECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_keywords_appear_in_flags() {
    let store = Arc::new(MemStore::new());
    hold(&store, "one");
    let s = start(store.clone()).await;
    let v = run(&s, "keywords").await;
    let vs = v.to_string();
    let sys = r"\\Answered \\Flagged \\Deleted \\Seen \\Draft";
    assert_eq!(
        v["flags_a"],
        serde_json::json!([format!("({sys})").replace(r"\\", r"\")]),
        "{vs}"
    );
    let with_kw = format!("({sys} $Phishing)").replace(r"\\", r"\");
    assert_eq!(v["flags_after_store"], serde_json::json!([with_kw]), "{vs}");
    assert!(
        v["perm_after_store"].to_string().contains(
            r"[PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Phishing \\*)]"
        ),
        "{vs}"
    );
    assert_eq!(v["flags_b_noop"], serde_json::json!([with_kw]), "{vs}");
    assert!(v["fetch_b_noop"].to_string().contains("$Phishing"), "{vs}");
    assert_eq!(v["flags_c"], serde_json::json!([with_kw]), "{vs}");
    assert!(v["perm_c"].to_string().contains("$Phishing"), "{vs}");
    s.stop().await;
}

/// An over-long line or literal gets an answer with the command's tag, and the session
/// goes on; a non-synchronising literal over the limit gets BYE, the tagged BAD, and close.
/// Non-synchronising literals within the limit work (LITERAL+).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_commands_get_a_tagged_answer() {
    let store = Arc::new(MemStore::new());
    let s = start(store.clone()).await;
    let v = run(&s, "toolong").await;
    let vs = v.to_string();
    let last = |k: &str| {
        v[k].as_array()
            .and_then(|a| a.last())
            .and_then(|l| l.as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(last("line").starts_with("x1 BAD "), "{vs}");
    assert_eq!(v["line"].as_array().map(Vec::len), Some(1), "{vs}");
    assert!(last("after_line").starts_with("x2 OK"), "{vs}");
    assert!(last("sync_literal").starts_with("x3 BAD "), "{vs}");
    assert!(last("after_literal").starts_with("x4 OK"), "{vs}");
    assert!(last("literal_plus").starts_with("x5 OK"), "{vs}");
    assert!(
        last("long_sync_literal_line").starts_with("x6 BAD "),
        "{vs}"
    );
    assert!(last("after_long_sync").starts_with("x7 OK"), "{vs}");
    let nsl = v["non_sync_literal"].to_string();
    assert!(
        nsl.contains("* BYE") && nsl.contains("x8 BAD [TOOBIG]"),
        "{vs}"
    );
    assert_eq!(v["then"], "", "the connection is closed: {vs}");
    s.stop().await;
}

/// Mail held since the user's last session is \Recent for the first SELECT session only;
/// RECENT, NEW and OLD follow; it persists across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_goes_to_the_first_session() {
    let store = Arc::new(MemStore::new());
    hold(&store, "one");
    hold(&store, "two");
    let s = start(store.clone()).await;
    let v = run(&s, "recent").await;
    let vs = v.to_string();
    assert_eq!(
        v["status"],
        serde_json::json!(["INBOX (MESSAGES 2 RECENT 2)"]),
        "{vs}"
    );
    assert_eq!(v["recent"], serde_json::json!(["2"]), "{vs}");
    assert_eq!(v["search_recent"], serde_json::json!(["1 2"]), "{vs}");
    assert_eq!(v["search_new"], serde_json::json!(["1 2"]), "{vs}");
    assert_eq!(v["search_old"], serde_json::json!([""]), "{vs}");
    assert!(
        v["fetch_flags"]
            .to_string()
            .contains(r"1 (FLAGS (\\Recent))"),
        "{vs}"
    );
    assert_eq!(v["search_new_after_read"], serde_json::json!(["2"]), "{vs}");
    assert_eq!(v["recent_second"], serde_json::json!(["0"]), "{vs}");
    assert_eq!(v["search_recent_second"], serde_json::json!([""]), "{vs}");
    assert_eq!(v["search_old_second"], serde_json::json!(["1 2"]), "{vs}");
    s.stop().await;

    // After a restart, only what arrived since is recent; EXAMINE shows it and
    // leaves it to the SELECT that follows.
    hold(&store, "three");
    let s = start(store.clone()).await;
    let v = run(&s, "recent_again").await;
    let vs = v.to_string();
    assert_eq!(v["recent_examine"], serde_json::json!(["1"]), "{vs}");
    assert_eq!(v["recent"], serde_json::json!(["1"]), "{vs}");
    assert_eq!(v["search_recent"], serde_json::json!(["3"]), "{vs}");
    s.stop().await;
}

/// A message another session expunged (or released) stays readable and searchable in
/// this session until it is told of the EXPUNGE (RFC 2180 4.1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expunged_elsewhere_stays_readable_until_told() {
    let store = Arc::new(MemStore::new());
    hold(&store, "gone");
    hold(&store, "moved");
    hold(&store, "stays");
    let s = start(store.clone()).await;
    let v = run(&s, "ghost").await;
    let vs = v.to_string();
    assert_eq!(v["expunge_a"][0], "OK", "{vs}");
    let fetch = v["fetch_b"].to_string();
    assert_eq!(v["fetch_b"][0], "OK", "{vs}");
    assert!(
        fetch.contains("Subject: gone") && fetch.contains("Subject: moved"),
        "{vs}"
    );
    assert_eq!(v["expunge_before_told"], serde_json::json!([]), "{vs}");
    assert_eq!(v["search_b"], serde_json::json!(["OK", ["1"]]), "{vs}");
    assert_eq!(
        v["search_b_moved"],
        serde_json::json!(["OK", ["2"]]),
        "{vs}"
    );
    assert_eq!(v["expunge_at_noop"], serde_json::json!(["2", "1"]), "{vs}");
    assert_eq!(v["exists_after"], serde_json::json!(["1"]), "{vs}");
    assert_eq!(store.released().len(), 1);
    s.stop().await;
}

/// SENTON and friends use the day the Date header names, not that day in UTC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_dates_are_the_header_own() {
    let store = Arc::new(MemStore::new());
    // 27 Nov in +0200, which is still 26 Nov in UTC.
    hold_raw(
        &store,
        "From: a@evil.test\r\nSubject: late\r\nDate: Fri, 27 Nov 2026 00:30:00 +0200\r\n\r\nx\r\n",
    );
    let s = start(store.clone()).await;
    let v = run(&s, "search_sent").await;
    let vs = v.to_string();
    assert_eq!(v["SENTON 27-Nov-2026"], serde_json::json!(["1"]), "{vs}");
    assert_eq!(v["SENTSINCE 27-Nov-2026"], serde_json::json!(["1"]), "{vs}");
    assert_eq!(v["SENTBEFORE 27-Nov-2026"], serde_json::json!([""]), "{vs}");
    assert_eq!(v["SENTON 26-Nov-2026"], serde_json::json!([""]), "{vs}");
    s.stop().await;
}

/// ENVELOPE: no phantom member in a group holding only a comment, no source route in
/// the mailbox name; BODY[1.TEXT] of an attached multipart keeps its epilogue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_addresses_and_encapsulated_text() {
    let store = Arc::new(MemStore::new());
    hold_raw(
        &store,
        "From: <@relay.test:eve@evil.test>\r\nTo: undisclosed-recipients: (none) ;\r\nSubject: outer\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\nplain\r\n--i--\r\ninner epilogue\r\n--o--\r\n",
    );
    let s = start(store.clone()).await;
    let v = run(&s, "mime").await;
    let env = v["envelope"].to_string();
    assert!(
        env.contains(r#"((NIL \"@relay.test\" \"eve\" \"evil.test\"))"#),
        "{env}"
    );
    assert!(
        env.contains(r#"((NIL NIL \"undisclosed-recipients\" NIL)(NIL NIL NIL NIL))"#),
        "{env}"
    );
    let text = v["text"].to_string();
    assert!(text.contains(r"plain\r\n--i--\r\ninner epilogue"), "{text}");
    s.stop().await;
}

/// Whether a LIST/LSUB answer names the folder `Release` itself (not
/// `Release and allow sender`).
fn has_release(lines: &serde_json::Value) -> bool {
    lines.as_array().is_some_and(|a| {
        a.iter()
            .any(|l| l.as_str().is_some_and(|l| l.ends_with(" Release")))
    })
}

/// UNSUBSCRIBE and SUBSCRIBE change what LSUB shows, per user, across a restart; only
/// existing folders can be subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_change_lsub() {
    let store = Arc::new(MemStore::new());
    let s = start(store.clone()).await;
    let v = run(&s, "subscribe").await;
    let vs = v.to_string();
    let lsub0 = v["lsub0"].to_string();
    assert!(lsub0.contains("INBOX") && has_release(&v["lsub0"]), "{vs}");
    assert_eq!(v["unsub"][0], "OK", "{vs}");
    let lsub1 = v["lsub1"].to_string();
    assert!(lsub1.contains("INBOX") && !has_release(&v["lsub1"]), "{vs}");
    assert_eq!(v["sub_nowhere"][0], "NO", "{vs}");
    assert!(
        v["sub_nowhere"].to_string().contains("[NONEXISTENT]"),
        "{vs}"
    );
    assert!(has_release(&v["list"]), "LIST keeps it: {vs}");
    assert!(has_release(&v["lsub_bob"]), "bob's own: {vs}");
    s.stop().await;

    let s = start(store.clone()).await;
    let v = run(&s, "subscribe_after_restart").await;
    let vs = v.to_string();
    assert!(!has_release(&v["lsub"]), "{vs}");
    assert_eq!(v["sub"][0], "OK", "{vs}");
    assert!(has_release(&v["lsub_after"]), "{vs}");
    s.stop().await;
}

/// Sequence numbers beyond EXISTS, and `*` in an empty folder, are BAD; UID sets are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_beyond_exists_are_bad() {
    let store = Arc::new(MemStore::new());
    hold(&store, "one");
    hold(&store, "two");
    let s = start(store.clone()).await;
    let v = run(&s, "seqnums").await;
    let vs = v.to_string();
    for k in [
        "fetch_beyond",
        "fetch_range_beyond",
        "store_beyond",
        "copy_beyond",
        "empty_fetch_star",
    ] {
        let r = v[k].as_str().unwrap_or_default();
        assert!(r.starts_with("error: ") && r.contains("BAD"), "{k}: {vs}");
    }
    assert_eq!(v["fetch_ok"][0], "OK", "{vs}");
    assert_eq!(v["uid_fetch_beyond"][0], "OK", "{vs}");
    assert_eq!(v["empty_uid_fetch_star"][0], "OK", "{vs}");
    assert_eq!(v["empty_search"], serde_json::json!(["OK", [""]]), "{vs}");
    assert!(store.released().is_empty(), "{vs}");
    s.stop().await;
}

/// LITERAL+ (above), ID, NAMESPACE and UNSELECT are advertised and work; the fixed
/// folders refuse APPEND, CREATE, DELETE and RENAME with NO [CANNOT].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_clients_look_for() {
    let store = Arc::new(MemStore::new());
    hold(&store, "one");
    let s = start(store.clone()).await;
    let v = run(&s, "caps").await;
    let vs = v.to_string();
    let caps = v["caps"][1][0].as_str().unwrap_or_default().to_string();
    let words: Vec<&str> = caps.split(' ').collect();
    for c in [
        "LITERAL+",
        "ID",
        "NAMESPACE",
        "UNSELECT",
        "IDLE",
        "MOVE",
        "UIDPLUS",
    ] {
        assert!(words.contains(&c), "{c}: {vs}");
    }
    assert_eq!(v["id"][0], "OK", "{vs}");
    assert!(v["id_data"].to_string().contains("Postern"), "{vs}");
    assert_eq!(
        v["namespace"],
        serde_json::json!(["OK", [r#"(("" "/")) NIL NIL"#]]),
        "{vs}"
    );
    assert_eq!(v["unselect"][0], "OK", "{vs}");
    assert_eq!(v["fetch_unselected"][0], "NO", "{vs}");
    for k in ["create", "append", "rename", "delete"] {
        assert_eq!(v[k][0], "NO", "{k}: {vs}");
        assert!(v[k].to_string().contains("[CANNOT]"), "{k}: {vs}");
    }
    s.stop().await;
}
