//! `postern rules replay`: the running rule set and a candidate set over a
//! corpus of real mail, side by side, offline.
//!
//! Both sets run [`RuleSet::evaluate`] on every message with the same case
//! (envelope, client, check and scanner results, list hits): the one
//! recorded at receipt for `--recent` (`[rules] keep_recent`), or one
//! derived from the message's own headers for `--maildir` and `--mbox` (see
//! [`derive_case`]). Messages are spread over one worker thread per core;
//! the report lists the verdict counts of each set, every message whose
//! verdict changed, and per-script calls, verdicts and time.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::policy::{Case, Problem};
use crate::policy::{CheckResults, DataInputs, Evaluation, ListHits, Policy, RuleSet, ScanResults};
use crate::store::recent::RecentCase;

/// Where the messages come from.
#[derive(Debug, Clone)]
pub enum Corpus {
    /// A Maildir (its `cur/` and `new/`, and those of Maildir++ folders).
    Maildir(PathBuf),
    /// An mbox file (mboxrd: `>From ` lines are unquoted).
    Mbox(PathBuf),
    /// The copies `keep_recent` kept of the mail received this long ago or later.
    Recent(Duration),
}

/// `postern rules replay` arguments.
#[derive(Debug, Clone)]
pub struct Options {
    /// The candidate rules directory.
    pub rules: PathBuf,
    pub corpus: Corpus,
    /// Worker threads (default: one per core).
    pub threads: Option<usize>,
}

/// The verdict words, in the order the tables show them.
const VERDICTS: [&str; 5] = ["accept", "quarantine", "discard", "reject", "tempfail"];

/// One message of the corpus: its id and where to read it.
#[derive(Debug, Clone)]
pub struct Item {
    /// Maildir: the file name up to `:2,`; mbox: its ordinal (from 1);
    /// recent: the queue id.
    pub id: String,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Mbox(Range<usize>),
    Recorded(PathBuf, Box<RecentCase>),
}

/// A loaded corpus: its items, and the mbox bytes they point into.
pub struct Loaded {
    pub items: Vec<Item>,
    mbox: Vec<u8>,
    what: String,
}

/// What one set made of the corpus.
#[derive(Debug, Default, Clone)]
pub struct SetReport {
    /// Messages per final verdict word.
    pub verdicts: BTreeMap<String, u64>,
    /// Per script (file name).
    pub scripts: BTreeMap<String, ScriptStats>,
    /// `evaluate` time per message, in nanoseconds.
    pub nanos: Vec<u64>,
}

/// What one script did over the corpus.
#[derive(Debug, Default, Clone)]
pub struct ScriptStats {
    pub shadow: bool,
    /// Messages it was called on.
    pub messages: u64,
    pub calls: u64,
    /// Calls per verdict word other than `none` (`error` too).
    pub said: BTreeMap<String, u64>,
    /// Messages whose final verdict it decided.
    pub decided: u64,
    /// Its time per message (all its calls on that message), µs.
    pub micros: Vec<u64>,
}

/// A message whose verdict changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Changed {
    pub index: usize,
    pub id: String,
    pub sender: String,
    pub subject: String,
    pub old: String,
    pub old_by: String,
    pub new: String,
    pub new_by: String,
}

/// The whole comparison.
#[derive(Debug, Default)]
pub struct Report {
    pub messages: usize,
    pub running: SetReport,
    pub candidate: SetReport,
    pub changed: Vec<Changed>,
    /// Same verdict, another script deciding.
    pub redecided: u64,
    /// `--recent`: messages where the running set now disagrees with the
    /// verdict recorded at receipt (the rules changed since, or a rate
    /// limit or the submission From check decided, which replay leaves out).
    pub unlike_recorded: u64,
    /// Messages that could not be read, with why (first few).
    pub unreadable: Vec<String>,
    pub unreadable_count: usize,
    pub threads: usize,
    pub elapsed: Duration,
}

/// Runs the command: prints the report on stdout; 0 unless the rules, the
/// corpus or the store could not be read (a changed verdict is no error).
pub async fn run(cfg: &Config, opts: Options) -> ExitCode {
    let running = match Policy::from_config(cfg) {
        Ok(p) => p,
        Err(problems) => return fail_problems("the running rules do not load", &problems),
    };
    let mut candidate_cfg = cfg.rules.clone();
    candidate_cfg.dir = opts.rules.clone();
    if !opts.rules.is_dir() {
        eprintln!(
            "postern: the candidate rules directory {} does not exist",
            opts.rules.display()
        );
        return ExitCode::FAILURE;
    }
    let candidate = match Policy::load(
        candidate_cfg,
        &cfg.policies.dir,
        cfg.checks.clone(),
        cfg.dns.clone(),
        cfg.server.hostname.clone(),
    ) {
        Ok(p) => p,
        Err(problems) => return fail_problems("the candidate rules do not load", &problems),
    };
    let mut export = None;
    let loaded = match &opts.corpus {
        Corpus::Maildir(d) => load_maildir(d),
        Corpus::Mbox(f) => load_mbox(f),
        Corpus::Recent(age) => match export_recent(cfg, *age).await {
            Ok(dir) => {
                let l = load_export(&dir, *age);
                export = Some(dir);
                l
            }
            Err(e) => Err(e),
        },
    };
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            eprintln!("postern: {e}");
            if let Some(dir) = export {
                let _ = std::fs::remove_dir_all(dir);
            }
            return ExitCode::FAILURE;
        }
    };
    let threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let (r, c) = (running.current(), candidate.current());
    let report = replay(&r, &c, &loaded, &cfg.server.hostname, threads);
    if let Some(dir) = export {
        let _ = std::fs::remove_dir_all(dir);
    }
    print!(
        "{}",
        render(
            &report,
            &loaded.what,
            &cfg.rules.dir,
            &opts.rules,
            matches!(opts.corpus, Corpus::Recent(_))
        )
    );
    ExitCode::SUCCESS
}

fn fail_problems(what: &str, problems: &[Problem]) -> ExitCode {
    eprintln!("postern: {what}:");
    for p in problems {
        eprintln!("  {p}");
    }
    ExitCode::FAILURE
}

// ---------------------------------------------------------------- corpora

/// The messages of a Maildir: `cur/` and `new/` of `dir` and of its
/// Maildir++ folders (`.Name/`), in file-name order.
pub fn load_maildir(dir: &Path) -> Result<Loaded, String> {
    let mut roots = vec![dir.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let dotted = e.file_name().to_string_lossy().starts_with('.');
            if dotted && (p.join("cur").is_dir() || p.join("new").is_dir()) {
                roots.push(p);
            }
        }
    }
    let mut files = Vec::new();
    let mut found = false;
    for root in &roots {
        for sub in ["cur", "new"] {
            let d = root.join(sub);
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", d.display())),
            };
            found = true;
            for e in rd {
                let e = e.map_err(|e| format!("{}: {e}", d.display()))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_file()) {
                    continue;
                }
                files.push((name, e.path()));
            }
        }
    }
    if !found {
        return Err(format!(
            "{} is not a Maildir (it has no cur/ or new/)",
            dir.display()
        ));
    }
    files.sort();
    let items = files
        .into_iter()
        .map(|(name, path)| Item {
            id: name.split(":2,").next().unwrap_or(&name).to_string(),
            source: Source::File(path),
        })
        .collect();
    Ok(Loaded {
        items,
        mbox: Vec::new(),
        what: format!("Maildir {}", dir.display()),
    })
}

/// The messages of an mbox file.
pub fn load_mbox(file: &Path) -> Result<Loaded, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if !bytes.is_empty() && !bytes.starts_with(b"From ") {
        return Err(format!(
            "{} is not an mbox file (it does not start with a \"From \" line)",
            file.display()
        ));
    }
    let items = mbox_messages(&bytes)
        .into_iter()
        .enumerate()
        .map(|(i, r)| Item {
            id: (i + 1).to_string(),
            source: Source::Mbox(r),
        })
        .collect();
    Ok(Loaded {
        items,
        mbox: bytes,
        what: format!("mbox {}", file.display()),
    })
}

/// Where each message of an mbox lies: after its `From ` separator line,
/// up to the next separator (a `From ` line at the start of the file or
/// after an empty line), without the empty line that precedes it.
pub fn mbox_messages(mbox: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut pos = 0;
    let mut prev_empty = true;
    while pos < mbox.len() {
        let end = mbox[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(mbox.len(), |i| pos + i + 1);
        let line = &mbox[pos..end];
        if prev_empty && line.starts_with(b"From ") {
            if let Some(s) = start {
                out.push(s..trim_separator_gap(mbox, s, pos));
            }
            start = Some(end);
        }
        prev_empty = line == b"\n" || line == b"\r\n";
        pos = end;
    }
    if let Some(s) = start {
        out.push(s..trim_separator_gap(mbox, s, mbox.len()));
    }
    out
}

/// The end of a message that runs to `end`: the empty line the next
/// separator needs is the mbox's, not the message's.
fn trim_separator_gap(mbox: &[u8], start: usize, end: usize) -> usize {
    let m = &mbox[start..end];
    if m.ends_with(b"\r\n\r\n") || m == b"\r\n" {
        end - 2
    } else if m.ends_with(b"\n\n") || m == b"\n" {
        end - 1
    } else {
        end
    }
}

/// mboxrd unquoting: a line `>From `, `>>From `, ... loses one `>`.
pub fn mboxrd_unquote(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len());
    for line in m.split_inclusive(|&b| b == b'\n') {
        let quotes = line.iter().take_while(|&&b| b == b'>').count();
        if quotes > 0 && line[quotes..].starts_with(b"From ") {
            out.extend_from_slice(&line[1..]);
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

/// Asks the running gateway to write the recent copies into a fresh
/// directory under `data_dir/replay/`, or writes them itself from the
/// store (into a fresh directory in the temp dir) when no gateway runs.
async fn export_recent(cfg: &Config, age: Duration) -> Result<PathBuf, String> {
    use crate::admin::{Request, export_root, send_control, socket_path};
    let data_dir = &cfg.server.data_dir;
    let since_ms = crate::store::now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2);
    let dir = export_root(data_dir).join(format!(
        "recent-{}-{}",
        std::process::id(),
        crate::store::now_ms()
    ));
    let req = Request::RecentExport {
        since_ms,
        dir: dir.clone(),
    };
    match send_control(&socket_path(data_dir), &req).await {
        Some(resp) if resp.ok => Ok(dir),
        Some(resp) => Err(format!(
            "the gateway could not export the recent copies: {}",
            resp.output.trim_end()
        )),
        None => {
            let path = data_dir.join("store");
            if !path.exists() {
                return Err(format!(
                    "no store at {} (has `postern serve` ever run with this config?)",
                    path.display()
                ));
            }
            // Not under data_dir: a root-owned directory there would keep
            // a later gateway (its own user) from writing its exports.
            let dir = std::env::temp_dir().join(format!(
                "postern-recent-{}-{}",
                std::process::id(),
                crate::store::now_ms()
            ));
            let store = crate::store::Store::open(&path).map_err(|e| e.to_string())?;
            let r = store.export_recent(since_ms, &dir);
            let _ = store.flush();
            match r {
                Ok(_) => Ok(dir),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    Err(format!("exporting the recent copies: {e}"))
                }
            }
        }
    }
}

/// The items of an export directory (`cases.jsonl` and `ID.eml`).
fn load_export(dir: &Path, age: Duration) -> Result<Loaded, String> {
    let list = dir.join("cases.jsonl");
    let text = std::fs::read_to_string(&list).map_err(|e| format!("{}: {e}", list.display()))?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: RecentCase =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", list.display(), n + 1))?;
        items.push(Item {
            id: case.id.clone(),
            source: Source::Recorded(dir.join(format!("{}.eml", case.id)), Box::new(case)),
        });
    }
    Ok(Loaded {
        items,
        mbox: Vec::new(),
        what: format!(
            "the copies kept of the last {}",
            humantime::format_duration(age)
        ),
    })
}

/// One message ready to run: its bytes, case, and the verdict recorded.
struct Ready {
    message: Vec<u8>,
    case: Case,
    recorded: Option<(String, String)>,
}

impl Loaded {
    fn ready(&self, item: &Item, hostname: &str) -> Result<Ready, String> {
        match &item.source {
            Source::File(p) => {
                let message = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                let case = derive_case(&message, hostname);
                Ok(Ready {
                    message,
                    case,
                    recorded: None,
                })
            }
            Source::Mbox(r) => {
                let message = mboxrd_unquote(self.mbox.get(r.clone()).unwrap_or_default());
                let case = derive_case(&message, hostname);
                Ok(Ready {
                    message,
                    case,
                    recorded: None,
                })
            }
            Source::Recorded(p, rc) => {
                let message = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                Ok(Ready {
                    message,
                    case: recorded_case(rc),
                    recorded: Some((rc.verdict.clone(), rc.decided_by.clone())),
                })
            }
        }
    }
}

/// The case a `keep_recent` copy was decided with.
pub fn recorded_case(rc: &RecentCase) -> Case {
    Case {
        ip: rc.ip,
        helo: rc.helo.clone(),
        from: rc.from.clone(),
        rcpts: rc.rcpts.clone(),
        auth_user: rc.auth_user.clone(),
        tls: rc.tls,
        submission: rc.submission,
        trusted: rc.trusted,
        inputs: DataInputs {
            checks: Some(rc.checks.clone()),
            scan: Some(rc.scan.clone()),
            lists: rc.lists,
        },
    }
}

// ---------------------------------------------------------------- the envelope from headers

/// The address in a `Return-Path`/`Delivered-To` style value (`<a@b>` or `a@b`).
fn bare_address(v: &str) -> String {
    let v = v.trim();
    let v = match (v.find('<'), v.rfind('>')) {
        (Some(a), Some(b)) if a < b => &v[a + 1..b],
        _ => v,
    };
    v.trim().to_string()
}

fn unfold(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The envelope and check results of a message that has none recorded,
/// from its own headers:
/// - sender: `Return-Path`, else the first `From` address, else `<>`;
/// - recipients: every `Delivered-To`, else every `X-Original-To`, else the
///   `To` and `Cc` addresses, else `postmaster@HOSTNAME`;
/// - client IP and HELO: the topmost `Received` (the last hop's, which the
///   receiving server wrote), `from HELO (... [IP])`; else `0.0.0.0` and
///   `unknown`; TLS when it says `with ESMTPS`/`ESMTPSA`;
/// - checks: the `Authentication-Results` whose authserv-id is `hostname`,
///   else the topmost one: its `spf=`, `dkim=` (a pass if any signature
///   passed), `dmarc=` and `policy.dmarc=`; else all `none`;
/// - no scanner results, no list hits, not trusted, no login.
pub fn derive_case(message: &[u8], hostname: &str) -> Case {
    let h = crate::mail::headers::scan(message);
    let mut return_path = None;
    let mut delivered = Vec::new();
    let mut original = Vec::new();
    let mut received = None;
    let mut ar_ours = None;
    let mut ar_first = None;
    for f in &h.fields {
        let name = f.name(message);
        let value = || unfold(f.value(message));
        if name.eq_ignore_ascii_case(b"return-path") && return_path.is_none() {
            return_path = Some(bare_address(&value()));
        } else if name.eq_ignore_ascii_case(b"delivered-to") {
            delivered.push(bare_address(&value()));
        } else if name.eq_ignore_ascii_case(b"x-original-to") {
            original.push(bare_address(&value()));
        } else if name.eq_ignore_ascii_case(b"received") && received.is_none() {
            received = Some(value());
        } else if name.eq_ignore_ascii_case(b"authentication-results") {
            let v = value();
            let id = v.split(';').next().unwrap_or("").trim();
            let id = id.split_whitespace().next().unwrap_or("");
            if ar_ours.is_none() && id.eq_ignore_ascii_case(hostname) {
                ar_ours = Some(v.clone());
            }
            if ar_first.is_none() {
                ar_first = Some(v);
            }
        }
    }
    let parsed = mail_parser::MessageParser::new().parse_headers(message);
    let addresses = |which: Option<&mail_parser::Address>| -> Vec<String> {
        which
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.address.as_deref().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let from = match return_path {
        Some(rp) => rp,
        None => parsed
            .as_ref()
            .and_then(|p| addresses(p.from()).into_iter().next())
            .unwrap_or_default(),
    };
    let mut rcpts = if !delivered.is_empty() {
        delivered
    } else if !original.is_empty() {
        original
    } else {
        parsed
            .as_ref()
            .map(|p| {
                let mut v = addresses(p.to());
                v.extend(addresses(p.cc()));
                v
            })
            .unwrap_or_default()
    };
    let mut seen = std::collections::HashSet::new();
    rcpts.retain(|r| !r.is_empty() && seen.insert(r.to_ascii_lowercase()));
    if rcpts.is_empty() {
        rcpts.push(format!("postmaster@{hostname}"));
    }
    let (ip, helo, tls) = received
        .as_deref()
        .map(parse_received)
        .unwrap_or((None, None, false));
    let checks = ar_ours.or(ar_first).map(|v| parse_auth_results(&v));
    Case {
        ip: ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        helo: helo.unwrap_or_else(|| "unknown".into()),
        from,
        rcpts,
        auth_user: None,
        tls,
        submission: false,
        trusted: false,
        inputs: DataInputs {
            checks: Some(checks.unwrap_or_default()),
            scan: Some(ScanResults::default()),
            lists: ListHits::default(),
        },
    }
}

/// `from HELO (rdns [IP])` of a Received value; and whether TLS was used.
fn parse_received(v: &str) -> (Option<IpAddr>, Option<String>, bool) {
    let mut words = v.split_whitespace();
    let helo = match (words.next(), words.next(), words.next()) {
        // Ours for an EHLO name that is no domain: `from [IP] (helo=NAME)`.
        (Some(f), Some(_), Some(c))
            if f.eq_ignore_ascii_case("from") && c.starts_with("(helo=") =>
        {
            Some(c["(helo=".len()..].trim_end_matches(')').to_string())
        }
        (Some(f), Some(h), _) if f.eq_ignore_ascii_case("from") => {
            Some(h.trim_matches(|c| c == '(' || c == ')').to_string())
        }
        _ => None,
    };
    // The first bracketed literal is the connecting address.
    let ip = v.split('[').skip(1).find_map(|rest| {
        let lit = rest.split(']').next()?;
        let lit = lit
            .strip_prefix("IPv6:")
            .or_else(|| lit.strip_prefix("ipv6:"))
            .unwrap_or(lit);
        lit.parse::<IpAddr>().ok()
    });
    let lower = v.to_ascii_lowercase();
    let tls = lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| matches!(w, "esmtps" | "esmtpsa" | "lmtps"));
    (ip, helo.filter(|h| !h.is_empty()), tls)
}

/// SPF, DKIM and DMARC words of an `Authentication-Results` value.
pub fn parse_auth_results(v: &str) -> CheckResults {
    let mut c = CheckResults::default();
    let mut dkim: Vec<String> = Vec::new();
    for part in v.split(';').skip(1) {
        let mut words = part.split_whitespace();
        let Some(first) = words.next() else { continue };
        let Some((method, result)) = first.split_once('=') else {
            continue;
        };
        let result = result.to_ascii_lowercase();
        match method.to_ascii_lowercase().as_str() {
            "spf" => c.spf = result,
            "dkim" => dkim.push(result),
            "dmarc" => {
                c.dmarc = result;
                for w in words {
                    if let Some(p) = w.strip_prefix("policy.dmarc=") {
                        c.dmarc_policy = p.to_ascii_lowercase();
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(best) = dkim.iter().find(|d| *d == "pass").or(dkim.first()) {
        c.dkim = best.clone();
    }
    c
}

fn subject_of(message: &[u8]) -> String {
    mail_parser::MessageParser::new()
        .parse_headers(message)
        .and_then(|p| p.subject().map(crate::mail::one_line))
        .unwrap_or_default()
}

// ---------------------------------------------------------------- the run

/// Runs both sets over every item on `threads` workers.
pub fn replay(
    running: &RuleSet,
    candidate: &RuleSet,
    corpus: &Loaded,
    hostname: &str,
    threads: usize,
) -> Report {
    let started = Instant::now();
    let threads = threads.clamp(1, 64);
    let next = AtomicUsize::new(0);
    let unreadable = Mutex::new((Vec::new(), 0usize));
    // Workers take small batches so a slow message does not hold one up.
    const BATCH: usize = 64;
    let parts: Vec<Part> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut part = Part::default();
                    loop {
                        let from = next.fetch_add(BATCH, Ordering::Relaxed);
                        if from >= corpus.items.len() {
                            break;
                        }
                        let to = (from + BATCH).min(corpus.items.len());
                        for (i, item) in corpus.items[from..to].iter().enumerate() {
                            match corpus.ready(item, hostname) {
                                Ok(r) => part.one(from + i, item, &r, running, candidate),
                                Err(e) => {
                                    if let Ok(mut u) = unreadable.lock() {
                                        u.1 += 1;
                                        if u.0.len() < 10 {
                                            u.0.push(e);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    part
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut report = Report {
        threads,
        ..Report::default()
    };
    for p in parts {
        report.messages += p.messages;
        merge(&mut report.running, p.running);
        merge(&mut report.candidate, p.candidate);
        report.changed.extend(p.changed);
        report.redecided += p.redecided;
        report.unlike_recorded += p.unlike_recorded;
    }
    report.changed.sort_by_key(|c| c.index);
    for set in [&mut report.running, &mut report.candidate] {
        set.nanos.sort_unstable();
        for s in set.scripts.values_mut() {
            s.micros.sort_unstable();
        }
    }
    let (list, count) = unreadable.into_inner().unwrap_or_default();
    report.unreadable = list;
    report.unreadable_count = count;
    report.elapsed = started.elapsed();
    report
}

/// What one worker saw.
#[derive(Default)]
struct Part {
    messages: usize,
    running: SetReport,
    candidate: SetReport,
    changed: Vec<Changed>,
    redecided: u64,
    unlike_recorded: u64,
}

impl Part {
    fn one(
        &mut self,
        index: usize,
        item: &Item,
        r: &Ready,
        running: &RuleSet,
        candidate: &RuleSet,
    ) {
        self.messages += 1;
        let old = timed(running, r, &mut self.running);
        let new = timed(candidate, r, &mut self.candidate);
        let (ow, nw) = (old.verdict.word(), new.verdict.word());
        if let Some((word, _)) = &r.recorded
            && word != ow
        {
            self.unlike_recorded += 1;
        }
        if ow != nw {
            self.changed.push(Changed {
                index,
                id: item.id.clone(),
                sender: r.case.from.clone(),
                subject: subject_of(&r.message),
                old: ow.into(),
                old_by: old.decided_by,
                new: nw.into(),
                new_by: new.decided_by,
            });
        } else if old.decided_by != new.decided_by {
            self.redecided += 1;
        }
    }
}

/// Evaluates one message and adds what it did to `set`.
fn timed(rules: &RuleSet, r: &Ready, set: &mut SetReport) -> Evaluation {
    let started = Instant::now();
    let e = rules.evaluate(&r.case, &r.message);
    set.nanos
        .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    *set.verdicts.entry(e.verdict.word().into()).or_default() += 1;
    let mut per: BTreeMap<&str, u64> = BTreeMap::new();
    for st in &e.trace.stages {
        for c in &st.calls {
            if c.script.starts_with("ratelimit:") {
                continue;
            }
            let s = set.scripts.entry(c.script.clone()).or_default();
            s.shadow = c.shadow;
            s.calls += 1;
            if c.verdict != "none" {
                *s.said.entry(c.verdict.clone()).or_default() += 1;
            }
            *per.entry(&c.script).or_default() += c.micros;
        }
    }
    for (name, micros) in per {
        if let Some(s) = set.scripts.get_mut(name) {
            s.messages += 1;
            s.micros.push(micros);
        }
    }
    if let Some(s) = set.scripts.get_mut(&e.decided_by) {
        s.decided += 1;
    }
    e
}

fn merge(into: &mut SetReport, from: SetReport) {
    for (k, v) in from.verdicts {
        *into.verdicts.entry(k).or_default() += v;
    }
    into.nanos.extend(from.nanos);
    for (k, v) in from.scripts {
        let s = into.scripts.entry(k).or_default();
        s.shadow |= v.shadow;
        s.messages += v.messages;
        s.calls += v.calls;
        s.decided += v.decided;
        for (w, n) in v.said {
            *s.said.entry(w).or_default() += n;
        }
        s.micros.extend(v.micros);
    }
}

// ---------------------------------------------------------------- the report

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The report as printed.
pub fn render(
    report: &Report,
    what: &str,
    running: &Path,
    candidate: &Path,
    recent: bool,
) -> String {
    let mut s = String::new();
    let secs = report.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        report.messages as f64 / secs
    } else {
        0.0
    };
    s.push_str(&format!(
        "replayed {} message(s) from {what} on {} thread(s) in {secs:.2}s ({rate:.0} messages/s)\n",
        report.messages, report.threads
    ));
    s.push_str(&format!("running:   {}\n", running.display()));
    s.push_str(&format!("candidate: {}\n", candidate.display()));
    if report.unreadable_count > 0 {
        s.push_str(&format!(
            "unreadable: {} message(s) skipped\n",
            report.unreadable_count
        ));
        for e in &report.unreadable {
            s.push_str(&format!("  {e}\n"));
        }
    }
    s.push_str("\nVERDICT       RUNNING  CANDIDATE   CHANGE\n");
    let mut words: Vec<&str> = VERDICTS.to_vec();
    for set in [&report.running, &report.candidate] {
        for k in set.verdicts.keys() {
            if !words.contains(&k.as_str()) {
                words.push(k);
            }
        }
    }
    for w in words {
        let a = report.running.verdicts.get(w).copied().unwrap_or(0);
        let b = report.candidate.verdicts.get(w).copied().unwrap_or(0);
        s.push_str(&format!(
            "{w:<12} {a:>8} {b:>10} {:>+8}\n",
            b as i64 - a as i64
        ));
    }
    if recent {
        s.push_str(&format!(
            "(the running set disagrees with the verdict given at receipt on {} message(s))\n",
            report.unlike_recorded
        ));
    }
    s.push_str(&format!("\nchanged: {} message(s)", report.changed.len()));
    if report.redecided > 0 {
        s.push_str(&format!(
            " ({} more keep their verdict, decided by another script)",
            report.redecided
        ));
    }
    s.push('\n');
    for c in &report.changed {
        s.push_str(&format!(
            "  {}  {}  \"{}\"  {} -> {}  ({} -> {})\n",
            c.id,
            if c.sender.is_empty() { "<>" } else { &c.sender },
            c.subject.replace('"', "'"),
            c.old,
            c.new,
            c.old_by,
            c.new_by
        ));
    }
    for (name, set) in [
        ("running", &report.running),
        ("candidate", &report.candidate),
    ] {
        s.push_str(&format!(
            "\n{name} set: evaluate per message p50 {}µs, p99 {}µs, max {}µs\n",
            quantile(&set.nanos, 0.5) / 1000,
            quantile(&set.nanos, 0.99) / 1000,
            set.nanos.last().copied().unwrap_or(0) / 1000
        ));
        s.push_str(
            "SCRIPT                         MESSAGES    CALLS  DECIDED  P50µs  P99µs  MAXµs  SAID\n",
        );
        for (script, st) in &set.scripts {
            let said: Vec<String> = st.said.iter().map(|(w, n)| format!("{w}={n}")).collect();
            let label = if st.shadow {
                format!("{script} (shadow)")
            } else {
                script.clone()
            };
            s.push_str(&format!(
                "{label:<30} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6}  {}\n",
                st.messages,
                st.calls,
                st.decided,
                quantile(&st.micros, 0.5),
                quantile(&st.micros, 0.99),
                st.micros.last().copied().unwrap_or(0),
                if said.is_empty() {
                    "-".to_string()
                } else {
                    said.join(" ")
                }
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbox_split_and_unquote() {
        let mbox = b"From a@b.test Mon Jan  1 00:00:00 2024\nSubject: one\n\nbody\n>From here\n>>From there\nFrom inside a line is not a separator\n\nFrom c@d.test Mon Jan  1 00:00:01 2024\nSubject: two\n\nlast\n";
        let ms = mbox_messages(mbox);
        assert_eq!(ms.len(), 2);
        let one = mboxrd_unquote(&mbox[ms[0].clone()]);
        assert_eq!(
            one,
            b"Subject: one\n\nbody\nFrom here\n>From there\nFrom inside a line is not a separator\n"
        );
        assert_eq!(&mbox[ms[1].clone()], b"Subject: two\n\nlast\n");
        // CRLF mboxes, and an empty file.
        let crlf = b"From x\r\nA: 1\r\n\r\nb\r\n\r\nFrom y\r\nA: 2\r\n\r\nc\r\n";
        let ms = mbox_messages(crlf);
        assert_eq!(&crlf[ms[0].clone()], b"A: 1\r\n\r\nb\r\n");
        assert_eq!(&crlf[ms[1].clone()], b"A: 2\r\n\r\nc\r\n");
        assert!(mbox_messages(b"").is_empty());
    }

    #[test]
    fn case_from_headers() {
        let m = b"Return-Path: <bounce@far.test>\r\nDelivered-To: u@local.test\r\nReceived: from mx.far.test ([192.0.2.7])\r\n\tby gw.test (Postern) with ESMTPS id 1;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\nReceived: from inner ([10.0.0.1]) by mx.far.test\r\nAuthentication-Results: other.test; spf=fail\r\nAuthentication-Results: gw.test; spf=pass smtp.mailfrom=far.test;\r\n dkim=fail header.d=x; dkim=pass header.d=far.test; dmarc=pass header.from=far.test policy.dmarc=reject\r\nFrom: Someone <someone@far.test>\r\nTo: other@local.test\r\nSubject: hi\r\n\r\nbody\r\n";
        let c = derive_case(m, "gw.test");
        assert_eq!(c.from, "bounce@far.test");
        assert_eq!(c.rcpts, vec!["u@local.test".to_string()]);
        assert_eq!(c.ip, "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_eq!(c.helo, "mx.far.test");
        assert!(c.tls);
        let checks = c.inputs.checks.unwrap();
        assert_eq!(
            (
                checks.spf.as_str(),
                checks.dkim.as_str(),
                checks.dmarc.as_str()
            ),
            ("pass", "pass", "pass")
        );
        assert_eq!(checks.dmarc_policy, "reject");
        // Nothing to go on: the header From, To and Cc, and defaults.
        let c = derive_case(
            b"From: a@far.test\nTo: x@local.test, Y <y@local.test>\nCc: z@local.test\n\nhi\n",
            "gw.test",
        );
        assert_eq!(c.from, "a@far.test");
        assert_eq!(c.rcpts, ["x@local.test", "y@local.test", "z@local.test"]);
        assert_eq!(c.ip, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.inputs.checks.unwrap(), CheckResults::default());
        let c = derive_case(b"Subject: none\n\n", "gw.test");
        assert_eq!(c.rcpts, ["postmaster@gw.test"]);
        assert_eq!(c.from, "");
        let (ip, helo, _) = parse_received("from [192.0.2.9] (helo=x?Tue,) by x");
        assert_eq!(ip, Some("192.0.2.9".parse().unwrap()));
        assert_eq!(helo.as_deref(), Some("x?Tue,"));
        let (ip, _, _) = parse_received("from h ([IPv6:2001:db8::1]) by x");
        assert_eq!(ip, Some("2001:db8::1".parse().unwrap()));
    }
}

#[cfg(test)]
mod property {
    /// Any bytes split into in-bounds, ordered, non-overlapping messages;
    /// unquoting never grows a message and keeps its line count.
    #[test]
    fn any_mbox_splits_in_bounds() {
        crate::testing::cases(20_000, 0x3b0c5, |rng| {
            let mbox = rng.bytes(200, b"From >\r\n\nax");
            let mut last = 0;
            for r in super::mbox_messages(&mbox) {
                assert!(
                    r.start <= r.end && r.end <= mbox.len() && r.start >= last,
                    "{mbox:?}"
                );
                last = r.end;
                let m = &mbox[r];
                let u = super::mboxrd_unquote(m);
                assert!(u.len() <= m.len());
                let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count();
                assert_eq!(lines(&u), lines(m));
            }
        });
    }
}
