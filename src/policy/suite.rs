//! Rule suites (SPEC "Rule suites"): `DIR/*.toml` cases, each a message, an
//! envelope, fixed check and scanner results and the verdict expected. No
//! DNS, no gateway: [`RuleSet::evaluate`] on the calling thread.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::auth::RESULT_WORDS;
use super::evaluate::Case;
use super::types::{CheckResults, DataInputs, ListHits, ScanResults};
use super::{Problem, RuleSet};

/// The verdict words a case may expect.
const EXPECT_WORDS: [&str; 5] = ["accept", "reject", "tempfail", "quarantine", "discard"];

/// Largest case message read (a suite is for rules, not for load).
const MAX_CASE_MESSAGE: u64 = 10 << 20;

/// One `*.toml` case file, strict.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    /// The message file, relative to the case file.
    message: String,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    rcpt: Option<Vec<String>>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    helo: Option<String>,
    /// An authenticated submission user (makes the case trusted).
    #[serde(default)]
    auth_user: Option<String>,
    /// From a trusted network (`[relay] networks`).
    #[serde(default)]
    trusted: bool,
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    spf: Option<String>,
    #[serde(default)]
    dkim: Option<String>,
    #[serde(default)]
    dmarc: Option<String>,
    #[serde(default)]
    dmarc_policy: Option<String>,
    #[serde(default)]
    virus: Option<String>,
    #[serde(default)]
    rspamd_score: Option<f64>,
    #[serde(default)]
    rspamd_action: Option<String>,
    #[serde(default)]
    rspamd_symbols: Option<Vec<String>>,
    #[serde(default)]
    allowed: bool,
    #[serde(default)]
    blocked: bool,
    expect: String,
    /// The script that must decide (a file name; `score` or `default` too).
    #[serde(default)]
    script: Option<String>,
    /// Headers the scripts must add, `Name: value` (or just `Name`).
    #[serde(default)]
    header: Vec<String>,
    /// Header names the scripts must not add.
    #[serde(default)]
    no_header: Vec<String>,
}

/// One case, read and checked.
#[derive(Debug, Clone)]
pub struct SuiteCase {
    pub file: PathBuf,
    pub case: Case,
    pub message: Vec<u8>,
    pub expect: String,
    pub script: Option<String>,
    pub header: Vec<String>,
    pub no_header: Vec<String>,
}

/// How one case came out.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case file's name.
    pub name: String,
    pub expect: String,
    pub expect_script: Option<String>,
    /// The verdict word given and who decided.
    pub got: String,
    pub decided_by: String,
    /// The reply, reason or error behind the verdict.
    pub detail: String,
    pub passed: bool,
}

/// How many cases `dir` holds (0 when it does not exist).
pub fn count(dir: &Path) -> usize {
    case_files(dir).map(|f| f.len()).unwrap_or(0)
}

/// The `*.toml` files of `dir`, in name order.
fn case_files(dir: &Path) -> Result<Vec<PathBuf>, Problem> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Problem::new(dir, None, format!("cannot read the suite directory: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The line of `key = ` in `text`, for problems found after parsing.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == key))
        .map(|i| i + 1)
}

/// Reads every case of `dir`; all problems at once. `local_domain` gives
/// the default recipient (`user@local_domain`).
pub fn load(dir: &Path, local_domain: &str) -> Result<Vec<SuiteCase>, Vec<Problem>> {
    let files = case_files(dir).map_err(|p| vec![p])?;
    let mut problems = Vec::new();
    let mut cases = Vec::new();
    for file in files {
        match load_case(&file, local_domain) {
            Ok(c) => cases.push(c),
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(cases)
    } else {
        Err(problems)
    }
}

fn load_case(file: &Path, local_domain: &str) -> Result<SuiteCase, Vec<Problem>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![Problem::new(file, None, format!("cannot read: {e}"))])?;
    let c: CaseFile =
        toml::from_str(&text).map_err(|e| vec![crate::config::toml_problem(file, &text, &e)])?;
    let mut problems = Vec::new();
    let at = |key: &str| line_of_key(&text, key);
    let expect = c.expect.trim().to_ascii_lowercase();
    if !EXPECT_WORDS.contains(&expect.as_str()) {
        problems.push(Problem::new(
            file,
            at("expect"),
            format!(
                "expect = \"{}\" is not one of {}",
                c.expect,
                EXPECT_WORDS.join(", ")
            ),
        ));
    }
    let mut word = |key: &str, v: &Option<String>| -> Option<String> {
        let v = v.as_ref()?;
        let w = v.trim().to_ascii_lowercase();
        if !RESULT_WORDS.contains(&w.as_str()) {
            problems.push(Problem::new(
                file,
                at(key),
                format!(
                    "{key} = \"{v}\" is not a result word ({})",
                    RESULT_WORDS.join(", ")
                ),
            ));
        }
        Some(w)
    };
    let (spf, dkim, dmarc, policy) = (
        word("spf", &c.spf),
        word("dkim", &c.dkim),
        word("dmarc", &c.dmarc),
        word("dmarc_policy", &c.dmarc_policy),
    );
    let ip: IpAddr = match c.ip.as_deref().map(str::parse) {
        None => IpAddr::from([192, 0, 2, 1]),
        Some(Ok(ip)) => ip,
        Some(Err(_)) => {
            problems.push(Problem::new(
                file,
                at("ip"),
                format!("ip = \"{}\" is not an IP address", c.ip.unwrap_or_default()),
            ));
            IpAddr::from([192, 0, 2, 1])
        }
    };
    let message_path = file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(&c.message);
    let message = match std::fs::metadata(&message_path) {
        Ok(m) if m.len() > MAX_CASE_MESSAGE => {
            problems.push(Problem::new(
                file,
                at("message"),
                format!("{} is larger than 10 MB", message_path.display()),
            ));
            Vec::new()
        }
        _ => match std::fs::read(&message_path) {
            Ok(m) => m,
            Err(e) => {
                problems.push(Problem::new(
                    file,
                    at("message"),
                    format!("cannot read {}: {e}", message_path.display()),
                ));
                Vec::new()
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let checks =
        (spf.is_some() || dkim.is_some() || dmarc.is_some() || policy.is_some()).then(|| {
            CheckResults {
                spf: spf.unwrap_or_else(|| "none".into()),
                dkim: dkim.unwrap_or_else(|| "none".into()),
                dmarc: dmarc.unwrap_or_else(|| "none".into()),
                dmarc_policy: policy.unwrap_or_else(|| "none".into()),
            }
        });
    let scan = ScanResults {
        virus: c.virus.unwrap_or_default(),
        rspamd_score: c.rspamd_score.unwrap_or_default(),
        rspamd_action: c.rspamd_action.unwrap_or_default(),
        rspamd_symbols: c.rspamd_symbols.unwrap_or_default(),
        errors: Vec::new(),
    };
    let authenticated = c.auth_user.as_deref().is_some_and(|u| !u.is_empty());
    Ok(SuiteCase {
        file: file.to_path_buf(),
        case: Case {
            ip,
            helo: c.helo.unwrap_or_else(|| "outside.test".into()),
            from: c.from.unwrap_or_else(|| "sender@outside.test".into()),
            rcpts: c
                .rcpt
                .unwrap_or_else(|| vec![format!("user@{local_domain}")]),
            auth_user: c.auth_user.filter(|u| !u.is_empty()),
            tls: c.tls,
            submission: authenticated,
            trusted: c.trusted || authenticated,
            inputs: DataInputs {
                checks,
                scan: Some(scan),
                lists: ListHits {
                    allowed: c.allowed,
                    blocked: c.blocked,
                },
            },
        },
        message,
        expect,
        script: c.script.filter(|s| !s.is_empty()),
        header: c.header,
        no_header: c.no_header,
    })
}

/// Runs every case on `set`.
pub fn run(set: &RuleSet, cases: &[SuiteCase]) -> Vec<CaseResult> {
    cases
        .iter()
        .map(|c| {
            let e = set.evaluate(&c.case, &c.message);
            let got = e.verdict.word().to_string();
            let added: Vec<String> = e.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
            let has = |want: &str| {
                added.iter().any(|h| {
                    h.eq_ignore_ascii_case(want)
                        || h.split_once(':')
                            .is_some_and(|(n, _)| n.eq_ignore_ascii_case(want.trim()))
                })
            };
            let mut detail = super::rules::verdict_detail(&e.verdict);
            let missing: Vec<&String> = c.header.iter().filter(|h| !has(h)).collect();
            let unwanted: Vec<&String> = c.no_header.iter().filter(|h| has(h)).collect();
            for h in &missing {
                detail = format!("{detail}; header not added: {h}");
            }
            for h in &unwanted {
                detail = format!("{detail}; header added: {h}");
            }
            let passed = got == c.expect
                && c.script.as_ref().is_none_or(|s| *s == e.decided_by)
                && missing.is_empty()
                && unwanted.is_empty();
            CaseResult {
                name: c
                    .file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                expect: c.expect.clone(),
                expect_script: c.script.clone(),
                got,
                decided_by: e.decided_by,
                detail: detail.trim_start_matches("; ").to_string(),
                passed,
            }
        })
        .collect()
}

/// The suite as a reload sees it: every failed case as a problem (a
/// broken case refuses the rule set like a script that does not compile).
pub(crate) fn problems(set: &RuleSet, dir: &Path, local_domain: &str) -> Vec<Problem> {
    let cases = match load(dir, local_domain) {
        Ok(c) => c,
        Err(p) => return p,
    };
    run(set, &cases)
        .into_iter()
        .zip(&cases)
        .filter(|(r, _)| !r.passed)
        .map(|(r, c)| {
            Problem::new(
                &c.file,
                None,
                format!(
                    "rule suite case fails: expected {}{}, got {} by {}{}",
                    r.expect,
                    r.expect_script
                        .as_deref()
                        .map(|s| format!(" by {s}"))
                        .unwrap_or_default(),
                    r.got,
                    r.decided_by,
                    if r.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", r.detail)
                    }
                ),
            )
        })
        .collect()
}
