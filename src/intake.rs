//! Intake: what happens to a message between the final dot and the reply.
//!
//! The SMTP shell knows nothing of verdicts or storage; it hands the message
//! here and sends back whatever reply this returns. "250" is only returned
//! once the message is durable on disk.

use std::sync::Arc;

use crate::delivery::Scheduler;
use crate::metrics::Metrics;
use crate::smtp::session::{Session, Transaction, reply};
use crate::store::{self, QueueEntry, QueueState, RcptStatus, Recipient, Store};

pub struct Intake {
    pub store: Store,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
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
        tx: Transaction,
        id: u64,
        body: Vec<u8>,
    ) -> Vec<u8> {
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
            // Best effort: do not leave a half-written entry to be delivered
            // after the client was told to retry.
            let _ = self.store.remove(id);
            return reply(451, "4.3.0 Temporary storage failure, try again later");
        }
        let qid = store::fmt_id(id);
        tracing::info!(id = %qid, from = %entry.sender, rcpts = entry.recipients.len(), size = entry.size, "queued");
        self.metrics
            .messages_received
            .with_label_values(&[session.kind.label()])
            .inc();
        self.metrics
            .verdicts
            .with_label_values(&["accept", "data"])
            .inc();
        self.scheduler.now(id);
        reply(250, &format!("2.0.0 Ok: queued as {qid}"))
    }
}
