//! The Prometheus registry and the `GET /metrics` endpoint.
//!
//! Every metric SPEC.md names is registered here, except the policy
//! engine's own (rule errors and time, rate limits, auth results, reloads,
//! content scanner results),
//! which `policy::PolicyMetrics` defines and [`Metrics::register_policy`]
//! adds to the same registry. Each stage increments its metric where it decides.

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
    /// Sessions that finished a TLS handshake (STARTTLS or implicit), by listener.
    pub(crate) smtp_tls_sessions: IntCounterVec,
    pub(crate) queue_oldest_age: IntGauge,
    pub(crate) releases: IntCounterVec,
    /// `postern_digests_sent_total`: one per digest mail queued.
    pub(crate) digests_sent: IntCounter,
    /// RCPT-time recipient checks (`[relay] verify_recipients`).
    pub(crate) recipient_verify: IntCounterVec,
    /// DSNs not sent because they would have been backscatter.
    pub(crate) dsn_suppressed: IntCounterVec,
}

/// `postern_dsn_suppressed_total{reason}`: failed SPF or DMARC; a sender
/// outside our domains of mail from outside that the backend refused.
pub(crate) const DSN_SUPPRESSED: [&str; 2] = ["auth_failed", "outside_sender"];

/// Label values known before anything happens, created at 0 (SPEC: every
/// counter exists from the first scrape).
const VERDICTS: [&str; 5] = ["accept", "reject", "tempfail", "quarantine", "discard"];
const STAGES: [&str; 4] = ["connect", "mail", "rcpt", "data"];
const RELEASE_VIA: [&str; 4] = ["imap", "pop3", "web", "cli"];

/// Delivery attempt times: a loopback LMTP hand-off takes milliseconds, a
/// slow MX up to the client's timeouts (minutes).
const DELIVERY_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

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

fn plain_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn plain_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
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
        let quarantine_messages = plain_gauge(
            &r,
            "postern_quarantine_messages",
            "Quarantine entries currently held (one per held recipient).",
        );
        let bounces = plain_counter(&r, "postern_bounces_total", "DSN bounces generated.");
        let digests_sent = plain_counter(
            &r,
            "postern_digests_sent_total",
            "Quarantine digest mails queued.",
        );
        let queue_oldest_age = plain_gauge(
            &r,
            "postern_queue_oldest_age_seconds",
            "Age of the oldest message waiting for delivery (queued or deferred); 0 when none.",
        );
        let build_info = gauge(
            &r,
            "postern_build_info",
            "Always 1; the version of the running binary is in the label.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
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
                "Delivery attempts per recipient group, by result and whether the session used TLS.",
                &["result", "tls"],
            ),
            delivery_seconds: histogram(
                &r,
                "postern_delivery_seconds",
                "Time of one delivery attempt.",
                DELIVERY_BUCKETS.to_vec(),
            ),
            bounces,
            mailbox_logins: counter(
                &r,
                "postern_mailbox_logins_total",
                "POP3 and IMAP logins by result.",
                &["protocol", "result"],
            ),
            smtp_tls_sessions: counter(
                &r,
                "postern_smtp_tls_sessions_total",
                "SMTP sessions that completed a TLS handshake (STARTTLS or implicit).",
                &["listener"],
            ),
            queue_oldest_age,
            digests_sent,
            releases: counter(
                &r,
                "postern_releases_total",
                "Quarantined messages released to their recipient, by how.",
                &["via"],
            ),
            recipient_verify: counter(
                &r,
                "postern_recipient_verify_total",
                "RCPT-time recipient verification, by result (ok/unknown/tempfail) and whether the cache answered.",
                &["result", "cached"],
            ),
            dsn_suppressed: counter(
                &r,
                "postern_dsn_suppressed_total",
                "Bounces dropped instead of sent (they would have been backscatter), by reason.",
                &["reason"],
            ),
            registry: r,
        };
        // Make the label sets visible from the first scrape.
        for s in QueueState::ALL {
            m.queue_messages.with_label_values(&[s.as_str()]).set(0);
        }
        for res in ["ok", "tempfail", "permfail"] {
            for tls in ["yes", "no"] {
                m.delivery_attempts.with_label_values(&[res, tls]);
            }
        }
        for proto in ["pop3", "imap", "smtp"] {
            for res in ["ok", "fail", "refused"] {
                m.mailbox_logins.with_label_values(&[proto, res]);
            }
        }
        for res in ["ok", "unknown", "tempfail"] {
            for cached in ["true", "false"] {
                m.recipient_verify.with_label_values(&[res, cached]);
            }
        }
        for reason in DSN_SUPPRESSED {
            m.dsn_suppressed.with_label_values(&[reason]);
        }
        for verdict in VERDICTS {
            for stage in STAGES {
                m.verdicts.with_label_values(&[verdict, stage]);
            }
        }
        for via in RELEASE_VIA {
            m.releases.with_label_values(&[via]);
        }
        Arc::new(m)
    }

    /// Creates the per-listener series of an SMTP listener that runs.
    pub(crate) fn smtp_listener(&self, label: &str) {
        self.smtp_connections.with_label_values(&[label]);
        self.smtp_sessions_active.with_label_values(&[label]);
        self.messages_received.with_label_values(&[label]);
        self.smtp_tls_sessions.with_label_values(&[label]);
    }

    /// Add the policy engine's metrics to this registry.
    pub(crate) fn register_policy(
        &self,
        pm: &crate::policy::PolicyMetrics,
    ) -> prometheus::Result<()> {
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
            match store.oldest_waiting(10_000) {
                Ok(Some(created)) => self
                    .queue_oldest_age
                    .set((crate::store::now_unix() - created).max(0)),
                Ok(None) => self.queue_oldest_age.set(0),
                // Keep the last value: a store error shows in the logs.
                Err(e) => tracing::warn!(error = %e, "metrics: cannot read the queue"),
            }
        }
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Whether the request carries `Authorization: Bearer <token>`, compared
/// in constant time so the answer's timing does not leak the token.
fn authorized(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    let want = token.as_bytes();
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// Serve `GET /metrics` until `shutdown` fires; with a `token`, only to
/// requests that carry it.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    token: String,
    metrics: Arc<Metrics>,
    store: Store,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::{
        Router,
        http::{HeaderMap, StatusCode, header},
        response::IntoResponse,
        routing::get,
    };
    let token = Arc::new(token);
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let (metrics, store, token) = (metrics.clone(), store.clone(), token.clone());
            async move {
                if !token.is_empty() && !authorized(&headers, &token) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer realm=\"postern metrics\"")],
                        "401 Unauthorized: /metrics needs Authorization: Bearer <[metrics] token>\n",
                    )
                        .into_response();
                }
                let body = tokio::task::spawn_blocking(move || metrics.render(Some(&store)))
                    .await
                    .unwrap_or_default();
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
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
