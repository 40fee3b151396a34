//! `postern rules test`: the whole rule set on one message, offline.

use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use crate::config::Config;
use crate::policy::{ConnInfo, Decision, TxInfo, Verdict};

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
        Verdict::Reject { code, text } | Verdict::Tempfail { code, text } => {
            format!("{} {code} {text}", v.word())
        }
        Verdict::Quarantine { reason } => format!("quarantine: {reason}"),
        Verdict::Discard => "discard".into(),
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
    let policy = match cfg.load_policy() {
        Ok(p) => p,
        Err(problems) => {
            for p in problems {
                eprintln!("{p}");
            }
            return ExitCode::FAILURE;
        }
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
    // A reject or tempfail ends the transaction; a quarantine or discard
    // before DATA sticks to the message, as in the gateway (intake.rs).
    let mut sticky: Option<Decision> = None;
    let note = |d: &Decision, sticky: &mut Option<Decision>| {
        if sticky.is_none()
            && matches!(
                d.verdict,
                Some(Verdict::Quarantine { .. } | Verdict::Discard)
            )
        {
            *sticky = Some(d.clone());
        }
    };
    let d = set.connect_async(&conn).await;
    println!("connect:   {}", show(&d));
    note(&d, &mut sticky);
    let mut final_: Option<Decision> = stop(d);
    if final_.is_none() {
        let d = set.mail_from_async(&tx).await;
        println!("mail from: {}", show(&d));
        note(&d, &mut sticky);
        final_ = stop(d);
    }
    if final_.is_none() {
        for r in rcpts {
            let d = set.rcpt_async(&tx, r).await;
            println!("rcpt {r}: {}", show(&d));
            note(&d, &mut sticky);
            if stop(d.clone()).is_some() {
                final_ = Some(d);
                break;
            }
            tx.rcpts.push(r.clone());
        }
    }
    let verdict = match final_ {
        Some(d) => format!(
            "{} by {} {}",
            d.verdict.as_ref().map(verdict_text).unwrap_or_default(),
            d.script.unwrap_or_default(),
            d.function.unwrap_or_default()
        ),
        None => {
            let out = set.data(&tx, &data).await;
            println!(
                "checks:    spf={} dkim={} dmarc={}",
                out.spf, out.dkim, out.dmarc
            );
            println!("score:     {}", out.score);
            for (n, v) in &out.headers {
                println!("header:    {n}: {v}");
            }
            let data_decides = matches!(
                out.verdict,
                Verdict::Reject { .. } | Verdict::Tempfail { .. }
            ) || matches!(
                (
                    &out.verdict,
                    sticky.as_ref().and_then(|s| s.verdict.as_ref())
                ),
                (Verdict::Quarantine { .. }, Some(Verdict::Discard))
            );
            match sticky {
                Some(d) if !data_decides => format!(
                    "{} by {} {}",
                    d.verdict.as_ref().map(verdict_text).unwrap_or_default(),
                    d.script.unwrap_or_default(),
                    d.function.unwrap_or_default()
                ),
                _ => format!(
                    "{} by {}",
                    verdict_text(&out.verdict),
                    out.script.as_deref().unwrap_or("(no script decided)")
                ),
            }
        }
    };
    println!("verdict:   {verdict}");
    println!(
        "time:      {:.3} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    ExitCode::SUCCESS
}

/// A reject or tempfail ends the transaction before DATA.
fn stop(d: Decision) -> Option<Decision> {
    matches!(
        d.verdict,
        Some(Verdict::Reject { .. } | Verdict::Tempfail { .. })
    )
    .then_some(d)
}
