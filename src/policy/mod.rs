//! The policy engine: relay control, rate limits, SPF/DKIM/DMARC and the Rhai rules.
//!
//! Sans-I/O except for DNS: the SMTP session calls [`RuleSet::connect`],
//! [`RuleSet::mail_from`], [`RuleSet::rcpt`] and, at end of DATA, the async
//! [`RuleSet::data`]. A session takes [`Policy::current`] once and keeps
//! that set while a reload swaps in a new one.

mod auth;
pub(crate) mod cluster;
mod evaluate;
mod limits;
mod metrics;
mod rules;
mod script_api;
pub mod suite;
mod types;
mod watch;

/// The open-relay guard every RCPT goes through.
pub(crate) mod login_guard;
pub(crate) mod relay;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{ChecksConfig, ClusterConfig, Config, DnsConfig, OnError, RulesConfig};

use arc_swap::ArcSwap;
use mail_auth::MessageAuthenticator;
use rhai::Dynamic;

pub use crate::config::Problem;
pub use auth::{AuthOutcome, strip_forged_auth_results};
pub use cluster::check_reachable as check_cluster;
pub use evaluate::{Case, Evaluation};
pub use limits::{LimitAction, LimitKey, LimitSpec, Scope, normalize_address};
pub use metrics::PolicyMetrics;
pub use rules::{CALL_TIME_LIMIT, STAGES};
pub use types::{
    Call, CheckResults, ConnInfo, DataInputs, DataOutcome, Decided, Decision, ListHits,
    ScanResults, StageTrace, Trace, TxInfo, Verdict, final_verdict,
};
pub use watch::{spawn_cluster_probe, spawn_housekeeping, watch, watch_every};

use limits::{Limited, LimiterRegistry, Limits};
use rules::{Rules, StageArg};
use script_api::{Conn, Msg};

/// What `crate::fuzzing` wraps (the fuzz targets, `fuzz/`).
#[cfg(fuzzing)]
pub(crate) use {
    auth::authserv_id, limits::parse_str as parse_ratelimits, script_api::Msg as RuleMsg,
};

/// What MAIL FROM and RCPT TO checks give: the decision, and the `hold`
/// rate limit the transaction went over (the message is then accepted and
/// kept in the queue's held state, see policies/ratelimits.toml).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checked {
    pub decision: Decision,
    pub hold: Option<String>,
}

/// A suite case's default recipient domain when no relay domain is configured.
const DEFAULT_LOCAL_DOMAIN: &str = "example.test";

/// The rule-suite directory inside the rules directory (SPEC "Rule suites").
pub const SUITE_DIR: &str = "tests";

/// The name of the rate-limit file inside the policies directory.
pub(crate) const RATELIMITS_FILE: &str = "ratelimits.toml";

/// What a load is for, besides the files: the suite's default domain,
/// whether to run the suite, and the cluster to count limits in.
struct LoadFor<'a> {
    local_domain: String,
    run_suite: bool,
    cluster: Option<&'a ClusterConfig>,
}

/// The DNS side, shared by all rule sets of a [`Policy`].
struct Dns {
    checks: ChecksConfig,
    hostname: String,
    /// The first relay domain: a suite case's default recipient is there.
    local_domain: String,
    /// Whether loading runs `rules/tests/` (a failing case refuses the set).
    run_suite: bool,
    config: DnsConfig,
    /// Built on first use, inside the runtime.
    resolver: OnceLock<Result<MessageAuthenticator, crate::dns::DnsError>>,
    /// `[scan]`: asked at end of DATA with the DNS checks; unset = none
    /// configured. Set once by [`Policy::from_config_suite`].
    scanners: OnceLock<crate::scan::Scanners>,
}

impl Dns {
    fn resolver(&self) -> Result<&MessageAuthenticator, &crate::dns::DnsError> {
        self.resolver
            .get_or_init(|| crate::dns::resolver(&self.config).map(MessageAuthenticator))
            .as_ref()
    }
}

/// One loaded set of rules and limits. Immutable; replaced whole on reload.
pub struct RuleSet {
    rules: Arc<Rules>,
    limits: Limits,
    dns: Arc<Dns>,
    metrics: PolicyMetrics,
    generation: u64,
}

/// The loader and holder of the current [`RuleSet`].
pub struct Policy {
    policies_dir: PathBuf,
    rules_config: RulesConfig,
    dns: Arc<Dns>,
    limiters: LimiterRegistry,
    metrics: PolicyMetrics,
    current: ArcSwap<RuleSet>,
    generation: AtomicU64,
    reloading: Mutex<()>,
}

impl Policy {
    /// The rules and policies `cfg` names (what `serve`, `check` and
    /// `rules test` load).
    pub fn from_config(cfg: &Config) -> Result<Policy, Vec<Problem>> {
        Policy::from_config_suite(cfg, true)
    }

    /// [`from_config`](Self::from_config); `run_suite: false` leaves
    /// `rules/tests/` out (for `rules test --suite`, which reports each case).
    pub fn from_config_suite(cfg: &Config, run_suite: bool) -> Result<Policy, Vec<Problem>> {
        Policy::from_config_with(cfg, run_suite, None)
    }

    /// What `serve` loads: [`from_config`](Self::from_config), with the
    /// rate limits counted in `[cluster] redis` when it is set (the other
    /// commands count alone, so a `rules test` never spends a sender's quota).
    pub fn serving(cfg: &Config) -> Result<Policy, Vec<Problem>> {
        Policy::from_config_with(cfg, true, Some(&cfg.cluster))
    }

    fn from_config_with(
        cfg: &Config,
        run_suite: bool,
        cluster: Option<&ClusterConfig>,
    ) -> Result<Policy, Vec<Problem>> {
        let policy = Policy::load_for(
            cfg.rules.clone(),
            &cfg.policies.dir,
            cfg.checks.clone(),
            cfg.dns.clone(),
            cfg.server.hostname.clone(),
            LoadFor {
                local_domain: cfg
                    .relay
                    .domains
                    .first()
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_LOCAL_DOMAIN.into()),
                run_suite,
                cluster,
            },
        )?;
        if let Some(scanners) = crate::scan::Scanners::new(&cfg.scan, &cfg.server.hostname) {
            // Fresh, so not set yet.
            let _ = policy.dns.scanners.set(scanners);
        }
        Ok(policy)
    }

    /// Compiles every rule in `rules.dir` and parses every policy in
    /// `policies_dir`; all problems at once.
    pub fn load(
        rules_config: RulesConfig,
        policies_dir: impl AsRef<Path>,
        checks: ChecksConfig,
        dns: DnsConfig,
        hostname: impl Into<String>,
    ) -> Result<Policy, Vec<Problem>> {
        Policy::load_for(
            rules_config,
            policies_dir,
            checks,
            dns,
            hostname,
            LoadFor {
                local_domain: DEFAULT_LOCAL_DOMAIN.into(),
                run_suite: true,
                cluster: None,
            },
        )
    }

    fn load_for(
        rules_config: RulesConfig,
        policies_dir: impl AsRef<Path>,
        checks: ChecksConfig,
        dns: DnsConfig,
        hostname: impl Into<String>,
        LoadFor {
            local_domain,
            run_suite,
            cluster,
        }: LoadFor<'_>,
    ) -> Result<Policy, Vec<Problem>> {
        let metrics = PolicyMetrics::new();
        let dns = Arc::new(Dns {
            checks,
            hostname: hostname.into(),
            local_domain,
            run_suite,
            config: dns,
            resolver: OnceLock::new(),
            scanners: OnceLock::new(),
        });
        let shared = cluster.and_then(|c| {
            cluster::Shared::from_config(
                c,
                metrics.backend_up.clone(),
                metrics.backend_errors.clone(),
            )
            .map(|s| (s, c.nodes))
        });
        let limiters = match shared {
            Some((s, nodes)) => LimiterRegistry::clustered(s, nodes),
            None => LimiterRegistry::default(),
        };
        let policies_dir = policies_dir.as_ref().to_path_buf();
        let set = build_set(&policies_dir, &rules_config, &dns, &limiters, &metrics, 1)?;
        Ok(Policy {
            policies_dir,
            rules_config,
            dns,
            limiters,
            metrics,
            current: ArcSwap::from_pointee(set),
            generation: AtomicU64::new(1),
            reloading: Mutex::new(()),
        })
    }

    /// Loads the files again and swaps the new set in atomically. On any
    /// problem the running set stays and the problems are returned (and
    /// logged, and counted in `postern_config_reloads_total{result="error"}`).
    pub fn reload(&self) -> Result<(), Vec<Problem>> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        match build_set(
            &self.policies_dir,
            &self.rules_config,
            &self.dns,
            &self.limiters,
            &self.metrics,
            generation,
        ) {
            Ok(set) => {
                let scripts = set.script_names().len();
                let limits = set.limit_names().len();
                self.current.store(Arc::new(set));
                self.generation.store(generation, Ordering::SeqCst);
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(generation, scripts, limits, "rules and policies reloaded");
                Ok(())
            }
            Err(problems) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                for p in &problems {
                    tracing::error!("reload failed, keeping the running rules: {p}");
                }
                Err(problems)
            }
        }
    }

    /// How many rule-suite cases loading ran (and passed).
    pub fn suite_cases(&self) -> usize {
        if self.dns.run_suite {
            suite::count(&self.rules_config.dir.join(SUITE_DIR))
        } else {
            0
        }
    }

    /// The first relay domain (a suite case's default recipient domain).
    pub fn local_domain(&self) -> &str {
        &self.dns.local_domain
    }

    /// The set to use for one session (or one transaction).
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// The directories whose files make up the set (for [`watch`]); the
    /// rule suite is one of them, since a reload runs it.
    pub fn dirs(&self) -> Vec<PathBuf> {
        vec![
            self.rules_config.dir.clone(),
            self.rules_config.dir.join(SUITE_DIR),
            self.policies_dir.clone(),
        ]
    }

    /// Forgets rate-limit keys whose bucket is full again and frees the
    /// memory; returns the number of keys still tracked. Call it every
    /// minute or so (see [`spawn_housekeeping`]).
    pub fn housekeeping(&self) -> usize {
        self.limiters.housekeeping()
    }

    /// Whether the rate limits are counted in `[cluster] redis`.
    pub(crate) fn is_clustered(&self) -> bool {
        self.limiters.shared().is_some()
    }

    /// Asks the cluster's Redis whether it answers (moves
    /// `postern_ratelimit_backend_up`); None when there is none.
    pub async fn probe_backend(&self) -> Option<bool> {
        match self.limiters.shared() {
            Some(s) => Some(s.probe().await),
            None => None,
        }
    }
}

fn build_set(
    policies_dir: &Path,
    rules_config: &RulesConfig,
    dns: &Arc<Dns>,
    limiters: &LimiterRegistry,
    metrics: &PolicyMetrics,
    generation: u64,
) -> Result<RuleSet, Vec<Problem>> {
    let mut problems = Vec::new();
    let rules = Rules::load(rules_config.clone(), metrics)
        .map_err(|p| problems.extend(p))
        .ok();
    if !policies_dir.is_dir() {
        problems.push(Problem::new(
            policies_dir,
            None,
            "the policies directory does not exist",
        ));
    }
    let specs = limits::parse_file(&policies_dir.join(RATELIMITS_FILE))
        .map_err(|p| problems.extend(p))
        .ok();
    // The suite runs on a copy of the scripts with metrics of its own, so
    // its cases never show in the live series.
    let suite = rules_config.dir.join(SUITE_DIR);
    if dns.run_suite && rules.is_some() && suite.is_dir() {
        let scratch_metrics = PolicyMetrics::new();
        match Rules::load(rules_config.clone(), &scratch_metrics) {
            Ok(copy) => {
                let scratch = RuleSet {
                    rules: Arc::new(copy),
                    limits: LimiterRegistry::default().build(Vec::new()),
                    dns: dns.clone(),
                    metrics: scratch_metrics,
                    generation: 0,
                };
                problems.extend(suite::problems(&scratch, &suite, &dns.local_domain));
            }
            Err(p) => problems.extend(p),
        }
    }
    match (rules, specs) {
        (Some(rules), Some(specs)) if problems.is_empty() => {
            let set = RuleSet {
                rules: Arc::new(rules),
                // Only now, with everything valid, touch the shared limiters.
                limits: limiters.build(specs),
                dns: dns.clone(),
                metrics: metrics.clone(),
                generation,
            };
            for name in set.limit_names() {
                metrics.limit(&name);
            }
            Ok(set)
        }
        _ => Err(problems),
    }
}

impl RuleSet {
    /// Counts up by one on every successful reload (the first set is 1).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The scripts, in the order they run.
    pub fn script_names(&self) -> Vec<String> {
        self.rules.scripts.iter().map(|s| s.name.clone()).collect()
    }

    /// The rate limits, in file order.
    pub fn limit_names(&self) -> Vec<String> {
        self.limits.specs().map(|s| s.name.clone()).collect()
    }

    fn decide(&self, function: &str, stage: String, arg: Dynamic) -> Decision {
        if !self.rules.defines(function) {
            return Decision {
                trace: StageTrace {
                    stage,
                    calls: Vec::new(),
                },
                ..Decision::pass()
            };
        }
        let r = self.rules.run_stage(function, &StageArg::Conn(arg));
        Decision {
            function: r.verdict.as_ref().map(|_| function.to_string()),
            verdict: r.verdict,
            script: r.script,
            trace: StageTrace {
                stage,
                calls: r.calls,
            },
        }
    }

    /// After the client connects: the `connect(c)` functions.
    pub fn connect(&self, conn: &ConnInfo) -> Decision {
        self.decide(
            "connect",
            "connect".into(),
            Dynamic::from(Conn::from_conn(conn)),
        )
    }

    /// At MAIL FROM: the rate limits (all keys but `recipient`), then the
    /// `mail_from(c)` functions.
    pub fn mail_from(&self, tx: &TxInfo) -> Decision {
        self.mail_from_checked(tx).decision
    }

    /// [`mail_from`](Self::mail_from), and the `hold` limit gone over.
    pub fn mail_from_checked(&self, tx: &TxInfo) -> Checked {
        self.mail_from_after(self.limits.check_mail_from(tx), tx)
    }

    /// The `mail_from(c)` functions after the limits said `limited`.
    fn mail_from_after(&self, limited: Option<Limited>, tx: &TxInfo) -> Checked {
        self.after_limits(limited, "mail_from", || {
            self.decide(
                "mail_from",
                "mail_from".into(),
                Dynamic::from(Conn::from_tx(tx, None)),
            )
        })
    }

    /// At each RCPT TO: the `recipient` rate limits, then `rcpt(c)`.
    pub fn rcpt(&self, tx: &TxInfo, rcpt: &str) -> Decision {
        self.rcpt_checked(tx, rcpt).decision
    }

    /// [`rcpt`](Self::rcpt), and the `hold` limit gone over.
    pub fn rcpt_checked(&self, tx: &TxInfo, rcpt: &str) -> Checked {
        self.rcpt_after(self.limits.check_rcpt(tx, rcpt), tx, rcpt)
    }

    /// The `rcpt(c)` functions after the limits said `limited`.
    fn rcpt_after(&self, limited: Option<Limited>, tx: &TxInfo, rcpt: &str) -> Checked {
        self.after_limits(limited, "rcpt", || {
            self.decide(
                "rcpt",
                format!("rcpt {rcpt}"),
                Dynamic::from(Conn::from_tx(tx, Some(rcpt))),
            )
        })
    }

    /// A `tempfail` limit decides at once; a `hold` limit lets the scripts
    /// run (one may still refuse) and rides along. Both are counted in
    /// `postern_ratelimited_total{limit}` and logged.
    fn after_limits(
        &self,
        limited: Option<Limited>,
        function: &str,
        scripts: impl FnOnce() -> Decision,
    ) -> Checked {
        let limit = match &limited {
            Some(Limited::Refuse(l, _) | Limited::Hold(l)) => l.clone(),
            Some(Limited::Backend(_)) => "backend".to_string(),
            None => String::new(),
        };
        if matches!(limited, Some(Limited::Refuse(..) | Limited::Hold(_))) {
            self.metrics.ratelimited.with_label_values(&[&limit]).inc();
        }
        let limit_call = |verdict: &str, detail: String| Call {
            script: format!("ratelimit:{limit}"),
            verdict: verdict.into(),
            detail,
            ..Call::default()
        };
        match limited {
            Some(Limited::Backend(verdict)) => {
                let call = limit_call("refuse", rules::verdict_detail(&verdict));
                Checked {
                    decision: Decision {
                        verdict: Some(verdict),
                        script: Some("ratelimit:backend".to_string()),
                        function: Some(function.to_string()),
                        trace: StageTrace {
                            stage: function.to_string(),
                            calls: vec![call],
                        },
                    },
                    hold: None,
                }
            }
            Some(Limited::Refuse(limit, verdict)) => {
                tracing::info!(limit = %limit, "rate limited");
                let call = limit_call("refuse", rules::verdict_detail(&verdict));
                Checked {
                    decision: Decision {
                        verdict: Some(verdict),
                        script: Some(format!("ratelimit:{limit}")),
                        function: Some(function.to_string()),
                        trace: StageTrace {
                            stage: function.to_string(),
                            calls: vec![call],
                        },
                    },
                    hold: None,
                }
            }
            Some(Limited::Hold(limit)) => {
                tracing::info!(limit = %limit, "rate limited: the message will be held");
                let mut decision = scripts();
                decision
                    .trace
                    .calls
                    .insert(0, limit_call("hold", String::new()));
                Checked {
                    decision,
                    hold: Some(limit),
                }
            }
            None => Checked {
                decision: scripts(),
                hold: None,
            },
        }
    }

    /// [`connect`](Self::connect) on a blocking thread when a script
    /// defines `connect`, so a slow script never holds up the runtime.
    pub async fn connect_async(self: &Arc<Self>, conn: &ConnInfo) -> Decision {
        if !self.rules.defines("connect") {
            return Decision::pass();
        }
        let (set, conn) = (self.clone(), conn.clone());
        self.join_decision(tokio::task::spawn_blocking(move || set.connect(&conn)))
            .await
    }

    /// [`mail_from`](Self::mail_from) on a blocking thread when a script
    /// defines `mail_from` (the rate limits alone are cheap).
    pub async fn mail_from_async(self: &Arc<Self>, tx: &TxInfo) -> Decision {
        self.mail_from_checked_async(tx).await.decision
    }

    /// [`mail_from_checked`](Self::mail_from_checked) as [`mail_from_async`](Self::mail_from_async).
    pub async fn mail_from_checked_async(self: &Arc<Self>, tx: &TxInfo) -> Checked {
        if self.limits.is_shared() {
            let limited = self.limits.check_mail_from_shared(tx).await;
            if !self.rules.defines("mail_from") {
                return self.mail_from_after(limited, tx);
            }
            let (set, tx) = (self.clone(), tx.clone());
            return self
                .join_checked(tokio::task::spawn_blocking(move || {
                    set.mail_from_after(limited, &tx)
                }))
                .await;
        }
        if !self.rules.defines("mail_from") {
            return self.mail_from_checked(tx);
        }
        let (set, tx) = (self.clone(), tx.clone());
        self.join_checked(tokio::task::spawn_blocking(move || {
            set.mail_from_checked(&tx)
        }))
        .await
    }

    /// [`rcpt`](Self::rcpt) on a blocking thread when a script defines `rcpt`.
    pub async fn rcpt_async(self: &Arc<Self>, tx: &TxInfo, rcpt: &str) -> Decision {
        self.rcpt_checked_async(tx, rcpt).await.decision
    }

    /// [`rcpt_checked`](Self::rcpt_checked) as [`rcpt_async`](Self::rcpt_async).
    pub async fn rcpt_checked_async(self: &Arc<Self>, tx: &TxInfo, rcpt: &str) -> Checked {
        if self.limits.is_shared() {
            let limited = self.limits.check_rcpt_shared(tx, rcpt).await;
            if !self.rules.defines("rcpt") {
                return self.rcpt_after(limited, tx, rcpt);
            }
            let (set, tx, rcpt) = (self.clone(), tx.clone(), rcpt.to_string());
            return self
                .join_checked(tokio::task::spawn_blocking(move || {
                    set.rcpt_after(limited, &tx, &rcpt)
                }))
                .await;
        }
        if !self.rules.defines("rcpt") {
            return self.rcpt_checked(tx, rcpt);
        }
        let (set, tx, rcpt) = (self.clone(), tx.clone(), rcpt.to_string());
        self.join_checked(tokio::task::spawn_blocking(move || {
            set.rcpt_checked(&tx, &rcpt)
        }))
        .await
    }

    async fn join_checked(&self, handle: tokio::task::JoinHandle<Checked>) -> Checked {
        match handle.await {
            Ok(c) => c,
            Err(e) => Checked {
                decision: self.thread_failed(e),
                hold: None,
            },
        }
    }

    async fn join_decision(&self, handle: tokio::task::JoinHandle<Decision>) -> Decision {
        match handle.await {
            Ok(d) => d,
            Err(e) => self.thread_failed(e),
        }
    }

    /// A rule thread panicked or was cancelled: `on_error` decides.
    fn thread_failed(&self, e: tokio::task::JoinError) -> Decision {
        tracing::error!("rule thread failed: {e}");
        self.metrics.rule_errors.with_label_values(&["*"]).inc();
        Decision {
            verdict: self.error_verdict(),
            ..Decision::default()
        }
    }

    /// The verdict of `on_error` when no single script is to blame.
    fn error_verdict(&self) -> Option<Verdict> {
        match self.rules.config.on_error {
            OnError::Accept => None,
            OnError::Tempfail => Some(Verdict::local_tempfail()),
            OnError::Quarantine => Some(Verdict::Quarantine {
                reason: "rule error".to_string(),
            }),
        }
    }

    /// At end of DATA: SPF, DKIM and DMARC (one deadline, see
    /// [`ChecksConfig::deadline`]), then the `data(m)` functions on a
    /// blocking thread, then the score. `message` is the message as
    /// received (strip forged `Authentication-Results` first with
    /// [`strip_forged_auth_results`]).
    pub async fn data(&self, tx: &TxInfo, message: &[u8]) -> DataOutcome {
        self.data_with(tx, message, DataInputs::default()).await
    }

    /// [`data`](Self::data) with the list hits the gateway looked up, and
    /// any check or scanner results fixed in advance (those are then not
    /// asked of DNS or the scanners, nor counted in the check metrics).
    pub async fn data_with(&self, tx: &TxInfo, message: &[u8], inputs: DataInputs) -> DataOutcome {
        let started = Instant::now();
        // The DNS checks and the scanners wait on other machines: at once.
        let checks = async {
            match &inputs.checks {
                Some(fixed) => AuthOutcome::fixed(&self.dns.hostname, fixed),
                None => {
                    let auth = self.authenticate(tx, message).await;
                    self.count_checks(&auth);
                    auth
                }
            }
        };
        let scanning = async {
            match inputs.scan.clone() {
                Some(fixed) => crate::scan::Scanned {
                    results: fixed,
                    ..Default::default()
                },
                None => self.scan(tx, message).await,
            }
        };
        let (auth, scanned) = tokio::join!(checks, scanning);
        if let Some(mut refused) = self.scan_refusal(&scanned, &auth) {
            refused.elapsed = started.elapsed();
            return refused;
        }
        let crate::scan::Scanned {
            results: scan,
            headers: scan_headers,
            ..
        } = scanned;
        let lists = inputs.lists;
        let mut outcome = if self.rules.defines("data") {
            let rules = self.rules.clone();
            let tx = tx.clone();
            let message = message.to_vec();
            let joined = tokio::task::spawn_blocking(move || {
                decide_data(&rules, &tx, &message, auth, scan, lists)
            })
            .await;
            match joined {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::error!("rule thread failed: {e}");
                    self.metrics.rule_errors.with_label_values(&["*"]).inc();
                    DataOutcome {
                        verdict: self.error_verdict().unwrap_or(Verdict::Accept),
                        ..DataOutcome::new(AuthOutcome::fixed(
                            &self.dns.hostname,
                            &CheckResults::default(),
                        ))
                    }
                }
            }
        } else {
            decide_data(&self.rules, tx, message, auth, scan, lists)
        };
        // The scanners' headers right after Authentication-Results.
        let at = outcome.headers.len().min(1);
        outcome.headers.splice(at..at, scan_headers);
        outcome.elapsed = started.elapsed();
        outcome
    }

    /// `[scan] on_error = "tempfail"` and a scanner failed: 451 at end of
    /// DATA, nothing stored, no rule run (they would judge without the
    /// scanner); decided by `scan:<scanner>`.
    fn scan_refusal(
        &self,
        scanned: &crate::scan::Scanned,
        auth: &AuthOutcome,
    ) -> Option<DataOutcome> {
        let on_error = self.dns.scanners.get()?.on_error;
        let (scanner, why) = scanned.failed.first()?;
        if on_error != crate::scan::ScanOnError::Tempfail {
            return None;
        }
        let verdict = Verdict::local_tempfail();
        let mut outcome = DataOutcome::new(auth.clone());
        outcome.trace.calls = scanned
            .failed
            .iter()
            .map(|(s, why)| Call {
                script: format!("scan:{s}"),
                verdict: verdict.word().into(),
                detail: why.clone(),
                ..Call::default()
            })
            .collect();
        tracing::warn!(scanner, error = %why, "content scanner failed: answering 451 ([scan] on_error = \"tempfail\")");
        outcome.verdict = verdict;
        outcome.script = Some(format!("scan:{scanner}"));
        outcome.scan = scanned.results.clone();
        Some(outcome)
    }

    /// The DATA stage with every input fixed, on the calling thread: no
    /// DNS, no scanners, no runtime (suites and replays). Checks not given
    /// are `none`.
    pub fn data_offline(&self, tx: &TxInfo, message: &[u8], inputs: DataInputs) -> DataOutcome {
        let started = Instant::now();
        let auth = AuthOutcome::fixed(&self.dns.hostname, &inputs.checks.unwrap_or_default());
        let mut outcome = decide_data(
            &self.rules,
            tx,
            message,
            auth,
            inputs.scan.unwrap_or_default(),
            inputs.lists,
        );
        outcome.elapsed = started.elapsed();
        outcome
    }

    fn count_checks(&self, auth: &AuthOutcome) {
        for (method, result, enabled) in [
            ("spf", auth.spf, self.dns.checks.spf),
            ("dkim", auth.dkim, self.dns.checks.dkim),
            ("dmarc", auth.dmarc, self.dns.checks.dmarc),
        ] {
            if enabled {
                self.metrics
                    .auth_results
                    .with_label_values(&[method, result])
                    .inc();
            }
        }
    }

    /// What the configured content scanners say of `message` (nothing
    /// configured: empty results), counted in `postern_scan_results_total`.
    async fn scan(&self, tx: &TxInfo, message: &[u8]) -> crate::scan::Scanned {
        let Some(scanners) = self.dns.scanners.get() else {
            return crate::scan::Scanned::default();
        };
        let scanned = scanners.scan(tx, message).await;
        for (scanner, result) in &scanned.counts {
            self.metrics
                .scan_results
                .with_label_values(&[scanner, result])
                .inc();
        }
        scanned
    }

    async fn authenticate(&self, tx: &TxInfo, message: &[u8]) -> AuthOutcome {
        let checks = &self.dns.checks;
        if tx.trusted || !(checks.spf || checks.dkim || checks.dmarc) {
            return AuthOutcome {
                spf: "none",
                dkim: "none",
                dmarc: "none",
                dmarc_policy: "none",
                header: format!("{}; none", self.dns.hostname),
            };
        }
        match self.dns.resolver() {
            Ok(resolver) => {
                auth::check_message(
                    resolver,
                    checks,
                    &self.dns.hostname,
                    tx.conn.ip,
                    &tx.helo,
                    &tx.from,
                    message,
                )
                .await
            }
            Err(e) => {
                tracing::error!("no DNS resolver: {e}");
                let word = |on: bool| if on { "temperror" } else { "none" };
                let mut header = self.dns.hostname.clone();
                for (m, on) in [
                    ("spf", checks.spf),
                    ("dkim", checks.dkim),
                    ("dmarc", checks.dmarc),
                ] {
                    if on {
                        header.push_str(&format!("; {m}=temperror"));
                    }
                }
                AuthOutcome {
                    spf: word(checks.spf),
                    dkim: word(checks.dkim),
                    dmarc: word(checks.dmarc),
                    dmarc_policy: "none",
                    header,
                }
            }
        }
    }
}

impl DataOutcome {
    /// Accept, with the checks' header and words, nothing else yet.
    fn new(auth: AuthOutcome) -> Self {
        DataOutcome {
            verdict: Verdict::Accept,
            script: None,
            score: 0.0,
            headers: vec![("Authentication-Results".to_string(), auth.header.clone())],
            spf: auth.spf.to_string(),
            dkim: auth.dkim.to_string(),
            dmarc: auth.dmarc.to_string(),
            dmarc_policy: auth.dmarc_policy.to_string(),
            scan: ScanResults::default(),
            trace: StageTrace {
                stage: "data".into(),
                calls: Vec::new(),
            },
            by_score: false,
            elapsed: Duration::ZERO,
        }
    }
}

/// The `data(m)` functions and the score, on the calling thread.
fn decide_data(
    rules: &Rules,
    tx: &TxInfo,
    message: &[u8],
    auth: AuthOutcome,
    scan: ScanResults,
    lists: ListHits,
) -> DataOutcome {
    let mut outcome = DataOutcome::new(auth.clone());
    if rules.defines("data") {
        let msg = Msg::build(tx, message, &auth, &scan, lists);
        let result = rules.run_stage("data", &StageArg::Msg(msg.clone()));
        let effects = msg.effects();
        outcome.score = effects.score;
        outcome.headers.extend(effects.headers);
        outcome.trace.calls = result.calls;
        match result.verdict {
            Some(v) => {
                outcome.verdict = v;
                outcome.script = result.script;
            }
            None if effects.score >= rules.config.quarantine_score => {
                outcome.by_score = true;
                outcome.verdict = Verdict::Quarantine {
                    reason: format!(
                        "score {} >= {}: {}",
                        effects.score,
                        rules.config.quarantine_score,
                        effects.reasons.join(", ")
                    ),
                };
            }
            None => {}
        }
    }
    outcome.scan = scan;
    outcome
}
