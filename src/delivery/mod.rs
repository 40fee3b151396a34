//! Delivery: take queued messages to the mailbox backend or the recipient
//! domain's MX, retry on temporary failure, bounce on permanent failure or
//! expiry.
//!
//! A dispatcher task keeps the timers (when each deferred message is due) and
//! starts one delivery task per due message, at most `[delivery] concurrency`
//! at a time. Each attempt groups the pending recipients by next hop and
//! sends one transaction per hop over a pooled connection; an MX domain
//! gets at most `[delivery] per_destination` of those at once
//! ([`slots`]). Every SMTP/LMTP hop is secured as `[outbound_tls]` and the
//! domain's MTA-STS policy ask ([`tls`], [`mta_sts`]).

pub(crate) mod client;
pub(crate) mod dsn;
pub(crate) mod maildir;
pub(crate) mod mta_sts;
pub(crate) mod mx;
pub(crate) mod slots;
pub(crate) mod tls;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, Route, TlsLevel};
use crate::dns::DnsError;
use crate::mail::{Enhanced, Reply};
use crate::metrics::Metrics;
use crate::policy::relay;
use crate::store::wake::{Scheduler, Wakeups};
use crate::store::{self, QueueEntry, QueueState, RcptStatus, Store, fmt_id, now_ms, now_unix};
use client::Pool;
use mta_sts::MtaSts;
use slots::Slots;
use tls::{Channel, OutboundTls};

/// How long a message whose destination was full waits at most before it
/// looks again by itself (normally a freed slot wakes it sooner).
const BUSY_FALLBACK: Duration = Duration::from_secs(30);

/// Why delivery could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeliveryInitError {
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// What every delivery task shares.
pub(crate) struct Delivery {
    pub(crate) cfg: Arc<Config>,
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) scheduler: Scheduler,
    pub(crate) resolver: TokioResolver,
    pub(crate) pool: Pool,
    tls: OutboundTls,
    sts: MtaSts,
    slots: Arc<Slots>,
    in_flight: Mutex<HashSet<u64>>,
}

/// A group of recipients that share a next hop.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Hop {
    Route(Route),
    Mx(String),
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hop::Route(r) => r.fmt(f),
            Hop::Mx(domain) => write!(f, "mx:{domain}"),
        }
    }
}

/// Why a recipient was deferred. The MX loop moves on to the next host
/// only for [`Reason::ConnectFailed`] and [`Reason::Tls`]: any answer from
/// a host is final for this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// No session with the next hop (refused, timed out, dropped).
    ConnectFailed,
    /// The hop could not be secured as `[outbound_tls]` or MTA-STS require
    /// (no STARTTLS, a failed handshake, a bad certificate, an MX host
    /// outside the policy); nothing was sent.
    Tls,
    /// A DNS lookup failed temporarily.
    Dns,
    /// Our side failed (Maildir write, a misconfigured route).
    Local,
    /// The next hop answered 4xx.
    Remote,
}

/// What the mailbox backend said of a recipient at RCPT time
/// ([`Delivery::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// 2xx, or a Maildir route (every address of a relay domain exists).
    Known,
    /// 5xx: the backend's reply (for the log only).
    Unknown(Reply),
    /// 4xx, no connection, a timeout: why, for the log.
    Unavailable(String),
}

/// The longest a RCPT-time probe may take: the client is waiting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one attempt did for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered(Reply),
    Deferred(Reason, Reply),
    Failed(Reply),
}

impl Outcome {
    /// A next hop's answer: 2xx delivered, 5xx failed, anything else later.
    fn answered(reply: Reply) -> Outcome {
        match reply.code {
            200..=299 => Outcome::Delivered(reply),
            500..=599 => Outcome::Failed(reply),
            _ => Outcome::Deferred(Reason::Remote, reply),
        }
    }

    fn reply(&self) -> &Reply {
        match self {
            Outcome::Delivered(r) | Outcome::Deferred(_, r) | Outcome::Failed(r) => r,
        }
    }
}

/// One recipient's outcome, the host that gave it and how that session
/// was carried.
#[derive(Debug, Clone)]
struct RcptOutcome {
    outcome: Outcome,
    remote: Option<String>,
    channel: Channel,
}

/// What one attempt collected across its hops.
#[derive(Default)]
struct Tally {
    /// Failed in this attempt, with the reply that failed them.
    failed_now: Vec<(usize, Reply)>,
    /// The deferral of each recipient still pending, for expiry.
    deferred: HashMap<usize, Reply>,
    /// Hops attempted.
    tried: usize,
    /// A hop was skipped: its destination had no free slot.
    busy: bool,
}

/// The same outcome for every recipient of a hop (no session gave it).
fn for_all(rcpts: &[String], outcome: Outcome, remote: Option<String>) -> Vec<RcptOutcome> {
    vec![
        RcptOutcome {
            outcome,
            remote,
            channel: Channel::NoSession,
        };
        rcpts.len()
    ]
}

/// A deferral because TLS was not as required (4.7.5, cryptographic failure).
fn tls_later(text: String) -> Outcome {
    later(Reason::Tls, Enhanced::new(4, 7, 5), text)
}

/// A deferral (451) for `reason`.
fn later(reason: Reason, enhanced: Enhanced, text: String) -> Outcome {
    Outcome::Deferred(reason, Reply::new(451, enhanced, text))
}

impl Delivery {
    pub(crate) fn new(
        cfg: Arc<Config>,
        store: Store,
        metrics: Arc<Metrics>,
        scheduler: Scheduler,
    ) -> Result<Arc<Delivery>, DeliveryInitError> {
        let resolver = crate::dns::resolver(&cfg.dns)?;
        let tls = OutboundTls::new(&cfg.outbound_tls.ca)?;
        tracing::info!(
            default = cfg.outbound_tls.default.as_str(),
            mta_sts = cfg.outbound_tls.mta_sts,
            trust_anchors = tls.anchors,
            "outbound TLS"
        );
        Ok(Arc::new(Delivery {
            sts: MtaSts::new(cfg.outbound_tls.mta_sts_port),
            slots: Slots::new(cfg.delivery.per_destination, scheduler.clone()),
            cfg,
            store,
            metrics,
            scheduler,
            resolver,
            pool: Pool::default(),
            tls,
            in_flight: Mutex::default(),
        }))
    }

    /// Put every message of the store on the schedule (at start).
    pub(crate) fn resume(&self) -> store::Result<usize> {
        let mut n = 0;
        for e in self.store.queue_entries()? {
            if e.state != QueueState::Held {
                self.scheduler.at(e.id, e.next_attempt_ms);
                n += 1;
            }
        }
        Ok(n)
    }

    fn hop_for(&self, address: &str) -> Hop {
        let domain = relay::split(address).map(|(_, d)| d).unwrap_or("");
        if self.cfg.relay.is_local_domain(domain) {
            Hop::Route(self.cfg.delivery.route.clone())
        } else {
            match &self.cfg.delivery.outbound {
                Route::Mx => Hop::Mx(domain.to_ascii_lowercase()),
                r => Hop::Route(r.clone()),
            }
        }
    }

    /// One delivery attempt of message `id`.
    pub(crate) async fn attempt(self: &Arc<Self>, id: u64) {
        {
            let Ok(mut f) = self.in_flight.lock() else {
                return;
            };
            if !f.insert(id) {
                return;
            }
        }
        if let Err(e) = self.attempt_inner(id).await {
            tracing::error!(id = %fmt_id(id), error = %e, "delivery attempt failed in the store");
        }
        if let Ok(mut f) = self.in_flight.lock() {
            f.remove(&id);
        }
        // A freed slot woke this message while it was in flight: go again.
        if self.slots.is_woken(id) {
            self.scheduler.now(id);
        }
    }

    async fn attempt_inner(self: &Arc<Self>, id: u64) -> store::Result<()> {
        // Woken by a freed destination slot: due now, whatever its timer says.
        let woken = self.slots.take_woken(id);
        let Some(mut entry) = self.store.entry(id)? else {
            return Ok(());
        };
        // Held, or rescheduled for later since this timer was set.
        if entry.state == QueueState::Held || (entry.next_attempt_ms > now_ms() + 50 && !woken) {
            return Ok(());
        }
        let Some(body) = self.store.body(id)? else {
            tracing::error!(id = %fmt_id(id), "queue entry without a body; dropping it");
            self.store.remove(id)?;
            return Ok(());
        };
        let mut tally = Tally::default();
        for (hop, idx) in self.hop_groups(&entry) {
            self.attempt_hop(id, &mut entry, &hop, &idx, &body, &mut tally)
                .await;
        }
        if tally.tried == 0 && tally.busy {
            return self.wait_for_slot(id, &mut entry);
        }
        entry.attempts += 1;
        self.expire_if_old(&mut entry, &mut tally);
        if !tally.failed_now.is_empty() {
            self.bounce(&entry, &tally.failed_now, &body).await?;
        }
        if entry.pending().next().is_none() {
            self.store.remove(id)?;
            return Ok(());
        }
        self.reschedule(id, &mut entry, tally.busy)
    }

    /// Every hop of this message was full: nothing was tried, so this is
    /// not an attempt. A freed slot wakes it; the timer is a fallback.
    fn wait_for_slot(&self, id: u64, entry: &mut QueueEntry) -> store::Result<()> {
        let due = now_ms() + BUSY_FALLBACK.as_millis() as i64;
        if entry.next_attempt_ms < due {
            entry.next_attempt_ms = due;
            if !self.store.update(entry)? {
                return Ok(());
            }
        }
        self.scheduler.at(id, entry.next_attempt_ms);
        Ok(())
    }

    /// The indices of the pending recipients, grouped by next hop.
    fn hop_groups(&self, entry: &QueueEntry) -> HashMap<Hop, Vec<usize>> {
        let mut groups: HashMap<Hop, Vec<usize>> = HashMap::new();
        for (i, r) in entry.recipients.iter().enumerate() {
            if r.status == RcptStatus::Pending {
                groups.entry(self.hop_for(&r.address)).or_default().push(i);
            }
        }
        groups
    }

    /// Delivers to one hop the recipients at `idx` and records each one's
    /// outcome in `entry` and `tally`, with the attempt metrics.
    async fn attempt_hop(
        &self,
        id: u64,
        entry: &mut QueueEntry,
        hop: &Hop,
        idx: &[usize],
        body: &sled::IVec,
        tally: &mut Tally,
    ) {
        // MX domains share the per-destination cap; the mailbox backend and
        // a smarthost are one destination each and may use all workers.
        let _slot = match hop {
            Hop::Mx(_) => match self.slots.acquire(&hop.to_string(), id) {
                Some(g) => Some(g),
                None => {
                    tracing::debug!(id = %fmt_id(id), hop = %hop, "destination busy; waiting for a slot");
                    tally.busy = true;
                    return;
                }
            },
            Hop::Route(_) => None,
        };
        tally.tried += 1;
        let rcpts: Vec<String> = idx
            .iter()
            .map(|&i| entry.recipients[i].address.clone())
            .collect();
        let started = Instant::now();
        let outcomes = self.deliver_hop(hop, &entry.sender, &rcpts, body).await;
        let elapsed = started.elapsed();
        self.metrics.delivery_seconds.observe(elapsed.as_secs_f64());
        let mut result = "ok";
        // What the attempt line reports: the host that answered, the worst
        // reply (a failure over a deferral over a success), the TLS used.
        let (mut host, mut worst) = (None, (0u8, String::new()));
        let channel = outcomes
            .iter()
            .map(|o| o.channel.clone())
            .find(|c| *c != Channel::NoSession)
            .unwrap_or_default();
        for (&i, o) in idx.iter().zip(outcomes) {
            let r = &mut entry.recipients[i];
            let reply = o.outcome.reply().to_string();
            let rank = match o.outcome {
                Outcome::Delivered(_) => 1,
                Outcome::Deferred(..) => 2,
                Outcome::Failed(_) => 3,
            };
            if rank > worst.0 {
                worst = (rank, reply.clone());
            }
            r.last_reply = Some(reply);
            if host.is_none() {
                host.clone_from(&o.remote);
            }
            r.remote = o.remote;
            r.tls = o.channel.record();
            match o.outcome {
                Outcome::Delivered(reply) => {
                    r.status = RcptStatus::Delivered;
                    tracing::debug!(id = %fmt_id(id), rcpt = %r.address, reply = %reply, "delivered");
                }
                Outcome::Failed(reply) => {
                    r.status = RcptStatus::Failed;
                    result = "permfail";
                    tracing::debug!(id = %fmt_id(id), rcpt = %r.address, reply = %reply, "failed permanently");
                    tally.failed_now.push((i, reply));
                }
                Outcome::Deferred(reason, reply) => {
                    if result == "ok" {
                        result = "tempfail";
                    }
                    entry.last_error = Some(reply.to_string());
                    tracing::debug!(id = %fmt_id(id), rcpt = %r.address, reply = %reply, ?reason, "deferred");
                    tally.deferred.insert(i, reply);
                }
            }
        }
        let tls = channel.is_tls();
        self.metrics
            .delivery_attempts
            .with_label_values(&[result, if tls { "yes" } else { "no" }])
            .inc();
        let host = host.unwrap_or_else(|| hop.to_string());
        // One line per attempt (per message and next hop).
        tracing::info!(
            id = %fmt_id(id),
            host = %host,
            rcpts = rcpts.len(),
            result,
            reply = %worst.1,
            tls,
            tls_detail = %channel.record().unwrap_or_else(|| "no session".into()),
            duration_ms = elapsed.as_millis() as u64,
            "delivery attempt"
        );
    }

    /// Past `max_age` every recipient still pending fails now (4.4.7),
    /// with its last deferral in the reply.
    fn expire_if_old(&self, entry: &mut QueueEntry, tally: &mut Tally) {
        let expired = now_unix() - entry.created >= self.cfg.delivery.max_age.0.as_secs() as i64;
        if !expired {
            return;
        }
        let age = humantime::format_duration(self.cfg.delivery.max_age.0);
        for (i, r) in entry.recipients.iter_mut().enumerate() {
            if r.status == RcptStatus::Pending {
                r.status = RcptStatus::Failed;
                let last = tally
                    .deferred
                    .remove(&i)
                    .map(|d| d.to_string())
                    .or_else(|| r.last_reply.clone())
                    .unwrap_or_default();
                // "Delivery time expired" (4.4.7), final now.
                let reply = Reply::new(
                    554,
                    Enhanced::new(4, 4, 7).permanent(),
                    format!("Message expired after {age} in the queue; last error: {last}"),
                );
                r.last_reply = Some(reply.to_string());
                tally.failed_now.push((i, reply));
            }
        }
    }

    /// Stores the attempt's results and sets the next attempt by the retry
    /// schedule (sooner when a hop waits for a slot: `busy`); an admin
    /// change made meanwhile keeps its state.
    fn reschedule(&self, id: u64, entry: &mut QueueEntry, busy: bool) -> store::Result<()> {
        let steps = &self.cfg.delivery.retry;
        let mut step = steps[(entry.attempts as usize - 1).min(steps.len() - 1)].0;
        if busy {
            step = step.min(BUSY_FALLBACK);
        }
        entry.next_attempt_ms = now_ms() + step.as_millis() as i64;
        entry.state = QueueState::Deferred;
        if !self.store.update(entry)? {
            // Changed by an admin meanwhile: keep their state, record our results.
            if let Some(mut cur) = self.store.entry(id)? {
                cur.recipients = entry.recipients.clone();
                cur.attempts = entry.attempts;
                cur.last_error = entry.last_error.clone();
                if cur.state != QueueState::Held {
                    cur.state = QueueState::Deferred;
                    cur.next_attempt_ms = entry.next_attempt_ms;
                }
                self.store.update(&cur)?;
            }
        }
        self.scheduler.at(id, entry.next_attempt_ms);
        Ok(())
    }

    /// Send a DSN for the recipients at `failed`, each with the reply that
    /// failed it (never to the null sender).
    async fn bounce(
        &self,
        entry: &QueueEntry,
        failed: &[(usize, Reply)],
        body: &[u8],
    ) -> store::Result<()> {
        if entry.sender.is_empty() {
            tracing::warn!(id = %fmt_id(entry.id), "a bounce could not be delivered; dropping it (no DSN to <>)");
            return Ok(());
        }
        if let Some(reason) = dsn::suppressed(entry, |d| self.cfg.relay.is_local_domain(d)) {
            self.metrics
                .dsn_suppressed
                .with_label_values(&[reason])
                .inc();
            tracing::info!(id = %fmt_id(entry.id), to = %crate::mail::token(&entry.sender), failed = failed.len(), reason, "bounce dropped (it would be backscatter)");
            return Ok(());
        }
        let failures: Vec<dsn::Failure<'_>> = failed
            .iter()
            .map(|(i, reply)| dsn::Failure {
                recipient: &entry.recipients[*i],
                // A server that gave no enhanced code: "permanent, other".
                status: reply.enhanced.unwrap_or(Enhanced::new(5, 0, 0)),
                diagnostic: reply.to_string(),
            })
            .collect();
        let report = dsn::build(
            &self.cfg.server.hostname,
            &entry.sender,
            &fmt_id(entry.id),
            entry.created,
            &failures,
            body,
        );
        let id = self.store.next_id()?;
        // A bounce is from the null sender, so it is never bounced itself.
        let dsn_entry = QueueEntry::new(
            id,
            String::new(),
            [entry.sender.clone()],
            report.len() as u64,
            String::new(),
            String::new(),
        );
        self.store.enqueue(&dsn_entry, &report)?;
        // The bounce must be on disk before the original is forgotten.
        self.store.durable().await?;
        self.metrics.bounces.inc();
        tracing::info!(id = %fmt_id(entry.id), dsn = %fmt_id(id), to = %entry.sender, "bounce queued");
        self.scheduler.now(id);
        Ok(())
    }

    /// Deliver to one next hop; one outcome per recipient.
    async fn deliver_hop(
        &self,
        hop: &Hop,
        from: &str,
        rcpts: &[String],
        body: &sled::IVec,
    ) -> Vec<RcptOutcome> {
        match hop {
            Hop::Route(Route::Maildir(root)) => self.to_maildir(root, rcpts, body).await,
            Hop::Route(Route::Smtp(hp)) => self.to_route(hp, false, from, rcpts, body).await,
            Hop::Route(Route::Lmtp(hp)) => self.to_route(hp, true, from, rcpts, body).await,
            Hop::Route(Route::Mx) => for_all(
                rcpts,
                later(
                    Reason::Local,
                    Enhanced::new(4, 3, 5),
                    "Misconfigured route".into(),
                ),
                None,
            ),
            Hop::Mx(domain) => self.to_mx(domain, from, rcpts, body).await,
        }
    }

    /// Writes every copy into the Maildirs under `root`.
    async fn to_maildir(
        &self,
        root: &std::path::Path,
        rcpts: &[String],
        body: &sled::IVec,
    ) -> Vec<RcptOutcome> {
        // One blocking task writes every copy; the body is shared
        // (IVec is reference-counted), not copied per recipient.
        let (root, rcpts2, host, data) = (
            root.to_path_buf(),
            rcpts.to_vec(),
            self.cfg.server.hostname.clone(),
            body.clone(),
        );
        let res = tokio::task::spawn_blocking(move || {
            rcpts2
                .iter()
                .map(|r| match maildir::deliver(&root, r, &host, &data) {
                    Ok(_) => Outcome::Delivered(Reply::new(
                        250,
                        Enhanced::new(2, 0, 0),
                        "Delivered to Maildir",
                    )),
                    Err(e) => later(
                        Reason::Local,
                        Enhanced::new(4, 3, 0),
                        format!("Maildir write failed: {e}"),
                    ),
                })
                .collect::<Vec<_>>()
        })
        .await;
        match res {
            Ok(outcomes) => outcomes
                .into_iter()
                .map(|outcome| RcptOutcome {
                    outcome,
                    remote: None,
                    channel: Channel::NoSession,
                })
                .collect(),
            Err(e) => for_all(
                rcpts,
                later(
                    Reason::Local,
                    Enhanced::new(4, 3, 0),
                    format!("Maildir task failed: {e}"),
                ),
                None,
            ),
        }
    }

    /// Sends over SMTP or LMTP to the fixed `host:port` of a route, with
    /// the TLS level configured for that host name (else the default).
    async fn to_route(
        &self,
        hp: &str,
        lmtp: bool,
        from: &str,
        rcpts: &[String],
        body: &sled::IVec,
    ) -> Vec<RcptOutcome> {
        let Some((host, port)) = mx::split_host_port(hp) else {
            let bad = format!("Bad route {hp}");
            return for_all(
                rcpts,
                later(Reason::Local, Enhanced::new(4, 3, 5), bad),
                None,
            );
        };
        let addrs = match mx::resolve_host(&self.resolver, host, port).await {
            Ok(a) => a,
            Err(e) => {
                let why = later(Reason::Dns, Enhanced::new(4, 4, 3), e.to_string());
                return for_all(rcpts, why, Some(hp.to_string()));
            }
        };
        let key = format!("{}://{hp}", if lmtp { "lmtp" } else { "smtp" });
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let want = self.want(lmtp, self.cfg.outbound_tls.level_for(host), host);
        self.send(&key, &addrs, &want, from, rcpts, body, hp).await
    }

    /// Asks the mailbox backend whether it has `address`, on a connection
    /// of its own (never a pooled one: a probe must not leave a delivery
    /// session half-way), secured as deliveries to it are, within
    /// [`PROBE_TIMEOUT`].
    pub(crate) async fn probe(&self, address: &str) -> Probe {
        let (hp, lmtp) = match &self.cfg.delivery.route {
            Route::Maildir(_) => return Probe::Known,
            Route::Smtp(hp) => (hp, false),
            Route::Lmtp(hp) => (hp, true),
            Route::Mx => return Probe::Unavailable("misconfigured route".into()),
        };
        match tokio::time::timeout(PROBE_TIMEOUT, self.probe_route(hp, lmtp, address)).await {
            Ok(p) => p,
            Err(_) => Probe::Unavailable(format!("{hp}: timed out")),
        }
    }

    async fn probe_route(&self, hp: &str, lmtp: bool, address: &str) -> Probe {
        let Some((host, port)) = mx::split_host_port(hp) else {
            return Probe::Unavailable(format!("bad route {hp}"));
        };
        let addrs = match mx::resolve_host(&self.resolver, host, port).await {
            Ok(a) => a,
            Err(e) => return Probe::Unavailable(format!("{hp}: {e}")),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut want = self.want(lmtp, self.cfg.outbound_tls.level_for(host), host);
        want.timeout = want.timeout.min(PROBE_TIMEOUT);
        let mut last = format!("{hp}: no address");
        for a in addrs {
            let mut conn = match client::Conn::connect(a, &want, false).await {
                Ok(c) => c,
                Err(client::ClientError::Refused(r)) => {
                    return Probe::Unavailable(format!("{hp} refused the session: {r}"));
                }
                Err(e) => {
                    last = format!("{hp}: {e}");
                    continue;
                }
            };
            let answer = conn.probe(address).await;
            conn.quit().await;
            return match answer {
                Ok(r) if (200..300).contains(&r.code) => Probe::Known,
                Ok(r) if r.is_permanent() => Probe::Unknown(r),
                Ok(r) => Probe::Unavailable(format!("{hp}: {r}")),
                Err(e) => Probe::Unavailable(format!("{hp}: {e}")),
            };
        }
        Probe::Unavailable(last)
    }

    fn want<'a>(&'a self, lmtp: bool, level: TlsLevel, host: &'a str) -> client::Want<'a> {
        client::Want {
            lmtp,
            helo_name: &self.cfg.server.hostname,
            timeout: self.cfg.delivery.timeout.0,
            level,
            host,
            tls: &self.tls,
        }
    }

    /// Sends to the MX hosts of `domain` in order, moving on only when a
    /// host could not be reached or not secured as required; a null or
    /// missing domain fails at once. An MTA-STS `enforce` policy skips
    /// hosts outside its `mx` patterns and requires verified TLS; `testing`
    /// logs what enforce would have refused and delivers as configured.
    async fn to_mx(
        &self,
        domain: &str,
        from: &str,
        rcpts: &[String],
        body: &sled::IVec,
    ) -> Vec<RcptOutcome> {
        let hosts = match mx::lookup_mx(&self.resolver, domain).await {
            mx::MxAnswer::Hosts(h) => h,
            mx::MxAnswer::NullMx => {
                let text = format!("Domain {domain} accepts no mail (null MX)");
                let reply = Reply::new(556, Enhanced::new(5, 1, 10), text);
                return for_all(rcpts, Outcome::Failed(reply), None);
            }
            mx::MxAnswer::NoDomain => {
                let text = format!("Domain {domain} does not exist");
                let reply = Reply::new(550, Enhanced::new(5, 1, 2), text);
                return for_all(rcpts, Outcome::Failed(reply), None);
            }
            mx::MxAnswer::TempFail(e) => {
                let text = format!("DNS lookup for {domain} failed: {e}");
                return for_all(
                    rcpts,
                    later(Reason::Dns, Enhanced::new(4, 4, 3), text),
                    None,
                );
            }
        };
        let policy = if self.cfg.outbound_tls.mta_sts {
            self.sts.policy(&self.resolver, &self.tls, domain).await
        } else {
            None
        };
        let mode = policy.as_ref().map_or(mta_sts::Mode::None, |p| p.mode);
        let level = match mode {
            mta_sts::Mode::Enforce => TlsLevel::Verify,
            _ => self.cfg.outbound_tls.level_for(domain),
        };
        let none = format!("No MX host of {domain} answered");
        let mut last = for_all(
            rcpts,
            later(Reason::ConnectFailed, Enhanced::new(4, 4, 1), none),
            None,
        );
        let port = self.cfg.delivery.mx_port;
        for h in hosts {
            if let Some(p) = policy.as_ref().filter(|p| !p.allows(&h)) {
                match p.mode {
                    mta_sts::Mode::Enforce => {
                        tracing::warn!(domain, host = %h, "MTA-STS enforce: MX host outside the policy; not used");
                        let text = format!("MX host {h} is not in the MTA-STS policy of {domain}");
                        last = for_all(rcpts, tls_later(text), Some(h.clone()));
                        continue;
                    }
                    mta_sts::Mode::Testing => {
                        tracing::warn!(domain, host = %h, "MTA-STS testing: MX host outside the policy (enforce would not use it)");
                    }
                    mta_sts::Mode::None => {}
                }
            }
            let addrs = match mx::resolve_host(&self.resolver, &h, port).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) | Err(_) => continue,
            };
            let key = format!("smtp://{h}:{port}");
            let want = self.want(false, level, &h);
            let out = self.send(&key, &addrs, &want, from, rcpts, body, &h).await;
            if mode == mta_sts::Mode::Testing {
                sts_testing_report(domain, &h, &out);
            }
            // Only a failure before any transaction moves on to the next MX.
            let next = out.iter().all(|o| {
                matches!(
                    o.outcome,
                    Outcome::Deferred(Reason::ConnectFailed | Reason::Tls, _)
                )
            });
            if !next {
                return out;
            }
            last = out;
        }
        last
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        key: &str,
        addrs: &[std::net::SocketAddr],
        want: &client::Want<'_>,
        from: &str,
        rcpts: &[String],
        body: &[u8],
        remote: &str,
    ) -> Vec<RcptOutcome> {
        let remote = Some(remote.to_string());
        let each = |outcome: Outcome| for_all(rcpts, outcome, remote.clone());
        match client::deliver(&self.pool, key, addrs, want, from, rcpts, body).await {
            Ok((replies, channel)) => replies
                .into_iter()
                .map(|reply| RcptOutcome {
                    outcome: Outcome::answered(reply),
                    remote: remote.clone(),
                    channel: channel.clone(),
                })
                .collect(),
            // Refused in the greeting or EHLO: an answer, not a lost
            // connection, but never a delivery.
            Err(client::ClientError::Refused(r)) if r.is_permanent() => each(Outcome::Failed(r)),
            Err(client::ClientError::Refused(r)) => each(Outcome::Deferred(Reason::Remote, r)),
            Err(client::ClientError::Tls(f)) => each(tls_later(format!(
                "TLS to {} ({}) not as required: {f}",
                want.host,
                want.level.as_str()
            ))),
            Err(e) => each(Outcome::Deferred(
                Reason::ConnectFailed,
                Reply::new(
                    451,
                    Enhanced::new(4, 4, 1),
                    format!("Connection to {key} failed: {e}"),
                ),
            )),
        }
    }
}

/// Under an MTA-STS `testing` policy: says what `enforce` would have
/// refused in this delivery (RFC 8461 5: deliver, and report).
fn sts_testing_report(domain: &str, host: &str, out: &[RcptOutcome]) {
    let Some(o) = out.first() else {
        return;
    };
    let why = match &o.channel {
        Channel::Tls(t) => match &t.verdict {
            tls::Verdict::Verified => return,
            tls::Verdict::NotVerified(why) => format!("certificate not verified: {why}"),
        },
        Channel::Plain => "no TLS".to_string(),
        Channel::NoSession => return,
    };
    tracing::warn!(
        domain,
        host,
        why,
        "MTA-STS testing: enforce would have refused this delivery"
    );
}

/// Run the dispatcher until shutdown; in-flight attempts finish (bounded by
/// the delivery timeout) and are tracked by `tracker`.
pub(crate) async fn run(
    delivery: Arc<Delivery>,
    mut rx: Wakeups,
    mut shutdown: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(delivery.cfg.delivery.concurrency));
    let mut timers: BTreeSet<(i64, u64)> = BTreeSet::new();
    let mut ready: VecDeque<u64> = VecDeque::new();
    loop {
        let now = now_ms();
        while let Some(&(due, id)) = timers.first() {
            if due > now {
                break;
            }
            timers.pop_first();
            ready.push_back(id);
        }
        // Start what is ready while there are free workers.
        while !ready.is_empty() {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            let Some(id) = ready.pop_front() else { break };
            let d = delivery.clone();
            let span = tracing::info_span!("delivery", id = %fmt_id(id));
            tracker.spawn(
                async move {
                    d.attempt(id).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        let next_timer = timers.first().map(|&(due, _)| due);
        let sleep_for = next_timer
            .map(|due| Duration::from_millis((due - now).max(0) as u64))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => break,
            msg = rx.recv() => match msg {
                Some((due, id)) => {
                    if due <= now_ms() { ready.push_back(id) } else { timers.insert((due, id)); }
                }
                None => break,
            },
            // A worker became free.
            p = permits.clone().acquire_owned(), if !ready.is_empty() => drop(p),
            _ = tokio::time::sleep(sleep_for), if next_timer.is_some() => {}
        }
    }
    for c in delivery.pool.drain() {
        c.quit().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_typed_by_its_code() {
        let r = |code, e: (u8, u16, u16)| Reply::new(code, Enhanced::new(e.0, e.1, e.2), "x");
        assert!(matches!(
            Outcome::answered(r(250, (2, 0, 0))),
            Outcome::Delivered(_)
        ));
        assert!(matches!(
            Outcome::answered(r(550, (5, 1, 1))),
            Outcome::Failed(_)
        ));
        // A server's own 4.4.1 is an answer: it never moves on to the next MX.
        assert!(matches!(
            Outcome::answered(r(451, (4, 4, 1))),
            Outcome::Deferred(Reason::Remote, _)
        ));
    }
}
