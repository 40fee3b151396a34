//! Prometheus metrics of the policy engine. The caller registers them in its
//! registry with [`PolicyMetrics::register`].

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

/// Counters and histograms the policy engine updates where it decides.
#[derive(Clone)]
pub struct PolicyMetrics {
    /// `postern_rule_errors_total{script}`: runtime errors and runaway scripts.
    pub rule_errors: IntCounterVec,
    /// `postern_ratelimited_total{limit}`: transactions refused by a rate limit.
    pub ratelimited: IntCounterVec,
    /// `postern_auth_results_total{method,result}`: SPF/DKIM/DMARC outcomes.
    pub auth_results: IntCounterVec,
    /// `postern_rule_seconds`: time spent running the rule scripts of one stage.
    pub(crate) rule_seconds: Histogram,
    /// `postern_config_reloads_total{result}`: `ok` or `error`.
    pub config_reloads: IntCounterVec,
}

impl PolicyMetrics {
    /// Creates unregistered metrics.
    pub(crate) fn new() -> Self {
        // The names and label sets are constants, so these cannot fail.
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let rule_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "postern_rule_seconds",
                "Time spent running rule scripts for one stage",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric postern_rule_seconds: {e}"));
        Self {
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
            config_reloads: counter(
                "postern_config_reloads_total",
                "Reloads of rules and policies",
                &["result"],
            ),
        }
    }

    /// Registers every metric in `registry`.
    pub(crate) fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.rule_errors.clone()))?;
        registry.register(Box::new(self.ratelimited.clone()))?;
        registry.register(Box::new(self.auth_results.clone()))?;
        registry.register(Box::new(self.rule_seconds.clone()))?;
        registry.register(Box::new(self.config_reloads.clone()))?;
        Ok(())
    }
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
