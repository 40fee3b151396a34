//! The plain data types the SMTP session hands in and gets back.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

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

/// The answer of a stage. `text` starts with an enhanced status code
/// (RFC 3463), e.g. `"5.7.1 ..."`: one is added when a script leaves it out.
///
/// `Quarantine` and `Discard` decided before DATA are meant to stick to the
/// transaction: the session accepts the command and applies them to the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject { code: u16, text: String },
    Tempfail { code: u16, text: String },
    Quarantine { reason: String },
    Discard,
}

impl Verdict {
    /// A short word for logs and the `verdict` metric label.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Reject { .. } => "reject",
            Verdict::Tempfail { .. } => "tempfail",
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
    pub elapsed: Duration,
}

/// What to do when a script fails at run time or runs away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Answer 451 (the sender retries later).
    #[default]
    Tempfail,
    /// Ignore the failing script and let the next one decide.
    Accept,
    /// Hold the message in quarantine.
    Quarantine,
}

impl std::str::FromStr for OnError {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tempfail" => Ok(OnError::Tempfail),
            "accept" => Ok(OnError::Accept),
            "quarantine" => Ok(OnError::Quarantine),
            other => Err(format!(
                "on_error must be \"tempfail\", \"accept\" or \"quarantine\", not {other:?}"
            )),
        }
    }
}

/// `[rules]` of postern.toml (without `dir`).
#[derive(Debug, Clone, PartialEq)]
pub struct RulesConfig {
    /// Operations allowed per script call; beyond it the call is an error.
    pub max_operations: u64,
    pub on_error: OnError,
    /// A total score at or above this quarantines.
    pub quarantine_score: f64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            max_operations: 100_000,
            on_error: OnError::Tempfail,
            quarantine_score: 10.0,
        }
    }
}

/// `[checks]` of postern.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChecksConfig {
    pub spf: bool,
    pub dkim: bool,
    pub dmarc: bool,
    /// One deadline for all DNS work of one message; what is not done by
    /// then is `temperror`.
    pub deadline: Duration,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self {
            spf: true,
            dkim: true,
            dmarc: true,
            deadline: Duration::from_secs(20),
        }
    }
}

/// One problem found while loading rules or policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn new(file: impl Into<PathBuf>, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for Problem {}
