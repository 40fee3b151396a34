//! The quarantine's acting IMAP folders in the real binary: a release asked
//! for by many sessions at once delivers once, `Release and allow sender`
//! and `Block sender` change what happens to the sender's next message
//! (with the shipped rules), and the CLI on an already released id.

use std::time::Duration;

use crate::common::*;

const HOLD_RULE: &str = r#"
// Hold anything whose subject says so.
fn data(m) {
    if m.subject.contains("[hold]") {
        return quarantine("subject asked for it");
    }
}
"#;

fn alice() -> (String, String, Vec<String>, String) {
    (
        "alice".into(),
        "alice-pw".into(),
        vec!["alice@local.test".into()],
        "user".into(),
    )
}

/// One message from `from` (empty: a bounce) to alice; answered 250.
async fn send(gw: &Gateway, from: &str, subject: &str) {
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let author = if from.is_empty() {
        "mailer-daemon@far.test"
    } else {
        from
    };
    let body = format!(
        "From: <{author}>\r\nTo: alice@local.test\r\nSubject: {subject}\r\nMessage-ID: <{}@far.test>\r\n\r\nhello\r\n",
        subject.replace(' ', "-").replace(['[', ']'], "")
    );
    let r = c.mail(from, &["alice@local.test"], body.as_bytes()).await;
    assert!(r.starts_with("250"), "{subject}: {r}");
    c.cmd("QUIT").await;
}

fn subject_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        .unwrap_or_default()
}

/// N sessions of one user, each logged in with INBOX selected; per round
/// they all send `UID MOVE uid Release` for the same uid past one barrier.
const RACE: &str = r#"
import imaplib, ssl, sys, threading
port, user, pw, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
def session():
    m = imaplib.IMAP4('127.0.0.1', port, timeout=30)
    m.starttls(ctx)
    m.login(user, pw)
    m.select('INBOX')
    return m
ms = [session() for _ in range(n)]
typ, data = ms[0].uid('SEARCH', None, 'ALL')
uids = data[0].split()
print('uids', len(uids))
for uid in uids:
    barrier = threading.Barrier(n)
    res = [None] * n
    def go(i):
        barrier.wait()
        try:
            res[i] = ms[i].uid('MOVE', uid, 'Release')[0]
        except Exception as e:
            res[i] = 'error %r' % e
    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in ts: t.start()
    for t in ts: t.join()
    print('round', uid.decode(), ' '.join(res))
for m in ms:
    m.logout()
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_release_asked_by_many_imap_sessions_at_once_delivers_once() {
    const ROUNDS: usize = 20;
    const SESSIONS: usize = 6;
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts {
        rules: vec![("50-hold.rhai".into(), HOLD_RULE.into())],
        users: vec![alice()],
        ..Opts::sink(sink.port)
    })
    .await;
    for i in 0..ROUNDS {
        send(&gw, "mallory@far.test", &format!("[hold] race {i:02}")).await;
    }
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(list.contains(&format!("{ROUNDS} message(s)")), "{list}");
    let first_id = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();

    let args = [
        gw.imap.to_string(),
        "alice".to_string(),
        "alice-pw".to_string(),
        SESSIONS.to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        python(RACE, &args)
    })
    .await
    .unwrap();
    assert!(out.contains(&format!("uids {ROUNDS}")), "{out}");
    let rounds: Vec<&str> = out.lines().filter(|l| l.starts_with("round")).collect();
    assert_eq!(rounds.len(), ROUNDS, "{out}");
    assert!(
        rounds
            .iter()
            .all(|l| l.split_whitespace().skip(2).all(|r| r == "OK")),
        "every session's MOVE answers OK (the losers found it gone): {out}"
    );

    assert!(
        eventually(Duration::from_secs(20), || sink.count() >= ROUNDS).await,
        "{} of {ROUNDS} released messages delivered; log:\n{}",
        sink.count(),
        gw.log_text()
    );
    // A second copy would be queued by now, and due at once: give it time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = sink.messages();
    let mut subjects: Vec<String> = got.iter().map(|m| subject_of(&m.body)).collect();
    subjects.sort();
    let want: Vec<String> = (0..ROUNDS).map(|i| format!("[hold] race {i:02}")).collect();
    assert_eq!(subjects, want, "each released message exactly once");
    for m in &got {
        let text = String::from_utf8_lossy(&m.body);
        assert!(
            text.starts_with("X-Postern-Released: by alice via imap; "),
            "{text}"
        );
    }
    let metrics = gw.metrics_text().await;
    assert_eq!(
        metric(&metrics, "postern_releases_total{via=\"imap\"}"),
        ROUNDS as f64,
        "{metrics}"
    );

    // The CLI on an id the IMAP sessions released: refused, nothing sent, not counted.
    let (ok, _, err) = gw.admin(&["quarantine", "release", &first_id]);
    assert!(!ok && err.contains("already released"), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), ROUNDS);
    let metrics = gw.metrics_text().await;
    assert_eq!(
        metric(&metrics, "postern_releases_total{via=\"cli\"}"),
        0.0,
        "{metrics}"
    );
}

/// Moves the message whose subject contains argv[4] into folder argv[5].
const MOVE_TO: &str = r#"
import imaplib, ssl, sys
port, user, pw, subject, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4('127.0.0.1', port, timeout=10)
m.starttls(ctx)
m.login(user, pw)
typ, data = m.list()
print('list', ' | '.join(d.decode() for d in data))
typ, data = m.select('"%s"' % folder, readonly=True)
print('drop box exists', data[0].decode())
m.select('INBOX')
typ, data = m.uid('SEARCH', None, 'SUBJECT', '"%s"' % subject)
uids = data[0].split()
print('found', len(uids))
typ, data = m.uid('MOVE', uids[0], '"%s"' % folder)
print('move', typ)
m.logout()
"#;

#[tokio::test(flavor = "multi_thread")]
async fn release_and_allow_delivers_and_block_holds_the_next_one() {
    let sink = Sink::start(false).await;
    let mut rules = shipped_rules();
    rules.push(("50-hold.rhai".into(), HOLD_RULE.into()));
    let gw = Gateway::start(Opts {
        rules,
        users: vec![alice()],
        ..Opts::sink(sink.port)
    })
    .await;
    send(&gw, "pal@far.test", "[hold] from pal").await;
    send(&gw, "pest@far.test", "[hold] from pest").await;
    send(&gw, "", "[hold] a bounce").await;
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(list.contains("3 message(s)"), "{list}");

    let port = gw.imap.to_string();
    let move_to = |subject: &str, folder: &str| {
        let args = [
            port.clone(),
            "alice".to_string(),
            "alice-pw".to_string(),
            subject.to_string(),
            folder.to_string(),
        ];
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            python(MOVE_TO, &args)
        })
    };
    let out = move_to("from pal", "Release and allow sender")
        .await
        .unwrap();
    assert!(
        out.contains("\"/\" \"Release and allow sender\"")
            && out.contains("\"/\" \"Block sender\""),
        "{out}"
    );
    assert!(out.contains("drop box exists 0"), "{out}");
    assert!(out.contains("found 1") && out.contains("move OK"), "{out}");
    assert!(
        eventually(Duration::from_secs(15), || sink.count() == 1).await,
        "the released message was not delivered; log:\n{}",
        gw.log_text()
    );
    let first = &sink.messages()[0];
    assert_eq!(subject_of(&first.body), "[hold] from pal");
    assert!(
        String::from_utf8_lossy(&first.body).starts_with("X-Postern-Released: by alice via imap; "),
        "{}",
        String::from_utf8_lossy(&first.body)
    );

    let out = move_to("from pest", "Block sender").await.unwrap();
    assert!(out.contains("found 1") && out.contains("move OK"), "{out}");
    let out = move_to("a bounce", "Block sender").await.unwrap();
    assert!(out.contains("found 1") && out.contains("move OK"), "{out}");
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(
        list.contains("0 message(s)"),
        "blocked ones are deleted: {list}"
    );

    let (_, allowed, _) = gw.admin(&["lists", "allow", "show", "--user", "alice"]);
    assert!(allowed.contains("pal@far.test"), "{allowed}");
    let (_, blocked, _) = gw.admin(&["lists", "block", "show", "--user", "alice"]);
    assert!(
        blocked.contains("pest@far.test")
            && !blocked.contains("mailer-daemon")
            && !blocked.contains("pal@"),
        "a bounce is never listed: {blocked}"
    );

    // The allowed sender's next message passes 05-lists.rhai before the hold rule runs.
    send(&gw, "pal@far.test", "[hold] pal again").await;
    assert!(
        eventually(Duration::from_secs(15), || sink.count() == 2).await,
        "the allowed sender's next message was not delivered; log:\n{}",
        gw.log_text()
    );
    assert_eq!(subject_of(&sink.messages()[1].body), "[hold] pal again");
    // The blocked sender's next message is held by 05-lists.rhai, whatever its subject.
    send(&gw, "pest@far.test", "pest again").await;
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(
        list.contains("1 message(s)")
            && list.contains("pest@far.test")
            && list.contains("sender on a block list"),
        "{list}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 2, "nothing else was delivered");
}
