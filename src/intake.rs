//! Intake: what happens to a message between the final dot and the reply.
//!
//! The SMTP shell knows nothing of storage; it hands an [`Arrival`] (the
//! peer, the envelope, what stuck to the transaction) and the body here, and
//! sends back whatever reply this returns. The checks and the `data(m)`
//! rules decide; "250" is only returned once the message is durable on disk
//! (queued or quarantined), or when the rules said discard. The intake sees
//! only shared types (`mail`, `policy`), never the SMTP session.

use std::sync::Arc;

use crate::mail::{Enhanced, Envelope, Peer};
use crate::mailbox::accounts::owns;
use crate::metrics::Metrics;
use crate::policy::{
    CheckResults, DataInputs, ListHits, RuleSet, StageTrace, Trace, TxInfo, Verdict, final_verdict,
    strip_forged_auth_results,
};
use crate::spool::MessageBody;
use crate::store::recent::RecentCase;
use crate::store::wake::Scheduler;
use crate::store::{self, HeldEntry, QueueEntry, QueueState, Store};

/// A complete message as the SMTP session hands it over.
pub(crate) struct Arrival {
    /// The queue id, allocated when DATA began.
    pub(crate) id: u64,
    pub(crate) peer: Peer,
    /// What the rules see of the session (sender and recipients are filled
    /// in from `envelope`).
    pub(crate) info: TxInfo,
    pub(crate) envelope: Envelope,
    /// A quarantine or discard decided before DATA, with its script.
    pub(crate) sticky: Option<(Verdict, Option<String>)>,
    /// The `hold` rate limit the transaction went over: an accepted
    /// message is queued held, not delivered, until an admin releases it.
    pub(crate) hold: Option<String>,
    /// The stages before DATA, for the decision trace.
    pub(crate) trace: Vec<StageTrace>,
    /// For an authenticated user: the addresses every header From address
    /// must be one of (SPEC "Submission"); `None` otherwise.
    pub(crate) sender_addresses: Option<Vec<String>>,
    /// The `Received:` header to prepend.
    pub(crate) received: String,
}

use crate::mail::reply::line as reply;

pub(crate) struct Intake {
    pub(crate) store: Store,
    pub(crate) scheduler: Scheduler,
    pub(crate) metrics: Arc<Metrics>,
    /// Our hostname and `[checks] authserv_ids`: inbound
    /// `Authentication-Results` naming one of them are forged.
    pub(crate) authserv_ids: Vec<String>,
    /// `[dkim_sign]` keys: our users' mail is signed before it is stored.
    pub(crate) signers: Arc<crate::dkim::Signers>,
    /// `[rules] keep_recent` is on: keep a copy of every decided message.
    pub(crate) keep_recent: bool,
    /// The accounts as last (re)loaded: whose allow and block lists apply
    /// to which recipient.
    pub(crate) accounts: Arc<crate::mailbox::MailboxCtx>,
    /// Where arriving message data waits, and the memory budget the
    /// checks read it back within.
    pub(crate) spool: Arc<crate::spool::Spool>,
}

impl Intake {
    /// Allocate the queue id of a message about to arrive.
    pub(crate) fn next_id(&self) -> store::Result<u64> {
        self.store.next_id()
    }

    /// Decide on and store a complete message; return the reply to send.
    /// The message is read into memory for the checks only if the
    /// `data_memory` budget has room for it; otherwise `452 4.3.1`.
    pub(crate) async fn accept(
        &self,
        arrival: Arrival,
        rules: &Arc<RuleSet>,
        body: MessageBody,
    ) -> Vec<u8> {
        let size = body.len();
        let loaded = match body.load().await {
            Ok(l) => l,
            Err(e) => {
                let budget = e.is_budget();
                tracing::warn!(
                    id = %store::fmt_id(arrival.id),
                    size,
                    data_memory_used = self.spool.budget().used(),
                    error = %e,
                    result = "refused",
                    "message not taken: {}",
                    if budget { "no memory for its checks" } else { "spool read failed" }
                );
                return reply(
                    452,
                    Enhanced::new(4, 3, 1),
                    "Insufficient system storage, try again later",
                );
            }
        };
        // `loaded` keeps its bytes charged until the reply is made.
        self.decide(arrival, rules, &loaded.bytes).await
    }

    async fn decide(&self, arrival: Arrival, rules: &Arc<RuleSet>, body: &[u8]) -> Vec<u8> {
        let Arrival {
            id,
            peer,
            mut info,
            envelope: tx,
            sticky,
            hold,
            trace: mut stages,
            sender_addresses,
            received,
        } = arrival;
        let label = peer.listener;
        let qid = store::fmt_id(id);
        if let Some(why) = sender_addresses
            .as_deref()
            .and_then(|mine| header_from_refusal(mine, body))
        {
            self.metrics
                .verdicts
                .with_label_values(&["reject", "data"])
                .inc();
            tracing::info!(
                id = %qid,
                from = %tx.from,
                rcpts = tx.rcpts.len(),
                size = body.len(),
                verdict = "reject",
                reason = %why,
                tls = peer.tls,
                result = "refused",
                "message decision"
            );
            return reply(553, Enhanced::new(5, 7, 1), &why);
        }
        info.from = tx.from.clone();
        info.rcpts = tx.rcpt_addresses();
        let clean = strip_forged_auth_results(body, &self.authserv_ids);
        let inputs = DataInputs {
            lists: self.list_hits(&qid, &tx, &clean),
            ..DataInputs::default()
        };
        let lists = inputs.lists;
        let outcome = rules.data_with(&info, &clean, inputs).await;
        let (verdict, script) =
            final_verdict((outcome.verdict.clone(), outcome.script.clone()), sticky);
        stages.push(outcome.trace.clone());
        let trace = Trace {
            stages,
            checks: CheckResults {
                spf: outcome.spf.clone(),
                dkim: outcome.dkim.clone(),
                dmarc: outcome.dmarc.clone(),
                dmarc_policy: outcome.dmarc_policy.clone(),
            },
            scan: outcome.scan.clone(),
            lists,
            hold: hold.clone(),
            score: outcome.score,
            verdict: verdict.word().to_string(),
            decided_by: decided_by(script.as_deref(), outcome.by_score && script.is_none()),
        };
        self.metrics
            .verdicts
            .with_label_values(&[verdict.word(), "data"])
            .inc();
        let (from, rcpts, size) = (tx.from.clone(), tx.rcpts.len(), body.len());
        // Only mail of our own (trusted networks, authenticated users) that
        // will be stored is signed; the signature covers the message as the
        // client sent it. RSA signing takes a millisecond or more of CPU, so
        // it runs on the blocking pool, not on a runtime worker.
        let stored = matches!(verdict, Verdict::Accept | Verdict::Quarantine { .. });
        let key = (stored && info.trusted && !self.signers.is_empty())
            .then(|| self.signers.key_for(&clean))
            .flatten();
        let signed = match key {
            Some(key) => {
                let (signers, copy) = (self.signers.clone(), clean.to_vec());
                tokio::task::spawn_blocking(move || signers.sign_with(key, &copy))
                    .await
                    .unwrap_or_else(|e| crate::dkim::Signed::Failed(e.to_string()))
            }
            None => crate::dkim::Signed::NotOurs,
        };
        let dkim_signed = match &signed {
            crate::dkim::Signed::Header { domain, .. } => domain.as_str(),
            crate::dkim::Signed::Failed(e) => {
                tracing::error!(id = %store::fmt_id(id), error = %e, "DKIM signing failed; sending unsigned");
                ""
            }
            crate::dkim::Signed::NotOurs => "",
        };
        let message = || {
            let mut m = Vec::with_capacity(received.len() + clean.len() + 1024);
            m.extend_from_slice(received.as_bytes());
            if let crate::dkim::Signed::Header { header, .. } = &signed {
                m.extend_from_slice(header.as_bytes());
            }
            for (name, value) in &outcome.headers {
                m.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            m.extend_from_slice(&clean);
            m
        };
        let word = verdict.word();
        let deciding = trace.decided_by.clone();
        let mut reason = None;
        let (answer, result) = match verdict {
            Verdict::Reject(r) | Verdict::Tempfail(r) => (r.to_bytes(), "refused"),
            Verdict::Discard => (self.received(label, id), "discarded"),
            Verdict::Quarantine { reason: why } => {
                let m = message();
                let template = HeldEntry {
                    id: 0,
                    body_key: 0,
                    sender: tx.from.clone(),
                    recipient: String::new(),
                    reason: crate::mail::one_line(&why),
                    script: script.clone(),
                    received: store::now_unix(),
                    size: m.len() as u64,
                    client_ip: peer.ip.to_string(),
                    helo: peer.helo.clone(),
                    trace: Some(trace.clone()),
                    from_outside: !info.trusted,
                };
                reason = Some(template.reason.clone());
                let rcpts: Vec<String> = tx.rcpts.iter().map(|r| r.address.clone()).collect();
                let stored = match self.store.room_for(m.len() as u64) {
                    Err(short) => Err(short),
                    Ok(()) => Ok(match self.store.quarantine(&template, &rcpts, &m) {
                        Ok(_) => self.store.durable().await,
                        Err(e) => Err(e),
                    }),
                };
                match stored {
                    Err(short) => no_room(&qid, short),
                    Ok(Err(e)) => {
                        tracing::error!(id = %qid, error = %e, "could not quarantine; the client is told to retry");
                        (store_failed(&e), "store failed")
                    }
                    Ok(Ok(())) => (self.received(label, id), "quarantined"),
                }
            }
            Verdict::Accept => {
                if let Some(limit) = &hold {
                    reason = Some(format!("rate limit {limit}"));
                }
                let outside = !info.trusted;
                self.enqueue(
                    &peer,
                    tx,
                    id,
                    message(),
                    (hold.is_some(), outside),
                    trace.clone(),
                )
                .await
            }
        };
        if self.keep_recent {
            // What the rules decided from, for `rules replay --recent`.
            // Written after the reply is known, on the blocking pool, with
            // no fsync of its own: the client does not wait for it.
            let case = RecentCase {
                id: qid.clone(),
                received: store::now_ms(),
                ip: info.conn.ip,
                helo: info.helo.clone(),
                from: info.from.clone(),
                rcpts: info.rcpts.clone(),
                auth_user: info.auth_user.clone(),
                tls: info.conn.tls,
                submission: info.submission,
                trusted: info.trusted,
                checks: trace.checks.clone(),
                scan: outcome.scan.clone(),
                lists,
                verdict: word.to_string(),
                decided_by: deciding.clone(),
            };
            let (store, copy) = (self.store.clone(), clean.into_owned());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.keep_recent(&case, id, &copy) {
                    tracing::warn!(id = %case.id, error = %e, "keep_recent: copy not kept");
                }
            });
        }
        // The one line per message decision (addresses may be logged; the
        // body never is).
        tracing::info!(
            id = %qid,
            from = %from,
            rcpts,
            size,
            verdict = word,
            script = script.as_deref().unwrap_or(""),
            decided_by = %deciding,
            reason = reason.as_deref().unwrap_or(""),
            score = outcome.score,
            spf = %outcome.spf,
            dkim = %outcome.dkim,
            dmarc = %outcome.dmarc,
            tls = peer.tls,
            dkim_signed,
            result,
            "message decision"
        );
        answer
    }

    /// Queues an accepted message (`held`: in the held state, for an admin
    /// to release; `outside`: from a client neither trusted nor
    /// authenticated): the reply, and what became of it.
    async fn enqueue(
        &self,
        peer: &Peer,
        tx: Envelope,
        id: u64,
        body: Vec<u8>,
        (held, outside): (bool, bool),
        trace: Trace,
    ) -> (Vec<u8>, &'static str) {
        let mut entry = QueueEntry::new(
            id,
            tx.from,
            tx.rcpts.into_iter().map(|r| r.address),
            body.len() as u64,
            peer.ip.to_string(),
            peer.helo.clone(),
        );
        if held {
            entry.state = QueueState::Held;
        }
        entry.trace = Some(trace);
        if let Err(short) = self.store.room_for(body.len() as u64) {
            return no_room(&store::fmt_id(id), short);
        }
        entry.from_outside = outside;
        let stored = match self.store.enqueue(&entry, &body) {
            Ok(()) => self.store.durable().await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::error!(id = %store::fmt_id(id), error = %e, "could not store message; the client is told to retry");
            // Do not leave a half-written entry to be delivered after the
            // client was told to retry.
            let _ = self.store.remove(id);
            return (store_failed(&e), "store failed");
        }
        if held {
            return (self.received(peer.listener, id), "held");
        }
        self.scheduler.now(id);
        (self.received(peer.listener, id), "queued")
    }

    /// The allow and block list hits of a message ([`crate::store::lists`]).
    /// A store error is logged and counts as no hit: the message then gets
    /// the ordinary checks.
    fn list_hits(&self, qid: &str, tx: &Envelope, message: &[u8]) -> ListHits {
        if tx.from.is_empty() {
            return ListHits::default();
        }
        let accounts = self.accounts.accounts();
        let owners: Vec<Vec<String>> = tx
            .rcpts
            .iter()
            .map(|r| accounts.owners(&r.address))
            .collect();
        let authors = header_from_addresses(message);
        self.store
            .list_hits(&tx.from, &authors, &owners)
            .unwrap_or_else(|e| {
                tracing::error!(id = %qid, error = %e, "allow/block lists not readable; no list hits");
                ListHits::default()
            })
    }

    /// Counts a message taken in (stored, or discarded by the rules) and
    /// makes its `250`.
    fn received(&self, listener: &str, id: u64) -> Vec<u8> {
        self.metrics
            .messages_received
            .with_label_values(&[listener])
            .inc();
        let qid = store::fmt_id(id);
        reply(250, Enhanced::new(2, 0, 0), &format!("Ok: queued as {qid}"))
    }
}

/// Who decided, for the trace: the script (or `ratelimit:<name>`), `score`
/// when the total score quarantined, or `default` when nothing objected.
fn decided_by(script: Option<&str>, by_score: bool) -> String {
    match script {
        Some(s) => s.to_string(),
        None if by_score => "score".into(),
        None => "default".into(),
    }
}

/// `452 4.3.1`: the data dir is short of its `min_free_space` reserve, so
/// nothing is written (see [`store::space`]).
fn no_room(id: &str, short: store::space::Short) -> (Vec<u8>, &'static str) {
    tracing::error!(
        id,
        free = short.free,
        needed = short.needed,
        "data dir below [server] min_free_space; answering 452"
    );
    let answer = reply(
        452,
        Enhanced::new(4, 3, 1),
        "Insufficient system storage, try again later",
    );
    (answer, "store full")
}

/// `451 4.3.0` (`452 4.3.1` when the disk is full): nothing was stored,
/// the client should try again.
fn store_failed(e: &store::StoreError) -> Vec<u8> {
    if e.is_no_space() {
        return reply(
            452,
            Enhanced::new(4, 3, 1),
            "Insufficient system storage, try again later",
        );
    }
    reply(
        451,
        Enhanced::new(4, 3, 0),
        "Temporary storage failure, try again later",
    )
}

/// Why the header From of `message` is not the authenticated user's to
/// use, or `None` when every address in every From field is one of `mine`.
/// No From address at all is refused too (RFC 5322 requires one), and so
/// is a From field with no readable address: what a mail client shows as
/// the sender must be checkable here.
fn header_from_refusal(mine: &[String], message: &[u8]) -> Option<String> {
    use mail_parser::{HeaderName, HeaderValue, MessageParser};
    let Some(parsed) = MessageParser::new().parse_headers(message) else {
        return Some("The message has no header From".into());
    };
    let mut seen = 0;
    for h in parsed.headers() {
        if h.name != HeaderName::From {
            continue;
        }
        let HeaderValue::Address(list) = &h.value else {
            return Some("The header From has no address in it".into());
        };
        for a in list.iter() {
            seen += 1;
            match a.address.as_deref() {
                Some(addr) if owns(mine, addr) => {}
                Some(addr) => {
                    return Some(format!(
                        "Header From <{}> is not one of your addresses",
                        crate::mail::token(addr)
                    ));
                }
                None => return Some("The header From has an entry without an address".into()),
            }
        }
    }
    if seen == 0 {
        return Some("The message has no header From".into());
    }
    None
}

/// The addresses in the header From fields (for the block lists).
fn header_from_addresses(message: &[u8]) -> Vec<String> {
    use mail_parser::{HeaderName, HeaderValue, MessageParser};
    let Some(parsed) = MessageParser::new().parse_headers(message) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for h in parsed.headers() {
        if h.name != HeaderName::From {
            continue;
        }
        if let HeaderValue::Address(list) = &h.value {
            out.extend(
                list.iter()
                    .filter_map(|a| a.address.as_deref().map(str::to_string)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::header_from_refusal;

    #[test]
    fn header_from_binding() {
        let mine = vec!["alice@example.test".to_string()];
        let ok = |m: &str| header_from_refusal(&mine, m.as_bytes()).is_none();
        assert!(ok(
            "From: Alice <Alice+x@Example.test>\r\nSubject: hi\r\n\r\nbody\r\n"
        ));
        assert!(ok("Subject: hi\r\nFrom: alice@example.test\r\n\r\n"));
        assert!(!ok("From: Boss <boss@example.test>\r\n\r\nbody\r\n"));
        assert!(!ok("From: alice@example.test, boss@example.test\r\n\r\n"));
        assert!(!ok(
            "From: alice@example.test\r\nFrom: boss@example.test\r\n\r\n"
        ));
        assert!(!ok(
            "From: \"alice@example.test\" <boss@example.test>\r\n\r\n"
        ));
        assert!(!ok("From: undisclosed\r\n\r\n"));
        assert!(!ok("Subject: no from\r\n\r\nbody\r\n"));
        assert!(!ok(
            "From: team: alice@example.test, boss@example.test;\r\n\r\n"
        ));
    }
}
