//! `postern rules test`: the whole rule set on one message, offline.

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::policy::{ConnInfo, Decided, Decision, Policy, RuleSet, TxInfo, Verdict, final_verdict};

/// Each script call of a stage, one indented line each (shadow ones marked).
fn calls(stage: &crate::policy::StageTrace) {
    for c in &stage.calls {
        let mut line = format!("           {} {}", c.script, c.verdict);
        if c.shadow {
            line.push_str(" (shadow, not applied)");
        }
        if !c.detail.is_empty() {
            line.push_str(&format!(": {}", c.detail));
        }
        if c.score != 0.0 {
            line.push_str(&format!(" score {:+}", c.score));
        }
        println!("{line}");
    }
}

fn show(d: &Decision) -> String {
    match &d.verdict {
        None => "no objection".into(),
        Some(v) => format!(
            "{} ({} {})",
            verdict_text(v),
            d.script.as_deref().unwrap_or("-"),
            d.function.as_deref().unwrap_or("-")
        ),
    }
}

fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Reject(r) | Verdict::Tempfail(r) => format!("{} {r}", v.word()),
        Verdict::Quarantine { reason } => format!("quarantine: {reason}"),
        Verdict::Discard => "discard".into(),
    }
}

/// `rules test --suite DIR`: every case, a table, exit 1 on any mismatch
/// (or on a case file that does not read).
pub fn suite(cfg: &Config, dir: &Path) -> ExitCode {
    let policy = match Policy::from_config_suite(cfg, false) {
        Ok(p) => p,
        Err(problems) => return failed(&problems),
    };
    let cases = match crate::policy::suite::load(dir, policy.local_domain()) {
        Ok(c) => c,
        Err(problems) => return failed(&problems),
    };
    let set = policy.current();
    let started = Instant::now();
    let results = crate::policy::suite::run(&set, &cases);
    let elapsed = started.elapsed();
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<10}  {:<10}  {:<24}  result",
        "case", "expect", "got", "decided by"
    );
    for r in &results {
        let expect = match &r.expect_script {
            Some(s) => format!("{} by {s}", r.expect),
            None => r.expect.clone(),
        };
        let mut line = format!(
            "{:<width$}  {:<10}  {:<10}  {:<24}  {}",
            r.name,
            r.expect,
            r.got,
            r.decided_by,
            if r.passed { "ok" } else { "FAIL" }
        );
        if !r.passed {
            line.push_str(&format!(" (expected {expect}"));
            if !r.detail.is_empty() {
                line.push_str(&format!("; {}", r.detail));
            }
            line.push(')');
        }
        println!("{line}");
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    println!(
        "{} cases: {} passed, {failed} failed ({:.1} ms)",
        results.len(),
        results.len() - failed,
        elapsed.as_secs_f64() * 1000.0
    );
    if failed == 0 && !results.is_empty() {
        ExitCode::SUCCESS
    } else {
        if results.is_empty() {
            eprintln!("postern: {}: no *.toml cases", dir.display());
        }
        ExitCode::FAILURE
    }
}

/// Run connect, MAIL, each RCPT and DATA as the gateway would, and print each decision.
pub async fn run(
    cfg: &Config,
    message: &Path,
    from: &str,
    rcpts: &[String],
    ip: IpAddr,
    helo: &str,
) -> ExitCode {
    let data = match std::fs::read(message) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("postern: {}: {e}", message.display());
            return ExitCode::FAILURE;
        }
    };
    let policy = match Policy::from_config(cfg) {
        Ok(p) => p,
        Err(problems) => return failed(&problems),
    };
    let set = policy.current();
    let started = Instant::now();
    let conn = ConnInfo {
        ip,
        port: 0,
        tls: false,
    };
    let mut tx = TxInfo {
        conn: conn.clone(),
        helo: helo.to_string(),
        from: from.to_string(),
        auth_user: None,
        rcpts: Vec::new(),
        submission: false,
        trusted: false,
    };
    println!("scripts:   {}", set.script_names().join(", "));
    // A reject or tempfail ends the transaction; the first quarantine or
    // discard before DATA sticks to the message ([`final_verdict`] decides,
    // as in the gateway), shown with the script and function that said it.
    let mut sticky: Option<Decided> = None;
    let verdict = match envelope(&set, &conn, &mut tx, rcpts, &mut sticky).await {
        Some(d) => format!(
            "{} by {} {}",
            d.verdict.as_ref().map(verdict_text).unwrap_or_default(),
            d.script.unwrap_or_default(),
            d.function.unwrap_or_default()
        ),
        None => data_stage(&set, &tx, &data, sticky).await,
    };
    println!("verdict:   {verdict}");
    println!(
        "time:      {:.3} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    ExitCode::SUCCESS
}

/// Connect, MAIL and each RCPT, printing each decision; the decision that
/// ended the transaction, if one did. Accepted recipients go into `tx`.
async fn envelope(
    set: &Arc<RuleSet>,
    conn: &ConnInfo,
    tx: &mut TxInfo,
    rcpts: &[String],
    sticky: &mut Option<Decided>,
) -> Option<Decision> {
    let d = set.connect_async(conn).await;
    println!("connect:   {}", show(&d));
    calls(&d.trace);
    note(&d, sticky);
    if let Some(d) = stop(d) {
        return Some(d);
    }
    let d = set.mail_from_async(tx).await;
    println!("mail from: {}", show(&d));
    calls(&d.trace);
    note(&d, sticky);
    if let Some(d) = stop(d) {
        return Some(d);
    }
    for r in rcpts {
        let d = set.rcpt_async(tx, r).await;
        println!("rcpt {r}: {}", show(&d));
        calls(&d.trace);
        note(&d, sticky);
        if stop(d.clone()).is_some() {
            return Some(d);
        }
        tx.rcpts.push(r.clone());
    }
    None
}

/// Keeps the first quarantine or discard, with who said it.
fn note(d: &Decision, sticky: &mut Option<Decided>) {
    if sticky.is_none()
        && let Some(v @ (Verdict::Quarantine { .. } | Verdict::Discard)) = &d.verdict
    {
        let by = format!(
            "{} {}",
            d.script.as_deref().unwrap_or_default(),
            d.function.as_deref().unwrap_or_default()
        );
        *sticky = Some((v.clone(), Some(by)));
    }
}

/// DATA: prints the checks, score and added headers; returns the final
/// verdict line, `sticky` taken into account.
async fn data_stage(set: &RuleSet, tx: &TxInfo, data: &[u8], sticky: Option<Decided>) -> String {
    let out = set.data(tx, data).await;
    println!(
        "checks:    spf={} dkim={} dmarc={}",
        out.spf, out.dkim, out.dmarc
    );
    println!("data:");
    calls(&out.trace);
    println!("score:     {}", out.score);
    for (n, v) in &out.headers {
        println!("header:    {n}: {v}");
    }
    let data = (out.verdict.clone(), out.script.clone());
    let (verdict, by) = final_verdict(data, sticky);
    format!(
        "{} by {}",
        verdict_text(&verdict),
        by.as_deref().unwrap_or("(no script decided)")
    )
}

/// A reject or tempfail ends the transaction before DATA.
fn stop(d: Decision) -> Option<Decision> {
    matches!(d.verdict, Some(Verdict::Reject(_) | Verdict::Tempfail(_))).then_some(d)
}

/// Prints each problem (`file:line: message`) and gives the failure status.
fn failed(problems: &[crate::config::Problem]) -> ExitCode {
    for p in problems {
        eprintln!("{p}");
    }
    ExitCode::FAILURE
}
