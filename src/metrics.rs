//! The Prometheus registry and the `GET /metrics` endpoint.
//!
//! Every metric SPEC.md names is registered here, except the policy
//! engine's own (rule errors and time, rate limits, auth results, reloads),
//! which `policy::PolicyMetrics` defines and [`Metrics::register_policy`]
//! adds to the same registry. Each stage increments its metric where it decides.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::store::{QueueState, Store};

pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) smtp_connections: IntCounterVec,
    pub(crate) smtp_sessions_active: IntGaugeVec,
    pub(crate) messages_received: IntCounterVec,
    pub(crate) verdicts: IntCounterVec,
    pub(crate) queue_messages: IntGaugeVec,
    pub(crate) quarantine_messages: IntGauge,
    pub(crate) delivery_attempts: IntCounterVec,
    pub(crate) delivery_seconds: Histogram,
    pub(crate) bounces: IntCounter,
    pub(crate) mailbox_logins: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

impl Metrics {
    /// Build the registry. Names are constants, so registration cannot fail at run time.
    pub(crate) fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let quarantine_messages = IntGauge::new(
            "postern_quarantine_messages",
            "Quarantine entries currently held (one per held recipient).",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(quarantine_messages.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let bounces = IntCounter::new("postern_bounces_total", "DSN bounces generated.")
            .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(bounces.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let m = Metrics {
            smtp_connections: counter(
                &r,
                "postern_smtp_connections_total",
                "SMTP connections accepted.",
                &["listener"],
            ),
            smtp_sessions_active: gauge(
                &r,
                "postern_smtp_sessions_active",
                "SMTP sessions in progress.",
                &["listener"],
            ),
            messages_received: counter(
                &r,
                "postern_messages_received_total",
                "Messages acknowledged with 250 after DATA.",
                &["listener"],
            ),
            verdicts: counter(
                &r,
                "postern_verdicts_total",
                "Decisions taken on sessions and messages.",
                &["verdict", "stage"],
            ),
            queue_messages: gauge(
                &r,
                "postern_queue_messages",
                "Messages in the queue by state.",
                &["state"],
            ),
            quarantine_messages,
            delivery_attempts: counter(
                &r,
                "postern_delivery_attempts_total",
                "Delivery attempts per recipient group, by result.",
                &["result"],
            ),
            delivery_seconds: histogram(
                &r,
                "postern_delivery_seconds",
                "Time of one delivery attempt.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ],
            ),
            bounces,
            mailbox_logins: counter(
                &r,
                "postern_mailbox_logins_total",
                "POP3 and IMAP logins by result.",
                &["protocol", "result"],
            ),
            registry: r,
        };
        // Make the label sets visible from the first scrape.
        for s in QueueState::ALL {
            m.queue_messages.with_label_values(&[s.as_str()]).set(0);
        }
        for res in ["ok", "tempfail", "permfail"] {
            m.delivery_attempts.with_label_values(&[res]);
        }
        for proto in ["pop3", "imap"] {
            for res in ["ok", "fail"] {
                m.mailbox_logins.with_label_values(&[proto, res]);
            }
        }
        Arc::new(m)
    }

    /// Add the policy engine's metrics to this registry.
    pub(crate) fn register_policy(
        &self,
        pm: &crate::policy::PolicyMetrics,
    ) -> prometheus::Result<()> {
        for res in ["ok", "error"] {
            pm.config_reloads.with_label_values(&[res]);
        }
        pm.register(&self.registry)
    }

    /// Refresh the gauges that mirror the store, then encode everything.
    pub(crate) fn render(&self, store: Option<&Store>) -> String {
        if let Some(store) = store {
            let counts = store.counts();
            for s in QueueState::ALL {
                self.queue_messages
                    .with_label_values(&[s.as_str()])
                    .set(counts.get(&s).copied().unwrap_or(0));
            }
            self.quarantine_messages.set(store.held_count() as i64);
        }
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serve `GET /metrics` until `shutdown` fires.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    store: Store,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::{Router, http::header, response::IntoResponse, routing::get};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            let store = store.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(Some(&store)),
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = crate::stopped(&mut shutdown).await;
        })
        .await
}
