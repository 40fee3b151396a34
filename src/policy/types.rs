//! The plain data types the SMTP session hands in and gets back.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::mail::{Enhanced, Reply};

/// What is known about a client when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub ip: IpAddr,
    pub port: u16,
    pub tls: bool,
}

/// What is known about a transaction at MAIL FROM, RCPT TO and end of DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxInfo {
    pub conn: ConnInfo,
    pub helo: String,
    /// The envelope sender, `""` for `MAIL FROM:<>`.
    pub from: String,
    pub auth_user: Option<String>,
    /// The recipients accepted so far (all of them at end of DATA).
    pub rcpts: Vec<String>,
    /// True on the submission listeners (587/465).
    pub submission: bool,
    /// The client is in `[relay] networks` or authenticated: our own mail,
    /// so SPF/DKIM/DMARC are not asked of it (as with Postfix's mynetworks).
    pub trusted: bool,
}

/// The answer of a stage. A reject or tempfail carries the SMTP reply to
/// send, its enhanced status code (RFC 3463) apart from the text (one is
/// supplied when a script leaves it out).
///
/// `Quarantine` and `Discard` decided before DATA are meant to stick to the
/// transaction: the session accepts the command and applies them to the
/// message (see [`final_verdict`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject(Reply),
    Tempfail(Reply),
    Quarantine { reason: String },
    Discard,
}

impl Verdict {
    /// `451 4.3.0`: what `on_error = "tempfail"` answers for a failed rule.
    pub(crate) fn local_tempfail() -> Verdict {
        Verdict::Tempfail(Reply::new(
            451,
            Enhanced::new(4, 3, 0),
            "Temporary local problem, please try again later",
        ))
    }

    /// A short word for logs and the `verdict` metric label.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Reject(_) => "reject",
            Verdict::Tempfail(_) => "tempfail",
            Verdict::Quarantine { .. } => "quarantine",
            Verdict::Discard => "discard",
        }
    }
}

/// The answer at connect, MAIL FROM and RCPT TO. `verdict == None` means no
/// rule or limit objected: carry on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub verdict: Option<Verdict>,
    /// The script (file name) or `ratelimit:<name>` that decided.
    pub script: Option<String>,
    /// The function (`connect`, `mail_from`, `rcpt`) that decided.
    pub function: Option<String>,
    /// What each script (and limit) said at this stage, for the trace.
    pub trace: StageTrace,
}

impl Decision {
    /// Nothing to say: carry on.
    pub fn pass() -> Self {
        Self::default()
    }
}

/// The answer at end of DATA.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOutcome {
    pub verdict: Verdict,
    /// The script that decided (or whose error decided), if any.
    pub script: Option<String>,
    /// The total score the scripts gave.
    pub score: f64,
    /// Headers to prepend, `Authentication-Results` first.
    pub headers: Vec<(String, String)>,
    /// Result words as in Authentication-Results (`pass`, `fail`, ...).
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub dmarc_policy: String,
    /// What the scanners said (empty when none is configured).
    pub scan: ScanResults,
    /// The `data` stage for the trace: every script call, shadow ones too.
    pub trace: StageTrace,
    /// True when the total score, not a script, quarantined.
    pub by_score: bool,
    /// Time spent in checks and rules.
    pub(crate) elapsed: Duration,
}

/// SPF, DKIM and DMARC results given in advance (a suite case, a replayed
/// message, a copy kept by `keep_recent`) instead of asked of DNS. Words as
/// in Authentication-Results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResults {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    /// The From domain's DMARC policy: `reject`, `quarantine` or `none`.
    #[serde(default = "none_word")]
    pub dmarc_policy: String,
}

fn none_word() -> String {
    "none".into()
}

impl Default for CheckResults {
    fn default() -> Self {
        CheckResults {
            spf: none_word(),
            dkim: none_word(),
            dmarc: none_word(),
            dmarc_policy: none_word(),
        }
    }
}

/// What the content scanners said (the rules' `m.virus`, `m.rspamd_*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScanResults {
    /// clamd's signature name, `""` when clean or not asked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub virus: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rspamd_score: f64,
    /// Rspamd's action (`no action`, `add header`, `reject`, ...), `""` when not asked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rspamd_action: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rspamd_symbols: Vec<String>,
    /// Scanners that could not answer, with why (`clamd: timeout`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl ScanResults {
    pub fn is_empty(&self) -> bool {
        *self == ScanResults::default()
    }
}

/// The envelope sender on an allow or block list of a recipient or the site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListHits {
    #[serde(default)]
    pub allowed: bool,
    #[serde(default)]
    pub blocked: bool,
}

/// The DATA stage's inputs besides the message and the envelope. The
/// gateway fills `lists` and leaves the rest to be asked live; suites and
/// replays fix all of them.
#[derive(Debug, Clone, Default)]
pub struct DataInputs {
    /// Fixed check results instead of DNS.
    pub checks: Option<CheckResults>,
    /// Fixed scanner results instead of asking the scanners.
    pub scan: Option<ScanResults>,
    pub lists: ListHits,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One script call (or limit) in a message's decision trace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// The script file name, or `ratelimit:<name>`.
    pub script: String,
    /// `none`, `error`, or a verdict word; for a limit `refuse` or `hold`.
    pub verdict: String,
    /// The reply, quarantine reason or error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// A `*.shadow.rhai` script: said, never applied.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    /// Points this call added with `m.score()`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub score: f64,
    /// Headers this call added (`Name: value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    #[serde(default)]
    pub micros: u64,
}

/// The calls of one stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTrace {
    /// `connect`, `mail_from`, `rcpt <address>` or `data`.
    pub stage: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<Call>,
}

/// How a message was decided, kept with it in the queue or quarantine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub stages: Vec<StageTrace>,
    #[serde(default)]
    pub checks: CheckResults,
    #[serde(default, skip_serializing_if = "ScanResults::is_empty")]
    pub scan: ScanResults,
    #[serde(default)]
    pub lists: ListHits,
    /// A `hold` rate limit the transaction went over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub score: f64,
    /// The verdict applied, as a word.
    pub verdict: String,
    /// What decided: a script, `ratelimit:<name>`, `score`, or `default`
    /// (nothing objected).
    pub decided_by: String,
}

impl Trace {
    /// The trace as lines for `queue show` / `quarantine show`.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "decision: {} by {}{}",
            self.verdict,
            self.decided_by,
            if self.score != 0.0 {
                format!(" (score {})", self.score)
            } else {
                String::new()
            }
        )];
        let c = &self.checks;
        out.push(format!(
            "checks:   spf={} dkim={} dmarc={} (policy {})",
            c.spf, c.dkim, c.dmarc, c.dmarc_policy
        ));
        if !self.scan.is_empty() {
            let s = &self.scan;
            let mut line = format!(
                "scan:     virus={}",
                if s.virus.is_empty() { "none" } else { &s.virus }
            );
            if !s.rspamd_action.is_empty() {
                line.push_str(&format!(
                    " rspamd={} score={} symbols={}",
                    s.rspamd_action,
                    s.rspamd_score,
                    s.rspamd_symbols.join(",")
                ));
            }
            for e in &s.errors {
                line.push_str(&format!(" error=\"{e}\""));
            }
            out.push(line);
        }
        if self.lists.allowed || self.lists.blocked {
            out.push(format!(
                "lists:    allowed={} blocked={}",
                self.lists.allowed, self.lists.blocked
            ));
        }
        if let Some(h) = &self.hold {
            out.push(format!("limit:    {h} (held)"));
        }
        for st in &self.stages {
            for c in &st.calls {
                let mut line = format!("  {:<18} {:<22} {}", st.stage, c.script, c.verdict);
                if c.shadow {
                    line.push_str(" (shadow, not applied)");
                }
                if !c.detail.is_empty() {
                    line.push_str(&format!(": {}", c.detail));
                }
                if c.score != 0.0 {
                    line.push_str(&format!(" score {:+}", c.score));
                }
                for h in &c.headers {
                    line.push_str(&format!(" [+{h}]"));
                }
                line.push_str(&format!(" {}µs", c.micros));
                out.push(line);
            }
        }
        out
    }
}

/// A verdict with what decided it (a script name, `ratelimit:<name>`, or a
/// label the caller chooses).
pub type Decided = (Verdict, Option<String>);

/// The verdict applied to a message, the one rule the gateway and
/// `postern rules test` share: a reject or tempfail at DATA wins; else a
/// quarantine or discard decided before DATA (`sticky`) applies, except
/// that a DATA quarantine beats an earlier discard (holding is the safer
/// of the two); else the DATA verdict.
pub fn final_verdict(data: Decided, sticky: Option<Decided>) -> Decided {
    match (&data.0, sticky) {
        (Verdict::Reject(_) | Verdict::Tempfail(_), _) | (_, None) => data,
        (Verdict::Quarantine { .. }, Some((Verdict::Discard, _))) => data,
        (_, Some(sticky)) => sticky,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(why: &str) -> Verdict {
        Verdict::Quarantine { reason: why.into() }
    }

    #[test]
    fn final_verdict_rule() {
        let by = |v: Verdict, s: &str| (v, Some(s.to_string()));
        let reject = Verdict::Reject(Reply::new(550, Enhanced::new(5, 7, 1), "no"));
        // Nothing sticky: DATA decides.
        assert_eq!(
            final_verdict(by(Verdict::Accept, "d"), None),
            by(Verdict::Accept, "d")
        );
        // A reject or tempfail at DATA wins over anything earlier.
        assert_eq!(
            final_verdict(by(reject.clone(), "d"), Some(by(q("early"), "m"))),
            by(reject, "d")
        );
        assert_eq!(
            final_verdict(
                by(Verdict::local_tempfail(), "d"),
                Some(by(Verdict::Discard, "m"))
            ),
            by(Verdict::local_tempfail(), "d")
        );
        // An early quarantine or discard sticks over accept (or a later discard).
        assert_eq!(
            final_verdict(by(Verdict::Accept, "d"), Some(by(q("early"), "m"))),
            by(q("early"), "m")
        );
        assert_eq!(
            final_verdict(by(Verdict::Discard, "d"), Some(by(q("early"), "m"))),
            by(q("early"), "m")
        );
        assert_eq!(
            final_verdict((Verdict::Accept, None), Some(by(Verdict::Discard, "m"))),
            by(Verdict::Discard, "m")
        );
        // A DATA quarantine beats an earlier discard, not an earlier quarantine.
        assert_eq!(
            final_verdict(by(q("late"), "d"), Some(by(Verdict::Discard, "m"))),
            by(q("late"), "d")
        );
        assert_eq!(
            final_verdict(by(q("late"), "d"), Some(by(q("early"), "m"))),
            by(q("early"), "m")
        );
    }
}
