//! Submission (587 after STARTTLS, 465 at once): AUTH PLAIN and LOGIN
//! against policies/users.toml, the login slow-down, sender binding
//! (envelope and header From), relaying only when authenticated, the
//! `Received:` trace, and per-user `hold` limits that an admin releases.
//! The clients are Python's smtplib (independent of our code) and the raw
//! line client of `common`.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const ALICE: &str = "alice@local.test";
const ALICE_PW: &str = "alice-secret";

/// Shared by every script: TLS without verification (the gateway's
/// certificate is self-signed), raw commands that report `code text`.
const PRELUDE: &str = r#"
import base64, json, smtplib, ssl, sys, time
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE
ALICE, PW = "alice@local.test", "alice-secret"
def b64(s): return base64.b64encode(s.encode()).decode()
def plain(u, p): return b64("\0%s\0%s" % (u, p))
def starttls(port):
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("client.test")
    s.starttls(context=CTX)
    s.ehlo("client.test")
    return s
def implicit(port):
    s = smtplib.SMTP_SSL("127.0.0.1", port, context=CTX, timeout=30)
    s.ehlo("client.test")
    return s
def cmd(s, *a):
    code, msg = s.docmd(*a)
    return "%d %s" % (code, msg.decode(errors="replace").replace("\n", " | "))
def data(s, text):
    r = cmd(s, "DATA")
    if not r.startswith("354"):
        return r
    s.send(text.replace("\n", "\r\n").encode() + b"\r\n.\r\n")
    code, msg = s.getreply()
    return "%d %s" % (code, msg.decode(errors="replace"))
def msg(frm, to, subject):
    return "From: %s\nTo: %s\nSubject: %s\nMessage-ID: <%s@client.test>\n\nHello from a mail client.\n" % (
        frm, to, subject, subject.replace(" ", "-"))
out = {}
port = int(sys.argv[1])
"#;

/// Runs `PRELUDE + body` with `args` (the first is the port) off the
/// runtime and returns its `out` dict.
async fn py(body: &str, args: Vec<String>) -> Value {
    let script = format!("{PRELUDE}{body}\nprint(json.dumps(out))\n");
    let text = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        python(&script, &args)
    })
    .await
    .unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("no {k} in {v}"))
        .to_string()
}

/// The value of one series in a scrape (`name{labels}` as exported).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
}

fn users() -> Vec<(String, String, Vec<String>, String)> {
    vec![
        (
            ALICE.into(),
            ALICE_PW.into(),
            vec![ALICE.into(), "sales@local.test".into()],
            "user".into(),
        ),
        (
            "root".into(),
            "root-secret".into(),
            vec!["postmaster@local.test".into()],
            "admin".into(),
        ),
    ]
}

async fn gateway(sink: &Sink, f: impl FnOnce(&mut Opts)) -> Gateway {
    let mut o = Opts::sink(sink.port);
    o.users = users();
    f(&mut o);
    Gateway::start(o).await
}

#[tokio::test(flavor = "multi_thread")]
async fn no_auth_before_starttls_and_mail_refused_530() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |_| {}).await;
    let mut c = Client::connect(gw.submission).await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "AUTH offered in the clear: {ehlo}");
    let r = c.cmd(&format!("AUTH PLAIN {}", "AGFsaWNlAHB3")).await;
    assert!(r.starts_with("538 5.7.11"), "{r}");
    let r = c.cmd("MAIL FROM:<alice@local.test>").await;
    assert!(r.starts_with("530 5.7.0"), "{r}");
    // After STARTTLS: AUTH is offered, MAIL without it is still 530, and
    // the SASL error paths answer as RFC 4954 says.
    let out = py(
        r#"
s = starttls(port)
out["ehlo"] = s.ehlo_resp.decode()
out["mail"] = cmd(s, "MAIL FROM:<alice@local.test>")
out["unknown"] = cmd(s, "AUTH CRAM-MD5")
out["badb64"] = cmd(s, "AUTH PLAIN !!!notbase64")
out["cancel1"] = cmd(s, "AUTH LOGIN")
out["cancel2"] = cmd(s, "*")
s.quit()
"#,
        vec![gw.submission.to_string()],
    )
    .await;
    assert!(s(&out, "ehlo").contains("AUTH PLAIN LOGIN"), "{out}");
    assert!(s(&out, "mail").starts_with("530 5.7.0"), "{out}");
    assert!(s(&out, "unknown").starts_with("504 5.5.4"), "{out}");
    assert!(s(&out, "badb64").starts_with("501 5.5.2"), "{out}");
    assert!(s(&out, "cancel1").starts_with("334 VXNlcm5hbWU6"), "{out}");
    assert!(s(&out, "cancel2").starts_with("501"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_network_still_needs_auth_on_submission() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |o| o.networks = vec!["127.0.0.0/8".into()]).await;
    let out = py(
        r#"
s = implicit(port)
out["mail"] = cmd(s, "MAIL FROM:<app@local.test>")
s.quit()
"#,
        vec![gw.submissions.to_string()],
    )
    .await;
    assert!(s(&out, "mail").starts_with("530 5.7.0"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_password_refused_and_slowed_good_one_accepted() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |_| {}).await;
    let before = gw.metrics_text().await;
    assert_eq!(
        metric(
            &before,
            "postern_mailbox_logins_total{protocol=\"smtp\",result=\"ok\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &before,
            "postern_mailbox_logins_total{protocol=\"smtp\",result=\"fail\"}"
        ),
        0.0
    );
    let out = py(
        r#"
s = starttls(port)
t = time.monotonic(); out["bad1"] = cmd(s, "AUTH PLAIN " + plain(ALICE, "wrong")); out["t1"] = time.monotonic() - t
t = time.monotonic(); out["bad2"] = cmd(s, "AUTH PLAIN " + plain(ALICE, "wrong again")); out["t2"] = time.monotonic() - t
# PLAIN with the credentials in a 334 continuation.
out["plain334"] = cmd(s, "AUTH PLAIN")
out["good"] = cmd(s, plain(ALICE, PW))
out["twice"] = cmd(s, "AUTH PLAIN " + plain(ALICE, PW))
out["mail"] = cmd(s, "MAIL FROM:<alice@local.test>")
out["in_tx"] = cmd(s, "AUTH PLAIN " + plain(ALICE, PW))
s.quit()
# Three failures in one session and the gateway hangs up.
s = starttls(port)
for i in range(3):
    out["fail%d" % i] = cmd(s, "AUTH PLAIN " + plain("nobody@local.test", "x"))
try:
    out["after"] = cmd(s, "NOOP")
except smtplib.SMTPServerDisconnected:
    out["after"] = "closed"
"#,
        vec![gw.submission.to_string()],
    )
    .await;
    assert!(s(&out, "bad1").starts_with("535 5.7.8"), "{out}");
    assert!(s(&out, "bad2").starts_with("535 5.7.8"), "{out}");
    let (t1, t2) = (out["t1"].as_f64().unwrap(), out["t2"].as_f64().unwrap());
    eprintln!("bad AUTH answered after {t1:.3}s, the next one after {t2:.3}s");
    // The slow-down (0.25 s after the first failure) dwarfs argon2's noise.
    assert!(
        t2 > t1 + 0.15,
        "the second bad password was not slowed: {t1:.3}s then {t2:.3}s"
    );
    assert!(s(&out, "plain334").starts_with("334"), "{out}");
    assert!(s(&out, "good").starts_with("235 2.7.0"), "{out}");
    assert!(s(&out, "twice").starts_with("503 5.5.1"), "{out}");
    assert!(s(&out, "mail").starts_with("250"), "{out}");
    assert!(s(&out, "in_tx").starts_with("503 5.5.1"), "{out}");
    assert!(s(&out, "fail0").starts_with("535"), "{out}");
    assert!(s(&out, "fail1").starts_with("535"), "{out}");
    assert!(s(&out, "fail2").starts_with("535"), "{out}");
    let after = s(&out, "after");
    assert!(
        after == "closed" || after.starts_with("421"),
        "not closed after 3 failures: {out}"
    );
    let m = gw.metrics_text().await;
    assert_eq!(
        metric(
            &m,
            "postern_mailbox_logins_total{protocol=\"smtp\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "postern_mailbox_logins_total{protocol=\"smtp\",result=\"fail\"}"
        ),
        5.0
    );
    // Logged without the password.
    let log = gw.log_plain();
    assert!(log.contains("protocol=\"smtp\""), "{log}");
    assert!(
        !log.contains("wrong again") && !log.contains(ALICE_PW),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sender_binding_envelope_and_header_from() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |_| {}).await;
    let out = py(
        r#"
s = starttls(port)
out["auth"] = cmd(s, "AUTH PLAIN " + plain(ALICE, PW))
out["foreign"] = cmd(s, "MAIL FROM:<boss@local.test>")
out["null"] = cmd(s, "MAIL FROM:<>")
out["tagged"] = cmd(s, "MAIL FROM:<Alice+Lists@LOCAL.test>")
out["rcpt"] = cmd(s, "RCPT TO:<bob@far.test>")
out["header"] = data(s, msg("The Boss <boss@local.test>", "bob@far.test", "forged"))
out["mail2"] = cmd(s, "MAIL FROM:<sales@local.test>")
out["rcpt2"] = cmd(s, "RCPT TO:<bob@far.test>")
out["both"] = data(s, msg("sales@local.test, boss@local.test", "bob@far.test", "two froms"))
out["mail3"] = cmd(s, "MAIL FROM:<alice@local.test>")
out["rcpt3"] = cmd(s, "RCPT TO:<bob@far.test>")
out["ok"] = data(s, msg("Alice <alice@local.test>", "bob@far.test", "fine"))
s.quit()
# An admin may see all quarantine, but sends only as their own addresses.
s = starttls(port)
out["root"] = cmd(s, "AUTH PLAIN " + plain("root", "root-secret"))
out["root_foreign"] = cmd(s, "MAIL FROM:<alice@local.test>")
s.quit()
"#,
        vec![gw.submission.to_string()],
    )
    .await;
    assert!(s(&out, "auth").starts_with("235"), "{out}");
    assert!(s(&out, "foreign").starts_with("553 5.7.1"), "{out}");
    assert!(s(&out, "null").starts_with("553 5.7.1"), "{out}");
    assert!(s(&out, "tagged").starts_with("250"), "{out}");
    assert!(s(&out, "rcpt").starts_with("250"), "{out}");
    assert!(s(&out, "header").starts_with("553 5.7.1"), "{out}");
    assert!(s(&out, "both").starts_with("553 5.7.1"), "{out}");
    assert!(s(&out, "ok").starts_with("250"), "{out}");
    assert!(s(&out, "root").starts_with("235"), "{out}");
    assert!(s(&out, "root_foreign").starts_with("553 5.7.1"), "{out}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
    // Only the good one, and nothing of the refused ones was kept.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(String::from_utf8_lossy(&got[0].body).contains("Subject: fine"));
    let (ok, list, _) = gw.admin(&["queue", "list"]);
    assert!(ok);
    assert!(!list.contains("boss"), "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_domains_only_when_authenticated_and_relay_port_has_no_auth() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |_| {}).await;
    // The relay port: no AUTH in EHLO, before or after STARTTLS.
    let mut c = Client::connect(gw.smtp).await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let r = c.cmd("AUTH PLAIN AGFsaWNlAHB3").await;
    assert!(r.starts_with("502"), "{r}");
    assert!(
        c.cmd("MAIL FROM:<alice@local.test>")
            .await
            .starts_with("250")
    );
    let r = c.cmd("RCPT TO:<bob@far.test>").await;
    assert!(r.starts_with("550 5.7.1"), "{r}");
    let out = py(
        r#"
s = starttls(port)
out["ehlo"] = s.ehlo_resp.decode()
out["auth"] = cmd(s, "AUTH PLAIN " + plain(ALICE, PW))
s.quit()
"#,
        vec![gw.smtp.to_string()],
    )
    .await;
    assert!(!s(&out, "ehlo").contains("AUTH"), "{out}");
    assert!(s(&out, "auth").starts_with("502"), "{out}");
    // Authenticated on submission: the same foreign recipient is relayed.
    let out = py(
        r#"
s = starttls(port)
s.login(ALICE, PW)
s.sendmail(ALICE, ["bob@far.test"], msg(ALICE, "bob@far.test", "outbound").replace("\n", "\r\n"))
s.quit()
out["sent"] = "yes"
"#,
        vec![gw.submission.to_string()],
    )
    .await;
    assert_eq!(s(&out, "sent"), "yes");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 1).await);
    assert_eq!(sink.messages()[0].rcpts, vec!["bob@far.test".to_string()]);
    assert_eq!(sink.messages()[0].from, ALICE);
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_auth_login_and_received_says_esmtpsa() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |_| {}).await;
    let shown = gateway(&sink, |o| o.smtp_extra = "received_auth_user = true".into()).await;
    let body = r#"
s = implicit(port)
out["ehlo"] = s.ehlo_resp.decode()
out["login"] = cmd(s, "AUTH LOGIN")
out["user"] = cmd(s, b64(ALICE))
out["pass"] = cmd(s, b64(PW))
out["mail"] = cmd(s, "MAIL FROM:<alice@local.test>")
out["rcpt"] = cmd(s, "RCPT TO:<bob@far.test>")
out["data"] = data(s, msg(ALICE, "bob@far.test", sys.argv[2]))
s.quit()
"#;
    for (g, subject) in [(&gw, "hidden"), (&shown, "shown")] {
        let out = py(body, vec![g.submissions.to_string(), subject.into()]).await;
        assert!(s(&out, "ehlo").contains("AUTH PLAIN LOGIN"), "{out}");
        assert!(!s(&out, "ehlo").contains("STARTTLS"), "{out}");
        assert!(s(&out, "login").starts_with("334 VXNlcm5hbWU6"), "{out}");
        assert!(s(&out, "user").starts_with("334 UGFzc3dvcmQ6"), "{out}");
        assert!(s(&out, "pass").starts_with("235 2.7.0"), "{out}");
        assert!(s(&out, "data").starts_with("250"), "{out}");
    }
    assert!(eventually(Duration::from_secs(10), || sink.count() == 2).await);
    let text = |subject: &str| {
        let m = sink.messages();
        let g = m
            .iter()
            .find(|g| String::from_utf8_lossy(&g.body).contains(&format!("Subject: {subject}")))
            .unwrap_or_else(|| panic!("no message {subject}"));
        String::from_utf8_lossy(&g.body).into_owned()
    };
    // Our trace header: from the client's name up to the `;` before the date.
    let received = |m: &str| {
        let start = m
            .find("Received: from client.test")
            .unwrap_or_else(|| panic!("no Received from the client: {m}"));
        let end = m[start..].find(';').map_or(m.len(), |e| start + e);
        m[start..end].to_string()
    };
    let hidden = received(&text("hidden"));
    assert!(hidden.contains("with ESMTPSA"), "{hidden}");
    assert!(!hidden.contains(ALICE), "the login is shown: {hidden}");
    let shown = received(&text("shown"));
    assert!(shown.contains("with ESMTPSA"), "{shown}");
    assert!(
        shown.contains("(authenticated as alice@local.test)"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_limit_keeps_the_third_message_until_released() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |o| {
        o.ratelimits = "[[limit]]\nname = \"per-user\"\nkey = \"auth_user\"\nrate = \"2/1h\"\nburst = 2\nscope = \"submission\"\naction = \"hold\"\n".into();
    })
    .await;
    let m0 = gw.metrics_text().await;
    assert_eq!(
        metric(&m0, "postern_ratelimited_total{limit=\"per-user\"}"),
        0.0
    );
    let out = py(
        r#"
s = starttls(port)
s.login(ALICE, PW)
for i in range(3):
    out["mail%d" % i] = cmd(s, "MAIL FROM:<alice@local.test>")
    out["rcpt%d" % i] = cmd(s, "RCPT TO:<bob@far.test>")
    out["data%d" % i] = data(s, msg(ALICE, "bob@far.test", "number %d" % i))
s.quit()
"#,
        vec![gw.submission.to_string()],
    )
    .await;
    for i in 0..3 {
        assert!(s(&out, &format!("mail{i}")).starts_with("250"), "{out}");
        assert!(s(&out, &format!("data{i}")).starts_with("250"), "{out}");
    }
    let held_id = s(&out, "data2")
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(eventually(Duration::from_secs(10), || sink.count() == 2).await);
    let (ok, list, err) = gw.admin(&["queue", "list", "--state", "held"]);
    assert!(ok, "{err}");
    assert!(list.contains(&held_id), "{held_id} not held: {list}");
    assert_eq!(
        list.lines().filter(|l| l.contains("held")).count(),
        1,
        "{list}"
    );
    // Held: not delivered, however long we wait for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.count(), 2);
    assert!(
        !sink
            .messages()
            .iter()
            .any(|g| String::from_utf8_lossy(&g.body).contains("number 2"))
    );
    let m = gw.metrics_text().await;
    assert_eq!(
        metric(&m, "postern_ratelimited_total{limit=\"per-user\"}"),
        1.0
    );
    let log = gw.log_plain();
    assert!(
        log.lines().any(|l| l.contains("message decision")
            && l.contains("result=\"held\"")
            && l.contains("reason=\"rate limit per-user\"")),
        "{log}"
    );
    let (ok, said, err) = gw.admin(&["queue", "release", &held_id]);
    assert!(ok, "{said}{err}");
    assert!(eventually(Duration::from_secs(10), || sink.count() == 3).await);
    assert!(
        sink.messages()
            .iter()
            .any(|g| String::from_utf8_lossy(&g.body).contains("number 2"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tempfail_limit_per_user_answers_450_at_mail() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |o| {
        o.ratelimits = "[[limit]]\nname = \"per-user\"\nkey = \"auth_user\"\nrate = \"1/1h\"\nburst = 1\nscope = \"submission\"\n".into();
    })
    .await;
    let out = py(
        r#"
s = implicit(port)
s.login(ALICE, PW)
out["mail0"] = cmd(s, "MAIL FROM:<alice@local.test>")
out["rset"] = cmd(s, "RSET")
out["mail1"] = cmd(s, "MAIL FROM:<alice@local.test>")
s.quit()
"#,
        vec![gw.submissions.to_string()],
    )
    .await;
    assert!(s(&out, "mail0").starts_with("250"), "{out}");
    assert!(s(&out, "mail1").starts_with("450 4.7.1"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn users_toml_edits_reach_submission_logins() {
    let sink = Sink::start(false).await;
    let gw = gateway(&sink, |_| {}).await;
    let script = r#"
s = implicit(port)
out["auth"] = cmd(s, "AUTH PLAIN " + plain("carol@local.test", "carol-pw"))
s.quit()
"#;
    let before = py(script, vec![gw.submissions.to_string()]).await;
    assert!(s(&before, "auth").starts_with("535"), "{before}");
    // The quarantine's watcher reloads users.toml; submission shares it.
    let users = gw.dir.path().join("policies").join("users.toml");
    let mut text = std::fs::read_to_string(&users).unwrap();
    text.push_str(&format!(
        "[[user]]\nlogin = \"carol@local.test\"\npassword = \"{}\"\naddresses = [\"carol@local.test\"]\nrole = \"user\"\n",
        postern::mailbox::accounts::hash_password("carol-pw")
    ));
    std::fs::write(&users, text).unwrap();
    let mut last = Value::Null;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = py(script, vec![gw.submissions.to_string()]).await;
        if s(&last, "auth").starts_with("235") {
            return;
        }
    }
    panic!("carol never got in after the reload: {last}");
}
