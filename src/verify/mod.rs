//! Recipient verification at RCPT time (`[relay] verify_recipients`):
//! refuse an unknown user while the client is still there, instead of
//! accepting, failing at the backend and bouncing to a sender who may be
//! forged (backscatter).
//!
//! `backend` asks the mailbox backend with an SMTP/LMTP `RCPT` probe
//! ([`crate::delivery::Delivery::probe`]) and caches what it said
//! ([`cache`]); `list` matches the `recipients` file ([`list`]), reloaded
//! with the policies. The SMTP core asks through `Action::Verify` and gets
//! a [`Verified`] back.
//!
//! Probes are bounded: one at a time per address (sessions asking for an
//! address already being probed wait for that probe's answer, so a burst
//! of RCPTs for one user costs the backend one connection), at most
//! [`PROBES_AT_ONCE`] in all, and an answer within [`VERIFY_DEADLINE`] or
//! `451 4.4.3`.

pub(crate) mod cache;
pub(crate) mod list;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};

use prometheus::IntCounterVec;

use crate::config::{Config, Problem, VerifyRecipients};
use crate::delivery::{Delivery, Probe};
use cache::Cache;
use list::Recipients;

/// What verification says of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verified {
    /// It exists: take it.
    Known,
    /// The backend (or the list) does not have it: 550 5.1.1.
    Unknown,
    /// Nobody could say (backend down, 4xx, timeout): 451 4.4.3.
    Unavailable,
}

/// `postern check`: the recipients file of a `list` gateway parses; says
/// which file and how many entries (`None` when the mode is not `list`).
pub fn check(cfg: &Config) -> Result<Option<String>, Vec<Problem>> {
    if cfg.relay.verify_recipients != VerifyRecipients::List {
        return Ok(None);
    }
    let file = &cfg.relay.recipients;
    Recipients::load(file)
        .map(|r| Some(format!("{}: {} recipient entries", file.display(), r.len())))
}

/// Backend probes running at once, over all addresses: the backend sees
/// at most this many verification connections from us.
pub(crate) const PROBES_AT_ONCE: usize = 16;
/// Waiting for a probe slot plus the probe itself; past it the client is
/// told `451 4.4.3` (the probe has its own, shorter deadline).
pub(crate) const VERIFY_DEADLINE: Duration = Duration::from_secs(15);

/// An address being probed: the answer, once there is one.
type InFlight = watch::Receiver<Option<Verified>>;

/// The one verifier of a gateway, shared by every SMTP session.
pub(crate) struct Verifier {
    mode: VerifyRecipients,
    file: std::path::PathBuf,
    list: RwLock<Arc<Recipients>>,
    cache: Mutex<Cache>,
    /// Probes running, by cache key, for sessions asking the same meanwhile.
    in_flight: Mutex<HashMap<String, InFlight>>,
    probes: Semaphore,
    delivery: Arc<Delivery>,
    metric: IntCounterVec,
}

/// Whether this session probes an address or waits for another's probe.
enum Role {
    Lead(watch::Sender<Option<Verified>>),
    Follow(InFlight),
}

/// Takes the leader's entry out of `in_flight` however its probe ends
/// (answered, or the session gone mid-probe: its followers then see the
/// sender dropped and one of them probes).
struct Leading<'a> {
    verifier: &'a Verifier,
    key: &'a str,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.verifier
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.key);
    }
}

impl Verifier {
    /// Loads the recipients file in `list` mode (a problem stops the start).
    pub(crate) fn new(
        cfg: &Config,
        delivery: Arc<Delivery>,
        metric: IntCounterVec,
    ) -> Result<Verifier, Vec<Problem>> {
        let mode = cfg.relay.verify_recipients;
        let file = cfg.relay.recipients.clone();
        let list = if mode == VerifyRecipients::List {
            let r = Recipients::load(&file)?;
            tracing::info!(file = %file.display(), entries = r.len(), "recipients loaded");
            r
        } else {
            Recipients::default()
        };
        Ok(Verifier {
            mode,
            file,
            list: RwLock::new(Arc::new(list)),
            cache: Mutex::default(),
            in_flight: Mutex::default(),
            probes: Semaphore::new(PROBES_AT_ONCE),
            delivery,
            metric,
        })
    }

    /// The file to watch, in `list` mode.
    pub(crate) fn watched(&self) -> Option<&Path> {
        (self.mode == VerifyRecipients::List).then_some(self.file.as_path())
    }

    /// Re-read the recipients file (on change and SIGHUP); a broken file
    /// keeps the list in use.
    pub(crate) fn reload(&self) {
        if self.mode != VerifyRecipients::List {
            return;
        }
        match Recipients::load(&self.file) {
            Ok(r) => {
                tracing::info!(file = %self.file.display(), entries = r.len(), "recipients reloaded");
                *self.list.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r);
            }
            Err(problems) => {
                for p in problems {
                    tracing::error!(problem = %p, "recipients file does not load; keeping the list in use");
                }
            }
        }
    }

    /// Does `address` (a recipient in one of our domains) exist?
    pub(crate) async fn verify(&self, address: &str) -> Verified {
        match self.mode {
            VerifyRecipients::Off => Verified::Known,
            VerifyRecipients::List => {
                let list = self.list.read().unwrap_or_else(|e| e.into_inner()).clone();
                let v = if list.contains(address) {
                    Verified::Known
                } else {
                    Verified::Unknown
                };
                self.count(v, false);
                v
            }
            VerifyRecipients::Backend => self.ask_backend(address).await,
        }
    }

    async fn ask_backend(&self, address: &str) -> Verified {
        // The backend sees the address as given; the cache keys it by case
        // only (a `+tag` may route differently at the backend).
        let key = address.to_lowercase();
        let hit = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key, Instant::now());
        if let Some(known) = hit {
            let v = if known {
                Verified::Known
            } else {
                Verified::Unknown
            };
            self.count(v, true);
            return v;
        }
        let deadline = tokio::time::Instant::now() + VERIFY_DEADLINE;
        loop {
            let role = {
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                match in_flight.get(&key) {
                    Some(rx) => Role::Follow(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        in_flight.insert(key.clone(), rx);
                        Role::Lead(tx)
                    }
                }
            };
            match role {
                Role::Lead(tx) => {
                    let _leading = Leading {
                        verifier: self,
                        key: &key,
                    };
                    let v = match tokio::time::timeout_at(deadline, self.probe(address, &key)).await
                    {
                        Ok(v) => v,
                        Err(_) => {
                            tracing::warn!(rcpt = %crate::mail::token(address), "recipient verification: no probe slot in time");
                            self.count(Verified::Unavailable, false);
                            Verified::Unavailable
                        }
                    };
                    let _ = tx.send(Some(v));
                    return v;
                }
                Role::Follow(mut rx) => {
                    match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
                        // Answered by another session's probe: no probe of
                        // our own, so it counts as cached.
                        Ok(Ok(answer)) => {
                            let v = (*answer).unwrap_or(Verified::Unavailable);
                            drop(answer);
                            self.count(v, true);
                            return v;
                        }
                        // The leader's session went away mid-probe: ask again.
                        Ok(Err(_)) => continue,
                        Err(_) => {
                            self.count(Verified::Unavailable, true);
                            return Verified::Unavailable;
                        }
                    }
                }
            }
        }
    }

    /// One backend probe (within the global slot limit); caches a definite
    /// answer under `key` before the waiting sessions are told.
    async fn probe(&self, address: &str, key: &str) -> Verified {
        let _slot = self.probes.acquire().await.ok();
        let v = match self.delivery.probe(address).await {
            Probe::Known => Verified::Known,
            Probe::Unknown(reply) => {
                tracing::info!(rcpt = %crate::mail::token(address), reply = %reply, "recipient unknown at the backend");
                Verified::Unknown
            }
            Probe::Unavailable(why) => {
                tracing::warn!(rcpt = %crate::mail::token(address), why = %why, "recipient verification unavailable");
                Verified::Unavailable
            }
        };
        if v != Verified::Unavailable {
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(
                key.to_string(),
                v == Verified::Known,
                Instant::now(),
            );
        }
        self.count(v, false);
        v
    }

    fn count(&self, v: Verified, cached: bool) {
        let result = match v {
            Verified::Known => "ok",
            Verified::Unknown => "unknown",
            Verified::Unavailable => "tempfail",
        };
        self.metric
            .with_label_values(&[result, if cached { "true" } else { "false" }])
            .inc();
    }
}
