//! What operators see: every metric family from the first scrape (at 0 for
//! every label value known at start), counters that move with traffic, the
//! `/metrics` bearer token, and `--log-format json` (one object per event).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::dns::start_dns;

/// A scrape as `name{label="v",...}` (labels sorted) → value.
fn series(text: &str) -> HashMap<String, f64> {
    let body = text.split_once("\r\n\r\n").map_or(text, |(_, b)| b);
    let mut out = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let key = match key.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort_unstable();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => key.to_string(),
        };
        out.insert(key, value.parse().unwrap_or(f64::NAN));
    }
    out
}

/// `name{a="x",b="y"}` with the labels sorted, as [`series`] keys them.
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    l.sort_unstable();
    format!("{name}{{{}}}", l.join(","))
}

fn value(s: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.get(&key(name, labels)).copied()
}

/// The metric families SPEC.md's table names, plus the four README adds.
const FAMILIES: [&str; 25] = [
    "postern_smtp_connections_total",
    "postern_smtp_sessions_active",
    "postern_messages_received_total",
    "postern_verdicts_total",
    "postern_ratelimited_total",
    "postern_auth_results_total",
    "postern_rule_errors_total",
    "postern_rule_seconds",
    "postern_queue_messages",
    "postern_quarantine_messages",
    "postern_delivery_attempts_total",
    "postern_delivery_seconds",
    "postern_bounces_total",
    "postern_mailbox_logins_total",
    "postern_config_reloads_total",
    "postern_rule_verdicts_total",
    "postern_scan_results_total",
    "postern_digests_sent_total",
    "postern_releases_total",
    "postern_ratelimit_backend_up",
    "postern_build_info",
    "postern_queue_oldest_age_seconds",
    "postern_smtp_tls_sessions_total",
    "postern_recipient_verify_total",
    "postern_dsn_suppressed_total",
];

const RULE: &str = r#"
fn data(m) {
    if m.subject == "boom" { throw "a deliberate rule error"; }
    if m.subject == "[hold]" { return quarantine("ops test"); }
}
"#;

const LIMIT: &str = r#"
[[limit]]
name  = "per-sender"
key   = "sender"
rate  = "2/1h"
burst = 2
scope = "inbound"
"#;

fn ops_opts(dns: std::net::SocketAddr) -> Opts {
    Opts {
        dns: Some(dns),
        rules: vec![("50-ops.rhai".into(), RULE.into())],
        ratelimits: LIMIT.into(),
        users: vec![(
            "alice".into(),
            "alice-pw".into(),
            vec!["alice@local.test".into()],
            "user".into(),
        )],
        ..Opts::default()
    }
}

/// One message from an outside client; the reply after the final dot (or
/// the first refusal).
async fn send(gw: &Gateway, from: &str, subject: &str) -> String {
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO outside.test").await;
    let data = format!(
        "From: <{from}>\r\nTo: <alice@local.test>\r\nSubject: {subject}\r\nMessage-ID: <{subject}.{from}>\r\n\r\nhello\r\n"
    );
    let r = c
        .try_mail(from, "alice@local.test", data.as_bytes())
        .await
        .unwrap_or_else(|e| e);
    c.cmd("QUIT").await;
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn first_scrape_has_every_family_at_zero_and_traffic_moves_them() {
    let dns = start_dns(&[]).await;
    let gw = Gateway::start(ops_opts(dns)).await;
    let text = gw.metrics_text().await;
    let s = series(&text);
    for family in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no {family} on the first scrape:\n{text}"
        );
    }
    // The series every dashboard panel and alert needs, at 0 before any mail.
    let zero: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "postern_messages_received_total",
            vec![("listener", "relay")],
        ),
        (
            "postern_messages_received_total",
            vec![("listener", "submissions")],
        ),
        (
            "postern_smtp_sessions_active",
            vec![("listener", "submission")],
        ),
        (
            "postern_smtp_tls_sessions_total",
            vec![("listener", "relay")],
        ),
        (
            "postern_verdicts_total",
            vec![("verdict", "quarantine"), ("stage", "data")],
        ),
        (
            "postern_verdicts_total",
            vec![("verdict", "reject"), ("stage", "connect")],
        ),
        (
            "postern_auth_results_total",
            vec![("method", "dmarc"), ("result", "fail")],
        ),
        (
            "postern_auth_results_total",
            vec![("method", "spf"), ("result", "softfail")],
        ),
        ("postern_rule_errors_total", vec![("script", "50-ops.rhai")]),
        (
            "postern_rule_verdicts_total",
            vec![
                ("script", "50-ops.rhai"),
                ("verdict", "quarantine"),
                ("shadow", "false"),
            ],
        ),
        (
            "postern_rule_seconds_count",
            vec![("script", "50-ops.rhai")],
        ),
        ("postern_ratelimited_total", vec![("limit", "per-sender")]),
        ("postern_queue_messages", vec![("state", "deferred")]),
        ("postern_quarantine_messages", vec![]),
        (
            "postern_delivery_attempts_total",
            vec![("result", "permfail"), ("tls", "no")],
        ),
        ("postern_delivery_seconds_count", vec![]),
        ("postern_bounces_total", vec![]),
        (
            "postern_mailbox_logins_total",
            vec![("protocol", "imap"), ("result", "fail")],
        ),
        ("postern_config_reloads_total", vec![("result", "error")]),
        (
            "postern_scan_results_total",
            vec![("scanner", "clamd"), ("result", "infected")],
        ),
        ("postern_digests_sent_total", vec![]),
        ("postern_releases_total", vec![("via", "cli")]),
        ("postern_releases_total", vec![("via", "imap")]),
        ("postern_queue_oldest_age_seconds", vec![]),
    ];
    for (name, labels) in &zero {
        assert_eq!(
            value(&s, name, labels),
            Some(0.0),
            "{} is not 0 on the first scrape:\n{text}",
            key(name, labels)
        );
    }
    assert_eq!(value(&s, "postern_ratelimit_backend_up", &[]), Some(1.0));
    assert_eq!(
        value(
            &s,
            "postern_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{text}"
    );
    // Rule time from 5 µs, delivery time from 5 ms.
    assert!(text.contains("postern_rule_seconds_bucket{script=\"50-ops.rhai\",le=\"0.000005\"} 0"));
    assert!(text.contains("postern_delivery_seconds_bucket{le=\"0.005\"} 0"));
    promtool_check(&text);

    // Traffic: accepted and delivered, held, a rule error, rate-limited.
    assert!(send(&gw, "one@far.test", "plain").await.starts_with("250"));
    assert!(send(&gw, "two@far.test", "[hold]").await.starts_with("250"));
    assert!(send(&gw, "three@far.test", "boom").await.starts_with("451"));
    for _ in 0..2 {
        send(&gw, "flood@far.test", "plain").await;
    }
    assert!(send(&gw, "flood@far.test", "plain").await.starts_with('4'));
    assert!(
        eventually(Duration::from_secs(10), || gw
            .maildir_files("alice@local.test")
            .len()
            == 3)
        .await
    );
    let (id, _) = gw.first_held();
    let (ok, out, err) = gw.admin(&["quarantine", "release", &id]);
    assert!(ok, "release {id}: {out}{err}");
    assert!(
        eventually(Duration::from_secs(10), || gw
            .maildir_files("alice@local.test")
            .len()
            == 4)
        .await
    );
    let text = gw.metrics_text().await;
    let s = series(&text);
    let at_least = |name: &str, labels: &[(&str, &str)], min: f64| {
        let v = value(&s, name, labels).unwrap_or(0.0);
        assert!(
            v >= min,
            "{} = {v}, want >= {min}:\n{text}",
            key(name, labels)
        );
    };
    at_least(
        "postern_messages_received_total",
        &[("listener", "relay")],
        4.0,
    );
    at_least(
        "postern_verdicts_total",
        &[("verdict", "quarantine"), ("stage", "data")],
        1.0,
    );
    at_least(
        "postern_auth_results_total",
        &[("method", "spf"), ("result", "none")],
        4.0,
    );
    at_least(
        "postern_rule_errors_total",
        &[("script", "50-ops.rhai")],
        1.0,
    );
    at_least(
        "postern_rule_verdicts_total",
        &[
            ("script", "50-ops.rhai"),
            ("verdict", "error"),
            ("shadow", "false"),
        ],
        1.0,
    );
    at_least(
        "postern_rule_verdicts_total",
        &[
            ("script", "50-ops.rhai"),
            ("verdict", "none"),
            ("shadow", "false"),
        ],
        3.0,
    );
    at_least(
        "postern_rule_seconds_count",
        &[("script", "50-ops.rhai")],
        5.0,
    );
    at_least("postern_ratelimited_total", &[("limit", "per-sender")], 1.0);
    at_least(
        "postern_delivery_attempts_total",
        &[("result", "ok"), ("tls", "no")],
        4.0,
    );
    at_least("postern_releases_total", &[("via", "cli")], 1.0);
    assert_eq!(value(&s, "postern_quarantine_messages", &[]), Some(0.0));
    promtool_check(&text);
}

/// `promtool check metrics` on a scrape, when Debian's prometheus package
/// is installed (`.ci/run` installs it).
fn promtool_check(scrape: &str) {
    let body = scrape.split_once("\r\n\r\n").map_or(scrape, |(_, b)| b);
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!(
            "skipping `promtool check metrics`: promtool is not installed (Debian: prometheus)"
        );
        return;
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw `GET /metrics` with optional extra header lines; the whole answer.
async fn get_metrics(port: u16, header: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: x\r\n{header}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_token_is_required_when_set() {
    let gw = Gateway::start(Opts {
        extra: "token = \"s3cret-token\"".into(),
        ..Opts::default()
    })
    .await;
    let none = get_metrics(gw.metrics, "").await;
    assert!(none.starts_with("HTTP/1.0 401"), "{none}");
    assert!(none.contains("www-authenticate: Bearer"), "{none}");
    assert!(!none.contains("postern_"), "{none}");
    let wrong = get_metrics(gw.metrics, "Authorization: Bearer s3cret-tokeX\r\n").await;
    assert!(wrong.starts_with("HTTP/1.0 401"), "{wrong}");
    let good = get_metrics(gw.metrics, "Authorization: Bearer s3cret-token\r\n").await;
    assert!(good.starts_with("HTTP/1.0 200"), "{good}");
    assert!(good.contains("postern_build_info"), "{good}");
}

const LOGINS: &str = r#"
import imaplib, poplib, ssl, sys
imap_port, pop3_port = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
m = imaplib.IMAP4('127.0.0.1', imap_port, timeout=10)
m.starttls(ctx)
try:
    m.login('alice', 'wrong-password')
except imaplib.IMAP4.error as e:
    print('imap refused', e)
m.login('alice', 'alice-pw')
m.logout()
p = poplib.POP3('127.0.0.1', pop3_port, timeout=10)
p.stls(ctx)
p.user('alice'); p.pass_('alice-pw')
p.quit()
print('done')
"#;

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_have_one_object_per_event() {
    let dns = start_dns(&[]).await;
    let mut gw = Gateway::start(ops_opts(dns)).await;
    // Run it again on the same directory, logging JSON.
    gw.term();
    let json_log = gw.dir.path().join("json.log");
    let child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(gw.config_path())
        .env("POSTERN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&json_log).unwrap())
        .spawn()
        .unwrap();
    gw.child = Some(child);
    assert!(
        eventually(Duration::from_secs(20), || std::net::TcpStream::connect((
            "127.0.0.1",
            gw.smtp
        ))
        .is_ok())
        .await
    );
    assert!(send(&gw, "one@far.test", "plain").await.starts_with("250"));
    assert!(
        eventually(Duration::from_secs(10), || gw
            .maildir_files("alice@local.test")
            .len()
            == 1)
        .await
    );
    let (imap, pop3) = (gw.imap.to_string(), gw.pop3.to_string());
    let out = tokio::task::spawn_blocking(move || python(LOGINS, &[&imap, &pop3]))
        .await
        .unwrap();
    assert!(
        out.contains("imap refused") && out.contains("done"),
        "{out}"
    );
    gw.term();

    let text = std::fs::read_to_string(&json_log).unwrap();
    let mut events: Vec<serde_json::Value> = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        for field in ["timestamp", "level", "message"] {
            assert!(v.get(field).is_some(), "no {field}: {line}");
        }
        events.push(v);
    }
    let find = |message: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|v| v["message"] == message).collect()
    };
    // SMTP sessions: start and end, inside the session span.
    let starts = find("SMTP session start");
    assert!(!starts.is_empty(), "{text}");
    let span = &starts[0]["span"];
    assert_eq!(span["name"], "session", "{text}");
    assert_eq!(span["listener"], "relay", "{text}");
    assert!(
        span["peer"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:"),
        "{text}"
    );
    assert!(span["id"].is_number(), "{text}");
    let ends = find("SMTP session end");
    assert!(ends.iter().any(|e| e["helo"] == "outside.test"), "{text}");
    // The message decision.
    let decided = find("message decision");
    assert_eq!(decided.len(), 1, "{text}");
    let d = decided[0];
    assert_eq!(d["from"], "one@far.test");
    assert_eq!(d["rcpts"], 1);
    assert!(d["size"].as_u64().unwrap_or(0) > 50, "{d}");
    assert_eq!(d["verdict"], "accept");
    assert_eq!(d["result"], "queued");
    assert_eq!(d["spf"], "none");
    assert_eq!(d["tls"], false);
    let qid = d["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(qid.len(), 16, "{d}");
    // The delivery attempt of that message.
    let attempts = find("delivery attempt");
    let a = attempts
        .iter()
        .find(|a| a["id"] == qid.as_str())
        .unwrap_or_else(|| panic!("no delivery attempt for {qid}:\n{text}"));
    assert_eq!(a["result"], "ok");
    assert!(a["host"].as_str().unwrap_or("").contains("maildir"), "{a}");
    assert!(a["duration_ms"].is_number(), "{a}");
    assert_eq!(a["span"]["name"], "delivery", "{a}");
    // Mailbox logins, good and bad; never a password.
    let good = find("mailbox login");
    assert!(
        good.iter()
            .any(|e| e["protocol"] == "imap" && e["login"] == "alice"),
        "{text}"
    );
    assert!(good.iter().any(|e| e["protocol"] == "pop3"), "{text}");
    let bad = find("mailbox login failed");
    assert!(bad.iter().any(|e| e["login"] == "alice"), "{text}");
    assert!(!text.contains("alice-pw") && !text.contains("wrong-password"));
    assert!(!text.contains("hello"), "a message body reached the log");
}
