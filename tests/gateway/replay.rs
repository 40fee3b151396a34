//! `postern rules replay`: a generated Maildir and mbox, and the copies
//! `keep_recent` kept of real SMTP traffic, against a candidate rule set.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// The shipped rules, written into `dir`, with `20-attachments.rhai`
/// changed by `edit`.
fn rules_into(dir: &Path, edit: impl Fn(String) -> String) {
    std::fs::create_dir_all(dir).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    for e in std::fs::read_dir(&shipped).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "rhai") {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let mut text = std::fs::read_to_string(&p).unwrap();
            if name == "20-attachments.rhai" {
                text = edit(text);
            }
            std::fs::write(dir.join(name), text).unwrap();
        }
    }
}

/// A config that needs no gateway: hostname, rules and empty policies.
fn offline_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("postern.toml");
    std::fs::write(
        &cfg,
        "[server]\nhostname = \"gw.test\"\ndata_dir = \"data\"\n[rules]\ndir = \"rules\"\n[policies]\ndir = \"policies\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/ratelimits.toml"), "").unwrap();
    rules_into(&dir.join("rules"), |t| t);
    cfg
}

/// The candidate: `.exe` is no longer risky, and "URGENT wire" subjects
/// are held (one rule changed).
fn candidate(dir: &Path) {
    rules_into(dir, |t| {
        let t = t.replacen("\"exe\", ", "", 1);
        assert!(!t.contains("\"exe\""), "the shipped rule changed: {t}");
        t.replacen(
            "fn data(m) {",
            "fn data(m) {\n    if m.subject.contains(\"URGENT wire\") {\n        return quarantine(\"wire fraud\");\n    }",
            1,
        )
    });
}

fn replay(cfg: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["rules", "replay", "--config"])
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The changed lines of a report: (id, "old -> new").
fn changed(report: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut on = false;
    for line in report.lines() {
        if line.starts_with("changed: ") {
            on = true;
            continue;
        }
        if on {
            let Some(rest) = line.strip_prefix("  ") else {
                break;
            };
            let id = rest.split_whitespace().next().unwrap().to_string();
            let arrow = rest
                .split("  ")
                .find(|p| p.contains(" -> ") && !p.starts_with('('))
                .unwrap()
                .to_string();
            out.push((id, arrow));
        }
    }
    out
}

/// The RUNNING and CANDIDATE numbers of a verdict row.
fn counts(report: &str, verdict: &str) -> (u64, u64) {
    let line = report
        .lines()
        .find(|l| l.split_whitespace().next() == Some(verdict))
        .unwrap_or_else(|| panic!("no {verdict} row:\n{report}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    (n[0], n[1])
}

/// Message `i` of the generated corpus, and what each set must say of it.
struct Gen {
    text: String,
    running: &'static str,
    candidate: &'static str,
}

fn generate(i: usize) -> Gen {
    let exe = i.is_multiple_of(7);
    let scr = i.is_multiple_of(11);
    let urgent = i.is_multiple_of(5);
    let dmarc_reject = i.is_multiple_of(13);
    let spf_fail = i.is_multiple_of(17);
    let subject = if urgent {
        format!("URGENT wire transfer {i}")
    } else {
        format!("Minutes of meeting {i}")
    };
    let ar = if dmarc_reject {
        "gw.test; spf=pass smtp.mailfrom=far.test; dkim=none; dmarc=fail header.from=far.test policy.dmarc=reject"
    } else if spf_fail {
        "gw.test; spf=fail smtp.mailfrom=far.test; dkim=none; dmarc=none"
    } else {
        "gw.test; spf=pass smtp.mailfrom=far.test; dkim=pass header.d=far.test; dmarc=pass header.from=far.test policy.dmarc=none"
    };
    let mut text = format!(
        "Return-Path: <sender{i}@far.test>\r\nDelivered-To: user{}@local.test\r\nReceived: from mx{i}.far.test ([192.0.2.{}])\r\n\tby gw.test (Postern) with ESMTPS id {i:X};\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\nAuthentication-Results: {ar}\r\nFrom: Sender {i} <sender{i}@far.test>\r\nTo: user{}@local.test\r\nSubject: {subject}\r\nMessage-ID: <{i}@far.test>\r\nMIME-Version: 1.0\r\n",
        i % 9,
        i % 250 + 1,
        i % 9
    );
    let names: Vec<String> = [(exe, "exe"), (scr, "scr")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, ext)| format!("file{i}.{ext}"))
        .collect();
    if names.is_empty() {
        text.push_str("Content-Type: text/plain\r\n\r\nHello, number ");
        text.push_str(&i.to_string());
        // A body line "From " after an empty line: mbox must quote it.
        text.push_str("\r\n\r\nFrom the office.\r\n");
    } else {
        text.push_str("Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n");
        for n in names {
            text.push_str(&format!(
                "--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{n}\"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n"
            ));
        }
        text.push_str("--b--\r\n");
    }
    let running = if dmarc_reject {
        "reject"
    } else if spf_fail || exe || scr {
        "quarantine"
    } else {
        "accept"
    };
    // The candidate's 20-attachments: the subject first, then .scr only.
    let candidate = if dmarc_reject {
        "reject"
    } else if spf_fail || urgent || scr {
        "quarantine"
    } else {
        "accept"
    };
    Gen {
        text,
        running,
        candidate,
    }
}

#[test]
fn replay_a_maildir_lists_exactly_the_changed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = offline_config(dir.path());
    let cand = dir.path().join("candidate");
    candidate(&cand);
    let md = dir.path().join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(md.join(sub)).unwrap();
    }
    const N: usize = 3000;
    let mut want = BTreeSet::new();
    let (mut run_q, mut cand_q, mut rejects) = (0, 0, 0);
    for i in 0..N {
        let g = generate(i);
        let name = format!("1700000000.M{i:05}P1.test");
        // Half read (in cur/, with flags), half new.
        let path = if i.is_multiple_of(2) {
            md.join("cur").join(format!("{name}:2,S"))
        } else {
            md.join("new").join(&name)
        };
        std::fs::write(path, g.text).unwrap();
        if g.running != g.candidate {
            want.insert((name, format!("{} -> {}", g.running, g.candidate)));
        }
        run_q += usize::from(g.running == "quarantine");
        cand_q += usize::from(g.candidate == "quarantine");
        rejects += usize::from(g.running == "reject");
    }
    let (ok, out, err) = replay(
        &cfg,
        &[
            "--rules",
            cand.to_str().unwrap(),
            "--maildir",
            md.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}\n{err}");
    assert!(
        out.starts_with(&format!("replayed {N} message(s) from Maildir")),
        "{out}"
    );
    let got: BTreeSet<(String, String)> = changed(&out).into_iter().collect();
    assert!(!want.is_empty());
    assert_eq!(got, want, "report:\n{out}");
    assert!(
        out.contains(&format!("changed: {} message(s)", want.len())),
        "{out}"
    );
    assert_eq!(
        counts(&out, "quarantine"),
        (run_q as u64, cand_q as u64),
        "{out}"
    );
    assert_eq!(counts(&out, "reject"), (rejects as u64, rejects as u64));
    // Each changed line names the sender and subject, and who decided.
    let line = out
        .lines()
        .find(|l| l.contains("URGENT wire") && l.contains("accept -> quarantine"))
        .unwrap();
    assert!(line.contains("@far.test"), "{line}");
    assert!(line.contains("(default -> 20-attachments.rhai)"), "{line}");
    // The per-script tables of both sets.
    for set in ["running set:", "candidate set:"] {
        assert!(out.contains(set), "{out}");
    }
    let table_line = out
        .lines()
        .find(|l| l.starts_with("10-auth.rhai "))
        .unwrap();
    assert!(table_line.contains(&format!(" {N} ")), "{table_line}");
}

#[test]
fn replay_an_mbox_and_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = offline_config(dir.path());
    let cand = dir.path().join("candidate");
    candidate(&cand);
    // A rule that would see a quoted line the unquoting missed.
    std::fs::write(
        cand.join("90-quoted.rhai"),
        "fn data(m) {\n    if m.body.contains(\">From \") {\n        return reject(550, \"5.7.1 quoted\");\n    }\n}\n",
    )
    .unwrap();
    const N: usize = 200;
    let mut mbox = Vec::new();
    let mut want = BTreeSet::new();
    for i in 0..N {
        let g = generate(i);
        mbox.extend_from_slice(
            format!("From sender{i}@far.test Mon Jan  1 00:00:00 2024\n").as_bytes(),
        );
        // mboxrd: a body line starting "From " is written ">From ".
        let quoted = g
            .text
            .replace("\r\n", "\n")
            .replace("\nFrom the", "\n>From the");
        mbox.extend_from_slice(quoted.as_bytes());
        mbox.extend_from_slice(b"\n");
        if g.running != g.candidate {
            want.insert((
                (i + 1).to_string(),
                format!("{} -> {}", g.running, g.candidate),
            ));
        }
    }
    let file = dir.path().join("mail.mbox");
    std::fs::write(&file, &mbox).unwrap();
    let cand_s = cand.to_str().unwrap();
    let (ok, out, err) = replay(&cfg, &["--rules", cand_s, "--mbox", file.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.starts_with(&format!("replayed {N} message(s) from mbox")),
        "{out}"
    );
    let got: BTreeSet<(String, String)> = changed(&out).into_iter().collect();
    assert_eq!(got, want, "report:\n{out}");
    // The quoted body lines came back unquoted: 90-quoted never objected.
    let quoted = out
        .lines()
        .find(|l| l.starts_with("90-quoted.rhai"))
        .unwrap();
    assert!(quoted.ends_with(" -"), "{quoted}");

    // Clear errors: a missing candidate, a candidate that does not compile,
    // a corpus that is not one.
    let (ok, _, err) = replay(
        &cfg,
        &["--rules", "/nonexistent", "--mbox", file.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(err.contains("/nonexistent"), "{err}");
    std::fs::write(cand.join("95-bad.rhai"), "fn data(m) { let = 1; }\n").unwrap();
    let (ok, _, err) = replay(&cfg, &["--rules", cand_s, "--mbox", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("candidate rules do not load") && err.contains("95-bad.rhai"),
        "{err}"
    );
    std::fs::remove_file(cand.join("95-bad.rhai")).unwrap();
    let (ok, _, err) = replay(
        &cfg,
        &["--rules", cand_s, "--maildir", dir.path().to_str().unwrap()],
    );
    assert!(!ok);
    assert!(err.contains("is not a Maildir"), "{err}");
    let (ok, _, err) = replay(&cfg, &["--rules", cand_s, "--mbox", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("is not an mbox"), "{err}");
    // No store yet: --recent says so.
    let (ok, _, err) = replay(&cfg, &["--rules", cand_s, "--recent", "1h"]);
    assert!(!ok);
    assert!(err.contains("no store"), "{err}");
}

/// Turns `[rules] keep_recent` to `keep` and restarts the gateway.
async fn keep_recent(g: &mut Gateway, keep: &str) {
    if g.child.is_some() {
        assert!(g.term().success());
    }
    let text = std::fs::read_to_string(g.config_path()).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("keep_recent") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.starts_with("quarantine_score") {
            out.push_str(&format!("keep_recent = \"{keep}\"\n"));
        }
    }
    std::fs::write(g.config_path(), out).unwrap();
    g.spawn().await;
}

#[tokio::test]
async fn replay_recent_copies_of_real_traffic_then_they_are_purged() {
    let spam = "fn data(m) {\n    if m.subject.contains(\"spam\") {\n        return reject(550, \"5.7.1 no spam\");\n    }\n}\n";
    let mut g = Gateway::start(Opts {
        rules: vec![("10-spam.rhai".into(), spam.into())],
        ..Opts::default()
    })
    .await;
    keep_recent(&mut g, "1h").await;
    let cand = g.dir.path().join("candidate");
    std::fs::create_dir_all(&cand).unwrap();
    std::fs::write(cand.join("10-spam.rhai"), spam).unwrap();
    std::fs::write(
        cand.join("20-urgent.rhai"),
        "fn data(m) {\n    if m.subject.contains(\"urgent\") {\n        return quarantine(\"urgent\");\n    }\n}\n",
    )
    .unwrap();
    let mut c = Client::connect(g.smtp).await;
    let r = c.cmd("EHLO client.far.test").await;
    assert!(r.starts_with("250"), "{r}");
    let mut want = BTreeSet::new();
    for i in 0..12u32 {
        let subject = if i.is_multiple_of(3) {
            "urgent: pay now"
        } else {
            "hello"
        };
        let data = format!(
            "From: a{i}@far.test\r\nTo: u@local.test\r\nSubject: {subject} {i}\r\n\r\nbody {i}\r\n"
        );
        let r = c
            .mail(
                &format!("a{i}@far.test"),
                &["u@local.test"],
                data.as_bytes(),
            )
            .await;
        assert!(r.starts_with("250"), "{r}");
        let id = r.rsplit(' ').next().unwrap().to_string();
        if i.is_multiple_of(3) {
            want.insert((id, "accept -> quarantine".to_string()));
        }
    }
    // Refused at DATA by the running rules: kept too, and still refused.
    let r = c
        .mail(
            "s@far.test",
            &["u@local.test"],
            b"Subject: spam urgent\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("550"), "{r}");
    let _ = c.cmd("QUIT").await;
    let cand_s = cand.to_str().unwrap().to_string();
    let args = ["--rules", cand_s.as_str(), "--recent", "1h"];
    // The copies are written after the reply: wait until all 13 are there.
    let mut out = String::new();
    let all = eventually(Duration::from_secs(10), || {
        let (ok, o, e) = replay(&g.config_path(), &args);
        assert!(ok, "{o}\n{e}");
        out = o;
        out.starts_with("replayed 13 message(s)")
    })
    .await;
    assert!(all, "{out}");
    let got: BTreeSet<(String, String)> = changed(&out).into_iter().collect();
    assert_eq!(got, want, "{out}");
    assert_eq!(counts(&out, "reject"), (1, 1), "{out}");
    assert!(
        out.contains("disagrees with the verdict given at receipt on 0 message(s)"),
        "{out}"
    );
    // The export the gateway wrote for the command is gone again.
    assert_eq!(read_dir_count(&g.data_dir().join("replay")), 0);

    // Without the gateway the command reads the store itself.
    assert!(g.term().success());
    let (ok, o, e) = replay(&g.config_path(), &args);
    assert!(ok, "{o}\n{e}");
    assert!(o.starts_with("replayed 13 message(s)"), "{o}");
    assert_eq!(changed(&o).into_iter().collect::<BTreeSet<_>>(), want);

    // A tiny keep_recent: the housekeeping purges them.
    keep_recent(&mut g, "1s").await;
    let mut last = String::new();
    let purged = eventually(Duration::from_secs(20), || {
        let (ok, o, e) = replay(&g.config_path(), &args);
        assert!(ok, "{o}\n{e}");
        last = o;
        last.starts_with("replayed 0 message(s)")
    })
    .await;
    assert!(purged, "{last}");
    assert!(g.log_plain().contains("keep_recent: old copies deleted"));
}
