//! The SMTP I/O shell: drives the [`Session`] over a [`Conn`] from the
//! shared `net` layer (which accepts, admits, bounds every wait and runs
//! TLS), frames command lines, and feeds message data to the pure
//! [`DataDecoder`]. It performs what the session asks and nothing else.

use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use super::data::{DataDecoder, Status};
use super::session::{Action, Check, ListenerKind, Session, SessionConfig, reply};
use crate::config::BareNewline;
use crate::intake::{Arrival, Intake};
use crate::mail::Enhanced;
use crate::metrics::Metrics;
use crate::net::{Conn, Fill, Line, Peer};
use crate::policy::{Policy, RuleSet};

/// Everything the sessions of all SMTP listeners share.
pub(crate) struct SmtpContext {
    pub(crate) cfg: Arc<SessionConfig>,
    /// For STARTTLS (implicit TLS is the `net` listener's).
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) intake: Arc<Intake>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_line_length: usize,
    /// The whole DATA phase of one message.
    pub(crate) data_timeout: Duration,
    pub(crate) bare_newline: BareNewline,
}

/// Run one SMTP session on an admitted connection.
pub(crate) async fn handle(conn: Conn, peer: Peer, kind: ListenerKind, ctx: Arc<SmtpContext>) {
    let Some(addr) = peer.addr else {
        return;
    };
    let active = ctx
        .metrics
        .smtp_sessions_active
        .with_label_values(&[kind.label()]);
    active.inc();
    let mut session = Session::new(ctx.cfg.clone(), kind, addr, conn.tls);
    // The session keeps the rule set it started with, whatever reloads happen.
    let rules = ctx.policy.current();
    let mut conn = conn;
    let mut greet = true;
    loop {
        match run(&mut conn, &mut session, &ctx, &rules, greet).await {
            Ok(Next::StartTls) => {
                let Some(tls) = &ctx.tls else { break };
                match conn.starttls(tls).await {
                    Ok(upgraded) => {
                        conn = upgraded;
                        session.tls_started();
                        greet = false;
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "STARTTLS handshake failed");
                        break;
                    }
                }
            }
            Ok(Next::Close) => {
                conn.shutdown().await;
                break;
            }
            Ok(Next::CloseLingering) => {
                conn.close_lingering(Duration::from_secs(2)).await;
                break;
            }
            Ok(Next::Gone) => break,
            Err(e) => {
                tracing::debug!(error = %e, "session ended with an I/O error");
                break;
            }
        }
    }
    active.dec();
}

/// How the command loop ended.
enum Next {
    /// Run the TLS handshake, then the loop again on the upgraded stream.
    /// The clear-text buffer is dropped with the old connection.
    StartTls,
    /// We said goodbye: close our side.
    Close,
    /// We hung up on a client that may still be sending (mid-DATA): close
    /// our side and drain a moment, so our last reply is not lost to a reset.
    CloseLingering,
    /// The peer went away.
    Gone,
}

/// The command loop, until QUIT, STARTTLS, a close or the peer leaving.
async fn run(
    conn: &mut Conn,
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
    greet: bool,
) -> std::io::Result<Next> {
    let mut out: Vec<u8> = Vec::with_capacity(512);
    if greet {
        let d = rules.connect_async(&session.conn_info()).await;
        let action = session.connected(d);
        count_verdict(session, ctx);
        match action {
            Action::Close(b) => {
                tracing::info!("refused at connect");
                conn.write(&b).await?;
                return Ok(Next::Close);
            }
            Action::Reply(b) => out.extend(b),
            _ => {}
        }
    }
    let host = session.config().hostname.clone();
    loop {
        // PIPELINING (RFC 2920): answer a batch of commands in one write.
        if conn.buffered().is_empty() && !out.is_empty() {
            conn.write(&out).await?;
            out.clear();
        }
        // On shutdown, a session between transactions is told 421 at its
        // next command; one in the middle of a transaction may finish it.
        let between = !session.in_transaction();
        let line = if between && conn.shutting_down() {
            Line::Shutdown
        } else {
            conn.read_line_raw(ctx.max_line_length, between).await?
        };
        let line = match line {
            Line::Data(l) => l,
            Line::TooLong => {
                out.extend(reply(500, Enhanced::new(5, 5, 2), "Line too long"));
                continue;
            }
            Line::Eof => return Ok(Next::Gone),
            Line::Timeout => {
                let why = if conn.session_expired() {
                    "Session time limit reached, closing"
                } else {
                    "Idle timeout, closing"
                };
                out.extend(reply(421, Enhanced::new(4, 4, 2), &format!("{host} {why}")));
                conn.write(&out).await?;
                return Ok(Next::Close);
            }
            Line::Shutdown => {
                out.extend(reply(
                    421,
                    Enhanced::new(4, 3, 2),
                    &format!("{host} Shutting down"),
                ));
                conn.write(&out).await?;
                return Ok(Next::Close);
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
        count_verdict(session, ctx);
        match action {
            Action::Reply(b) => out.extend(b),
            Action::Close(b) => {
                out.extend(b);
                conn.write(&out).await?;
                return Ok(Next::Close);
            }
            Action::StartTls(b) => {
                out.extend(b);
                conn.write(&out).await?;
                return Ok(Next::StartTls);
            }
            Action::Data(b) => {
                out.extend(b);
                conn.write(&out).await?;
                out.clear();
                match receive_data(conn, session, ctx, rules).await? {
                    DataEnd::Reply(b) => out.extend(b),
                    DataEnd::Close(b) => {
                        conn.write(&b).await?;
                        return Ok(Next::CloseLingering);
                    }
                }
            }
            // Answered above; a second question in a row cannot happen.
            Action::Policy(_) => out.extend(reply(451, Enhanced::new(4, 3, 0), "Internal error")),
        }
    }
}

fn count_verdict(session: &mut Session, ctx: &SmtpContext) {
    if let Some((verdict, stage)) = session.take_verdict() {
        ctx.metrics
            .verdicts
            .with_label_values(&[verdict, stage])
            .inc();
    }
}

/// What the end of the DATA phase says.
enum DataEnd {
    /// Answer and read the next command.
    Reply(Vec<u8>),
    /// Answer and close (bare newline under `reject`, a timeout).
    Close(Vec<u8>),
}

/// Read the message up to `CRLF.CRLF` through the decoder, then hand it to
/// the intake. The whole phase is bounded by `data_timeout`, and silence
/// within it by `idle_timeout`.
async fn receive_data(
    conn: &mut Conn,
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
) -> std::io::Result<DataEnd> {
    let Some(tx) = session.take_transaction() else {
        return Ok(DataEnd::Reply(reply(
            503,
            Enhanced::new(5, 5, 1),
            "No transaction",
        )));
    };
    let max = session.config().max_message_size as usize;
    let host = session.config().hostname.clone();
    let id = ctx.intake.next_id();
    let cap = (tx.declared_size as usize).clamp(4096, max.min(1 << 20));
    let mut body = Vec::with_capacity(cap);
    let mut decoder = DataDecoder::new(ctx.bare_newline, max);
    let phase_end = conn.deadline_in(ctx.data_timeout);
    loop {
        if !conn.buffered().is_empty() {
            let fed = decoder.feed(conn.buffered(), &mut body);
            conn.consume(fed.consumed);
            match fed.status {
                Status::End => break,
                Status::BareNewline => {
                    tracing::warn!("message refused: bare CR or LF in DATA");
                    return Ok(DataEnd::Close(reply(
                        521,
                        Enhanced::new(5, 5, 2),
                        &format!(
                            "{host} Bare CR or LF in the message data is not allowed (RFC 5321 2.3.8); closing"
                        ),
                    )));
                }
                Status::NeedMore => {}
            }
        }
        let idle_end = conn.deadline_in(conn.deadlines().idle);
        match conn.fill(idle_end.min(phase_end)).await? {
            Fill::Data(_) => {}
            Fill::Eof => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in DATA",
                ));
            }
            Fill::Timeout => {
                let why = if tokio::time::Instant::now() >= phase_end {
                    "DATA took too long, closing"
                } else {
                    "Idle timeout in DATA, closing"
                };
                tracing::info!("{why}");
                return Ok(DataEnd::Close(reply(
                    421,
                    Enhanced::new(4, 4, 2),
                    &format!("{host} {why}"),
                )));
            }
        }
    }
    if decoder.too_big() {
        return Ok(DataEnd::Reply(reply(
            552,
            Enhanced::new(5, 3, 4),
            "Message size exceeds fixed maximum",
        )));
    }
    let Ok(id) = id else {
        return Ok(DataEnd::Reply(reply(
            451,
            Enhanced::new(4, 3, 0),
            "Temporary storage failure",
        )));
    };
    let received = session.received_header(&crate::store::fmt_id(id), &tx, chrono::Utc::now());
    let (envelope, sticky) = tx.into_parts();
    let arrival = Arrival {
        id,
        peer: session.peer(),
        info: session.tx_info(None),
        envelope,
        sticky,
        received,
    };
    Ok(DataEnd::Reply(
        ctx.intake.accept(arrival, rules, body).await,
    ))
}
