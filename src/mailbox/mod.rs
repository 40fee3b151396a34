//! The quarantine mailbox servers: POP3 and IMAP over the held messages.
//!
//! Layout: `store` (the interface to the quarantine, plus `MemStore` for tests), `accounts`
//! (users.toml, argon2id), the login failure budget ([`crate::policy::login_guard`], one
//! for POP3, IMAP and SMTP AUTH; the connection itself is the shared `net` layer's), `pop3` (typed commands, sans-I/O core with one handler per state, shell),
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
pub(crate) mod pop3;
pub mod store;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::mailbox::accounts::{Account, Accounts};
use crate::mailbox::store::QuarantineStore;
use crate::net::{self, Admission, AdmissionConfig, Deadlines, ListenerSpec};
use crate::policy::login_guard::{LoginGuard, Refusal};

/// Bounds on sessions; the defaults follow the RFCs' minimum autologout timers.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// POP3 inactivity autologout (RFC 1939: at least 10 minutes).
    pub(crate) pop3_idle: Duration,
    /// IMAP inactivity autologout, also bounds one IDLE (RFC 3501: at least 30 minutes).
    pub(crate) imap_idle: Duration,
    /// From the greeting to a successful login (`[quarantine] login_timeout`):
    /// silent clients must not hold mailbox slots for the idle timers above.
    pub(crate) login: Duration,
    /// Largest IMAP literal accepted (we take no APPEND, so literals are only strings).
    pub(crate) max_literal: usize,
    /// A TLS handshake (POP3S/IMAPS, or after STLS/STARTTLS).
    pub(crate) handshake: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pop3_idle: Duration::from_secs(10 * 60),
            imap_idle: Duration::from_secs(30 * 60),
            login: Duration::from_secs(60),
            max_literal: 64 * 1024,
            handshake: Duration::from_secs(10),
        }
    }
}

/// Everything the mailbox listeners share.
pub struct MailboxCtx {
    /// Blocking: call it from the blocking pool (see the module doc).
    pub(crate) store: Arc<dyn QuarantineStore>,
    /// Swapped on reload; a login uses the set current at that moment.
    pub(crate) accounts: RwLock<Arc<Accounts>>,
    pub(crate) tls: tokio_rustls::TlsAcceptor,
    pub(crate) hostname: String,
    /// `postern_mailbox_logins_total{protocol, result}`.
    pub logins: IntCounterVec,
    pub(crate) limits: Limits,
    /// The caps shared by every POP3 and IMAP listener (`[quarantine]
    /// max_connections`, `max_connections_per_ip`).
    pub(crate) admission: Arc<Admission>,
    /// The login failure budget every protocol shares (POP3, IMAP, SMTP AUTH).
    pub(crate) guard: LoginGuard,
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
            admission: Admission::new(AdmissionConfig {
                max_connections: 1000,
                max_per_ip: 20,
                rate_per_ip: None,
                exempt: Vec::new(),
            }),
            guard: LoginGuard::default(),
            pop3_locks: Mutex::new(HashSet::new()),
        }
    }

    /// Counts IMAP releases in `releases`; call before any session starts.
    pub(crate) fn count_releases(&mut self, releases: prometheus::IntCounter) {
        self.imap = Arc::new(imap::state::Shared::counting(self.store.clone(), releases));
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

    pub(crate) fn accounts(&self) -> Arc<Accounts> {
        self.accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Install a reloaded users file.
    pub(crate) fn set_accounts(&self, accounts: Arc<Accounts>) {
        *self.accounts.write().unwrap_or_else(|e| e.into_inner()) = accounts;
    }
}

/// Bounds the argon2 checks running at once (one per core).
fn verify_slots() -> &'static Semaphore {
    static SLOTS: std::sync::OnceLock<Semaphore> = std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// What a login attempt came to.
#[derive(Debug)]
pub(crate) enum Login {
    Ok(Account),
    /// Wrong login or password.
    Failed,
    /// Over the failure budget or too many at once from this IP: refused
    /// without looking at the password (the client should try later).
    Refused,
}

/// Check a login: ask the shared budget, wait the client IP's penalty,
/// verify on a blocking thread, count the result.
pub(crate) async fn check_login(
    ctx: &Arc<MailboxCtx>,
    ip: IpAddr,
    protocol: &str,
    login: String,
    password: String,
) -> Login {
    // For the log: the name tried, made safe; the password never leaves here.
    let tried = crate::mail::token(&login);
    let queued_until = tokio::time::Instant::now() + crate::policy::login_guard::MAX_QUEUE_WAIT;
    let ticket = loop {
        let freed = ctx.guard.slot_freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let why = match ctx.guard.begin(ip, &login, std::time::Instant::now()) {
            Ok(t) => break t,
            // Wait for the IP's turn, then ask the budget again.
            Err(Refusal::TooManyAtOnce) if tokio::time::Instant::now() < queued_until => {
                let _ = tokio::time::timeout_at(queued_until, freed).await;
                continue;
            }
            Err(why) => why,
        };
        ctx.logins.with_label_values(&[protocol, "refused"]).inc();
        let why = match why {
            Refusal::OverBudget => "over the failure budget",
            Refusal::TooManyAtOnce => "waited too long for a check slot",
        };
        tracing::warn!(%ip, protocol, login = %tried, why, "login refused without a password check");
        return Login::Refused;
    };
    if !ticket.delay.is_zero() {
        tokio::time::sleep(ticket.delay).await;
    }
    let accounts = ctx.accounts();
    // argon2 is CPU- and memory-heavy by design: no more checks at once than
    // cores, so a burst of logins queues instead of eating memory.
    let _slot = verify_slots().acquire().await.ok();
    let res = tokio::task::spawn_blocking(move || accounts.verify(&login, &password))
        .await
        .ok()
        .flatten();
    ticket.finish(res.is_some(), std::time::Instant::now());
    match res {
        Some(a) => {
            ctx.logins.with_label_values(&[protocol, "ok"]).inc();
            tracing::info!(%ip, protocol, login = %a.login, "mailbox login");
            Login::Ok(a)
        }
        None => {
            ctx.logins.with_label_values(&[protocol, "fail"]).inc();
            tracing::warn!(%ip, protocol, login = %tried, "mailbox login failed");
            Login::Failed
        }
    }
}

#[derive(Clone, Copy)]
enum Protocol {
    Pop3,
    Imap,
}

impl Protocol {
    fn label(self, implicit_tls: bool) -> &'static str {
        match (self, implicit_tls) {
            (Protocol::Pop3, false) => "pop3",
            (Protocol::Pop3, true) => "pop3s",
            (Protocol::Imap, false) => "imap",
            (Protocol::Imap, true) => "imaps",
        }
    }

    /// What a client turned away by the connection caps is told.
    fn overload(self) -> &'static [u8] {
        match self {
            Protocol::Pop3 => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
            Protocol::Imap => b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        }
    }
}

/// Serve POP3 (`implicit_tls = false`: port 110 style with STLS; `true`: POP3S) until
/// shutdown; sessions are told (POP3: `-ERR`, nothing deleted; IMAP: `* BYE`) and run in
/// `server.tracker`, which the gateway gives `[server] shutdown_grace`.
pub async fn serve_pop3(
    listener: TcpListener,
    implicit_tls: bool,
    ctx: Arc<MailboxCtx>,
    server: net::Server,
) {
    serve(listener, implicit_tls, ctx, server, Protocol::Pop3).await
}

/// Serve IMAP (`implicit_tls = false`: port 143 style with STARTTLS; `true`: IMAPS).
pub async fn serve_imap(
    listener: TcpListener,
    implicit_tls: bool,
    ctx: Arc<MailboxCtx>,
    server: net::Server,
) {
    serve(listener, implicit_tls, ctx, server, Protocol::Imap).await
}

async fn serve(
    listener: TcpListener,
    implicit_tls: bool,
    ctx: Arc<MailboxCtx>,
    server: net::Server,
    protocol: Protocol,
) {
    let idle = match protocol {
        Protocol::Pop3 => ctx.limits.pop3_idle,
        Protocol::Imap => ctx.limits.imap_idle,
    };
    let spec = Arc::new(ListenerSpec {
        label: protocol.label(implicit_tls),
        tls: implicit_tls.then(|| ctx.tls.clone()),
        admission: ctx.admission.clone(),
        overload: protocol.overload().to_vec(),
        deadlines: Deadlines {
            idle,
            handshake: ctx.limits.handshake,
            session: None,
        },
        on_accept: None,
    });
    let shutdown = server.shutdown.clone();
    net::serve(listener, spec, server, move |conn, peer| {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        async move {
            let Some(addr) = peer.addr else { return };
            let r = match protocol {
                Protocol::Pop3 => pop3::run_session(conn, addr.ip(), ctx, shutdown).await,
                Protocol::Imap => imap::run_session(conn, addr.ip(), ctx, shutdown).await,
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "mailbox session ended with an error");
            }
        }
    })
    .await
}
