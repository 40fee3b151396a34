//! Intake: what happens to a message between the final dot and the reply.
//!
//! The SMTP shell knows nothing of verdicts or storage; it hands the message
//! here and sends back whatever reply this returns. The checks and the
//! `data(m)` rules decide; "250" is only returned once the message is durable
//! on disk (queued or quarantined), or when the rules said discard.

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::policy::{RuleSet, Verdict, final_verdict, strip_forged_auth_results};
use crate::smtp::session::{Session, Transaction, reply};
use crate::store::wake::Scheduler;
use crate::store::{self, HeldEntry, QueueEntry, QueueState, RcptStatus, Recipient, Store};

pub struct Intake {
    pub store: Store,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    pub hostname: String,
}

impl Intake {
    /// Allocate the queue id and build the Received header, before the data arrives.
    pub fn prepare(&self, session: &Session, tx: &Transaction) -> store::Result<(u64, String)> {
        let id = self.store.next_id()?;
        let header = session.received_header(&store::fmt_id(id), tx);
        Ok((id, header))
    }

    /// Decide on and store a complete message; return the reply to send.
    pub async fn accept(
        &self,
        session: &Session,
        rules: &Arc<RuleSet>,
        tx: Transaction,
        id: u64,
        received: String,
        body: Vec<u8>,
    ) -> Vec<u8> {
        let label = session.kind.label();
        let mut info = session.tx_info(None);
        info.from = tx.from.clone();
        info.rcpts = tx.rcpts.iter().map(|r| r.address.clone()).collect();
        let clean = strip_forged_auth_results(&body, &self.hostname);
        let outcome = rules.data(&info, &clean).await;
        let (verdict, script) = final_verdict(
            (outcome.verdict.clone(), outcome.script.clone()),
            tx.sticky.clone(),
        );
        self.metrics
            .verdicts
            .with_label_values(&[verdict.word(), "data"])
            .inc();
        let qid = store::fmt_id(id);
        tracing::info!(
            id = %qid,
            verdict = verdict.word(),
            script = ?script,
            score = outcome.score,
            spf = %outcome.spf,
            dkim = %outcome.dkim,
            dmarc = %outcome.dmarc,
            "checked"
        );
        let message = || {
            let mut m = Vec::with_capacity(received.len() + clean.len() + 512);
            m.extend_from_slice(received.as_bytes());
            for (name, value) in &outcome.headers {
                m.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            m.extend_from_slice(&clean);
            m
        };
        match verdict {
            Verdict::Reject(r) | Verdict::Tempfail(r) => r.to_bytes(),
            Verdict::Discard => {
                self.metrics
                    .messages_received
                    .with_label_values(&[label])
                    .inc();
                tracing::info!(id = %qid, "discarded by the rules");
                reply(250, &format!("2.0.0 Ok: queued as {qid}"))
            }
            Verdict::Quarantine { reason } => {
                let m = message();
                let template = HeldEntry {
                    id: 0,
                    body_key: 0,
                    sender: tx.from.clone(),
                    recipient: String::new(),
                    reason: sanitize_text(&reason),
                    script,
                    received: store::now_unix(),
                    size: m.len() as u64,
                    client_ip: session.ip.to_string(),
                    helo: session.helo.clone().unwrap_or_default(),
                };
                let rcpts: Vec<String> = tx.rcpts.iter().map(|r| r.address.clone()).collect();
                let held = self.store.quarantine(&template, &rcpts, &m);
                let stored = match held {
                    Ok(_) => self.store.durable().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = stored {
                    tracing::error!(error = %e, "could not quarantine; answering 451");
                    return reply(451, "4.3.0 Temporary storage failure, try again later");
                }
                self.metrics
                    .messages_received
                    .with_label_values(&[label])
                    .inc();
                tracing::info!(id = %qid, reason = %template.reason, "quarantined");
                reply(250, &format!("2.0.0 Ok: queued as {qid}"))
            }
            Verdict::Accept => self.enqueue(session, tx, id, message()).await,
        }
    }

    async fn enqueue(&self, session: &Session, tx: Transaction, id: u64, body: Vec<u8>) -> Vec<u8> {
        let entry = QueueEntry {
            id,
            sender: tx.from,
            recipients: tx
                .rcpts
                .into_iter()
                .map(|r| Recipient {
                    address: r.address,
                    status: RcptStatus::Pending,
                    last_reply: None,
                    remote: None,
                })
                .collect(),
            state: QueueState::Queued,
            created: store::now_unix(),
            next_attempt_ms: store::now_ms(),
            attempts: 0,
            size: body.len() as u64,
            client_ip: session.ip.to_string(),
            helo: session.helo.clone().unwrap_or_default(),
            last_error: None,
        };
        let stored = match self.store.enqueue(&entry, &body) {
            Ok(()) => self.store.durable().await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::error!(error = %e, "could not store message; answering 451");
            // Do not leave a half-written entry to be delivered after the
            // client was told to retry.
            let _ = self.store.remove(id);
            return reply(451, "4.3.0 Temporary storage failure, try again later");
        }
        let qid = store::fmt_id(id);
        tracing::info!(id = %qid, from = %entry.sender, rcpts = entry.recipients.len(), size = entry.size, "queued");
        self.metrics
            .messages_received
            .with_label_values(&[session.kind.label()])
            .inc();
        self.scheduler.now(id);
        reply(250, &format!("2.0.0 Ok: queued as {qid}"))
    }
}

/// Reply and header text must stay on one line.
fn sanitize_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
