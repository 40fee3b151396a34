//! The SMTP I/O shell: listeners, connection limits, line framing, STARTTLS,
//! the DATA reader and its limits. Generic over `AsyncRead + AsyncWrite` so
//! plain TCP, STARTTLS and implicit TLS share one code path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::session::{Action, Check, ListenerKind, Session, SessionConfig, reply};
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::policy::{Policy, RuleSet, Verdict};

/// Everything the sessions of all SMTP listeners share.
pub struct SmtpContext {
    pub cfg: Arc<SessionConfig>,
    pub tls: Option<TlsAcceptor>,
    pub intake: Arc<Intake>,
    pub policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
    /// One permit per open connection, across all SMTP listeners.
    pub connections: Arc<Semaphore>,
    pub idle_timeout: Duration,
    pub max_line_length: usize,
    pub shutdown: watch::Receiver<bool>,
    pub tracker: TaskTracker,
}

/// Accept connections on `listener` until shutdown.
pub async fn serve(listener: TcpListener, kind: ListenerKind, ctx: Arc<SmtpContext>) {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let ctx = ctx.clone();
                    let span = tracing::info_span!("smtp", listener = kind.label(), %peer);
                    ctx.tracker.clone().spawn(handle(tcp, peer, kind, ctx).instrument(span));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn handle(mut tcp: TcpStream, peer: SocketAddr, kind: ListenerKind, ctx: Arc<SmtpContext>) {
    let label = kind.label();
    ctx.metrics
        .smtp_connections
        .with_label_values(&[label])
        .inc();
    let Ok(_permit) = ctx.connections.clone().try_acquire_owned() else {
        tracing::warn!("connection limit reached");
        let _ = tcp
            .write_all(&reply(421, "4.7.0 Too many connections, try again later"))
            .await;
        let _ = tcp.shutdown().await;
        return;
    };
    let _ = tcp.set_nodelay(true);
    let active = ctx.metrics.smtp_sessions_active.with_label_values(&[label]);
    active.inc();
    let mut session = Session::new(ctx.cfg.clone(), kind, peer, false);
    // The session keeps the rule set it started with, whatever reloads happen.
    let rules = ctx.policy.current();
    let result = match (kind, &ctx.tls) {
        (ListenerKind::Submissions, Some(tls)) => match tls.accept(tcp).await {
            Ok(stream) => {
                session.tls = true;
                run(stream, &mut session, &ctx, &rules, true)
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        },
        _ => match run(tcp, &mut session, &ctx, &rules, true).await {
            Ok(Some(tcp)) => match &ctx.tls {
                Some(tls) => match tls.accept(tcp).await {
                    Ok(stream) => {
                        session.tls_started();
                        run(stream, &mut session, &ctx, &rules, false)
                            .await
                            .map(|_| ())
                    }
                    Err(e) => Err(e),
                },
                None => Ok(()),
            },
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "session ended with an I/O error");
    }
    active.dec();
}

/// What reading one command line gave.
enum Line {
    Complete(Vec<u8>),
    TooLong,
    Eof,
    Timeout,
    Shutdown,
}

/// Run the command loop. Returns the raw stream when the client asked for
/// STARTTLS; anything it pipelined after STARTTLS is discarded with the
/// buffer (the CVE-2011-0411 class of injection).
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
    greet: bool,
) -> std::io::Result<Option<S>> {
    let mut r = BufReader::with_capacity(16 * 1024, io);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut shutdown = ctx.shutdown.clone();
    if greet {
        let d = rules.connect_async(&session.conn_info()).await;
        let refusal = match d.verdict {
            Some(Verdict::Reject(r)) => Some(r.to_bytes()),
            // RFC 5321 3.8: a server that must go away says 421 and closes.
            Some(Verdict::Tempfail(r)) => Some(crate::mail::Reply { code: 421, ..r }.to_bytes()),
            Some(Verdict::Accept) => {
                ctx.metrics
                    .verdicts
                    .with_label_values(&["accept", "connect"])
                    .inc();
                None
            }
            Some(v @ (Verdict::Quarantine { .. } | Verdict::Discard)) => {
                ctx.metrics
                    .verdicts
                    .with_label_values(&[v.word(), "connect"])
                    .inc();
                session.session_sticky = Some((v, d.script.clone()));
                None
            }
            _ => None,
        };
        if let Some(b) = refusal {
            let word = if b.starts_with(b"5") {
                "reject"
            } else {
                "tempfail"
            };
            ctx.metrics
                .verdicts
                .with_label_values(&[word, "connect"])
                .inc();
            tracing::info!(script = ?d.script, "refused at connect");
            out.extend(b);
            write_out(&mut r, &mut out).await?;
            let _ = r.get_mut().shutdown().await;
            return Ok(None);
        }
        out.extend(session.greeting());
    }
    loop {
        // PIPELINING (RFC 2920): answer a batch of commands in one write.
        if r.buffer().is_empty() && !out.is_empty() {
            write_out(&mut r, &mut out).await?;
        }
        // On shutdown, a session between transactions is told 421 at its
        // next command; one in the middle of a transaction may finish it.
        let between = session.tx.is_none();
        let line = if between && *shutdown.borrow() {
            Line::Shutdown
        } else {
            read_command(
                &mut r,
                ctx.max_line_length,
                ctx.idle_timeout,
                &mut shutdown,
                between,
            )
            .await?
        };
        let line = match line {
            Line::Complete(l) => l,
            Line::TooLong => {
                out.extend(reply(500, "5.5.2 Line too long"));
                continue;
            }
            Line::Eof => return Ok(None),
            Line::Timeout => {
                out.extend(reply(
                    421,
                    &format!("4.4.2 {} Idle timeout, closing", session.config().hostname),
                ));
                write_out(&mut r, &mut out).await?;
                return Ok(None);
            }
            Line::Shutdown => {
                out.extend(reply(
                    421,
                    &format!("4.3.2 {} Shutting down", session.config().hostname),
                ));
                write_out(&mut r, &mut out).await?;
                return Ok(None);
            }
        };
        let mut action = session.command(&line);
        if let Action::Policy(check) = action {
            let info = session.tx_info(Some(&check));
            let d = match &check {
                Check::Mail => rules.mail_from_async(&info).await,
                Check::Rcpt(rcpt) => rules.rcpt_async(&info, &rcpt.address).await,
            };
            if d.verdict.is_some() {
                tracing::info!(script = ?d.script, function = ?d.function, verdict = ?d.verdict, "rule decision");
            }
            action = session.policy_answer(check, d);
        }
        if let Some((verdict, stage)) = session.verdict.take() {
            ctx.metrics
                .verdicts
                .with_label_values(&[verdict, stage])
                .inc();
        }
        match action {
            Action::Reply(b) => out.extend(b),
            Action::Close(b) => {
                out.extend(b);
                write_out(&mut r, &mut out).await?;
                let _ = r.get_mut().shutdown().await;
                return Ok(None);
            }
            Action::StartTls(b) => {
                out.extend(b);
                write_out(&mut r, &mut out).await?;
                return Ok(Some(r.into_inner()));
            }
            Action::Data(b) => {
                out.extend(b);
                write_out(&mut r, &mut out).await?;
                let answer = receive_data(&mut r, session, ctx, rules).await?;
                out.extend(answer);
            }
            // Answered above; a second question in a row cannot happen.
            Action::Policy(_) => out.extend(reply(451, "4.3.0 Internal error")),
        }
    }
}

async fn write_out<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut BufReader<S>,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let w = r.get_mut();
    w.write_all(out).await?;
    w.flush().await?;
    out.clear();
    Ok(())
}

/// Read one command line of at most `max` bytes (CRLF included).
async fn read_command<S: AsyncRead + Unpin>(
    r: &mut BufReader<S>,
    max: usize,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
    may_stop: bool,
) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = tokio::select! {
            biased;
            res = tokio::time::timeout(idle, r.fill_buf()) => match res {
                Err(_) => return Ok(Line::Timeout),
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(e),
            },
            _ = crate::stopped(shutdown), if may_stop && line.is_empty() => return Ok(Line::Shutdown),
        };
        if chunk.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if line.len() + take > max {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete(line)
            });
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// Why a message was refused while it was read.
#[derive(Debug, Default, PartialEq, Eq)]
struct DataFault {
    too_big: bool,
    bare_newline: bool,
}

/// Read the message up to `CRLF.CRLF`, then hand it to the intake.
///
/// Only `CRLF.CRLF` ends a message. A bare LF or bare CR anywhere in the
/// data makes the message refused (after reading to the real end), so
/// `\n.\n` can never end one message and start another (SMTP smuggling).
async fn receive_data<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut BufReader<S>,
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
) -> std::io::Result<Vec<u8>> {
    let Some(tx) = session.take_transaction() else {
        return Ok(reply(503, "5.5.1 No transaction"));
    };
    let max = session.config().max_message_size as usize;
    let (id, header) = match ctx.intake.prepare(session, &tx) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot allocate a message id");
            // Still read the data so the connection stays in sync.
            let mut sink = Vec::new();
            read_body(r, &mut sink, 0, ctx.idle_timeout).await?;
            return Ok(reply(451, "4.3.0 Temporary storage failure"));
        }
    };
    let cap = (tx.declared_size as usize).clamp(4096, max.min(1 << 20));
    let mut body = Vec::with_capacity(cap);
    let fault = read_body(r, &mut body, max, ctx.idle_timeout).await?;
    if fault.bare_newline {
        tracing::warn!("message refused: bare CR or LF in DATA");
        return Ok(reply(
            550,
            "5.6.11 Message refused: bare CR or LF in the data (RFC 5321 2.3.8)",
        ));
    }
    if fault.too_big {
        return Ok(reply(552, "5.3.4 Message size exceeds fixed maximum"));
    }
    Ok(ctx
        .intake
        .accept(session, rules, tx, id, header, body)
        .await)
}

/// Append the unstuffed message to `body` until the final dot line.
/// Past `limit` bytes, keep reading but stop storing.
async fn read_body<S: AsyncRead + Unpin>(
    r: &mut BufReader<S>,
    body: &mut Vec<u8>,
    limit: usize,
    idle: Duration,
) -> std::io::Result<DataFault> {
    let mut st = BodyState {
        fault: DataFault::default(),
        prev_cr: false,
        limit,
    };
    let mut line_start = true;
    // Did the previous line end with CRLF? Only then can "." end the message:
    // "\n.\r\n" is not CRLF.CRLF, and treating it as the end is how smuggling works.
    let mut after_crlf = true;
    // A line that starts with '.', held until we know whether it is the final ".\r\n".
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(idle, r.fill_buf()).await {
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "idle timeout in DATA",
                ));
            }
            Ok(res) => res?,
        };
        if chunk.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed in DATA",
            ));
        }
        let (take, eol) = match memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !pending.is_empty() || (line_start && chunk[0] == b'.') {
            pending.extend_from_slice(&chunk[..take]);
            r.consume(take);
            if after_crlf && pending == b".\r\n" {
                return Ok(st.fault);
            }
            if eol || pending.len() >= 3 {
                let p = std::mem::take(&mut pending);
                st.process(&p, true, body);
                line_start = eol;
                if eol {
                    after_crlf = p.ends_with(b"\r\n");
                }
            }
            continue;
        }
        let piece = &chunk[..take];
        let crlf = eol
            && if take >= 2 {
                piece[take - 2] == b'\r'
            } else {
                st.prev_cr
            };
        st.process(piece, line_start, body);
        r.consume(take);
        line_start = eol;
        if eol {
            after_crlf = crlf;
        }
    }
}

struct BodyState {
    fault: DataFault,
    prev_cr: bool,
    limit: usize,
}

impl BodyState {
    /// Check and store one piece of a line (a whole line, or the part a buffer held).
    fn process(&mut self, piece: &[u8], at_line_start: bool, body: &mut Vec<u8>) {
        // Bare CR: a CR not followed by LF. Bare LF: an LF not preceded by CR.
        if self.prev_cr && piece.first() != Some(&b'\n') {
            self.fault.bare_newline = true;
        }
        for (i, &b) in piece.iter().enumerate() {
            if b == b'\r' && i + 1 < piece.len() && piece[i + 1] != b'\n' {
                self.fault.bare_newline = true;
            }
            if b == b'\n' {
                let after_cr = if i == 0 {
                    self.prev_cr
                } else {
                    piece[i - 1] == b'\r'
                };
                if !after_cr {
                    self.fault.bare_newline = true;
                }
            }
        }
        self.prev_cr = piece.last() == Some(&b'\r');
        if self.fault.too_big || self.fault.bare_newline {
            return;
        }
        // RFC 5321 4.5.2 transparency: drop the stuffed dot.
        let start = usize::from(at_line_start && piece.first() == Some(&b'.'));
        let data = &piece[start..];
        if body.len() + data.len() > self.limit {
            self.fault.too_big = true;
            body.clear();
            body.shrink_to_fit();
        } else {
            body.extend_from_slice(data);
        }
    }
}

/// Bind every address of a listener, failing loudly on the first that cannot be bound.
pub async fn bind_all(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
        out.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(input: &[u8]) -> (Vec<u8>, DataFault) {
        body_with_capacity(input, 7).await
    }

    async fn body_with_capacity(input: &[u8], cap: usize) -> (Vec<u8>, DataFault) {
        let mut r = BufReader::with_capacity(cap, input);
        let mut body = Vec::new();
        let f = read_body(&mut r, &mut body, 1000, Duration::from_secs(1))
            .await
            .unwrap();
        (body, f)
    }

    #[tokio::test]
    async fn unstuffs_and_stops_at_dot() {
        let (b, f) = body_of(b"a\r\n..b\r\n.\r\nMAIL").await;
        assert_eq!(b, b"a\r\n.b\r\n");
        assert_eq!(f, DataFault::default());
    }

    #[tokio::test]
    async fn smuggling_is_one_refused_message() {
        let (_, f) = body_of(b"hello\n.\nMAIL FROM:<x@y>\r\n.\r\n").await;
        assert!(f.bare_newline);
        let (_, f) = body_of(b"hello\r\n.\rMAIL\r\n.\r\n").await;
        assert!(f.bare_newline);
        // "\n.\r\n" is not the end: what follows stays inside the message.
        for cap in [1, 2, 3, 7, 64] {
            let mut r =
                BufReader::with_capacity(cap, &b"hi\r\n\n.\r\nRCPT TO:<x@y>\r\n.\r\nNOOP\r\n"[..]);
            let mut body = Vec::new();
            let f = read_body(&mut r, &mut body, 1000, Duration::from_secs(1))
                .await
                .unwrap();
            assert!(f.bare_newline, "capacity {cap}");
            let mut rest = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut rest)
                .await
                .unwrap();
            assert_eq!(rest, b"NOOP\r\n", "capacity {cap}");
        }
    }

    #[tokio::test]
    async fn crlf_split_across_reads_is_fine() {
        // Capacity 7 splits "abcdef\r" | "\n" across two fills.
        let (b, f) = body_of(b"abcdef\r\nx\r\n.\r\n").await;
        assert_eq!(b, b"abcdef\r\nx\r\n");
        assert!(!f.bare_newline);
    }

    #[tokio::test]
    async fn final_dot_split_across_reads() {
        for cap in 1..12 {
            let (b, f) = body_with_capacity(b"ab\r\n..\r\n.x\r\n.\r\nQUIT\r\n", cap).await;
            assert_eq!(b, b"ab\r\n.\r\nx\r\n", "capacity {cap}");
            assert_eq!(f, DataFault::default(), "capacity {cap}");
        }
    }

    #[tokio::test]
    async fn too_big_is_flagged() {
        let big = vec![b'x'; 2000];
        let mut input = big.clone();
        input.extend_from_slice(b"\r\n.\r\n");
        let (_, f) = body_of(&input).await;
        assert!(f.too_big);
    }
}
