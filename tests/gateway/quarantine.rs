//! The quarantine inside the real binary: a rule holds mail, recipients and
//! admins read, release and delete it over POP3 and IMAP (Python's poplib
//! and imaplib), and with `postern quarantine`.

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

fn opts(sink: u16) -> Opts {
    Opts {
        rules: vec![("50-hold.rhai".into(), HOLD_RULE.into())],
        users: vec![
            (
                "alice".into(),
                "alice-pw".into(),
                vec!["alice@local.test".into()],
                "user".into(),
            ),
            (
                "bob".into(),
                "bob-pw".into(),
                vec!["bob@local.test".into()],
                "user".into(),
            ),
            ("root".into(), "root-pw".into(), vec![], "admin".into()),
        ],
        ..Opts::sink(sink)
    }
}

async fn hold(gw: &Gateway, to: &[&str], subject: &str) {
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let body = format!(
        "From: Mallory <mallory@far.test>\r\nTo: {}\r\nSubject: {subject}\r\nMessage-ID: <{}@far.test>\r\n\r\nDear user,\r\n..please open the attachment (stuffed for SMTP)\r\n",
        to.join(", "),
        subject.replace(' ', "-")
    );
    let r = c.mail("mallory@far.test", to, body.as_bytes()).await;
    assert!(r.starts_with("250"), "a held message is answered 250: {r}");
    c.cmd("QUIT").await;
}

fn py(script: &str, args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    python(script, &args)
}

const POP3: &str = r#"
import poplib, ssl, sys
port, user, pw, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
p = poplib.POP3('127.0.0.1', port, timeout=10)
try:
    p.user(user)
    print('USER before STLS accepted')
except poplib.error_proto as e:
    print('refused before TLS:', e)
p.stls(ctx)
p.user(user); p.pass_(pw)
count, size = p.stat()
print('stat', count)
for line in p.uidl()[1]:
    print('uidl', line.decode())
if count:
    lines = p.retr(1)[1]
    print('subject', [l.decode() for l in lines if l.startswith(b'Subject:')][0])
    print('dotline', any(l.startswith(b'.please open') for l in lines))
if mode == 'dele':
    p.dele(1)
    p.quit()
elif mode == 'drop':
    p.dele(1)
    p.sock.close()   # no QUIT: nothing may be deleted
else:
    p.quit()
"#;

#[tokio::test(flavor = "multi_thread")]
async fn pop3_users_see_their_own_held_mail_and_dele_takes_effect_at_quit() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(opts(sink.port)).await;
    hold(&gw, &["alice@local.test"], "[hold] invoice").await;
    hold(&gw, &["bob@local.test"], "[hold] for bob").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 0, "held mail must not be delivered");

    let port = gw.pop3.to_string();
    let run = move |user: &str, pw: &str, mode: &str| {
        py(POP3, &[port.clone(), user.into(), pw.into(), mode.into()])
    };
    let out = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run("alice", "alice-pw", "drop")
    })
    .await
    .unwrap();
    assert!(out.contains("refused before TLS"), "{out}");
    assert!(out.contains("stat 1"), "alice sees only her message: {out}");
    assert!(out.contains("subject Subject: [hold] invoice"), "{out}");
    assert!(
        out.contains("dotline True"),
        "dot-stuffing round trip: {out}"
    );

    // The dropped session deleted nothing; a proper QUIT does.
    let out = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run("alice", "alice-pw", "dele")
    })
    .await
    .unwrap();
    assert!(
        out.contains("stat 1"),
        "dropped session deleted mail: {out}"
    );
    let out = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run("alice", "alice-pw", "list")
    })
    .await
    .unwrap();
    assert!(out.contains("stat 0"), "DELE+QUIT did not delete: {out}");

    // Bob's message is untouched; the admin sees what is left.
    let out = tokio::task::spawn_blocking(move || run("root", "root-pw", "list"))
        .await
        .unwrap();
    assert!(out.contains("stat 1") && out.contains("for bob"), "{out}");
    let m = gw.metrics_text().await;
    assert!(
        m.contains("postern_mailbox_logins_total{protocol=\"pop3\",result=\"ok\"} 4"),
        "{m}"
    );
    assert!(m.contains("postern_quarantine_messages 1"), "{m}");
}

const IMAP: &str = r#"
import imaplib, ssl, sys, re
port, user, pw, step = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4('127.0.0.1', port, timeout=10)
print('caps', ' '.join(m.capabilities))
try:
    m.login(user, pw)
    print('login before TLS accepted')
except imaplib.IMAP4.error as e:
    print('refused before TLS')
m.starttls(ctx)
m.login(user, pw)
typ, data = m.select('INBOX')
print('exists', data[0].decode())
if step == 'read':
    typ, data = m.uid('SEARCH', None, 'ALL')
    uids = data[0].split()
    print('uids', b' '.join(uids).decode())
    # Headers first, as a mail client lists the folder.
    typ, data = m.fetch('1:*', '(UID FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])')
    print('list', b' '.join(x if isinstance(x, bytes) else b' '.join(x) for x in data).decode(errors='replace'))
    typ, data = m.fetch('1', '(FLAGS)')
    print('flags-after-peek', data[0].decode())
    typ, data = m.fetch('1', '(BODY[])')
    print('body-has-text', b'please open the attachment' in data[0][1])
    typ, data = m.fetch('1', '(FLAGS)')
    print('flags-after-body', data[0].decode())
    m.store('1', '+FLAGS', '(\\Flagged)')
elif step == 'flags':
    typ, data = m.uid('SEARCH', None, 'ALL')
    print('uids', b' '.join(data[0].split()).decode())
    typ, data = m.fetch('1:*', '(UID FLAGS)')
    print('flags', ' '.join(d.decode() for d in data))
    typ, data = m.status('INBOX', '(MESSAGES UIDVALIDITY)')
    print('status', data[0].decode())
elif step == 'release':
    typ, data = m.uid('SEARCH', None, 'ALL')
    uid = data[0].split()[0]
    typ, data = m.uid('MOVE', uid, 'Release')
    print('move', typ)
elif step == 'delete':
    m.store('1', '+FLAGS', '(\\Deleted)')
    typ, data = m.expunge()
    print('expunge', typ, data)
m.logout()
"#;

#[tokio::test(flavor = "multi_thread")]
async fn imap_headers_first_then_body_flags_persist_release_reaches_the_backend() {
    let sink = Sink::start(false).await;
    let mut gw = Gateway::start(opts(sink.port)).await;
    hold(
        &gw,
        &["alice@local.test", "bob@local.test"],
        "[hold] shared",
    )
    .await;
    hold(&gw, &["alice@local.test"], "[hold] second").await;

    let port = gw.imap.to_string();
    let run = move |user: &str, pw: &str, step: &str| {
        let args = [
            port.clone(),
            user.to_string(),
            pw.to_string(),
            step.to_string(),
        ];
        tokio::task::spawn_blocking(move || py(IMAP, &args))
    };
    let out = run("alice", "alice-pw", "read").await.unwrap();
    assert!(out.contains("LOGINDISABLED"), "{out}");
    assert!(out.contains("refused before TLS"), "{out}");
    assert!(out.contains("exists 2"), "{out}");
    assert!(
        out.contains("ENVELOPE") && out.contains("BODYSTRUCTURE"),
        "{out}"
    );
    assert!(
        out.contains("[hold] shared") && out.contains("[hold] second"),
        "{out}"
    );
    let peek = out
        .lines()
        .find(|l| l.starts_with("flags-after-peek"))
        .unwrap();
    assert!(!peek.contains("\\Seen"), "BODY.PEEK set \\Seen: {peek}");
    let body = out
        .lines()
        .find(|l| l.starts_with("flags-after-body"))
        .unwrap();
    assert!(body.contains("\\Seen"), "BODY[] did not set \\Seen: {body}");
    assert!(out.contains("body-has-text True"), "{out}");
    let uids_before = out
        .lines()
        .find(|l| l.starts_with("uids"))
        .unwrap()
        .to_string();

    // Bob sees his copy of the shared message only.
    let out = run("bob", "bob-pw", "flags").await.unwrap();
    assert!(out.contains("exists 1"), "{out}");

    // A restart keeps UIDs and flags.
    gw.kill9();
    gw.spawn().await;
    let out = run("alice", "alice-pw", "flags").await.unwrap();
    assert!(
        out.contains(&uids_before),
        "UIDs changed across restart: {out} vs {uids_before}"
    );
    let flags = out.lines().find(|l| l.starts_with("flags")).unwrap();
    assert!(
        flags.contains("\\Seen") && flags.contains("\\Flagged"),
        "flags lost: {flags}"
    );

    // MOVE into Release re-queues the message to its original recipient, once.
    let out = run("alice", "alice-pw", "release").await.unwrap();
    assert!(out.contains("move OK"), "{out}");
    assert!(
        eventually(Duration::from_secs(10), || sink.count() == 1).await,
        "released mail did not reach the backend; log:\n{}",
        gw.log_text()
    );
    let got = sink.messages();
    assert_eq!(got[0].rcpts, vec!["alice@local.test".to_string()]);
    assert_eq!(got[0].from, "mallory@far.test");
    assert!(String::from_utf8_lossy(&got[0].body).contains("[hold] shared"));

    // \Deleted + EXPUNGE deletes the other one.
    let out = run("alice", "alice-pw", "delete").await.unwrap();
    assert!(out.contains("expunge OK"), "{out}");
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(
        list.contains("1 message(s)") && list.contains("bob@local.test"),
        "{list}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.count(),
        1,
        "released twice or delivered the deleted one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn quarantine_commands_and_retention() {
    let sink = Sink::start(false).await;
    let mut o = opts(sink.port);
    o.retention = "3s".into();
    let gw = Gateway::start(o).await;
    hold(&gw, &["alice@local.test"], "[hold] one").await;
    hold(&gw, &["bob@local.test"], "[hold] two").await;
    let (ok, out, err) = gw.admin(&["quarantine", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("2 message(s)") && out.contains("subject asked for it"),
        "{out}"
    );
    let (_, out, _) = gw.admin(&["quarantine", "list", "--rcpt", "alice"]);
    assert!(out.contains("1 message(s)"), "{out}");
    let id = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (ok, show, _) = gw.admin(&["quarantine", "show", &id]);
    assert!(
        ok && show.contains("50-hold.rhai") && show.contains("Subject: [hold] one"),
        "{show}"
    );
    let (ok, _, _) = gw.admin(&["quarantine", "release", &id]);
    assert!(ok);
    assert!(eventually(Duration::from_secs(5), || sink.count() == 1).await);
    let (ok, _, err) = gw.admin(&["quarantine", "release", &id]);
    assert!(!ok && err.contains("no quarantined message"), "{err}");
    // The other one goes when the retention runs out.
    assert!(
        eventually(Duration::from_secs(10), || {
            gw.admin(&["quarantine", "list"]).1.contains("0 message(s)")
        })
        .await,
        "retention did not purge"
    );
}
