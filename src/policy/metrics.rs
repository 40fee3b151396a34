//! Prometheus metrics of the policy engine. The caller registers them in its
//! registry with [`PolicyMetrics::register`].
//!
//! Label values are bounded: script file names and limit names come from the
//! admin's files, results and verdicts from fixed lists below. Every series
//! a loaded rule set can move is created (at 0) when the set is built, so a
//! fresh gateway's first scrape already has it.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// The `verdict` label values of `postern_rule_verdicts_total`: one per
/// verdict a script can return, `none` for a call that returned nothing,
/// `error` for a call that failed.
pub(crate) const SCRIPT_VERDICTS: [&str; 7] = [
    "none",
    "accept",
    "reject",
    "tempfail",
    "quarantine",
    "discard",
    "error",
];

/// The `result` values each check can report (RFC 8601's words).
pub(crate) const AUTH_RESULTS: [(&str, &[&str]); 3] = [
    (
        "spf",
        &[
            "pass",
            "fail",
            "softfail",
            "neutral",
            "none",
            "temperror",
            "permerror",
        ],
    ),
    (
        "dkim",
        &["pass", "fail", "neutral", "none", "temperror", "permerror"],
    ),
    ("dmarc", &["pass", "fail", "none", "temperror", "permerror"]),
];

/// The `result` values each content scanner can report.
pub(crate) const SCAN_RESULTS: [(&str, &[&str]); 2] = [
    ("clamd", &["clean", "infected", "error"]),
    ("rspamd", &["clean", "spam", "error"]),
];

/// Time buckets of one script call: the shipped rules take tens of µs.
const RULE_BUCKETS: [f64; 17] = [
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Counters and histograms the policy engine updates where it decides.
#[derive(Clone)]
pub struct PolicyMetrics {
    /// `postern_rule_errors_total{script}`: runtime errors and runaway scripts.
    pub rule_errors: IntCounterVec,
    /// `postern_ratelimited_total{limit}`: transactions refused by a rate limit.
    pub ratelimited: IntCounterVec,
    /// `postern_auth_results_total{method,result}`: SPF/DKIM/DMARC outcomes.
    pub auth_results: IntCounterVec,
    /// `postern_rule_seconds{script}`: time of one script call.
    pub(crate) rule_seconds: HistogramVec,
    /// `postern_rule_verdicts_total{script,verdict,shadow}`: what each call returned.
    pub(crate) rule_verdicts: IntCounterVec,
    /// `postern_config_reloads_total{result}`: `ok` or `error`.
    pub config_reloads: IntCounterVec,
    /// `postern_scan_results_total{scanner,result}`: what clamd and Rspamd said.
    pub(crate) scan_results: IntCounterVec,
    /// `postern_ratelimit_backend_up`: 1 while the rate-limit backend answers
    /// (the in-process limiter always does; the cluster's Redis may not).
    pub(crate) backend_up: IntGauge,
    /// `postern_ratelimit_backend_errors_total`: calls to the cluster's
    /// Redis that failed or ran out of their deadline (each one decided by
    /// `[cluster] on_backend_error`), and failed health probes.
    pub(crate) backend_errors: IntCounter,
}

/// The series of one loaded script, looked up once when the set is built so
/// a call costs no label hashing.
pub(crate) struct ScriptMetrics {
    seconds: Histogram,
    verdicts: [IntCounter; SCRIPT_VERDICTS.len()],
    errors: IntCounter,
}

impl ScriptMetrics {
    /// Counts one call: its time and what it returned (`None` = nothing,
    /// `Some(word)` = a verdict word of [`SCRIPT_VERDICTS`]).
    pub(crate) fn observe(&self, seconds: f64, verdict: &str) {
        self.seconds.observe(seconds);
        if let Some(i) = SCRIPT_VERDICTS.iter().position(|v| *v == verdict) {
            self.verdicts[i].inc();
        }
        if verdict == "error" {
            self.errors.inc();
        }
    }
}

impl PolicyMetrics {
    /// Creates unregistered metrics.
    pub(crate) fn new() -> Self {
        // The names and label sets are constants, so these cannot fail.
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let rule_seconds = HistogramVec::new(
            HistogramOpts::new(
                "postern_rule_seconds",
                "Time of one rule script call, by script",
            )
            .buckets(RULE_BUCKETS.to_vec()),
            &["script"],
        )
        .unwrap_or_else(|e| panic!("metric postern_rule_seconds: {e}"));
        let backend_up = IntGauge::new(
            "postern_ratelimit_backend_up",
            "1 while the rate-limit backend answers (always 1 for the in-process limiter)",
        )
        .unwrap_or_else(|e| panic!("metric postern_ratelimit_backend_up: {e}"));
        backend_up.set(1);
        let m = Self {
            rule_errors: counter(
                "postern_rule_errors_total",
                "Rule script errors (runtime errors, runaway scripts)",
                &["script"],
            ),
            ratelimited: counter(
                "postern_ratelimited_total",
                "Transactions refused by a rate limit",
                &["limit"],
            ),
            auth_results: counter(
                "postern_auth_results_total",
                "SPF, DKIM and DMARC results",
                &["method", "result"],
            ),
            rule_seconds,
            rule_verdicts: counter(
                "postern_rule_verdicts_total",
                "Rule script calls by script and by what they returned",
                &["script", "verdict", "shadow"],
            ),
            config_reloads: counter(
                "postern_config_reloads_total",
                "Reloads of rules and policies",
                &["result"],
            ),
            scan_results: counter(
                "postern_scan_results_total",
                "Content scanner verdicts (clamd, Rspamd)",
                &["scanner", "result"],
            ),
            backend_up,
            backend_errors: IntCounter::new(
                "postern_ratelimit_backend_errors_total",
                "Calls to the shared rate-limit backend (Redis) that failed or missed their deadline",
            )
            .unwrap_or_else(|e| panic!("metric postern_ratelimit_backend_errors_total: {e}")),
        };
        for (scanner, results) in SCAN_RESULTS {
            for result in results {
                m.scan_results.with_label_values(&[scanner, result]);
            }
        }
        for (method, results) in AUTH_RESULTS {
            for result in results {
                m.auth_results.with_label_values(&[method, result]);
            }
        }
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }

    /// The series of the script `name`, created at 0 if new.
    pub(crate) fn script(&self, name: &str) -> ScriptMetrics {
        let shadow = if name.ends_with(crate::policy::rules::SHADOW_SUFFIX) {
            "true"
        } else {
            "false"
        };
        ScriptMetrics {
            seconds: self.rule_seconds.with_label_values(&[name]),
            verdicts: SCRIPT_VERDICTS
                .map(|v| self.rule_verdicts.with_label_values(&[name, v, shadow])),
            errors: self.rule_errors.with_label_values(&[name]),
        }
    }

    /// Creates the series of a configured rate limit at 0.
    pub(crate) fn limit(&self, name: &str) {
        self.ratelimited.with_label_values(&[name]);
    }

    /// Registers every metric in `registry`.
    pub(crate) fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.rule_errors.clone()))?;
        registry.register(Box::new(self.ratelimited.clone()))?;
        registry.register(Box::new(self.auth_results.clone()))?;
        registry.register(Box::new(self.rule_seconds.clone()))?;
        registry.register(Box::new(self.rule_verdicts.clone()))?;
        registry.register(Box::new(self.config_reloads.clone()))?;
        registry.register(Box::new(self.backend_up.clone()))?;
        registry.register(Box::new(self.backend_errors.clone()))?;
        registry.register(Box::new(self.scan_results.clone()))?;
        Ok(())
    }
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
