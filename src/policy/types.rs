//! The plain data types the SMTP session hands in and gets back.

use std::net::IpAddr;
use std::time::Duration;

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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub verdict: Option<Verdict>,
    /// The script (file name) or `ratelimit:<name>` that decided.
    pub script: Option<String>,
    /// The function (`connect`, `mail_from`, `rcpt`) that decided.
    pub function: Option<String>,
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
    /// Time spent in checks and rules.
    pub(crate) elapsed: Duration,
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
