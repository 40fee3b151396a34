//! Allow and block lists: `postern lists` with the gateway running (over
//! the control socket) and stopped (on the store), and what the shipped
//! rules/05-lists.rhai does with them to real SMTP traffic.

use std::time::Duration;

use crate::common::*;
use crate::dns::message;

/// The shipped scripts (see `common::shipped_rules`), this file's own among them.
fn shipped_rules() -> Vec<(String, String)> {
    let out = crate::common::shipped_rules();
    assert!(out.iter().any(|(n, _)| n == "05-lists.rhai"), "{out:?}");
    out
}

fn user(login: &str) -> (String, String, Vec<String>, String) {
    (
        login.to_string(),
        "pw".to_string(),
        vec![login.to_string()],
        "user".to_string(),
    )
}

/// `Gateway::start`, again when a port picked free was taken meanwhile.
async fn start(opts: Opts) -> Gateway {
    for _ in 0..3 {
        if let Ok(gw) = tokio::spawn(Gateway::start(opts.clone())).await {
            return gw;
        }
    }
    Gateway::start(opts).await
}

/// One message in a fresh session; the reply after the final dot.
async fn send(gw: &Gateway, from: &str, to: &[&str], data: &[u8]) -> String {
    let mut c = Client::connect(gw.smtp).await;
    let r = c.cmd("EHLO client.test").await;
    assert!(r.starts_with("250"), "EHLO: {r}");
    let r = c.mail(from, to, data).await;
    c.cmd("QUIT").await;
    r
}

/// `postern <args>`, which must succeed; its stdout.
fn admin_ok(gw: &Gateway, args: &[&str]) -> String {
    let (ok, out, err) = gw.admin(args);
    assert!(ok, "postern {args:?} failed: {err}");
    out
}

/// `postern <args>`, which must fail; its stderr.
fn admin_fails(gw: &Gateway, args: &[&str]) -> String {
    let (ok, out, err) = gw.admin(args);
    assert!(!ok, "postern {args:?} should fail, printed: {out}");
    err
}

/// The quarantine ids (first column of `quarantine list`) with their lines.
fn held(gw: &Gateway) -> Vec<(String, String)> {
    admin_ok(gw, &["quarantine", "list"])
        .lines()
        .skip(1)
        .filter(|l| !l.ends_with("message(s)"))
        .map(|l| {
            let id = l.split_whitespace().next().unwrap_or("").to_string();
            (id, l.to_string())
        })
        .collect()
}

/// Wait until the sink has `n` messages; their subjects.
async fn delivered(sink: &Sink, n: usize) -> Vec<String> {
    assert!(
        eventually(Duration::from_secs(15), || sink.count() >= n).await,
        "{} of {n} message(s) delivered",
        sink.count()
    );
    let mut subjects: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| {
            String::from_utf8_lossy(&m.body)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect();
    subjects.sort();
    subjects
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_cli_while_serving_and_stopped() {
    let sink = Sink::start(false).await;
    let mut gw = start(Opts {
        rules: shipped_rules(),
        users: vec![user("bob@local.test"), user("carol@local.test")],
        ..Opts::sink(sink.port)
    })
    .await;

    // Serving: the store is the gateway's, so these go over the socket.
    let out = admin_ok(&gw, &["lists", "block", "add", "Spam+News@Far.TEST"]);
    assert_eq!(out, "spam@far.test added to the site block list\n");
    let out = admin_ok(&gw, &["lists", "block", "add", "spam@far.test"]);
    assert_eq!(out, "spam@far.test is on the site block list already\n");
    let out = admin_ok(
        &gw,
        &[
            "lists",
            "allow",
            "add",
            "--user",
            "BOB@local.test",
            "@Friend.Test",
        ],
    );
    assert_eq!(out, "@friend.test added to bob@local.test's allow list\n");
    let out = admin_ok(&gw, &["lists", "block", "show"]);
    assert!(out.starts_with("ENTRY "), "{out}");
    assert!(out.contains("\nspam@far.test "), "{out}");
    assert!(out.ends_with("1 entry on the site block list\n"), "{out}");
    let out = admin_ok(&gw, &["lists", "allow", "show", "--user", "bob@local.test"]);
    assert!(out.contains("\n@friend.test "), "{out}");
    let out = admin_ok(&gw, &["lists", "allow", "show"]);
    assert!(out.ends_with("0 entries on the site allow list\n"), "{out}");
    // carol's list is her own.
    let out = admin_ok(
        &gw,
        &["lists", "allow", "show", "--user", "carol@local.test"],
    );
    assert!(out.contains("0 entries"), "{out}");
    // One entry: on it (exit 0), or not (exit 1), and through its domain.
    let out = admin_ok(&gw, &["lists", "block", "show", "<spam@far.test>"]);
    assert_eq!(out, "spam@far.test is on the site block list\n");
    let err = admin_fails(
        &gw,
        &[
            "lists",
            "allow",
            "show",
            "--user",
            "bob@local.test",
            "x@friend.test",
        ],
    );
    assert!(
        err.contains(
            "x@friend.test is not on bob@local.test's allow list itself, but @friend.test is"
        ),
        "{err}"
    );

    // The running gateway applies what was just added.
    let r = send(
        &gw,
        "spam@far.test",
        &["carol@local.test"],
        message("spam@far.test", "carol@local.test", "spam-1", "buy").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let h = held(&gw);
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(h[0].1.contains("(sender on a block list)"), "{h:?}");

    // Bad input: a clear message and exit 1, nothing changed.
    for (args, want) in [
        (
            &["lists", "block", "add", "not-an-address"][..],
            "\"not-an-address\" is not an address or @domain: no @",
        ),
        (
            &["lists", "block", "add", "@bad..test"][..],
            "is not an address or @domain",
        ),
        (
            &["lists", "allow", "add", "a b@far.test"][..],
            "is not an address or @domain",
        ),
        (
            &[
                "lists",
                "block",
                "add",
                "--user",
                "nobody@local.test",
                "x@far.test",
            ][..],
            "no user \"nobody@local.test\" in ",
        ),
        (
            &["lists", "block", "remove", "other@far.test"][..],
            "other@far.test is not on the site block list",
        ),
        // An entry is on the block list, so removing it from the allow
        // list is an error and leaves it blocked.
        (
            &["lists", "allow", "remove", "spam@far.test"][..],
            "spam@far.test is not on the site allow list",
        ),
    ] {
        let err = admin_fails(&gw, args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (ok, _, err) = gw.admin(&["lists", "block", "add"]);
    assert!(!ok, "an entry is required: {err}");
    assert!(admin_ok(&gw, &["lists", "block", "show"]).contains("1 entry"));

    // Stopped: the commands open the store themselves.
    assert!(gw.term().success());
    let out = admin_ok(&gw, &["lists", "block", "add", "@evil.test"]);
    assert_eq!(out, "@evil.test added to the site block list\n");
    let out = admin_ok(&gw, &["lists", "block", "remove", "spam@far.test"]);
    assert_eq!(out, "spam@far.test removed from the site block list\n");
    let out = admin_ok(&gw, &["lists", "allow", "add", "spam@far.test"]);
    assert_eq!(out, "spam@far.test added to the site allow list\n");
    let out = admin_ok(&gw, &["lists", "block", "show"]);
    assert!(
        out.contains("\n@evil.test ") && out.contains("1 entry"),
        "{out}"
    );
    let err = admin_fails(
        &gw,
        &["lists", "block", "add", "--user", "dave", "x@far.test"],
    );
    assert!(err.contains("no user \"dave\""), "{err}");

    // Back up: the changes made while stopped are there and apply.
    gw.spawn().await;
    let r = send(
        &gw,
        "anyone@evil.test",
        &["bob@local.test"],
        message("anyone@evil.test", "bob@local.test", "evil-1", "x").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let r = send(
        &gw,
        "spam@far.test",
        &["bob@local.test"],
        message("spam@far.test", "bob@local.test", "spam-2", "now fine").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(delivered(&sink, 1).await, ["spam-2"]);
    let h = held(&gw);
    assert_eq!(h.len(), 2, "{h:?}");
    assert!(
        h.iter()
            .any(|(_, l)| l.contains("anyone@evil.test -> bob@local.test")),
        "{h:?}"
    );
    assert!(
        admin_ok(&gw, &["lists", "allow", "show", "--user", "bob@local.test"])
            .contains("@friend.test")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_blocked_sender_is_quarantined_with_its_trace() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: shipped_rules(),
        users: vec![user("bob@local.test")],
        ..Opts::sink(sink.port)
    })
    .await;
    admin_ok(&gw, &["lists", "block", "add", "bad@far.test"]);

    // The envelope sender, any case, with a +tag.
    let r = send(
        &gw,
        "Bad+promo@FAR.test",
        &["bob@local.test"],
        message("bad@far.test", "bob@local.test", "blocked-envelope", "x").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    // A clean envelope with the blocked author in the header From.
    let r = send(
        &gw,
        "bounces@mailer.test",
        &["bob@local.test"],
        message("bad@far.test", "bob@local.test", "blocked-author", "x").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    // A bounce is never blocked, whatever its header From.
    let r = send(
        &gw,
        "",
        &["bob@local.test"],
        message("bad@far.test", "bob@local.test", "bounce", "x").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    // Someone else at the same domain is not on the list.
    let r = send(
        &gw,
        "good@far.test",
        &["bob@local.test"],
        message("good@far.test", "bob@local.test", "other-sender", "x").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(delivered(&sink, 2).await, ["bounce", "other-sender"]);

    let h = held(&gw);
    assert_eq!(h.len(), 2, "{h:?}");
    for (id, line) in &h {
        assert!(line.contains("(sender on a block list)"), "{line}");
        let shown = admin_ok(&gw, &["quarantine", "show", id]);
        assert!(shown.contains("script:    05-lists.rhai"), "{shown}");
        assert!(
            shown.contains("decision: quarantine by 05-lists.rhai"),
            "{shown}"
        );
        assert!(
            shown.contains("lists:    allowed=false blocked=true"),
            "{shown}"
        );
    }
    let log = gw.log_plain();
    assert!(log.contains("decided_by=05-lists.rhai"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_block_holds_only_that_users_mail() {
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        rules: shipped_rules(),
        users: vec![user("bob@local.test"), user("carol@local.test")],
        ..Opts::sink(sink.port)
    })
    .await;
    admin_ok(
        &gw,
        &[
            "lists",
            "block",
            "add",
            "--user",
            "bob@local.test",
            "pest@far.test",
        ],
    );
    let to_carol = send(
        &gw,
        "pest@far.test",
        &["carol@local.test"],
        message("pest@far.test", "carol@local.test", "to-carol", "x").as_bytes(),
    )
    .await;
    assert!(to_carol.starts_with("250"), "{to_carol}");
    let to_bob = send(
        &gw,
        "pest@far.test",
        &["bob@local.test"],
        message("pest@far.test", "bob@local.test", "to-bob", "x").as_bytes(),
    )
    .await;
    assert!(to_bob.starts_with("250"), "{to_bob}");
    // Bob's +tag subaddress is his too.
    let to_tag = send(
        &gw,
        "pest@far.test",
        &["bob+lists@local.test"],
        message("pest@far.test", "bob+lists@local.test", "to-bob-tag", "x").as_bytes(),
    )
    .await;
    assert!(to_tag.starts_with("250"), "{to_tag}");
    assert_eq!(delivered(&sink, 1).await, ["to-carol"]);
    let h = held(&gw);
    assert_eq!(h.len(), 2, "{h:?}");
    assert!(
        h.iter()
            .all(|(_, l)| l.contains("pest@far.test -> bob")
                && l.contains("(sender on a block list)")),
        "{h:?}"
    );
    assert_eq!(sink.count(), 1, "nothing else was delivered");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_sender_with_an_spf_fail_is_delivered() {
    let dns = {
        let mut got = None;
        for _ in 0..5 {
            let started = tokio::spawn(async {
                crate::dns::start_dns(&[("fail.test", "v=spf1 ip4:192.0.2.1 -all")]).await
            })
            .await;
            if let Ok(a) = started {
                got = Some(a);
                break;
            }
        }
        got.expect("could not start the DNS server")
    };
    let sink = Sink::start(false).await;
    let gw = start(Opts {
        dns: Some(dns),
        rules: shipped_rules(),
        users: vec![user("bob@local.test"), user("carol@local.test")],
        ..Opts::sink(sink.port)
    })
    .await;
    admin_ok(
        &gw,
        &[
            "lists",
            "allow",
            "add",
            "--user",
            "bob@local.test",
            "@fail.test",
        ],
    );

    let r = send(
        &gw,
        "ceo@fail.test",
        &["bob@local.test"],
        message("ceo@fail.test", "bob@local.test", "allowed", "hi").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    // Carol does not allow it: the SPF fail holds it (10-auth.rhai).
    let r = send(
        &gw,
        "ceo@fail.test",
        &["carol@local.test"],
        message("ceo@fail.test", "carol@local.test", "not-allowed", "hi").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    // To both: bob's allow does not wave carol's copy through.
    let r = send(
        &gw,
        "ceo@fail.test",
        &["bob@local.test", "carol@local.test"],
        message("ceo@fail.test", "bob@local.test", "to-both", "hi").as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    // Allowed (and SPF none), but an executable attachment is still held
    // by 20-attachments.rhai.
    admin_ok(
        &gw,
        &[
            "lists",
            "allow",
            "add",
            "--user",
            "bob@local.test",
            "partner@none.test",
        ],
    );
    let exe = "From: <partner@none.test>\r\nTo: <bob@local.test>\r\nSubject: tool\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nrun it\r\n\
         --b1\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"tool.exe\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b1--\r\n";
    let r = send(
        &gw,
        "partner@none.test",
        &["bob@local.test"],
        exe.as_bytes(),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");

    assert_eq!(delivered(&sink, 1).await, ["allowed"]);
    let got = &sink.messages()[0];
    let text = String::from_utf8_lossy(&got.body);
    assert!(text.contains("spf=fail"), "the check still ran: {text}");
    assert!(text.contains("X-Postern-External: yes"), "{text}");

    let h = held(&gw);
    assert_eq!(h.len(), 4, "{h:?}");
    let reasons: Vec<&str> = h
        .iter()
        .filter_map(|(_, l)| l.rsplit_once(" (").map(|(_, r)| r))
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("SPF fail for fail.test"))
            .count(),
        3,
        "{h:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("executable attachment: tool.exe")),
        "{h:?}"
    );
    // The trace of the allowed-but-held one says so.
    let (id, _) = h.iter().find(|(_, l)| l.contains("tool.exe")).unwrap();
    let shown = admin_ok(&gw, &["quarantine", "show", id]);
    assert!(
        shown.contains("lists:    allowed=true blocked=false"),
        "{shown}"
    );
    assert!(
        shown.contains("decision: quarantine by 20-attachments.rhai"),
        "{shown}"
    );
}
