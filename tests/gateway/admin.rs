//! The admin commands, the config check, metrics and shutdown.

use std::time::Duration;

use crate::common::*;

fn first_id(list: &str) -> String {
    list.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_commands_work_while_serving() {
    // The backend is down: the message stays deferred in the queue.
    let gw = Gateway::start(Opts {
        // A down backend keeps mail queued (verification would answer 451).
        relay_extra: "verify_recipients = \"off\"".into(),
        ..Opts::sink(free_port())
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    let r = c
        .mail(
            "alice@local.test",
            &["bob@local.test"],
            b"Subject: waiting\r\n\r\nx",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (ok, out, err) = gw.admin(&["queue", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("alice@local.test -> bob@local.test"), "{out}");
    assert!(out.contains("1 message(s)"), "{out}");
    let id = first_id(&out);
    assert_eq!(id.len(), 16, "{out}");
    assert!(r.contains(&id), "the 250 reply names the queue id: {r}");

    let (ok, out, _) = gw.admin(&["queue", "show", &id]);
    assert!(ok);
    assert!(out.contains("state:     deferred"), "{out}");
    assert!(out.contains("Connection to smtp://127.0.0.1"), "{out}");
    assert!(out.contains("Subject: waiting"), "{out}");

    let (ok, out, _) = gw.admin(&["queue", "list", "--sender", "nobody"]);
    assert!(ok && out.contains("0 message(s)"), "{out}");
    let (ok, out, _) = gw.admin(&[
        "queue",
        "list",
        "--domain",
        "local.test",
        "--state",
        "deferred",
    ]);
    assert!(ok && out.contains("1 message(s)"), "{out}");

    let (ok, _, _) = gw.admin(&["queue", "hold", &id]);
    assert!(ok);
    let (_, out, _) = gw.admin(&["queue", "list", "--state", "held"]);
    assert!(out.contains("1 message(s)"), "{out}");
    let (ok, _, err) = gw.admin(&["queue", "retry", &id]);
    assert!(!ok && err.contains("held"), "{err}");
    let (ok, _, _) = gw.admin(&["queue", "release", &id]);
    assert!(ok);
    let (ok, _, _) = gw.admin(&["queue", "retry", &id]);
    assert!(ok);
    let (ok, out, _) = gw.admin(&["queue", "delete", &id]);
    assert!(ok, "{out}");
    let (_, out, _) = gw.admin(&["queue", "list"]);
    assert!(out.contains("0 message(s)"), "{out}");

    let (ok, _, err) = gw.admin(&["queue", "show", "not-an-id"]);
    assert!(!ok && err.contains("is not a queue id"), "{err}");
    let (ok, _, err) = gw.admin(&["queue", "delete", &id]);
    assert!(!ok && err.contains("no queued message"), "{err}");
    let (ok, _, err) = gw.admin(&["queue", "list", "--state", "lost"]);
    assert!(!ok && err.contains("unknown state"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_commands_work_without_a_running_gateway() {
    let mut gw = Gateway::start(Opts {
        // A down backend keeps mail queued (verification would answer 451).
        relay_extra: "verify_recipients = \"off\"".into(),
        ..Opts::sink(free_port())
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    c.mail(
        "alice@local.test",
        &["bob@local.test"],
        b"Subject: x\r\n\r\nx",
    )
    .await;
    let status = gw.term();
    assert!(status.success(), "exit {status}; log:\n{}", gw.log_text());
    assert!(gw.log_text().contains("stopped"));
    let (ok, out, err) = gw.admin(&["queue", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 message(s)"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_store_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "[server]\ndata_dir = \"nowhere\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["queue", "list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no store at"), "{err}");
}

#[test]
fn check_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nhostname = \"gw\"\n\n[smtp]\nmax_recipents = 5\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:5:") && err.contains("max_recipents"),
        "{err}"
    );

    std::fs::write(&bad, "[delivery]\nretry = [\"1m\", \"soon\"]\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.toml:2:") && err.contains("soon"),
        "{err}"
    );

    let out = std::process::Command::new(BIN)
        .args(["check", "--config", "postern.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `postern check` prints every problem at once: each bad key of the
/// config with its line, and (for a config that loads) every rule, policy
/// and accounts problem together.
#[test]
fn check_prints_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nhostname = \"two words\"\n\n[smtp]\nmax_recipients = 0\n\n[delivery]\nconcurrency = 0\n",
    )
    .unwrap();
    let check = |path: &std::path::Path| {
        let out = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(&bad);
    assert_eq!(code, Some(1), "{err}");
    for want in [
        "bad.toml:2: [server] hostname:",
        "bad.toml:5: [smtp] max_recipients:",
        "bad.toml:8: [delivery] concurrency:",
    ] {
        assert!(
            err.lines().any(|l| l.contains(want)),
            "{want:?} missing:\n{err}"
        );
    }

    // The config is fine; a rule, the rate limits and users.toml are not.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[server]\nhostname = \"gw.test\"\n").unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("rules/10-x.rhai"),
        "fn data(m) {\n  let = 1;\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policies/ratelimits.toml"),
        "[[limit]]\nname = \"a\"\nkey = \"nope\"\nrate = \"1/1s\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policies/users.toml"),
        "[[user]]\nlogin = 1\n",
    )
    .unwrap();
    let (code, err) = check(&good);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("10-x.rhai:2:"), "rule problem missing:\n{err}");
    assert!(
        err.contains("ratelimits.toml:3:"),
        "limit problem missing:\n{err}"
    );
    assert!(
        err.contains("users.toml"),
        "accounts problem missing:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_counts_what_happened() {
    let sink = Sink::start(false).await;
    let gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    c.mail("a@local.test", &["bob@local.test"], b"Subject: m\r\n\r\nx")
        .await;
    c.cmd("MAIL FROM:<a@local.test>").await;
    c.cmd("RCPT TO:<x@elsewhere.test>").await;
    assert!(eventually(Duration::from_secs(5), || sink.count() == 1).await);
    let m = gw.metrics_text().await;
    // The harness's readiness probe is a connection too.
    assert!(
        metric(&m, "postern_smtp_connections_total{listener=\"relay\"}") >= 1.0,
        "{m}"
    );
    for want in [
        "HTTP/1.0 200",
        "postern_smtp_sessions_active{listener=\"relay\"} 1",
        "postern_messages_received_total{listener=\"relay\"} 1",
        "postern_verdicts_total{stage=\"data\",verdict=\"accept\"} 1",
        "postern_verdicts_total{stage=\"rcpt\",verdict=\"reject\"} 1",
        "postern_delivery_attempts_total{result=\"ok\",tls=\"no\"} 1",
        "postern_queue_messages{state=\"deferred\"} 0",
        "postern_delivery_seconds_count 1",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_session_in_flight() {
    let sink = Sink::start(false).await;
    let mut gw = Gateway::start(Opts::sink(sink.port)).await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO c.test").await;
    c.cmd("MAIL FROM:<a@local.test>").await;
    c.cmd("RCPT TO:<bob@local.test>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(b"Subject: in flight\r\n\r\nhalf").await;
    let pid = gw.child.as_ref().unwrap().id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    // New connections are refused (soon), the message in flight is still taken.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", gw.smtp))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "still accepting connections after SIGTERM");
    c.send(b" and the rest\r\n.\r\n").await;
    let r = c.reply().await;
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("NOOP").await;
    assert!(r.starts_with("421") || r == "EOF", "{r}");
    let status = gw.term_wait();
    assert!(status.success());
    let (_, out, _) = gw.admin(&["queue", "list"]);
    let delivered = sink.count();
    assert!(
        delivered == 1 || out.contains("1 message(s)"),
        "the message was lost: {out}"
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.trim().parse().unwrap_or(-1.0))
        })
        .unwrap_or(-1.0)
}
