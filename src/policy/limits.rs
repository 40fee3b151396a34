//! Rate limits from `policies/ratelimits.toml` (governor keyed limiters).
//!
//! The limiter of a limit whose definition did not change is carried over a
//! reload, so its counts survive; [`LimiterRegistry::housekeeping`] forgets
//! keys that are back to a full bucket, so millions of distinct senders do
//! not pile up.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{BackendOnError, Problem};
use crate::mail::{Enhanced, Reply};
use crate::policy::cluster::{self, Answer, Bucket, Shared};
use crate::policy::types::{TxInfo, Verdict};

/// What a limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Sender,
    SenderDomain,
    ClientIp,
    AuthUser,
    Recipient,
}

impl LimitKey {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sender" => LimitKey::Sender,
            "sender_domain" => LimitKey::SenderDomain,
            "client_ip" => LimitKey::ClientIp,
            "auth_user" => LimitKey::AuthUser,
            "recipient" => LimitKey::Recipient,
            _ => return None,
        })
    }
}

/// Which listeners a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Inbound,
    Submission,
    All,
}

impl Scope {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "inbound" => Scope::Inbound,
            "submission" => Scope::Submission,
            "all" => Scope::All,
            _ => return None,
        })
    }

    fn applies(self, submission: bool) -> bool {
        match self {
            Scope::Inbound => !submission,
            Scope::Submission => submission,
            Scope::All => true,
        }
    }
}

/// What going over a limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitAction {
    /// `450 4.7.1` with a retry hint; nothing is accepted.
    Tempfail,
    /// Accept the message and keep it in the queue's held state for an
    /// admin: a compromised account sends nothing more and loses nothing.
    Hold,
}

impl LimitAction {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "tempfail" => LimitAction::Tempfail,
            "hold" => LimitAction::Hold,
            _ => return None,
        })
    }
}

/// A limit a transaction went over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Limited {
    /// A `tempfail` limit: refuse with this verdict.
    Refuse(String, Verdict),
    /// Only `hold` limits: accept, and hold the message.
    Hold(String),
    /// The shared backend did not answer and `on_backend_error = "tempfail"`.
    Backend(Verdict),
}

/// One `[[limit]]`, validated. Two equal specs share one limiter across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    pub(crate) name: String,
    pub(crate) key: LimitKey,
    /// `count` per `per`.
    pub(crate) count: u32,
    pub(crate) per: Duration,
    pub(crate) burst: u32,
    pub(crate) scope: Scope,
    pub(crate) action: LimitAction,
}

type Limiter = DefaultKeyedRateLimiter<String>;

/// A limit with its (shared) limiter.
pub(crate) struct Limit {
    pub(crate) spec: LimitSpec,
    limiter: Arc<Limiter>,
    /// In cluster mode: its Redis key prefix and GCRA terms.
    redis: Option<(String, (u64, u64))>,
}

/// The limits of one rule set.
#[derive(Default)]
pub(crate) struct Limits {
    limits: Vec<Limit>,
    /// `[cluster] redis`: count there first; the limiters above are then
    /// the fallback, at the limit divided by the number of nodes.
    shared: Option<Arc<Shared>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    limit: Vec<Spanned<LimitToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitToml {
    name: Spanned<String>,
    key: Spanned<String>,
    rate: Spanned<String>,
    burst: Option<Spanned<i64>>,
    scope: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(source: &str, offset: usize) -> usize {
    let end = offset.min(source.len());
    source.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses `"100/1h"` into (100, 1h): the one rate grammar, `config::Rate`.
fn parse_rate(rate: &str) -> Result<(u32, Duration), crate::config::ValueError> {
    crate::config::Rate::parse(rate).map(|r| (r.count, r.per))
}

/// Reads and validates `ratelimits.toml`. A missing file means no limits.
pub(crate) fn parse_file(path: &Path) -> Result<Vec<LimitSpec>, Vec<Problem>> {
    let source = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(vec![Problem::new(path, None, format!("cannot read: {e}"))]),
    };
    parse_str(path, &source)
}

/// Validates the text of a `ratelimits.toml`; `path` names it in problems.
pub(crate) fn parse_str(path: &Path, source: &str) -> Result<Vec<LimitSpec>, Vec<Problem>> {
    let file: LimitsFile = toml::from_str(source).map_err(|e| {
        let line = e.span().map(|s| line_of(source, s.start));
        vec![Problem::new(path, line, e.message().to_string())]
    })?;
    let mut problems = Vec::new();
    let mut specs: Vec<LimitSpec> = Vec::new();
    for entry in file.limit {
        match parse_entry(path, source, entry, &specs) {
            Ok(spec) => specs.push(spec),
            Err(p) => problems.push(p),
        }
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(problems)
    }
}

/// Validates one `[[limit]]` against the ones before it (`specs`): the
/// first problem found, at the line of the offending value.
fn parse_entry(
    path: &Path,
    source: &str,
    entry: Spanned<LimitToml>,
    specs: &[LimitSpec],
) -> Result<LimitSpec, Problem> {
    let entry_line = line_of(source, entry.span().start);
    let entry = entry.into_inner();
    let at = |s: std::ops::Range<usize>, msg: String| {
        Problem::new(path, Some(line_of(source, s.start)), msg)
    };
    let name = entry.name.get_ref().trim().to_string();
    if name.is_empty() {
        return Err(at(entry.name.span(), "empty limit name".into()));
    }
    if specs.iter().any(|s| s.name == name) {
        return Err(at(
            entry.name.span(),
            format!("limit {name:?} is defined twice"),
        ));
    }
    let key = LimitKey::parse(entry.key.get_ref()).ok_or_else(|| {
        at(
            entry.key.span(),
            format!(
                "limit {name:?}: key {:?} is not one of sender, sender_domain, client_ip, auth_user, recipient",
                entry.key.get_ref()
            ),
        )
    })?;
    let (count, per) = parse_rate(entry.rate.get_ref())
        .map_err(|msg| at(entry.rate.span(), format!("limit {name:?}: {msg}")))?;
    let burst = match &entry.burst {
        None => count,
        Some(b) => u32::try_from(*b.get_ref())
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| {
                at(
                    b.span(),
                    format!("limit {name:?}: burst must be a whole number >= 1"),
                )
            })?,
    };
    let scope = match &entry.scope {
        None => Scope::Inbound,
        Some(s) => Scope::parse(s.get_ref()).ok_or_else(|| {
            at(
                s.span(),
                format!(
                    "limit {name:?}: scope {:?} is not one of inbound, submission, all",
                    s.get_ref()
                ),
            )
        })?,
    };
    let action = match &entry.action {
        None => LimitAction::Tempfail,
        Some(a) => LimitAction::parse(a.get_ref()).ok_or_else(|| {
            at(
                a.span(),
                format!(
                    "limit {name:?}: action {:?} is not one of tempfail, hold",
                    a.get_ref()
                ),
            )
        })?,
    };
    if Quota::with_period(per / count).is_none() {
        return Err(Problem::new(
            path,
            Some(entry_line),
            format!("limit {name:?}: rate too high"),
        ));
    }
    Ok(LimitSpec {
        name,
        key,
        count,
        per,
        burst,
        scope,
        action,
    })
}

/// Limiters by their definition, shared by the rule sets of one [`Policy`](crate::policy::Policy).
#[derive(Default)]
pub(crate) struct LimiterRegistry {
    limiters: Mutex<HashMap<LimitSpec, Arc<Limiter>>>,
    /// `[cluster] redis`, when set.
    shared: Option<Arc<Shared>>,
    /// The local limiters allow limit / this (`[cluster] nodes`; 1 alone).
    nodes: u32,
}

impl LimiterRegistry {
    /// Limits counted in `shared` (Redis), falling back to this node's own
    /// buckets at the limit divided by `nodes`.
    pub(crate) fn clustered(shared: Arc<Shared>, nodes: u32) -> Self {
        LimiterRegistry {
            limiters: Mutex::default(),
            shared: Some(shared),
            nodes: nodes.max(1),
        }
    }

    /// The shared backend, if any (for the health probe).
    pub(crate) fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Builds the limits for `specs`, reusing the limiter of every unchanged
    /// spec. Limiters of specs no longer used are forgotten.
    pub(crate) fn build(&self, specs: Vec<LimitSpec>) -> Limits {
        let mut map = self
            .limiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = HashMap::new();
        let mut limits = Vec::with_capacity(specs.len());
        for spec in specs {
            let limiter = match map.remove(&spec) {
                Some(l) => l,
                None => Arc::new(new_limiter(&spec, self.nodes)),
            };
            next.insert(spec.clone(), limiter.clone());
            let redis = self
                .shared
                .as_ref()
                .map(|_| (cluster::key_prefix(&spec), cluster::gcra_terms(&spec)));
            limits.push(Limit {
                spec,
                limiter,
                redis,
            });
        }
        *map = next;
        Limits {
            limits,
            shared: self.shared.clone(),
        }
    }

    /// Forgets keys whose bucket is full again and returns memory; call it
    /// every minute or so. Returns the number of keys still tracked.
    pub(crate) fn housekeeping(&self) -> usize {
        let limiters: Vec<Arc<Limiter>> = self
            .limiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        limiters
            .iter()
            .map(|l| {
                l.retain_recent();
                l.shrink_to_fit();
                l.len()
            })
            .sum()
    }
}

/// The governor limiter of `spec`, at its rate and burst divided by `nodes`
/// (rounded up: a node alone never allows less than one message).
fn new_limiter(spec: &LimitSpec, nodes: u32) -> Limiter {
    let nodes = nodes.max(1);
    let count = spec.count.div_ceil(nodes).max(1);
    let period = (spec.per / count).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(spec.burst.div_ceil(nodes)).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst);
    RateLimiter::keyed(quota)
}

/// Lowercases an address and drops a `+tag` from its local part.
pub fn normalize_address(addr: &str) -> String {
    let addr = addr.trim().trim_start_matches('<').trim_end_matches('>');
    let lower = addr.to_lowercase();
    match lower.rsplit_once('@') {
        Some((local, domain)) => {
            let local = local.split_once('+').map_or(local, |(l, _)| l);
            format!("{local}@{domain}")
        }
        None => lower,
    }
}

fn domain_of(addr: &str) -> Option<&str> {
    addr.rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
}

impl Limits {
    pub(crate) fn specs(&self) -> impl Iterator<Item = &LimitSpec> {
        self.limits.iter().map(|l| &l.spec)
    }

    /// Checks the MAIL FROM limits (every key but `recipient`): the first
    /// exceeded `tempfail` limit refuses; else the first exceeded `hold`
    /// limit holds (the ones after it still count the transaction).
    pub(crate) fn check_mail_from(&self, tx: &TxInfo) -> Option<Limited> {
        let sender = normalize_address(&tx.from);
        let ip_key = format!("ip:{}", tx.conn.ip);
        let mut held = None;
        for limit in &self.limits {
            let Some(key) = limit.mail_from_key(tx, &sender, &ip_key) else {
                continue;
            };
            if let Some(l) = limit.exceeded(&key, &mut held) {
                return Some(l);
            }
        }
        held.map(Limited::Hold)
    }

    /// Checks the `recipient` limits for one RCPT TO, as [`Self::check_mail_from`].
    pub(crate) fn check_rcpt(&self, tx: &TxInfo, rcpt: &str) -> Option<Limited> {
        let key = normalize_address(rcpt);
        let mut held = None;
        for limit in &self.limits {
            if !limit.counts_rcpt(tx) {
                continue;
            }
            if let Some(l) = limit.exceeded(&key, &mut held) {
                return Some(l);
            }
        }
        held.map(Limited::Hold)
    }

    /// Whether the limits are counted in Redis (`[cluster] redis`), so the
    /// checks are to be awaited ([`Self::check_mail_from_shared`]).
    pub(crate) fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// [`Self::check_mail_from`] against the cluster's buckets, all or none.
    pub(crate) async fn check_mail_from_shared(&self, tx: &TxInfo) -> Option<Limited> {
        let sender = normalize_address(&tx.from);
        let ip_key = format!("ip:{}", tx.conn.ip);
        let keyed = self
            .limits
            .iter()
            .filter_map(|l| l.mail_from_key(tx, &sender, &ip_key).map(|k| (l, k)))
            .collect();
        self.check_shared(keyed, || self.check_mail_from(tx)).await
    }

    /// [`Self::check_rcpt`] against the cluster's buckets, all or none.
    pub(crate) async fn check_rcpt_shared(&self, tx: &TxInfo, rcpt: &str) -> Option<Limited> {
        let key = normalize_address(rcpt);
        let keyed = self
            .limits
            .iter()
            .filter(|l| l.counts_rcpt(tx))
            .map(|l| (l, key.clone()))
            .collect();
        self.check_shared(keyed, || self.check_rcpt(tx, rcpt)).await
    }

    /// One call to Redis for every (limit, key) of a command; `local` is the
    /// fallback when it fails and `on_backend_error = "local"`.
    async fn check_shared(
        &self,
        keyed: Vec<(&Limit, String)>,
        local: impl FnOnce() -> Option<Limited>,
    ) -> Option<Limited> {
        let shared = match &self.shared {
            Some(s) if !keyed.is_empty() => s,
            Some(_) => return None,
            None => return local(),
        };
        let buckets: Vec<Bucket> = keyed
            .iter()
            .filter_map(|(limit, key)| {
                let (prefix, (period_us, tolerance_us)) = limit.redis.as_ref()?;
                Some(Bucket {
                    key: format!("{prefix}{key}"),
                    period_us: *period_us,
                    tolerance_us: *tolerance_us,
                    hold: limit.spec.action == LimitAction::Hold,
                })
            })
            .collect();
        match shared.check(&buckets).await {
            Ok(Answer::Allowed { held: None }) => None,
            Ok(Answer::Allowed { held: Some(i) }) => keyed
                .get(i)
                .map(|(l, _)| Limited::Hold(l.spec.name.clone())),
            Ok(Answer::Refused { bucket, wait }) => keyed
                .get(bucket)
                .map(|(l, _)| Limited::Refuse(l.spec.name.clone(), refusal(&l.spec.name, wait))),
            Err(_unavailable) => match shared.on_error {
                BackendOnError::Local => local(),
                BackendOnError::Tempfail => Some(Limited::Backend(Verdict::Tempfail(Reply::new(
                    451,
                    Enhanced::new(4, 4, 3),
                    "Rate-limit service unavailable, please try again later",
                )))),
            },
        }
    }
}

/// The `450 4.7.1` of limit `name`, passing again in `wait`.
fn refusal(name: &str, wait: Duration) -> Verdict {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Verdict::Tempfail(Reply::new(
        450,
        Enhanced::new(4, 7, 1),
        format!("Rate limit {name} exceeded, try again in {}s", secs.max(1)),
    ))
}

impl Limit {
    /// What this limit counts a MAIL FROM by, or None when it does not
    /// count it (another scope, a `recipient` limit, no user).
    fn mail_from_key(&self, tx: &TxInfo, sender: &str, ip_key: &str) -> Option<String> {
        if !self.spec.scope.applies(tx.submission) {
            return None;
        }
        Some(match self.spec.key {
            LimitKey::Recipient => return None,
            // Bounces (MAIL FROM:<>) are counted by client IP.
            LimitKey::Sender if sender.is_empty() => ip_key.to_string(),
            LimitKey::Sender => sender.to_string(),
            LimitKey::SenderDomain => match domain_of(sender) {
                Some(d) => d.to_string(),
                None => ip_key.to_string(),
            },
            LimitKey::ClientIp => ip_key.to_string(),
            // A `<>` sender is a bounce, never a user's own mail.
            LimitKey::AuthUser if sender.is_empty() => return None,
            LimitKey::AuthUser => tx.auth_user.as_ref()?.to_lowercase(),
        })
    }

    /// Whether this limit counts each RCPT TO.
    fn counts_rcpt(&self, tx: &TxInfo) -> bool {
        self.spec.key == LimitKey::Recipient && self.spec.scope.applies(tx.submission)
    }

    /// Counts `key`; over a `tempfail` limit that is the refusal, over a
    /// `hold` limit its name goes into `held` (the first one wins).
    fn exceeded(&self, key: &String, held: &mut Option<String>) -> Option<Limited> {
        let verdict = self.check(key)?;
        match self.spec.action {
            LimitAction::Tempfail => Some(Limited::Refuse(self.spec.name.clone(), verdict)),
            LimitAction::Hold => {
                held.get_or_insert_with(|| self.spec.name.clone());
                None
            }
        }
    }

    fn check(&self, key: &String) -> Option<Verdict> {
        match self.limiter.check_key(key) {
            Ok(()) => None,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Some(refusal(&self.spec.name, wait))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(
            normalize_address("Alice+News@Example.TEST"),
            "alice@example.test"
        );
        assert_eq!(normalize_address("<bob@x.test>"), "bob@x.test");
        assert_eq!(normalize_address(""), "");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100/1h"), Ok((100, Duration::from_secs(3600))));
        assert_eq!(parse_rate("5/m"), Ok((5, Duration::from_secs(60))));
        assert!(parse_rate("0/1h").is_err());
        assert!(parse_rate("x/1h").is_err());
        assert!(parse_rate("10").is_err());
    }

    #[test]
    fn actions_parse_and_hold_does_not_refuse() {
        let src = "[[limit]]\nname = \"u\"\nkey = \"auth_user\"\nrate = \"1/1h\"\nscope = \"submission\"\naction = \"hold\"\n";
        let specs = parse_str(Path::new("r.toml"), src).unwrap();
        assert_eq!(specs[0].action, LimitAction::Hold);
        let err = parse_str(Path::new("r.toml"), &src.replace("hold", "drop")).unwrap_err();
        assert_eq!(err[0].line, Some(6), "{err:?}");
        let limits = LimiterRegistry::default().build(specs);
        let tx = |from: &str| TxInfo {
            conn: crate::policy::ConnInfo {
                ip: "192.0.2.1".parse().unwrap(),
                port: 1,
                tls: true,
            },
            helo: "h".into(),
            from: from.into(),
            auth_user: Some("Alice".into()),
            rcpts: vec![],
            submission: true,
            trusted: true,
        };
        assert_eq!(limits.check_mail_from(&tx("alice@x.test")), None);
        assert_eq!(
            limits.check_mail_from(&tx("alice@x.test")),
            Some(Limited::Hold("u".into()))
        );
        // `<>` never counts against a user.
        assert_eq!(limits.check_mail_from(&tx("")), None);
    }

    #[test]
    fn the_fallback_of_a_node_allows_its_share() {
        let spec = |burst| LimitSpec {
            name: "s".into(),
            key: LimitKey::Sender,
            count: 10,
            per: Duration::from_secs(60),
            burst,
            scope: Scope::All,
            action: LimitAction::Tempfail,
        };
        let allowed = |l: &Limiter| (0..20).filter(|_| l.check_key(&"k".into()).is_ok()).count();
        assert_eq!(allowed(&new_limiter(&spec(10), 1)), 10);
        // One of three nodes: 10 / 3, rounded up.
        assert_eq!(allowed(&new_limiter(&spec(10), 3)), 4);
        assert_eq!(allowed(&new_limiter(&spec(1), 3)), 1);
    }

    #[test]
    fn problems_have_lines() {
        let src = "[[limit]]\nname = \"a\"\nkey = \"sender\"\nrate = \"10/1h\"\n\n[[limit]]\nname = \"b\"\nkey = \"nope\"\nrate = \"1/1s\"\n";
        let err = parse_str(Path::new("r.toml"), src).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].line, Some(8));
        let err =
            parse_str(Path::new("r.toml"), "[[limit]]\nname = \"a\"\nbogus = 1\n").unwrap_err();
        assert_eq!(err[0].line, Some(3), "{:?}", err);
    }
}
