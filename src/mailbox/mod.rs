//! The quarantine mailbox servers: POP3 and IMAP over the held messages.
//!
//! Layout: `store` (the interface to the quarantine, plus `MemStore` for tests), `accounts`
//! (users.toml, argon2id), `io` (the I/O shell shared by both protocols: framing, STARTTLS,
//! throttling), `pop3` (typed commands, sans-I/O core with one handler per state, shell),
//! `imap` (sans-I/O core with one file per command group, shell), and the listeners here.
//!
//! The cores are synchronous and call the store; the shells run those calls on the
//! blocking pool (`store::offload`), as they run the argon2 check ([`check_login`]), so
//! neither sled nor argon2 ever holds a runtime thread. A store failure reaches the client
//! as "try again later" (`-ERR [SYS/TEMP]`, `NO [UNAVAILABLE]`), never as "gone".
//!
//! Crates added for this module, and why:
//! - `imap-codec` 2.0.0-alpha.10 (features `starttls`; builds on Rust 1.85+): parses IMAP
//!   client commands completely (sequence sets, SEARCH keys, FETCH attributes, literals,
//!   quoting), so our code only sees typed commands. We frame command lines and literals
//!   ourselves (bounded sizes) and hand the complete command to its `CommandCodec`. Responses
//!   are a small fixed set and are encoded by `imap::resp` (quoting, literals, NIL), which
//!   also lets message bodies go out without copying them into typed values.
//! - `mail-parser` 0.11.9 (1.x needs Rust 1.98): MIME structure and address parsing for
//!   ENVELOPE, BODYSTRUCTURE and BODY[section].
//! - `argon2` 0.5: argon2id PHC hashes in policies/users.toml.
//! - `base64` 0.22: SASL PLAIN.

pub mod accounts;
pub(crate) mod imap;
pub mod io;
pub(crate) mod pop3;
pub mod store;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::mailbox::accounts::{Account, Accounts};
use crate::mailbox::io::{Conn, Throttle};
use crate::mailbox::store::QuarantineStore;

/// Bounds on sessions; the defaults follow the RFCs' minimum autologout timers.
#[derive(Clone, Debug)]
pub struct Limits {
    /// POP3 inactivity autologout (RFC 1939: at least 10 minutes).
    pub pop3_idle: Duration,
    /// IMAP inactivity autologout, also bounds one IDLE (RFC 3501: at least 30 minutes).
    pub imap_idle: Duration,
    /// Largest IMAP literal accepted (we take no APPEND, so literals are only strings).
    pub max_literal: usize,
    /// Concurrent sessions per listener.
    pub max_sessions: usize,
    /// How long sessions in flight get to finish after shutdown before they are dropped.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pop3_idle: Duration::from_secs(10 * 60),
            imap_idle: Duration::from_secs(30 * 60),
            max_literal: 64 * 1024,
            max_sessions: 1000,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Everything the mailbox listeners share.
pub struct MailboxCtx {
    /// Blocking: call it from the blocking pool (see the module doc).
    pub store: Arc<dyn QuarantineStore>,
    /// Swapped on reload; a login uses the set current at that moment.
    pub accounts: RwLock<Arc<Accounts>>,
    pub tls: tokio_rustls::TlsAcceptor,
    pub hostname: String,
    /// `postern_mailbox_logins_total{protocol, result}`.
    pub logins: IntCounterVec,
    pub limits: Limits,
    pub(crate) throttle: Throttle,
    pub(crate) pop3_locks: Mutex<HashSet<String>>,
    /// Per-user IMAP state (UIDs, flags, cached views) shared by all IMAP sessions.
    pub(crate) imap: Arc<imap::state::Shared>,
}

impl MailboxCtx {
    pub fn new(
        store: Arc<dyn QuarantineStore>,
        accounts: Arc<Accounts>,
        tls: tokio_rustls::TlsAcceptor,
        hostname: &str,
        logins: IntCounterVec,
    ) -> MailboxCtx {
        MailboxCtx {
            imap: Arc::new(imap::state::Shared::new(store.clone())),
            store,
            accounts: RwLock::new(accounts),
            tls,
            hostname: hostname.to_string(),
            logins,
            limits: Limits::default(),
            throttle: Throttle::default(),
            pop3_locks: Mutex::new(HashSet::new()),
        }
    }

    /// The metric as the spec names it; register it with the gateway's registry.
    pub fn logins_metric() -> IntCounterVec {
        IntCounterVec::new(
            prometheus::Opts::new(
                "postern_mailbox_logins_total",
                "POP3/IMAP quarantine logins by protocol and result",
            ),
            &["protocol", "result"],
        )
        .expect("static metric definition is valid")
    }

    pub fn accounts(&self) -> Arc<Accounts> {
        self.accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Install a reloaded users file.
    pub fn set_accounts(&self, accounts: Arc<Accounts>) {
        *self.accounts.write().unwrap_or_else(|e| e.into_inner()) = accounts;
    }
}

/// Bounds the argon2 checks running at once (one per core).
fn verify_slots() -> &'static Semaphore {
    static SLOTS: std::sync::OnceLock<Semaphore> = std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// Check a login: wait the client IP's penalty, verify on a blocking thread, count the result.
pub(crate) async fn check_login(
    ctx: &Arc<MailboxCtx>,
    ip: IpAddr,
    protocol: &str,
    login: String,
    password: String,
) -> Option<Account> {
    let delay = ctx.throttle.delay(ip);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let accounts = ctx.accounts();
    // argon2 is CPU- and memory-heavy by design: no more checks at once than
    // cores, so a burst of logins queues instead of eating memory.
    let _slot = verify_slots().acquire().await.ok();
    let res = tokio::task::spawn_blocking(move || accounts.verify(&login, &password))
        .await
        .ok()
        .flatten();
    match &res {
        Some(a) => {
            ctx.throttle.succeeded(ip);
            ctx.logins.with_label_values(&[protocol, "ok"]).inc();
            tracing::info!(%ip, protocol, login = %a.login, "mailbox login");
        }
        None => {
            ctx.throttle.failed(ip);
            ctx.logins.with_label_values(&[protocol, "fail"]).inc();
            tracing::warn!(%ip, protocol, "mailbox login failed");
        }
    }
    res
}

#[derive(Clone, Copy)]
enum Protocol {
    Pop3,
    Imap,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Pop3 => "pop3",
            Protocol::Imap => "imap",
        }
    }
}

static SESSION_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serve POP3 (`implicit_tls = false`: port 110 style with STLS; `true`: POP3S) until
/// `shutdown` turns true (or its sender is dropped); then stop accepting, tell sessions
/// (POP3: `-ERR`, nothing deleted; IMAP: `* BYE`) and give them `limits.shutdown_grace`.
pub async fn serve_pop3(
    listener: TcpListener,
    implicit_tls: bool,
    ctx: Arc<MailboxCtx>,
    shutdown: watch::Receiver<bool>,
) {
    serve(listener, implicit_tls, ctx, shutdown, Protocol::Pop3).await
}

/// Serve IMAP (`implicit_tls = false`: port 143 style with STARTTLS; `true`: IMAPS).
pub async fn serve_imap(
    listener: TcpListener,
    implicit_tls: bool,
    ctx: Arc<MailboxCtx>,
    shutdown: watch::Receiver<bool>,
) {
    serve(listener, implicit_tls, ctx, shutdown, Protocol::Imap).await
}

async fn serve(
    listener: TcpListener,
    implicit_tls: bool,
    ctx: Arc<MailboxCtx>,
    mut shutdown: watch::Receiver<bool>,
    protocol: Protocol,
) {
    let sem = Arc::new(Semaphore::new(ctx.limits.max_sessions.max(1)));
    let mut sessions = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "mailbox accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::mailbox::io::wait_shutdown(&mut shutdown) => break,
        };
        // Reap finished sessions so the set does not grow.
        while sessions.try_join_next().is_some() {}
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!(
            "mailbox_session",
            protocol = protocol.name(),
            %peer,
            session = SESSION_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        sessions.spawn(tracing::Instrument::instrument(
            async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                let conn = if implicit_tls {
                    match tokio::time::timeout(Duration::from_secs(30), ctx.tls.accept(tcp)).await {
                        Ok(Ok(tls)) => Conn::new(Box::new(tls), true),
                        _ => return,
                    }
                } else {
                    Conn::new(Box::new(tcp), false)
                };
                let r = run_session(conn, peer.ip(), ctx, shutdown, protocol).await;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "mailbox session ended with an error");
                }
            },
            span,
        ));
    }
    let grace = ctx.limits.shutdown_grace;
    let _ = tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    sessions.abort_all();
}

/// Run one POP3 session on any byte stream (`tls`: whether it already is TLS, e.g. POP3S).
pub async fn pop3_session<S: io::Stream + 'static>(
    stream: S,
    peer: IpAddr,
    tls: bool,
    ctx: Arc<MailboxCtx>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    pop3::run_session(Conn::new(Box::new(stream), tls), peer, ctx, shutdown).await
}

/// Run one IMAP session on any byte stream (`tls`: whether it already is TLS, e.g. IMAPS).
pub async fn imap_session<S: io::Stream + 'static>(
    stream: S,
    peer: IpAddr,
    tls: bool,
    ctx: Arc<MailboxCtx>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    imap::run_session(Conn::new(Box::new(stream), tls), peer, ctx, shutdown).await
}

async fn run_session(
    conn: Conn,
    ip: IpAddr,
    ctx: Arc<MailboxCtx>,
    shutdown: watch::Receiver<bool>,
    protocol: Protocol,
) -> std::io::Result<()> {
    match protocol {
        Protocol::Pop3 => pop3::run_session(conn, ip, ctx, shutdown).await,
        Protocol::Imap => imap::run_session(conn, ip, ctx, shutdown).await,
    }
}
