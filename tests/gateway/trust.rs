//! Rules admins can trust (issue 11): rule suites on the command line and
//! at reload, shadow scripts, the decision trace, per-script metrics.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use crate::dns::message;

/// The shipped scripts and the shipped suite (`tests/...`), as rule files.
fn shipped_with_suite() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut out = Vec::new();
    for (sub, prefix) in [(dir.clone(), ""), (dir.join("tests"), "tests/")] {
        for e in std::fs::read_dir(&sub).unwrap().filter_map(Result::ok) {
            let p = e.path();
            if p.is_file() {
                out.push((
                    format!("{prefix}{}", p.file_name().unwrap().to_string_lossy()),
                    std::fs::read_to_string(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    assert!(out.iter().any(|(n, _)| n.starts_with("tests/")));
    out
}

/// A message with an executable attachment.
fn with_exe(from: &str, to: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\
         see attached\r\n--b\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"setup.exe\"\r\n\r\nMZ\r\n--b--\r\n"
    )
}

/// The queue id in a `250 ... queued as ID` reply.
fn queued_id(reply: &str) -> String {
    assert!(reply.starts_with("250"), "not accepted: {reply}");
    reply
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The value of one sample line of the metrics text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_suite_reports_each_case_and_fails_on_a_mismatch() {
    let gw = Gateway::start(Opts {
        rules: shipped_with_suite(),
        ..Opts::default()
    })
    .await;
    let suite = gw.dir.path().join("rules/tests");
    let suite_arg = suite.to_str().unwrap();

    // The shipped suite passes: a row per case, exit 0.
    let (ok, out, err) = gw.admin(&["rules", "test", "--suite", suite_arg]);
    assert!(ok, "shipped suite failed:\n{out}\n{err}");
    let cases = std::fs::read_dir(&suite)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert!(cases >= 10, "only {cases} shipped cases");
    assert!(
        out.contains(&format!("{cases} cases: {cases} passed, 0 failed")),
        "{out}"
    );
    assert!(out.contains("attachments-exe.toml") && out.contains("20-attachments.rhai"));
    let (ok, out, _) = gw.admin(&["check"]);
    assert!(
        ok && out.contains(&format!("{cases} rule suite case(s) passed")),
        "{out}"
    );

    // A case the rules do not meet: FAIL on its row, exit 1; the others pass.
    let other = gw.dir.path().join("other-suite");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(suite.join("plain.eml"), other.join("plain.eml")).unwrap();
    std::fs::write(
        other.join("wrong.toml"),
        "message = \"plain.eml\"\nexpect = \"reject\"\n",
    )
    .unwrap();
    std::fs::write(
        other.join("right.toml"),
        "message = \"plain.eml\"\nspf = \"fail\"\nexpect = \"quarantine\"\nscript = \"10-auth.rhai\"\n",
    )
    .unwrap();
    std::fs::write(
        other.join("wrong-script.toml"),
        "message = \"plain.eml\"\nspf = \"fail\"\nexpect = \"quarantine\"\nscript = \"20-attachments.rhai\"\n",
    )
    .unwrap();
    let (ok, out, _) = gw.admin(&["rules", "test", "--suite", other.to_str().unwrap()]);
    assert!(!ok, "a failing suite exited 0:\n{out}");
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{out}"))
            .to_string()
    };
    assert!(row("wrong.toml").contains("FAIL"), "{out}");
    assert!(row("wrong.toml").contains("accept"), "{out}");
    assert!(row("right.toml").ends_with("ok"), "{out}");
    assert!(
        row("wrong-script.toml").contains("FAIL (expected quarantine by 20-attachments.rhai"),
        "{out}"
    );
    assert!(out.contains("3 cases: 1 passed, 2 failed"), "{out}");

    // A case file that does not read names its file and line.
    std::fs::write(
        other.join("typo.toml"),
        "message = \"plain.eml\"\nexpect = \"quarantine\"\nspff = \"fail\"\n",
    )
    .unwrap();
    let (ok, _, err) = gw.admin(&["rules", "test", "--suite", other.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("typo.toml:3") && err.contains("spff"), "{err}");
    std::fs::write(
        other.join("typo.toml"),
        "message = \"missing.eml\"\nexpect = \"maybe\"\n",
    )
    .unwrap();
    let (ok, _, err) = gw.admin(&["rules", "test", "--suite", other.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("typo.toml:2") && err.contains("\"maybe\""),
        "{err}"
    );
    assert!(
        err.contains("typo.toml:1") && err.contains("missing.eml"),
        "{err}"
    );
}

#[tokio::test]
async fn a_reload_that_breaks_a_suite_case_is_refused() {
    let sink = Sink::start(false).await;
    let mut gw = Gateway::start(Opts {
        rules: shipped_with_suite(),
        ..Opts::sink(sink.port)
    })
    .await;
    let errors = r#"postern_config_reloads_total{result="error"}"#;
    assert_eq!(sample(&gw.metrics_text().await, errors), Some(0.0));

    // An edit that stops the attachment rule holding .exe files.
    let script = gw.dir.path().join("rules/20-attachments.rhai");
    let text = std::fs::read_to_string(&script).unwrap();
    std::fs::write(&script, text.replace("\"exe\", ", "")).unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if sample(&gw.metrics_text().await, errors).unwrap_or(0.0) >= 1.0 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the reload was not refused:\n{}", gw.log_plain());
    let log = gw.log_plain();
    assert!(
        log.contains("attachments-exe.toml") && log.contains("rule suite case fails"),
        "{log}"
    );
    let (ok, _, err) = gw.admin(&["check"]);
    assert!(!ok && err.contains("attachments-exe.toml"), "{err}");

    // The running set still holds the executable.
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO far.test").await;
    let r = c
        .mail(
            "a@far.test",
            &["b@local.test"],
            with_exe("a@far.test", "b@local.test", "setup").as_bytes(),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(list.contains("executable attachment"), "{list}");
    assert_eq!(sink.count(), 0);
    gw.term();
}

#[tokio::test]
async fn shadow_scripts_are_counted_and_traced_never_applied() {
    // Delivery goes nowhere, so accepted mail stays in the queue to be shown.
    let closed = free_port();
    let mut rules = shipped_with_suite();
    rules.push((
        "15-strict.shadow.rhai".into(),
        r#"
fn rcpt(c) { return tempfail("shadow would slow this down"); }
fn data(m) {
    m.score(50, "shadow thinks it is spam");
    m.add_header("X-Shadow", "yes");
    if m.subject.contains("invoice") { return reject(550, "5.7.1 no invoices"); }
}
"#
        .into(),
    ));
    let mut gw = Gateway::start(Opts {
        rules,
        route: format!("smtp://127.0.0.1:{closed}"),
        // Mail stays queued for a closed backend (verification would answer 451).
        relay_extra: "verify_recipients = \"off\"".into(),
        retry: "[\"1h\"]".into(),
        ..Opts::default()
    })
    .await;
    let m0 = gw.metrics_text().await;
    let shadow_reject = r#"postern_rule_verdicts_total{script="15-strict.shadow.rhai",shadow="true",verdict="reject"}"#;
    let shadow_tempfail = r#"postern_rule_verdicts_total{script="15-strict.shadow.rhai",shadow="true",verdict="tempfail"}"#;
    assert_eq!(sample(&m0, shadow_reject), Some(0.0), "{m0}");
    assert_eq!(
        sample(
            &m0,
            r#"postern_rule_verdicts_total{script="20-attachments.rhai",shadow="false",verdict="quarantine"}"#
        ),
        Some(0.0)
    );

    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO far.test").await;
    // RCPT is 250 although the shadow script says tempfail; the score of 50
    // and the reject for "invoice" are not applied either.
    let plain = c
        .mail(
            "a@far.test",
            &["b@local.test"],
            message("a@far.test", "b@local.test", "your invoice", "pay").as_bytes(),
        )
        .await;
    let plain_id = queued_id(&plain);
    let held = c
        .mail(
            "a@far.test",
            &["b@local.test"],
            with_exe("a@far.test", "b@local.test", "setup").as_bytes(),
        )
        .await;
    assert!(held.starts_with("250"), "{held}");

    // The accepted message: queued, no shadow header, trace says why.
    let (ok, show, err) = gw.admin(&["queue", "show", &plain_id]);
    assert!(ok, "{err}");
    assert!(
        !show.lines().any(|l| l.starts_with("X-Shadow")),
        "a shadow header was applied:\n{show}"
    );
    assert!(show.contains("X-Postern-External: yes"), "{show}");
    assert!(show.contains("decision: accept by default"), "{show}");
    let shadow_lines: Vec<&str> = show
        .lines()
        .filter(|l| l.contains("15-strict.shadow.rhai"))
        .collect();
    assert_eq!(shadow_lines.len(), 2, "rcpt and data calls:\n{show}");
    assert!(
        shadow_lines
            .iter()
            .all(|l| l.contains("(shadow, not applied)"))
    );
    assert!(shadow_lines[0].contains("rcpt b@local.test") && shadow_lines[0].contains("tempfail"));
    assert!(shadow_lines[1].contains("data") && shadow_lines[1].contains("reject"));
    assert!(shadow_lines[1].contains("score +50") && shadow_lines[1].contains("[+X-Shadow: yes]"));
    assert!(
        show.contains("checks:   spf=none dkim=none dmarc=none"),
        "{show}"
    );

    // The held message: the trace over `quarantine show` names the deciding
    // script and still shows the shadow's say.
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    let hid = list
        .lines()
        .find(|l| l.contains("executable"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("not held:\n{list}"))
        .to_string();
    let (ok, show, err) = gw.admin(&["quarantine", "show", &hid]);
    assert!(ok, "{err}");
    assert!(
        show.contains("decision: quarantine by 20-attachments.rhai"),
        "{show}"
    );
    let data_lines: Vec<&str> = show.lines().filter(|l| l.contains(" data ")).collect();
    assert!(
        data_lines
            .iter()
            .any(|l| l.contains("10-auth.rhai") && l.contains("none")),
        "{show}"
    );
    assert!(
        data_lines
            .iter()
            .any(|l| l.contains("15-strict.shadow.rhai") && l.contains("none (shadow")),
        "{show}"
    );
    assert!(
        data_lines.iter().any(|l| l.contains("20-attachments.rhai")
            && l.contains("quarantine: executable attachment: setup.exe")),
        "{show}"
    );
    // 30-tag never ran: the stage ended at the quarantine.
    assert!(!show.contains("30-tag.rhai"), "{show}");

    // Counted with shadow="true", and per-script time for every script that ran.
    let m = gw.metrics_text().await;
    assert_eq!(sample(&m, shadow_reject), Some(1.0), "{m}");
    assert_eq!(sample(&m, shadow_tempfail), Some(2.0), "{m}");
    assert_eq!(
        sample(
            &m,
            r#"postern_rule_verdicts_total{script="20-attachments.rhai",shadow="false",verdict="quarantine"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"postern_rule_seconds_count{script="20-attachments.rhai"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"postern_rule_seconds_count{script="15-strict.shadow.rhai"}"#
        ),
        Some(4.0)
    );
    // One log line per decision, with the queue id and who decided.
    let log = gw.log_plain();
    assert!(log.contains("shadow verdict (not applied)"), "{log}");
    let decision = log
        .lines()
        .find(|l| l.contains("message decision") && l.contains(&plain_id))
        .unwrap_or_else(|| panic!("no decision line for {plain_id}:\n{log}"));
    assert!(decision.contains("decided_by=default"), "{decision}");
    gw.term();
}
