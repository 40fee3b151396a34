//! Delivery: take queued messages to the mailbox backend or the recipient
//! domain's MX, retry on temporary failure, bounce on permanent failure or
//! expiry.
//!
//! A dispatcher task keeps the timers (when each deferred message is due) and
//! starts one delivery task per due message, at most `[delivery] concurrency`
//! at a time. Each attempt groups the pending recipients by next hop and
//! sends one transaction per hop over a pooled connection.

pub mod client;
pub mod dsn;
pub mod maildir;
pub mod mx;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, Route};
use crate::metrics::Metrics;
use crate::policy::relay;
use crate::store::{
    self, QueueEntry, QueueState, RcptStatus, Recipient, Store, fmt_id, now_ms, now_unix,
};
use client::{Pool, Reply};

/// Asks the dispatcher to attempt a message now or at a given time.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<(i64, u64)>,
}

impl Scheduler {
    pub fn channel() -> (Scheduler, mpsc::UnboundedReceiver<(i64, u64)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Scheduler { tx }, rx)
    }

    pub fn now(&self, id: u64) {
        let _ = self.tx.send((0, id));
    }

    pub fn at(&self, id: u64, due_ms: i64) {
        let _ = self.tx.send((due_ms, id));
    }
}

/// What every delivery task shares.
pub struct Delivery {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub scheduler: Scheduler,
    pub resolver: TokioResolver,
    pub pool: Pool,
    in_flight: Mutex<HashSet<u64>>,
}

/// A group of recipients that share a next hop.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Hop {
    Route(Route),
    Mx(String),
}

/// The outcome for one recipient of one attempt.
#[derive(Debug, Clone)]
struct Outcome {
    reply: Reply,
    remote: Option<String>,
}

impl Delivery {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        metrics: Arc<Metrics>,
        scheduler: Scheduler,
    ) -> Result<Arc<Delivery>, String> {
        let resolver = mx::resolver(&cfg.dns.nameservers)?;
        Ok(Arc::new(Delivery {
            cfg,
            store,
            metrics,
            scheduler,
            resolver,
            pool: Pool::default(),
            in_flight: Mutex::default(),
        }))
    }

    /// Put every message of the store on the schedule (at start).
    pub fn resume(&self) -> store::Result<usize> {
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
    pub async fn attempt(self: &Arc<Self>, id: u64) {
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
    }

    async fn attempt_inner(self: &Arc<Self>, id: u64) -> store::Result<()> {
        let Some(mut entry) = self.store.entry(id)? else {
            return Ok(());
        };
        // Held, or rescheduled for later since this timer was set.
        if entry.state == QueueState::Held || entry.next_attempt_ms > now_ms() + 50 {
            return Ok(());
        }
        let Some(body) = self.store.body(id)? else {
            tracing::error!(id = %fmt_id(id), "queue entry without a body; dropping it");
            self.store.remove(id)?;
            return Ok(());
        };
        let mut groups: HashMap<Hop, Vec<usize>> = HashMap::new();
        for (i, r) in entry.recipients.iter().enumerate() {
            if r.status == RcptStatus::Pending {
                groups.entry(self.hop_for(&r.address)).or_default().push(i);
            }
        }
        let mut failed_now: Vec<usize> = Vec::new();
        for (hop, idx) in groups {
            let rcpts: Vec<String> = idx
                .iter()
                .map(|&i| entry.recipients[i].address.clone())
                .collect();
            let started = Instant::now();
            let outcomes = self.deliver_hop(&hop, &entry.sender, &rcpts, &body).await;
            self.metrics
                .delivery_seconds
                .observe(started.elapsed().as_secs_f64());
            let mut result = "ok";
            for (&i, o) in idx.iter().zip(outcomes) {
                let r = &mut entry.recipients[i];
                r.last_reply = Some(o.reply.to_string());
                r.remote = o.remote.clone();
                if o.reply.is_ok() {
                    r.status = RcptStatus::Delivered;
                    tracing::info!(id = %fmt_id(id), rcpt = %r.address, reply = %o.reply, "delivered");
                } else if o.reply.is_permanent() {
                    r.status = RcptStatus::Failed;
                    failed_now.push(i);
                    result = "permfail";
                    tracing::warn!(id = %fmt_id(id), rcpt = %r.address, reply = %o.reply, "failed permanently");
                } else {
                    if result == "ok" {
                        result = "tempfail";
                    }
                    entry.last_error = Some(o.reply.to_string());
                    tracing::info!(id = %fmt_id(id), rcpt = %r.address, reply = %o.reply, "deferred");
                }
            }
            self.metrics
                .delivery_attempts
                .with_label_values(&[result])
                .inc();
        }
        entry.attempts += 1;
        let expired = now_unix() - entry.created >= self.cfg.delivery.max_age.0.as_secs() as i64;
        if expired {
            for (i, r) in entry.recipients.iter_mut().enumerate() {
                if r.status == RcptStatus::Pending {
                    r.status = RcptStatus::Failed;
                    let last = r.last_reply.clone().unwrap_or_default();
                    r.last_reply = Some(format!(
                        "4.4.7 Message expired after {} in the queue; last error: {last}",
                        humantime::format_duration(self.cfg.delivery.max_age.0)
                    ));
                    failed_now.push(i);
                }
            }
        }
        if !failed_now.is_empty() {
            self.bounce(&entry, &failed_now, &body).await?;
        }
        if entry.pending().next().is_none() {
            self.store.remove(id)?;
            return Ok(());
        }
        let steps = &self.cfg.delivery.retry;
        let step = steps[(entry.attempts as usize - 1).min(steps.len() - 1)].0;
        entry.next_attempt_ms = now_ms() + step.as_millis() as i64;
        entry.state = QueueState::Deferred;
        if !self.store.update(&entry)? {
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

    /// Send a DSN for the recipients at `failed` (never to the null sender).
    async fn bounce(&self, entry: &QueueEntry, failed: &[usize], body: &[u8]) -> store::Result<()> {
        if entry.sender.is_empty() {
            tracing::warn!(id = %fmt_id(entry.id), "a bounce could not be delivered; dropping it (no DSN to <>)");
            return Ok(());
        }
        let failures: Vec<dsn::Failure<'_>> = failed
            .iter()
            .map(|&i| {
                let r = &entry.recipients[i];
                let diag = r
                    .last_reply
                    .clone()
                    .unwrap_or_else(|| "5.0.0 failed".into());
                let status = first_status(&diag).unwrap_or_else(|| "5.0.0".into());
                let status = if status.starts_with('4') && r.status == RcptStatus::Failed {
                    // A temporary code that ran out of time is a permanent failure now.
                    if diag.starts_with("4.4.7") {
                        "4.4.7".to_string()
                    } else {
                        format!("5{}", &status[1..])
                    }
                } else {
                    status
                };
                dsn::Failure {
                    recipient: r,
                    status,
                    diagnostic: diag,
                }
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
        let dsn_entry = QueueEntry {
            id,
            sender: String::new(),
            recipients: vec![Recipient {
                address: entry.sender.clone(),
                status: RcptStatus::Pending,
                last_reply: None,
                remote: None,
            }],
            state: QueueState::Queued,
            created: now_unix(),
            next_attempt_ms: now_ms(),
            attempts: 0,
            size: report.len() as u64,
            client_ip: String::new(),
            helo: String::new(),
            last_error: None,
        };
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
    ) -> Vec<Outcome> {
        let all = |code: u16, text: String, remote: Option<String>| {
            vec![
                Outcome {
                    reply: Reply::local(code, text),
                    remote,
                };
                rcpts.len()
            ]
        };
        let timeout = self.cfg.delivery.timeout.0;
        let hostname = &self.cfg.server.hostname;
        match hop {
            Hop::Route(Route::Maildir(root)) => {
                // One blocking task writes every copy; the body is shared
                // (IVec is reference-counted), not copied per recipient.
                let (root, rcpts2, host, data) =
                    (root.clone(), rcpts.to_vec(), hostname.clone(), body.clone());
                let res = tokio::task::spawn_blocking(move || {
                    rcpts2
                        .iter()
                        .map(|r| match maildir::deliver(&root, r, &host, &data) {
                            Ok(_) => Reply::local(250, "2.0.0 Delivered to Maildir"),
                            Err(e) => Reply::local(451, format!("4.3.0 Maildir write failed: {e}")),
                        })
                        .collect::<Vec<_>>()
                })
                .await;
                match res {
                    Ok(replies) => replies
                        .into_iter()
                        .map(|reply| Outcome {
                            reply,
                            remote: None,
                        })
                        .collect(),
                    Err(e) => all(451, format!("4.3.0 Maildir task failed: {e}"), None),
                }
            }
            Hop::Route(Route::Smtp(hp)) | Hop::Route(Route::Lmtp(hp)) => {
                let lmtp = matches!(hop, Hop::Route(Route::Lmtp(_)));
                let Some((host, port)) = mx::split_host_port(hp) else {
                    return all(451, format!("4.3.5 Bad route {hp}"), None);
                };
                let addrs = match mx::resolve_host(&self.resolver, host, port).await {
                    Ok(a) => a,
                    Err(e) => return all(451, format!("4.4.3 {e}"), Some(hp.clone())),
                };
                let key = format!("{}://{hp}", if lmtp { "lmtp" } else { "smtp" });
                self.send(&key, &addrs, lmtp, from, rcpts, body, timeout, hp)
                    .await
            }
            Hop::Route(Route::Mx) => all(451, "4.3.5 Misconfigured route".into(), None),
            Hop::Mx(domain) => {
                let hosts = match mx::lookup_mx(&self.resolver, domain).await {
                    mx::MxAnswer::Hosts(h) => h,
                    mx::MxAnswer::NullMx => {
                        return all(
                            556,
                            format!("5.1.10 Domain {domain} accepts no mail (null MX)"),
                            None,
                        );
                    }
                    mx::MxAnswer::NoDomain => {
                        return all(550, format!("5.1.2 Domain {domain} does not exist"), None);
                    }
                    mx::MxAnswer::TempFail(e) => {
                        return all(
                            451,
                            format!("4.4.3 DNS lookup for {domain} failed: {e}"),
                            None,
                        );
                    }
                };
                let mut last = all(451, format!("4.4.1 No MX host of {domain} answered"), None);
                for h in hosts {
                    let addrs =
                        match mx::resolve_host(&self.resolver, &h, self.cfg.delivery.mx_port).await
                        {
                            Ok(a) if !a.is_empty() => a,
                            Ok(_) | Err(_) => continue,
                        };
                    let key = format!("smtp://{h}:{}", self.cfg.delivery.mx_port);
                    let out = self
                        .send(&key, &addrs, false, from, rcpts, body, timeout, &h)
                        .await;
                    // Only a connection-level failure moves on to the next MX.
                    let conn_failed = out.iter().all(|o| o.reply.text.starts_with("4.4.1"));
                    if !conn_failed {
                        return out;
                    }
                    last = out;
                }
                last
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        key: &str,
        addrs: &[std::net::SocketAddr],
        lmtp: bool,
        from: &str,
        rcpts: &[String],
        body: &[u8],
        timeout: Duration,
        remote: &str,
    ) -> Vec<Outcome> {
        let remote = Some(remote.to_string());
        match client::deliver(
            &self.pool,
            key,
            addrs,
            lmtp,
            &self.cfg.server.hostname,
            timeout,
            from,
            rcpts,
            body,
        )
        .await
        {
            Ok(replies) => replies
                .into_iter()
                .map(|reply| Outcome {
                    reply,
                    remote: remote.clone(),
                })
                .collect(),
            Err(client::ClientError::Refused(r)) => vec![
                Outcome {
                    reply: r,
                    remote: remote.clone()
                };
                rcpts.len()
            ],
            Err(e) => vec![
                Outcome {
                    reply: Reply::local(451, format!("4.4.1 Connection to {key} failed: {e}")),
                    remote: remote.clone()
                };
                rcpts.len()
            ],
        }
    }
}

/// Find an enhanced status code anywhere in a reply text ("550 5.1.1 ...").
fn first_status(text: &str) -> Option<String> {
    text.split_whitespace()
        .map(|w| Reply::local(0, w.to_string()))
        .find_map(|r| r.status().map(str::to_string))
}

/// Run the dispatcher until shutdown; in-flight attempts finish (bounded by
/// the delivery timeout) and are tracked by `tracker`.
pub async fn run(
    delivery: Arc<Delivery>,
    mut rx: mpsc::UnboundedReceiver<(i64, u64)>,
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
