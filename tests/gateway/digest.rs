//! The quarantine digest and the pages its links open, in the real binary:
//! who gets a digest and what it lists, links that act only on the POST and
//! only once, tokens that are forged, expired or another user's, a release
//! raced between a link and IMAP, the allow/block links with the shipped
//! rules, the schedule across restarts, and the page in headless Chromium.

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

fn user(login: &str) -> (String, String, Vec<String>, String) {
    (
        login.into(),
        format!("{login}-pw"),
        vec![format!("{login}@local.test")],
        "user".into(),
    )
}

/// A gateway with the hold rule, the web pages on their own port, users
/// alice, bob and carol, and `digest` as the schedule.
async fn start(sink: &Sink, digest: &str, shipped: bool) -> (Gateway, u16) {
    let web = free_port();
    let mut rules = if shipped { shipped_rules() } else { vec![] };
    rules.push(("50-hold.rhai".into(), HOLD_RULE.into()));
    let gw = Gateway::start(Opts {
        rules,
        users: vec![user("alice"), user("bob"), user("carol")],
        quarantine_extra: format!(
            "web = [\"127.0.0.1:{web}\"]\nweb_url = \"http://127.0.0.1:{web}/\"\ndigest = \"{digest}\"\nlink_lifetime = \"1h\"\n"
        ),
        ..Opts::sink(sink.port)
    })
    .await;
    (gw, web)
}

async fn send(gw: &Gateway, from: &str, to: &str, subject: &str) {
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let body = format!(
        "From: <{from}>\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{}@far.test>\r\n\r\nhello\r\n",
        free_port()
    );
    let r = c.mail(from, &[to], body.as_bytes()).await;
    assert!(r.starts_with("250"), "{subject}: {r}");
    c.cmd("QUIT").await;
}

/// One listed message of a digest: its subject and its four links.
#[derive(Debug, Clone)]
struct Listed {
    subject: String,
    release: String,
    allow: String,
    block: String,
    delete: String,
}

struct Digest {
    to: String,
    subject: String,
    text: String,
    html: String,
    listed: Vec<Listed>,
}

fn read_digest(m: &Got) -> Digest {
    let msg = mail_parser::MessageParser::default()
        .parse(&m.body)
        .expect("a digest parses");
    let text = msg.body_text(0).unwrap_or_default().to_string();
    let html = msg.body_html(0).unwrap_or_default().to_string();
    let mut listed: Vec<Listed> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(s) = l.strip_prefix("Subject: ") {
            listed.push(Listed {
                subject: s.trim().to_string(),
                release: String::new(),
                allow: String::new(),
                block: String::new(),
                delete: String::new(),
            });
        }
        let url = l.split_whitespace().last().unwrap_or_default().to_string();
        if let Some(cur) = listed.last_mut() {
            if l.starts_with("Release and allow sender:") {
                cur.allow = url;
            } else if l.starts_with("Release:") {
                cur.release = url;
            } else if l.starts_with("Block sender:") {
                cur.block = url;
            } else if l.starts_with("Delete:") {
                cur.delete = url;
            }
        }
    }
    Digest {
        to: m.rcpts.join(","),
        subject: msg.subject().unwrap_or_default().to_string(),
        text,
        html,
        listed,
    }
}

fn digests(sink: &Sink) -> Vec<Digest> {
    sink.messages()
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.body).contains("X-Postern-Digest:"))
        .map(read_digest)
        .collect()
}

fn delivered(sink: &Sink) -> Vec<String> {
    sink.messages()
        .iter()
        .filter(|m| !String::from_utf8_lossy(&m.body).contains("X-Postern-Digest:"))
        .map(|m| {
            String::from_utf8_lossy(&m.body)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

/// `curl` as a user's browser would send it: (status, headers, body).
fn http(method: &str, url: &str) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-i", "--max-time", "10", "-X", method])
        .args(if method == "POST" {
            vec!["-d", ""]
        } else {
            vec![]
        })
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

async fn http_async(method: &'static str, url: String) -> (u16, String, String) {
    tokio::task::spawn_blocking(move || http(method, &url))
        .await
        .unwrap()
}

/// The id of the first held entry whose `quarantine list` line contains `word`.
fn held_id(gw: &Gateway, word: &str) -> Option<u64> {
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    list.lines()
        .skip(1)
        .find(|l| l.contains(word))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|id| u64::from_str_radix(id, 16).ok())
}

/// A token signed with this gateway's own key (read from its data dir), as
/// only someone holding the key could make.
fn sign(gw: &Gateway, action: &str, id: u64, expires: i64, login: &str) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let key = std::fs::read(gw.data_dir().join("links.key")).unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let payload = format!("1\n{action}\n{id}\n{expires}\n{login}");
    let tag = ring::hmac::sign(&key, payload.as_bytes());
    format!("{}.{}", B64.encode(payload), B64.encode(tag.as_ref()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn digests_list_new_held_mail_and_links_act_once_on_the_post_only() {
    let sink = Sink::start(false).await;
    let (gw, web) = start(&sink, "off", false).await;
    send(&gw, "spam1@far.test", "alice@local.test", "[hold] one").await;
    send(
        &gw,
        "spam2@far.test",
        "alice@local.test",
        "[hold] <script>alert(1)</script> & two",
    )
    .await;
    send(&gw, "spam3@far.test", "bob@local.test", "[hold] for bob").await;

    let (ok, out, err) = gw.admin(&["quarantine", "digest"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("digest for alice to alice@local.test: 2 messages")
            && out.contains("digest for bob to bob@local.test: 1 message")
            && !out.contains("carol"),
        "{out}"
    );
    assert!(
        eventually(Duration::from_secs(15), || digests(&sink).len() == 2).await,
        "two digests delivered; log:\n{}",
        gw.log_text()
    );
    let all = digests(&sink);
    let alice = all.iter().find(|d| d.to == "alice@local.test").unwrap();
    let bob = all.iter().find(|d| d.to == "bob@local.test").unwrap();
    assert!(
        alice.subject.contains("2 messages are held"),
        "{}",
        alice.subject
    );
    assert!(bob.subject.contains("1 message is held"), "{}", bob.subject);
    assert_eq!(alice.listed.len(), 2, "{}", alice.text);
    assert!(alice.text.contains("spam1@far.test") && alice.text.contains("subject asked for it"));
    assert!(!alice.text.contains("for bob") && !bob.text.contains("[hold] one"));
    // The HTML part lists them too, escaped, with the same links.
    assert!(alice.html.contains("[hold] one"), "{}", alice.html);
    assert!(
        alice.html.contains("&lt;script&gt;") && !alice.html.contains("<script>"),
        "{}",
        alice.html
    );
    for l in &alice.listed {
        for url in [&l.release, &l.allow, &l.block, &l.delete] {
            assert!(
                url.starts_with(&format!("http://127.0.0.1:{web}/q/")),
                "{url}"
            );
            assert!(alice.html.contains(&url.replace('&', "&amp;")), "{url}");
        }
    }
    let one = alice
        .listed
        .iter()
        .find(|l| l.subject == "[hold] one")
        .unwrap()
        .clone();
    let two = alice
        .listed
        .iter()
        .find(|l| l.subject != "[hold] one")
        .unwrap()
        .clone();

    // A GET (a link scanner, a prefetch) shows the message and changes nothing.
    for url in [&one.release, &one.allow, &one.block, &one.delete] {
        let (status, head, body) = http_async("GET", url.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("[hold] one") && body.contains("<form method=\"post\">"),
            "{body}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'none'")
                && head.contains("referrer-policy: no-referrer")
                && head.contains("cache-control: no-store"),
            "{head}"
        );
        assert!(
            !body.contains("<script") && !body.contains("src="),
            "{body}"
        );
    }
    let (_, body) = {
        let (s, _, b) = http_async("GET", two.delete.clone()).await;
        (s, b)
    };
    assert!(
        body.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; two"),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(delivered(&sink).is_empty(), "a GET released nothing");
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(list.contains("3 message(s)"), "{list}");

    // The POST releases, once.
    let (status, _, body) = http_async("POST", one.release.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Released"), "{body}");
    assert!(
        eventually(Duration::from_secs(15), || delivered(&sink).len() == 1).await,
        "released by the link; log:\n{}",
        gw.log_text()
    );
    let released = sink
        .messages()
        .into_iter()
        .find(|m| !String::from_utf8_lossy(&m.body).contains("X-Postern-Digest:"))
        .unwrap();
    assert!(
        String::from_utf8_lossy(&released.body)
            .starts_with("X-Postern-Released: by alice via web; "),
        "{}",
        String::from_utf8_lossy(&released.body)
    );
    for url in [&one.release, &one.allow] {
        let (status, _, body) = http_async("POST", url.clone()).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("already <strong>released</strong> by alice from a digest link"),
            "{body}"
        );
    }
    let (_, _, body) = http_async("GET", one.delete.clone()).await;
    assert!(body.contains("already <strong>released</strong>"), "{body}");

    // Forged: one character changed; another gateway's key; a token for bob on
    // alice's message; an expired one. Each says so and changes nothing.
    let two_id = held_id(&gw, "alice@local.test").expect("alice's second is held");
    let mut forged = two.release.clone().into_bytes();
    let at = forged.len() - 3;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let base = format!("http://127.0.0.1:{web}/q/");
    let bobs = format!("{base}{}", sign(&gw, "release", two_id, now() + 600, "bob"));
    let expired = format!("{base}{}", sign(&gw, "release", two_id, now() - 1, "alice"));
    for (url, status, says) in [
        (forged, 403, "not valid"),
        (format!("{base}garbage.token"), 403, "not valid"),
        (bobs, 403, "not addressed to the account"),
        (expired, 410, "expired"),
    ] {
        for method in ["GET", "POST"] {
            let (s, _, body) = http_async(method, url.clone()).await;
            assert_eq!(s, status, "{method} {url}: {body}");
            assert!(
                body.contains(says) && body.contains("Nothing was done"),
                "{body}"
            );
        }
    }
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(list.contains("2 message(s)"), "{list}");

    // Delete through its link; then the page says so.
    let (status, _, body) = http_async("POST", two.delete.clone()).await;
    assert_eq!(status, 200);
    assert!(body.contains("Deleted"), "{body}");
    let (_, _, body) = http_async("POST", two.delete.clone()).await;
    assert!(
        body.contains("already <strong>deleted</strong> by alice"),
        "{body}"
    );
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(
        list.contains("1 message(s)") && list.contains("bob@local.test"),
        "{list}"
    );
    let metrics = gw.metrics_text().await;
    assert_eq!(
        metric(&metrics, "postern_releases_total{via=\"web\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "postern_digests_sent_total"),
        2.0,
        "{metrics}"
    );

    // Nothing new: no digest. New mail for alice: a digest of just that.
    let (ok, out, _) = gw.admin(&["quarantine", "digest"]);
    assert!(ok && out.contains("no digests"), "{out}");
    send(&gw, "spam4@far.test", "alice@local.test", "[hold] three").await;
    let (ok, out, _) = gw.admin(&["quarantine", "digest", "--user", "alice"]);
    assert!(
        ok && out.contains("alice to alice@local.test: 1 message"),
        "{out}"
    );
    // --now lists everything still held, told before or not: bob's one.
    let (ok, out, _) = gw.admin(&["quarantine", "digest", "--user", "bob", "--now"]);
    assert!(
        ok && out.contains("bob to bob@local.test: 1 message"),
        "{out}"
    );
    let (ok, _, err) = gw.admin(&["quarantine", "digest", "--user", "nobody"]);
    assert!(!ok && err.contains("no user \"nobody\""), "{err}");
    assert!(
        eventually(Duration::from_secs(15), || digests(&sink).len() == 4).await,
        "log:\n{}",
        gw.log_text()
    );
    let last = digests(&sink);
    assert!(last.iter().any(|d| d.to == "alice@local.test"
        && d.listed.len() == 1
        && d.listed[0].subject == "[hold] three"));
}

/// Per round: POST one link and send `UID MOVE uid Release` over IMAP past one barrier.
const LINK_VS_IMAP: &str = r#"
import imaplib, ssl, sys, threading, urllib.request
port, url = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4('127.0.0.1', port, timeout=30)
m.starttls(ctx)
m.login('alice', 'alice-pw')
m.select('INBOX')
typ, data = m.uid('SEARCH', None, 'ALL')
uid = data[0].split()[0]
barrier = threading.Barrier(2)
res = {}
def web():
    barrier.wait()
    with urllib.request.urlopen(urllib.request.Request(url, data=b'', method='POST'), timeout=20) as r:
        res['web'] = r.status
def imap():
    barrier.wait()
    res['imap'] = m.uid('MOVE', uid, 'Release')[0]
ts = [threading.Thread(target=f) for f in (web, imap)]
for t in ts: t.start()
for t in ts: t.join()
print('web', res.get('web'), 'imap', res.get('imap'))
m.logout()
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_link_and_imap_releasing_at_once_deliver_once() {
    const ROUNDS: usize = 8;
    let sink = Sink::start(false).await;
    let (gw, _web) = start(&sink, "off", false).await;
    for i in 0..ROUNDS {
        send(
            &gw,
            "x@far.test",
            "alice@local.test",
            &format!("[hold] race {i}"),
        )
        .await;
        let (ok, out, err) = gw.admin(&["quarantine", "digest", "--user", "alice"]);
        assert!(ok && out.contains("1 message"), "{out}{err}");
        assert!(
            eventually(Duration::from_secs(15), || digests(&sink).len() == i + 1).await,
            "log:\n{}",
            gw.log_text()
        );
        let link = digests(&sink)
            .into_iter()
            .flat_map(|d| d.listed)
            .find(|l| l.subject == format!("[hold] race {i}"))
            .unwrap();
        let args = [gw.imap.to_string(), link.release.clone()];
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            python(LINK_VS_IMAP, &args)
        })
        .await
        .unwrap();
        assert!(out.contains("web 200 imap OK"), "{out}");
        assert!(
            eventually(Duration::from_secs(15), || delivered(&sink).len() == i + 1).await,
            "round {i}; log:\n{}",
            gw.log_text()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = delivered(&sink);
    got.sort();
    let want: Vec<String> = (0..ROUNDS).map(|i| format!("[hold] race {i}")).collect();
    assert_eq!(got, want, "each message delivered exactly once");
    let metrics = gw.metrics_text().await;
    let (w, i) = (
        metric(&metrics, "postern_releases_total{via=\"web\"}"),
        metric(&metrics, "postern_releases_total{via=\"imap\"}"),
    );
    assert_eq!(w + i, ROUNDS as f64, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_and_block_links_change_what_the_senders_next_mail_meets() {
    let sink = Sink::start(false).await;
    let (gw, _web) = start(&sink, "off", true).await;
    send(&gw, "pal@far.test", "alice@local.test", "[hold] from pal").await;
    send(&gw, "pest@far.test", "alice@local.test", "[hold] from pest").await;
    let (ok, _, err) = gw.admin(&["quarantine", "digest"]);
    assert!(ok, "{err}");
    assert!(eventually(Duration::from_secs(15), || digests(&sink).len() == 1).await);
    let d = &digests(&sink)[0];
    let pal = d.listed.iter().find(|l| l.subject.contains("pal")).unwrap();
    let pest = d
        .listed
        .iter()
        .find(|l| l.subject.contains("pest"))
        .unwrap();

    let (_, _, body) = http_async("GET", pal.allow.clone()).await;
    assert!(
        body.contains("allow <strong>pal@far.test</strong>"),
        "{body}"
    );
    let (s, _, body) = http_async("POST", pal.allow.clone()).await;
    assert!(s == 200 && body.contains("is on your allow list"), "{body}");
    let (s, _, body) = http_async("POST", pest.block.clone()).await;
    assert!(s == 200 && body.contains("is on your block list"), "{body}");
    assert!(
        eventually(Duration::from_secs(15), || delivered(&sink)
            == ["[hold] from pal"])
        .await
    );
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(list.contains("0 message(s)"), "blocked one deleted: {list}");
    let (_, allowed, _) = gw.admin(&["lists", "allow", "show", "--user", "alice"]);
    let (_, blocked, _) = gw.admin(&["lists", "block", "show", "--user", "alice"]);
    assert!(allowed.contains("pal@far.test") && blocked.contains("pest@far.test"));

    // The shipped 05-lists.rhai: pal's next passes the hold rule, pest's is held.
    send(&gw, "pal@far.test", "alice@local.test", "[hold] pal again").await;
    assert!(
        eventually(Duration::from_secs(15), || delivered(&sink).len() == 2).await,
        "log:\n{}",
        gw.log_text()
    );
    send(&gw, "pest@far.test", "alice@local.test", "pest again").await;
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(
        list.contains("1 message(s)") && list.contains("sender on a block list"),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_digest_schedule_holds_across_restarts() {
    let sink = Sink::start(false).await;
    // Every 8 s: the first round is due 8 s after the first start.
    let (mut gw, _web) = start(&sink, "every 8s", false).await;
    let t0 = std::time::Instant::now();
    send(
        &gw,
        "x@far.test",
        "alice@local.test",
        "[hold] before the restart",
    )
    .await;
    gw.kill9();
    // Down past the due time: the round is not skipped, it runs at start.
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(t0.elapsed())).await;
    assert!(digests(&sink).is_empty());
    gw.spawn().await;
    let back = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(6), || digests(&sink).len() == 1).await,
        "the missed round runs at start; log:\n{}",
        gw.log_text()
    );
    assert!(back.elapsed() < Duration::from_secs(6));
    // A restart and a whole period later: nothing is listed twice.
    gw.term();
    gw.spawn().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(digests(&sink).len(), 1, "log:\n{}", gw.log_text());
    // New mail is in the next round's digest, alone.
    send(&gw, "x@far.test", "alice@local.test", "[hold] after").await;
    assert!(
        eventually(Duration::from_secs(12), || digests(&sink).len() == 2).await,
        "log:\n{}",
        gw.log_text()
    );
    let d = digests(&sink);
    let second = d
        .iter()
        .find(|d| d.listed.iter().any(|l| l.subject == "[hold] after"))
        .unwrap();
    assert_eq!(second.listed.len(), 1);
}

/// Debian's Chromium, headless, as root or not, with no network beyond loopback.
fn chromium(args: &[&str]) -> Option<std::process::Output> {
    let profile = tempfile::tempdir().ok()?;
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_in_a_real_browser_and_its_button() {
    if chromium(&["--version"]).is_none_or(|o| !o.status.success()) {
        eprintln!("skipped: no chromium (Debian package chromium; .ci/run installs it)");
        return;
    }
    let sink = Sink::start(false).await;
    let (gw, _web) = start(&sink, "off", false).await;
    send(
        &gw,
        "spam@far.test",
        "alice@local.test",
        "[hold] seen in a browser",
    )
    .await;
    gw.admin(&["quarantine", "digest"]);
    assert!(eventually(Duration::from_secs(15), || digests(&sink).len() == 1).await);
    let link = digests(&sink)[0].listed[0].clone();
    let url = link.release.clone();
    let out = tokio::task::spawn_blocking(move || chromium(&["--dump-dom", &url]))
        .await
        .unwrap()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dom.contains("[hold] seen in a browser")
            && dom.contains("<form method=\"post\">")
            && dom.contains("<button type=\"submit\">Release</button>"),
        "{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Kept for a look: bench/digest-page.png is a copy of one.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("digest-page.png");
    let (url, s) = (link.release.clone(), shot.clone());
    tokio::task::spawn_blocking(move || {
        chromium(&[
            &format!("--screenshot={}", s.display()),
            "--window-size=900,600",
            &url,
        ])
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 2000,
        "a screenshot was taken"
    );
    // The browser loaded the page twice and released nothing; the form's POST does.
    assert!(delivered(&sink).is_empty());
    let (s, _, body) = http_async("POST", link.release).await;
    assert!(s == 200 && body.contains("Released"), "{body}");
    assert!(eventually(Duration::from_secs(15), || delivered(&sink).len() == 1).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_web_tls_the_pages_are_served_over_tls_only() {
    let web = free_port();
    let gw = Gateway::start(Opts {
        quarantine_extra: format!("web = [\"127.0.0.1:{web}\"]\nweb_tls = true\n"),
        ..Opts::default()
    })
    .await;
    let url = format!("https://127.0.0.1:{web}/q/x.y");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", "-k", "-i", "--max-time", "10", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 403") && text.contains("not valid"),
        "{text}"
    );
    let (status, _, _) = http_async("GET", format!("http://127.0.0.1:{web}/q/x.y")).await;
    assert_eq!(status, 0, "plain HTTP gets no page");
    drop(gw);
}
