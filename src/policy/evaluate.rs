//! One message through the whole rule set offline: connect, MAIL, each
//! RCPT and DATA on the calling thread, with every input fixed. Rule suites
//! and replays run on this; rate limits are not rules and are left out
//! (they would count the corpus as traffic).

use std::net::IpAddr;

use rhai::Dynamic;

use super::script_api::Conn;
use super::types::{
    CheckResults, ConnInfo, DataInputs, Decision, StageTrace, Trace, TxInfo, Verdict,
};
use super::{RuleSet, final_verdict};

/// A message with its envelope, as a suite case or a replayed copy gives it.
#[derive(Debug, Clone)]
pub struct Case {
    pub ip: IpAddr,
    pub helo: String,
    pub from: String,
    pub rcpts: Vec<String>,
    pub auth_user: Option<String>,
    pub tls: bool,
    /// Came in on a submission port.
    pub submission: bool,
    /// From a trusted network or an authenticated user.
    pub trusted: bool,
    pub inputs: DataInputs,
}

/// What the rule set made of a [`Case`].
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub verdict: Verdict,
    /// The script that decided, `score`, or `default` when nothing objected.
    pub decided_by: String,
    /// Where it was decided: `connect`, `mail_from`, `rcpt` or `data`.
    pub stage: &'static str,
    pub trace: Trace,
    /// Headers the scripts added (besides Authentication-Results).
    pub headers: Vec<(String, String)>,
}

/// A decision before DATA that sticks: (verdict, script, stage).
type Sticky = (Verdict, Option<String>, &'static str);

impl RuleSet {
    /// Runs `case` with `message` as the gateway would, rate limits aside:
    /// a reject or tempfail before DATA ends it (a refused recipient is
    /// dropped, and the transaction ends only when none is left); the first
    /// quarantine or discard before DATA sticks ([`final_verdict`]).
    pub fn evaluate(&self, case: &Case, message: &[u8]) -> Evaluation {
        let conn = ConnInfo {
            ip: case.ip,
            port: 25,
            tls: case.tls,
        };
        let mut tx = TxInfo {
            conn: conn.clone(),
            helo: case.helo.clone(),
            from: case.from.clone(),
            auth_user: case.auth_user.clone(),
            rcpts: Vec::new(),
            submission: case.submission,
            trusted: case.trusted,
        };
        let mut stages = Vec::new();
        let mut sticky: Option<Sticky> = None;
        let mut refused: Option<Sticky> = None;
        let conn_arg = Dynamic::from(Conn::from_conn(&conn));
        let d = self.decide("connect", "connect".into(), conn_arg);
        if let Some(end) = self.step(d, "connect", &mut stages, &mut sticky, true) {
            return self.ended(end, stages, case);
        }
        let d = self.decide(
            "mail_from",
            "mail_from".into(),
            Dynamic::from(Conn::from_tx(&tx, None)),
        );
        if let Some(end) = self.step(d, "mail_from", &mut stages, &mut sticky, true) {
            return self.ended(end, stages, case);
        }
        for rcpt in &case.rcpts {
            let d = self.decide(
                "rcpt",
                format!("rcpt {rcpt}"),
                Dynamic::from(Conn::from_tx(&tx, Some(rcpt))),
            );
            match self.step(d, "rcpt", &mut stages, &mut sticky, false) {
                Some(end) => refused = Some(end),
                None => tx.rcpts.push(rcpt.clone()),
            }
        }
        if tx.rcpts.is_empty() {
            let end = refused.unwrap_or((
                Verdict::Reject(crate::mail::Reply::new(
                    554,
                    crate::mail::Enhanced::new(5, 5, 1),
                    "No valid recipients",
                )),
                None,
                "rcpt",
            ));
            return self.ended(end, stages, case);
        }
        let out = self.data_offline(&tx, message, case.inputs.clone());
        stages.push(out.trace.clone());
        let data = (out.verdict.clone(), out.script.clone());
        let early = sticky.clone().map(|(v, s, _)| (v, s));
        let (verdict, script) = final_verdict(data, early);
        let stage = match &sticky {
            Some((v, s, st)) if *v == verdict && *s == script => *st,
            _ => "data",
        };
        let decided_by = match script {
            Some(s) => s,
            None if out.by_score => "score".into(),
            None => "default".into(),
        };
        let headers = out.headers.iter().skip(1).cloned().collect();
        Evaluation {
            trace: Trace {
                stages,
                checks: CheckResults {
                    spf: out.spf.clone(),
                    dkim: out.dkim.clone(),
                    dmarc: out.dmarc.clone(),
                    dmarc_policy: out.dmarc_policy.clone(),
                },
                scan: out.scan.clone(),
                lists: case.inputs.lists,
                hold: None,
                score: out.score,
                verdict: verdict.word().into(),
                decided_by: decided_by.clone(),
            },
            verdict,
            decided_by,
            stage,
            headers,
        }
    }

    /// Notes one stage's decision: `Some` when it refuses. With `replaces`
    /// (connect, MAIL) a quarantine or discard replaces the sticky one, as
    /// the SMTP session does; a RCPT's only fills an empty one.
    fn step(
        &self,
        d: Decision,
        stage: &'static str,
        stages: &mut Vec<StageTrace>,
        sticky: &mut Option<Sticky>,
        replaces: bool,
    ) -> Option<Sticky> {
        if !d.trace.calls.is_empty() {
            stages.push(d.trace);
        }
        match d.verdict {
            Some(v @ (Verdict::Reject(_) | Verdict::Tempfail(_))) => Some((v, d.script, stage)),
            Some(v @ (Verdict::Quarantine { .. } | Verdict::Discard)) => {
                if replaces || sticky.is_none() {
                    *sticky = Some((v, d.script, stage));
                }
                None
            }
            Some(Verdict::Accept) | None => None,
        }
    }

    fn ended(&self, end: Sticky, stages: Vec<StageTrace>, case: &Case) -> Evaluation {
        let (verdict, script, stage) = end;
        let decided_by = script.unwrap_or_else(|| "default".into());
        Evaluation {
            trace: Trace {
                stages,
                checks: case.inputs.checks.clone().unwrap_or_default(),
                scan: case.inputs.scan.clone().unwrap_or_default(),
                lists: case.inputs.lists,
                hold: None,
                score: 0.0,
                verdict: verdict.word().into(),
                decided_by: decided_by.clone(),
            },
            verdict,
            decided_by,
            stage,
            headers: Vec::new(),
        }
    }
}
