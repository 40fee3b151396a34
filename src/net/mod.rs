//! The connection edge every listener shares: SMTP, POP3, IMAP and the
//! control socket.
//!
//! It accepts (backing off when the process is out of descriptors), admits
//! or refuses by the group's caps ([`admission`]) with the protocol's own
//! overload reply, runs an implicit-TLS handshake under its deadline, opens
//! one tracing span per session (session id, listener, peer), and hands
//! the protocol shell a [`Conn`] whose every read and write is bounded.
//! Shutdown is one watch channel and one [`TaskTracker`] for every session,
//! so `[server] shutdown_grace` is the one grace period.

pub(crate) mod admission;
pub(crate) mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub(crate) use admission::{Admission, AdmissionConfig};
pub(crate) use conn::{Conn, Deadlines, Fill, Line, Stream};

/// Resolve once the shutdown flag is set (or its sender is gone, which also
/// means stop). The watch guard is dropped inside, so callers stay `Send`.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// What every listener's sessions share: the shutdown signal and the
/// tracker the gateway waits on for `shutdown_grace`.
#[derive(Clone)]
pub struct Server {
    pub shutdown: watch::Receiver<bool>,
    pub tracker: TaskTracker,
}

/// How one listener treats its connections.
pub(crate) struct ListenerSpec {
    /// The metric and log label: "relay", "submission", "pop3s", "control"...
    pub(crate) label: &'static str,
    /// Implicit TLS (465, 995, 993): the handshake runs before the shell.
    pub(crate) tls: Option<TlsAcceptor>,
    /// The group's caps (shared by the listeners of one protocol family).
    pub(crate) admission: Arc<Admission>,
    /// What a refused client is told (`421 4.7.0 ...`, `-ERR [SYS/TEMP] ...`,
    /// `* BYE [UNAVAILABLE] ...`), before we close.
    pub(crate) overload: Vec<u8>,
    pub(crate) deadlines: Deadlines,
    /// Counted on every accepted connection, admitted or not.
    pub(crate) on_accept: Option<prometheus::IntCounter>,
}

/// The peer as the shell sees it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// `None` on a Unix socket.
    pub(crate) addr: Option<SocketAddr>,
    /// Unique per process: the `session` field of every log line.
    pub(crate) session: u64,
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// At most this many refusals are answered at once; beyond, the socket is
/// just closed, so a flood cannot make refusing expensive.
const MAX_REFUSALS: usize = 256;

fn refusals() -> &'static Arc<Semaphore> {
    static R: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();
    R.get_or_init(|| Arc::new(Semaphore::new(MAX_REFUSALS)))
}

/// Something connections come from.
pub(crate) trait Acceptor: Send + Sync + 'static {
    fn accept_one(
        &self,
    ) -> impl Future<Output = std::io::Result<(Box<dyn Stream>, Option<SocketAddr>)>> + Send;
}

impl Acceptor for TcpListener {
    async fn accept_one(&self) -> std::io::Result<(Box<dyn Stream>, Option<SocketAddr>)> {
        let (tcp, peer) = self.accept().await?;
        let _ = tcp.set_nodelay(true);
        Ok((Box::new(tcp), Some(peer)))
    }
}

impl Acceptor for UnixListener {
    async fn accept_one(&self) -> std::io::Result<(Box<dyn Stream>, Option<SocketAddr>)> {
        let (s, _) = self.accept().await?;
        Ok((Box::new(s), None))
    }
}

/// Accept on `listener` until shutdown; run `shell` for every admitted
/// connection, in its own task and span, tracked by `server.tracker`.
pub(crate) async fn serve<A, F, Fut>(listener: A, spec: Arc<ListenerSpec>, server: Server, shell: F)
where
    A: Acceptor,
    F: Fn(Conn, Peer) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let shell = Arc::new(shell);
    let mut shutdown = server.shutdown.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            a = listener.accept_one() => a,
        };
        let (io, addr) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // Out of descriptors and the like: back off, do not spin.
                tracing::warn!(listener = spec.label, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if let Some(c) = &spec.on_accept {
            c.inc();
        }
        let ticket = match spec.admission.admit(addr.map(|a| a.ip())) {
            Ok(t) => t,
            Err(why) => {
                tracing::info!(listener = spec.label, peer = ?addr, refused = why.label(), "connection refused");
                refuse(io, spec.clone(), &server.tracker);
                continue;
            }
        };
        let peer = Peer {
            addr,
            session: SESSION_IDS.fetch_add(1, Ordering::Relaxed),
        };
        let span = match addr {
            Some(a) => {
                tracing::info_span!("session", id = peer.session, listener = spec.label, peer = %a)
            }
            None => tracing::info_span!("session", id = peer.session, listener = spec.label),
        };
        let (spec, shell, rx) = (spec.clone(), shell.clone(), server.shutdown.clone());
        server.tracker.spawn(
            async move {
                let Some(mut conn) = open(io, spec.tls.as_ref(), spec.deadlines).await else {
                    return;
                };
                conn.watch_shutdown(rx);
                shell(conn, peer).await;
                drop(ticket);
            }
            .instrument(span),
        );
    }
}

/// Wrap the stream, running the implicit-TLS handshake under its deadline.
async fn open(
    io: Box<dyn Stream>,
    tls: Option<&TlsAcceptor>,
    deadlines: Deadlines,
) -> Option<Conn> {
    match tls {
        None => Some(Conn::with_deadlines(io, false, deadlines)),
        Some(acceptor) => {
            match tokio::time::timeout(deadlines.handshake, acceptor.accept(io)).await {
                Ok(Ok(tls)) => Some(Conn::with_deadlines(Box::new(tls), true, deadlines)),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::info!("TLS handshake timed out");
                    None
                }
            }
        }
    }
}

/// Tell a refused client why (over TLS on an implicit-TLS port), briefly.
fn refuse(io: Box<dyn Stream>, spec: Arc<ListenerSpec>, tracker: &TaskTracker) {
    let Ok(slot) = refusals().clone().try_acquire_owned() else {
        return;
    };
    tracker.spawn(async move {
        let _slot = slot;
        let short = Deadlines {
            idle: Duration::from_secs(5),
            handshake: spec.deadlines.handshake.min(Duration::from_secs(5)),
            session: None,
        };
        if let Some(mut conn) = open(io, spec.tls.as_ref(), short).await {
            let _ = conn.write(&spec.overload).await;
            conn.shutdown().await;
        }
    });
}

/// The listen backlog: bursts of hundreds of connects must not meet SYN
/// retransmits (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 1024;

/// Bind every address of a listener, failing loudly on the first that cannot be bound.
pub(crate) async fn bind_all(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out = Vec::new();
    for a in addrs {
        let bind = || {
            let sock = Socket::new(Domain::for_address(*a), Type::STREAM, Some(Protocol::TCP))?;
            // `[::]:25` beside `0.0.0.0:25` (the usual dual-stack pair) must
            // not also claim the IPv4 port, as Linux does by default.
            if a.is_ipv6() {
                sock.set_only_v6(true)?;
            }
            sock.set_reuse_address(true)?;
            sock.set_nonblocking(true)?;
            sock.bind(&(*a).into())?;
            sock.listen(BACKLOG as i32)?;
            TcpListener::from_std(std::net::TcpListener::from(sock))
        };
        let l = bind()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
        out.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ipv4_and_ipv6_wildcards_share_a_port() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipping: no IPv6 on this machine");
            return;
        }
        // A port free on both families.
        let port = std::net::TcpListener::bind("[::]:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        let addrs: Vec<SocketAddr> = vec![
            format!("0.0.0.0:{port}")
                .parse()
                .unwrap_or_else(|e| panic!("{e}")),
            format!("[::]:{port}")
                .parse()
                .unwrap_or_else(|e| panic!("{e}")),
        ];
        let bound = bind_all(&addrs).await;
        assert!(bound.is_ok(), "{:?}", bound.err());
        let v4 = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        let v6 = tokio::net::TcpStream::connect(("::1", port)).await;
        assert!(v4.is_ok() && v6.is_ok(), "{v4:?} {v6:?}");
    }
}
