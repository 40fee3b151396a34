//! Rules, rate limits and reloads (no DNS: checks off).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use postern::config::{OnError, RulesConfig};
use postern::mail::{Enhanced, Reply};
use postern::policy::{Verdict, watch};

const STAGES: &str = r#"
fn pick(word) {
    switch word {
        "reject" => reject(554, "no thanks"),
        "tempfail" => tempfail("4.2.0 later"),
        "quarantine" => quarantine("held"),
        "discard" => discard(),
        "accept" => accept(),
        _ => ()
    }
}
fn connect(c) {
    let words = ["", "reject", "tempfail", "quarantine", "discard", "accept"];
    if c.port < words.len() { return pick(words[c.port]); }
}
fn mail_from(c) { pick(c.from.split("@")[0]) }
fn rcpt(c) { pick(c.rcpt.split("@")[0]) }
fn data(m) {
    if m.subject == "score" {
        m.score(6, "first");
        m.score(4.5, "second");
        m.add_header("X-Seen", m.from_domain + " " + m.rcpt.len() + " " + m.header("x-custom") + " " + m.headers("received").len());
        return;
    }
    if m.subject == "fields" {
        m.add_header("X-Fields", `${m.ip}|${m.helo}|${m.tls}|${m.size > 0}|${m.body.contains("Hello world")}|${m.spf}|${m.dkim}|${m.dmarc}|${m.auth_user}`);
        return;
    }
    pick(m.subject)
}
"#;

fn verdict_of(word: &str, code_reject: u16, stage_text: bool) -> Option<Verdict> {
    let _ = stage_text;
    Some(match word {
        "reject" => Verdict::Reject(Reply::new(code_reject, Enhanced::new(5, 7, 1), "no thanks")),
        "tempfail" => Verdict::Tempfail(Reply::new(451, Enhanced::new(4, 2, 0), "later")),
        "quarantine" => Verdict::Quarantine {
            reason: "held".into(),
        },
        "discard" => Verdict::Discard,
        "accept" => Verdict::Accept,
        _ => return None,
    })
}

#[tokio::test]
async fn every_verdict_at_every_stage() {
    let dirs = Dirs::new(&[("50-stages.rhai", STAGES)], "");
    let policy = dirs.load_rules_only();
    let set = policy.current();
    let words = [
        "none",
        "reject",
        "tempfail",
        "quarantine",
        "discard",
        "accept",
    ];
    for (port, word) in words.iter().enumerate() {
        let d = set.connect(&conn("192.0.2.1", port as u16));
        assert_eq!(d.verdict, verdict_of(word, 554, false), "connect {word}");
        if d.verdict.is_some() {
            assert_eq!(d.script.as_deref(), Some("50-stages.rhai"));
            assert_eq!(d.function.as_deref(), Some("connect"));
        } else {
            assert_eq!(d.script, None);
            assert_eq!(d.function, None);
        }
        // The trace has the one call, whatever it said.
        assert_eq!(d.trace.stage, "connect");
        assert_eq!(d.trace.calls.len(), 1);
        assert_eq!(d.trace.calls[0].script, "50-stages.rhai");
        assert_eq!(d.trace.calls[0].verdict, *word);
    }
    for word in words {
        let from = format!("{word}@x.test");
        let t = tx("192.0.2.1", "h.test", &from, &[]);
        let d = set.mail_from(&t);
        assert_eq!(d.verdict, verdict_of(word, 554, false), "mail_from {word}");
        if d.verdict.is_some() {
            assert_eq!(d.function.as_deref(), Some("mail_from"));
        }
        let t = tx("192.0.2.1", "h.test", "ok@x.test", &[]);
        let d = set.rcpt(&t, &format!("{word}@y.test"));
        assert_eq!(d.verdict, verdict_of(word, 554, false), "rcpt {word}");
        let msg = message("ok@x.test", "b@y.test", word, "body");
        let out = set.data(&t, msg.as_bytes()).await;
        let want = verdict_of(word, 554, false).unwrap_or(Verdict::Accept);
        assert_eq!(out.verdict, want, "data {word}");
        assert_eq!(out.script.is_some(), word != "none");
        assert_eq!(out.headers[0].0, "Authentication-Results");
        assert_eq!(out.headers[0].1, "mx.postern.test; none");
    }
}

#[tokio::test]
async fn score_quarantines_and_headers_are_added() {
    let dirs = Dirs::new(&[("50-stages.rhai", STAGES)], "");
    let policy = dirs.load_rules_only();
    let set = policy.current();
    let t = tx(
        "192.0.2.1",
        "h.test",
        "ok@x.test",
        &["a@y.test", "b@y.test"],
    );
    let msg = "Received: one\r\nReceived: two\r\nX-Custom:  folded\r\n value\r\nSubject: score\r\n\r\nbody\r\n";
    let out = set.data(&t, msg.as_bytes()).await;
    assert_eq!(out.score, 10.5);
    assert!(
        matches!(&out.verdict, Verdict::Quarantine { reason } if reason.contains("first") && reason.contains("second")),
        "{out:?}"
    );
    assert_eq!(
        out.headers[1],
        ("X-Seen".to_string(), "x.test 2 folded value 2".to_string())
    );

    let mut t = tx("192.0.2.9", "helo.test", "ok@x.test", &["a@y.test"]);
    t.auth_user = Some("alice".into());
    t.conn.tls = true;
    let out = set
        .data(
            &t,
            message("ok@x.test", "a@y.test", "fields", "Hello world").as_bytes(),
        )
        .await;
    assert_eq!(out.verdict, Verdict::Accept);
    assert_eq!(
        out.headers[1].1,
        "192.0.2.9|helo.test|true|true|true|none|none|none|alice"
    );
}

#[tokio::test]
async fn bad_verdict_arguments_are_errors() {
    let dirs = Dirs::new(
        &[
            (
                "10-bad-code.rhai",
                "fn mail_from(c) { reject(450, \"nope\") }",
            ),
            (
                "20-header.rhai",
                "fn data(m) { m.add_header(\"X-A\", \"a\\r\\nBcc: x\"); }",
            ),
        ],
        "",
    );
    let policy = dirs.load_rules_only();
    let set = policy.current();
    let d = set.mail_from(&tx("192.0.2.1", "h", "a@b.test", &[]));
    assert_eq!(d.script.as_deref(), Some("10-bad-code.rhai"));
    assert!(matches!(
        d.verdict,
        Some(Verdict::Tempfail(Reply { code: 451, .. }))
    ));
    let out = set
        .data(
            &tx("192.0.2.1", "h", "a@b.test", &["c@d.test"]),
            b"Subject: x\r\n\r\ny\r\n",
        )
        .await;
    assert_eq!(out.script.as_deref(), Some("20-header.rhai"));
    assert_eq!(out.headers.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_script_tempfails_quickly_while_others_run() {
    let dirs = Dirs::new(
        &[(
            "40-loop.rhai",
            "fn data(m) { if m.subject == \"loop\" { loop {} } }\nfn rcpt(c) { if c.rcpt == \"loop@x.test\" { let i = 0; loop { i += 1; } } }",
        )],
        "",
    );
    let policy = Arc::new(dirs.load_rules_only());
    let set = policy.current();
    let t = tx("192.0.2.1", "h.test", "a@x.test", &["b@y.test"]);

    let started = Instant::now();
    let looping = {
        let set = set.clone();
        let t = t.clone();
        tokio::spawn(async move {
            set.data(&t, message("a@x.test", "b@y.test", "loop", "x").as_bytes())
                .await
        })
    };
    // Meanwhile ordinary messages go through.
    let mut normal = Vec::new();
    for i in 0..8 {
        let set = set.clone();
        let t = t.clone();
        normal.push(tokio::spawn(async move {
            set.data(
                &t,
                message("a@x.test", "b@y.test", &format!("n{i}"), "x").as_bytes(),
            )
            .await
        }));
    }
    for h in normal {
        assert_eq!(h.await.expect("join").verdict, Verdict::Accept);
    }
    let out = looping.await.expect("join");
    assert!(
        matches!(&out.verdict, Verdict::Tempfail(r) if r.code == 451 && r.enhanced.is_some_and(|e| e.class == 4)),
        "{out:?}"
    );
    assert_eq!(out.script.as_deref(), Some("40-loop.rhai"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The same at RCPT (synchronous): bounded by max_operations.
    let started = Instant::now();
    let d = set.rcpt(&t, "loop@x.test");
    assert!(matches!(
        d.verdict,
        Some(Verdict::Tempfail(Reply { code: 451, .. }))
    ));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        policy
            .metrics()
            .rule_errors
            .with_label_values(&["40-loop.rhai"])
            .get(),
        2
    );
}

#[tokio::test]
async fn runtime_error_is_counted_under_the_script_name_and_follows_on_error() {
    let scripts = [
        (
            "10-broken.rhai",
            "fn mail_from(c) { let x = c.from.len() / 0; }",
        ),
        (
            "20-after.rhai",
            "fn mail_from(c) { reject(550, \"5.7.1 from the second script\") }",
        ),
    ];
    let dirs = Dirs::new(&scripts, "");
    let policy = dirs.load_rules_only();
    let d = policy
        .current()
        .mail_from(&tx("192.0.2.1", "h", "a@b.test", &[]));
    assert_eq!(d.script.as_deref(), Some("10-broken.rhai"));
    assert!(matches!(
        d.verdict,
        Some(Verdict::Tempfail(Reply { code: 451, .. }))
    ));
    assert_eq!(
        policy
            .metrics()
            .rule_errors
            .with_label_values(&["10-broken.rhai"])
            .get(),
        1
    );

    // on_error = accept: the broken script is skipped, the next decides.
    let cfg = RulesConfig {
        on_error: OnError::Accept,
        ..RulesConfig::default()
    };
    let policy = dirs.load(cfg, no_checks(), Vec::new()).expect("load");
    let d = policy
        .current()
        .mail_from(&tx("192.0.2.1", "h", "a@b.test", &[]));
    assert_eq!(d.script.as_deref(), Some("20-after.rhai"));
    assert!(matches!(
        d.verdict,
        Some(Verdict::Reject(Reply { code: 550, .. }))
    ));

    // on_error = quarantine.
    let cfg = RulesConfig {
        on_error: OnError::Quarantine,
        ..RulesConfig::default()
    };
    let policy = dirs.load(cfg, no_checks(), Vec::new()).expect("load");
    let d = policy
        .current()
        .mail_from(&tx("192.0.2.1", "h", "a@b.test", &[]));
    assert!(
        matches!(&d.verdict, Some(Verdict::Quarantine { reason }) if reason.contains("10-broken.rhai"))
    );
}

#[test]
fn sandbox_refuses_eval_and_reports_lines() {
    let dirs = Dirs::new(
        &[
            ("10-ok.rhai", "fn data(m) { }"),
            ("20-eval.rhai", "fn data(m) {\n  eval(\"1\")\n}"),
            ("30-syntax.rhai", "fn data(m) {\n\n  let = 1;\n}"),
            ("40-arity.rhai", "fn rcpt() { }"),
        ],
        "[[limit]]\nname = \"a\"\nkey = \"sender\"\nrate = \"oops\"\n",
    );
    let problems = dirs
        .load(RulesConfig::default(), no_checks(), Vec::new())
        .err()
        .expect("must fail");
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 4, "{text:#?}");
    let find = |file: &str| {
        problems
            .iter()
            .find(|p| p.file.ends_with(file))
            .unwrap_or_else(|| panic!("no problem for {file}: {text:#?}"))
    };
    assert_eq!(find("20-eval.rhai").line, Some(2));
    assert_eq!(find("30-syntax.rhai").line, Some(3));
    assert!(find("40-arity.rhai").message.contains("one parameter"));
    assert_eq!(find("ratelimits.toml").line, Some(4));
}

/// Collects what tracing writes.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn print_and_errors_go_to_tracing_with_the_script_name() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let dirs = Dirs::new(
        &[(
            "70-chatty.rhai",
            "fn connect(c) { print(\"hello from the script\"); undefined_function(); }",
        )],
        "",
    );
    let policy = dirs.load_rules_only();
    let d = tracing::subscriber::with_default(subscriber, || {
        policy.current().connect(&conn("192.0.2.1", 25))
    });
    assert_eq!(d.script.as_deref(), Some("70-chatty.rhai"));
    let log = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
    assert!(log.contains("print: hello from the script"), "{log}");
    assert!(log.contains("rule error in 70-chatty.rhai"), "{log}");
    assert!(log.contains("undefined_function"), "{log}");
}

#[test]
fn eval_cannot_be_reached_through_a_function_pointer() {
    let dirs = Dirs::new(
        &[(
            "10-sneaky.rhai",
            "fn connect(c) { let f = Fn(\"eval\"); f.call(\"reject(550, \\\"evaluated\\\")\") }",
        )],
        "",
    );
    let policy = dirs.load_rules_only();
    let d = policy.current().connect(&conn("192.0.2.1", 25));
    assert!(!matches!(d.verdict, Some(Verdict::Reject(_))), "{d:?}");
}

#[test]
fn import_has_no_resolver() {
    let dirs = Dirs::new(
        &[(
            "10-p.rhai",
            "fn connect(c) { print(\"hello\"); debug(\"x\"); import \"std\" as s; }",
        )],
        "",
    );
    let policy = dirs.load_rules_only();
    let d = policy.current().connect(&conn("192.0.2.1", 25));
    // The import has no resolver: a runtime error, on_error = tempfail.
    assert!(matches!(d.verdict, Some(Verdict::Tempfail(_))), "{d:?}");
}

const LIMITS: &str = r#"
[[limit]]
name = "per-sender"
key = "sender"
rate = "2/1h"
burst = 2

[[limit]]
name = "per-rcpt"
key = "recipient"
rate = "1/1h"
burst = 1
scope = "all"
"#;

#[test]
fn rate_limit_shares_a_bucket_across_tags_and_case() {
    let dirs = Dirs::new(&[], LIMITS);
    let policy = dirs.load_rules_only();
    let set = policy.current();
    assert!(
        set.mail_from(&tx("192.0.2.1", "h", "alice+one@example.test", &[]))
            .verdict
            .is_none()
    );
    assert!(
        set.mail_from(&tx("192.0.2.2", "h", "Alice+two@EXAMPLE.test", &[]))
            .verdict
            .is_none()
    );
    let d = set.mail_from(&tx("192.0.2.3", "h", "alice@example.test", &[]));
    match &d.verdict {
        Some(Verdict::Tempfail(r)) if r.code == 450 => {
            assert!(
                r.enhanced == Some(Enhanced::new(4, 7, 1)) && r.text.contains("try again in"),
                "{r}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.script.as_deref(), Some("ratelimit:per-sender"));
    assert_eq!(
        policy
            .metrics()
            .ratelimited
            .with_label_values(&["per-sender"])
            .get(),
        1
    );
    // Another sender has its own bucket.
    assert!(
        set.mail_from(&tx("192.0.2.1", "h", "bob@example.test", &[]))
            .verdict
            .is_none()
    );
    // Bounces count by client IP.
    for _ in 0..2 {
        assert!(
            set.mail_from(&tx("192.0.2.50", "h", "", &[]))
                .verdict
                .is_none()
        );
    }
    assert!(
        set.mail_from(&tx("192.0.2.50", "h", "", &[]))
            .verdict
            .is_some()
    );
    assert!(
        set.mail_from(&tx("192.0.2.51", "h", "", &[]))
            .verdict
            .is_none()
    );
    // Submission is out of scope of an inbound limit.
    let mut sub = tx("192.0.2.1", "h", "alice@example.test", &[]);
    sub.submission = true;
    assert!(set.mail_from(&sub).verdict.is_none());
    // Recipients are limited at RCPT.
    let t = tx("192.0.2.1", "h", "carol@example.test", &[]);
    assert!(set.rcpt(&t, "Boss+x@example.test").verdict.is_none());
    let d = set.rcpt(&t, "boss@example.test");
    assert!(matches!(
        d.verdict,
        Some(Verdict::Tempfail(Reply { code: 450, .. }))
    ));
    assert_eq!(d.function.as_deref(), Some("rcpt"));
    assert!(policy.housekeeping() >= 1);
}

#[test]
fn reload_swaps_and_a_failed_reload_keeps_the_old_set() {
    let dirs = Dirs::new(
        &[("10-a.rhai", "fn mail_from(c) { reject(550, \"old\") }")],
        LIMITS,
    );
    let policy = dirs.load_rules_only();
    let old = policy.current();
    assert_eq!(old.generation(), 1);
    // Use up a limiter bucket.
    let t = tx("192.0.2.1", "h", "x@example.test", &[]);
    assert!(old.rcpt(&t, "r@example.test").verdict.is_none());

    dirs.write_rule("10-a.rhai", "fn mail_from(c) { reject(550, \"new\") }");
    policy.reload().expect("reload");
    let new = policy.current();
    assert_eq!(new.generation(), 2);
    let n = std::cell::Cell::new(0);
    let text = |set: &postern::policy::RuleSet| {
        n.set(n.get() + 1);
        let t = tx("192.0.2.1", "h", &format!("s{}@example.test", n.get()), &[]);
        match set.mail_from(&t).verdict {
            // The enhanced code and text, as the text-only verdict read.
            Some(Verdict::Reject(r)) => format!("{} {}", r.enhanced.expect("enhanced"), r.text),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(text(&new), "5.7.1 new");
    // A session that started before keeps its set.
    assert_eq!(text(&old), "5.7.1 old");
    // The unchanged limit kept its state over the reload.
    assert!(new.rcpt(&t, "r@example.test").verdict.is_some());

    // A broken script: reload fails, naming file and line; the set stays.
    dirs.write_rule("20-b.rhai", "fn data(m) {\n  if {\n}");
    let problems = policy.reload().expect_err("must fail");
    assert!(
        problems
            .iter()
            .any(|p| p.file.ends_with("20-b.rhai") && p.line.is_some()),
        "{problems:?}"
    );
    assert_eq!(policy.current().generation(), 2);
    assert_eq!(text(&policy.current()), "5.7.1 new");
    // A broken limits file fails too.
    std::fs::remove_file(dirs.rules().join("20-b.rhai")).expect("rm");
    dirs.write_limits(
        "[[limit]]\nname = \"x\"\nkey = \"sender\"\nrate = \"1/1h\"\nscope = \"everywhere\"\n",
    );
    let problems = policy.reload().expect_err("must fail");
    assert_eq!(problems[0].line, Some(5), "{problems:?}");
    assert_eq!(
        policy.current().limit_names(),
        vec!["per-sender", "per-rcpt"]
    );

    let m = &policy.metrics().config_reloads;
    assert_eq!(m.with_label_values(&["ok"]).get(), 1);
    assert_eq!(m.with_label_values(&["error"]).get(), 2);

    // A changed limit starts afresh.
    dirs.write_limits(&LIMITS.replace("rate = \"1/1h\"", "rate = \"2/1h\""));
    policy.reload().expect("reload");
    assert!(
        policy
            .current()
            .rcpt(&t, "r@example.test")
            .verdict
            .is_none()
    );
}

#[tokio::test]
async fn watch_reloads_on_file_change() {
    let dirs = Dirs::new(&[("10-a.rhai", "fn connect(c) { }")], "");
    let policy = Arc::new(dirs.load_rules_only());
    let task = watch(policy.clone(), policy.dirs());
    tokio::time::sleep(Duration::from_millis(300)).await;
    dirs.write_rule("20-b.rhai", "fn connect(c) { reject(554, \"closed\") }");
    let started = Instant::now();
    while policy.current().generation() < 2 {
        assert!(started.elapsed() < Duration::from_secs(5), "no reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        policy
            .current()
            .connect(&conn("192.0.2.1", 25))
            .verdict
            .is_some()
    );
    task.abort();
}

#[test]
fn shipped_set_loads() {
    let policy = postern::policy::Policy::load(
        RulesConfig {
            dir: shipped_rules(),
            ..RulesConfig::default()
        },
        shipped_policies(),
        no_checks(),
        postern::config::DnsConfig::default(),
        "mx.postern.test",
    )
    .unwrap_or_else(|p| panic!("{p:?}"));
    let set = policy.current();
    assert_eq!(
        set.script_names(),
        [
            "05-lists.rhai",
            "10-auth.rhai",
            "20-attachments.rhai",
            "30-tag.rhai",
            "40-scan.rhai"
        ]
    );
    assert_eq!(set.limit_names().len(), 4);
}

#[test]
fn wall_clock_and_size_limits_stop_scripts() {
    let dirs = Dirs::new(
        &[(
            "10-heavy.rhai",
            "fn connect(c) { if c.port == 1 { loop {} } let s = \"xxxxxxxx\"; loop { s += s; } }",
        )],
        "",
    );
    // Operations practically unlimited: the wall-clock bound stops it.
    let cfg = RulesConfig {
        max_operations: u64::MAX,
        ..RulesConfig::default()
    };
    let policy = dirs.load(cfg, no_checks(), Vec::new()).expect("load");
    let started = Instant::now();
    let d = policy.current().connect(&conn("192.0.2.1", 1));
    let took = started.elapsed();
    assert!(matches!(d.verdict, Some(Verdict::Tempfail(_))), "{d:?}");
    assert!(
        took < postern::policy::CALL_TIME_LIMIT + Duration::from_secs(2),
        "{took:?}"
    );
    // A string doubling forever hits the string size limit quickly.
    let started = Instant::now();
    let d = policy.current().connect(&conn("192.0.2.1", 2));
    assert!(matches!(d.verdict, Some(Verdict::Tempfail(_))), "{d:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn many_distinct_senders_do_not_pile_up() {
    let dirs = Dirs::new(
        &[],
        "[[limit]]\nname = \"fast\"\nkey = \"sender\"\nrate = \"1000/1s\"\nburst = 1\n",
    );
    let policy = dirs.load_rules_only();
    let set = policy.current();
    for i in 0..50_000 {
        let t = tx("192.0.2.1", "h", &format!("user{i}@spam.test"), &[]);
        assert!(set.mail_from(&t).verdict.is_none());
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(policy.housekeeping(), 0);
}

#[tokio::test]
async fn async_variants_give_the_same_answers() {
    let dirs = Dirs::new(&[("50-stages.rhai", STAGES)], LIMITS);
    let policy = dirs.load_rules_only();
    let set = policy.current();
    let d = set.connect_async(&conn("192.0.2.1", 1)).await;
    assert!(matches!(
        d.verdict,
        Some(Verdict::Reject(Reply { code: 554, .. }))
    ));
    let t = tx("192.0.2.1", "h", "discard@x.test", &[]);
    assert_eq!(
        set.mail_from_async(&t).await.verdict,
        Some(Verdict::Discard)
    );
    let t = tx("192.0.2.1", "h", "ok@x.test", &[]);
    assert_eq!(
        set.rcpt_async(&t, "accept@y.test").await.verdict,
        Some(Verdict::Accept)
    );
    // The recipient limit (burst 1) applies before the script.
    let d = set.rcpt_async(&t, "accept@y.test").await;
    assert!(matches!(
        d.verdict,
        Some(Verdict::Tempfail(Reply { code: 450, .. }))
    ));
}

/// A case for `RuleSet::evaluate` from 192.0.2.1 (port 25: no connect
/// verdict), sender `from`, recipients `rcpts`.
fn case(from: &str, rcpts: &[&str]) -> postern::policy::Case {
    postern::policy::Case {
        ip: "192.0.2.1".parse().unwrap(),
        helo: "h.test".into(),
        from: from.into(),
        rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
        auth_user: None,
        tls: false,
        submission: false,
        trusted: false,
        inputs: postern::policy::DataInputs::default(),
    }
}

#[test]
fn offline_evaluation_follows_the_session_rules() {
    let dirs = Dirs::new(&[("50-stages.rhai", STAGES)], "");
    let policy = dirs.load_rules_only();
    let set = policy.current();
    let msg = |subject: &str| message("ok@x.test", "b@y.test", subject, "body");
    // Nothing objects: accept by default, decided at data.
    let e = set.evaluate(&case("ok@x.test", &["b@y.test"]), msg("none").as_bytes());
    assert_eq!(
        (e.verdict.word(), e.decided_by.as_str(), e.stage),
        ("accept", "default", "data")
    );
    // A refused recipient is dropped; the message goes on for the others.
    let e = set.evaluate(
        &case("ok@x.test", &["reject@y.test", "b@y.test"]),
        msg("quarantine").as_bytes(),
    );
    assert_eq!((e.verdict.word(), e.stage), ("quarantine", "data"));
    assert_eq!(
        e.trace
            .stages
            .iter()
            .filter(|s| s.stage.starts_with("rcpt "))
            .count(),
        2
    );
    // Every recipient refused: the transaction ends at RCPT with the refusal.
    let e = set.evaluate(
        &case("ok@x.test", &["tempfail@y.test"]),
        msg("accept").as_bytes(),
    );
    assert_eq!((e.verdict.word(), e.stage), ("tempfail", "rcpt"));
    assert!(!e.trace.stages.iter().any(|s| s.stage == "data"));
    // A quarantine at MAIL sticks over an accept at DATA, a reject at DATA wins.
    let e = set.evaluate(
        &case("quarantine@x.test", &["b@y.test"]),
        msg("accept").as_bytes(),
    );
    assert_eq!(
        (e.verdict.word(), e.stage, e.decided_by.as_str()),
        ("quarantine", "mail_from", "50-stages.rhai")
    );
    let e = set.evaluate(
        &case("discard@x.test", &["b@y.test"]),
        msg("reject").as_bytes(),
    );
    assert_eq!((e.verdict.word(), e.stage), ("reject", "data"));
    // A reject at MAIL ends it before any RCPT.
    let e = set.evaluate(
        &case("reject@x.test", &["b@y.test"]),
        msg("accept").as_bytes(),
    );
    assert_eq!((e.verdict.word(), e.stage), ("reject", "mail_from"));
    assert!(!e.trace.stages.iter().any(|s| s.stage.starts_with("rcpt")));
    // The score quarantines and says so.
    let e = set.evaluate(&case("ok@x.test", &["b@y.test"]), msg("score").as_bytes());
    assert_eq!(
        (e.verdict.word(), e.decided_by.as_str()),
        ("quarantine", "score")
    );
    assert_eq!(e.trace.score, 10.5);
    assert!(e.headers.iter().any(|(n, _)| n == "X-Seen"));
}
