//! The SMTP I/O shell: drives the [`Session`] over a [`Conn`] from the
//! shared `net` layer (which accepts, admits, bounds every wait and runs
//! TLS), frames command lines, and feeds message data to the pure
//! [`DataDecoder`]. It performs what the session asks and nothing else.

use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use super::data::{DataDecoder, Status};
use super::session::{Action, Check, ListenerKind, Session, SessionConfig, reply};
use crate::config::{BareNewline, LongLines, NulBytes};
use crate::intake::{Arrival, Intake};
use crate::mail::Enhanced;
use crate::mailbox::MailboxCtx;
use crate::metrics::Metrics;
use crate::net::{Conn, Fill, Line, Peer};
use crate::policy::{Policy, RuleSet};
use crate::spool::BodyWriter;

/// Everything the sessions of all SMTP listeners share.
pub(crate) struct SmtpContext {
    pub(crate) cfg: Arc<SessionConfig>,
    /// For STARTTLS (implicit TLS is the `net` listener's).
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) intake: Arc<Intake>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) metrics: Arc<Metrics>,
    /// AUTH checks the quarantine's accounts with its login slow-down,
    /// CPU slots and `postern_mailbox_logins_total` (`protocol="smtp"`),
    /// and sees its reloads of users.toml.
    pub(crate) logins: Arc<MailboxCtx>,
    /// `[relay] verify_recipients`: asked for each local RCPT the rules took.
    pub(crate) verifier: Arc<crate::verify::Verifier>,
    pub(crate) max_line_length: usize,
    /// The whole DATA phase of one message.
    pub(crate) data_timeout: Duration,
    pub(crate) bare_newline: BareNewline,
    pub(crate) long_lines: LongLines,
    pub(crate) nul_bytes: NulBytes,
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
    let tls_sessions = ctx
        .metrics
        .smtp_tls_sessions
        .with_label_values(&[kind.label()]);
    if conn.tls {
        tls_sessions.inc();
    }
    let started = std::time::Instant::now();
    // The session span (net) carries id, listener and peer.
    tracing::info!(tls = conn.tls, "SMTP session start");
    let mut session = Session::new(ctx.cfg.clone(), kind, addr, conn.tls);
    // The session keeps the rule set it started with, whatever reloads happen.
    let rules = ctx.policy.current();
    let mut conn = conn;
    let mut greet = true;
    loop {
        match run(&mut conn, &mut session, &ctx, &rules, greet).await {
            Ok(Next::StartTls) => {
                let Some(tls) = &ctx.tls else { break };
                match Box::pin(conn.starttls(tls)).await {
                    Ok(upgraded) => {
                        conn = upgraded;
                        tls_sessions.inc();
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
    let peer = session.peer();
    tracing::info!(
        helo = %peer.helo,
        tls = peer.tls,
        duration_ms = started.elapsed().as_millis() as u64,
        "SMTP session end"
    );
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
///
/// The rare, large steps (rules, password checks, recipient probes, DATA,
/// the TLS handshake) are boxed where they are awaited: a future is as big
/// as its largest state, and an idle session would otherwise carry all of
/// them (17 KB per connection, 10 000 idle connections in bench/).
async fn run(
    conn: &mut Conn,
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
    greet: bool,
) -> std::io::Result<Next> {
    let mut out: Vec<u8> = Vec::with_capacity(512);
    if greet && let Some(next) = connected(conn, session, ctx, rules, &mut out).await? {
        return Ok(next);
    }
    let host = session.config().hostname.clone();
    loop {
        // PIPELINING (RFC 2920): answer a batch of commands in one write.
        if conn.buffered().is_empty() && !out.is_empty() {
            conn.write(&out).await?;
            out.clear();
        }
        let line = match next_line(conn, session, ctx, &host, &mut out).await? {
            Read::Line(l) => l,
            Read::Again => continue,
            Read::End(next) => return Ok(next),
        };
        let pipelined = !conn.buffered().is_empty();
        let action = decide(session, ctx, rules, &line, pipelined).await;
        count_verdict(session, ctx);
        if let Some(next) = perform(conn, session, ctx, rules, action, &mut out).await? {
            return Ok(next);
        }
    }
}

/// Asks the rules about the connection and queues the greeting; a refusal
/// is written at once and ends the session.
async fn connected(
    conn: &mut Conn,
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
    out: &mut Vec<u8>,
) -> std::io::Result<Option<Next>> {
    let d = Box::pin(rules.connect_async(&session.conn_info())).await;
    let action = session.connected(d);
    count_verdict(session, ctx);
    match action {
        Action::Close(b) => {
            tracing::info!("refused at connect");
            conn.write(&b).await?;
            return Ok(Some(Next::Close));
        }
        Action::Reply(b) => out.extend(b),
        _ => {}
    }
    Ok(None)
}

/// What reading the next command line gives the loop.
enum Read {
    Line(Vec<u8>),
    /// Answered (a line too long): read the next one.
    Again,
    /// Answered with 421, or the peer left.
    End(Next),
}

/// Reads one command line; an overlong line, a timeout or shutdown is
/// answered here (the last two flush `out` and close).
async fn next_line(
    conn: &mut Conn,
    session: &mut Session,
    ctx: &SmtpContext,
    host: &str,
    out: &mut Vec<u8>,
) -> std::io::Result<Read> {
    // On shutdown, a session between transactions is told 421 at its
    // next command; one in the middle of a transaction may finish it.
    let between = !session.in_transaction();
    let line = if between && conn.shutting_down() {
        Line::Shutdown
    } else {
        conn.read_line_raw(ctx.max_line_length, between).await?
    };
    Ok(match line {
        Line::Data(l) => Read::Line(l),
        Line::TooLong => {
            out.extend(session.line_too_long());
            Read::Again
        }
        Line::Eof => Read::End(Next::Gone),
        Line::Timeout => {
            let why = if conn.session_expired() {
                "Session time limit reached, closing"
            } else {
                "Idle timeout, closing"
            };
            out.extend(reply(421, Enhanced::new(4, 4, 2), &format!("{host} {why}")));
            conn.write(out).await?;
            Read::End(Next::Close)
        }
        Line::Shutdown => {
            out.extend(reply(
                421,
                Enhanced::new(4, 3, 2),
                &format!("{host} Shutting down"),
            ));
            conn.write(out).await?;
            Read::End(Next::Close)
        }
    })
}

/// The session's action for one command line, with MAIL and RCPT put to
/// the rules first and AUTH credentials checked.
async fn decide(
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
    line: &[u8],
    pipelined: bool,
) -> Action {
    let check = match session.command_with(line, pipelined) {
        Action::Policy(check) => check,
        Action::Auth(creds) => {
            let ip = session.conn_info().ip;
            let login = Box::pin(crate::mailbox::check_login(
                &ctx.logins,
                ip,
                "smtp",
                creds.login,
                creds.password,
            ))
            .await;
            return match login {
                crate::mailbox::Login::Ok(a) => session.auth_result(Some(a)),
                crate::mailbox::Login::Failed => session.auth_result(None),
                crate::mailbox::Login::Refused => session.auth_refused(),
            };
        }
        action => return action,
    };
    let info = session.tx_info(Some(&check));
    let c = match &check {
        Check::Mail => Box::pin(rules.mail_from_checked_async(&info)).await,
        Check::Rcpt(rcpt) => Box::pin(rules.rcpt_checked_async(&info, &rcpt.address)).await,
    };
    let d = c.decision;
    if d.verdict.is_some() {
        tracing::info!(script = ?d.script, function = ?d.function, verdict = ?d.verdict, "rule decision");
    }
    if let Some(limit) = c.hold {
        session.hold(&check, limit);
    }
    match session.policy_answer(check, d) {
        Action::Verify(address) => {
            let answer = Box::pin(ctx.verifier.verify(&address)).await;
            session.verify_answer(answer)
        }
        action => action,
    }
}

/// Does what the session asked: queue a reply, or flush and close, start
/// TLS or receive the message. Some when the command loop ends.
async fn perform(
    conn: &mut Conn,
    session: &mut Session,
    ctx: &SmtpContext,
    rules: &Arc<RuleSet>,
    action: Action,
    out: &mut Vec<u8>,
) -> std::io::Result<Option<Next>> {
    match action {
        Action::Reply(b) => out.extend(b),
        Action::Close(b) => {
            out.extend(b);
            conn.write(out).await?;
            return Ok(Some(Next::Close));
        }
        Action::StartTls(b) => {
            out.extend(b);
            conn.write(out).await?;
            return Ok(Some(Next::StartTls));
        }
        Action::Data(b) => {
            out.extend(b);
            conn.write(out).await?;
            out.clear();
            match Box::pin(receive_data(conn, session, ctx, rules)).await? {
                DataEnd::Reply(b) => out.extend(b),
                DataEnd::Close(b) => {
                    conn.write(&b).await?;
                    return Ok(Some(Next::CloseLingering));
                }
            }
        }
        // Answered above; a second question in a row cannot happen.
        Action::Policy(_) | Action::Auth(_) | Action::Verify(_) => {
            out.extend(reply(451, Enhanced::new(4, 3, 0), "Internal error"))
        }
    }
    Ok(None)
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
    // Past a small buffer the data goes to a spool file as it arrives
    // (crate::spool), so a trickling client holds little memory.
    let mut body = ctx.intake.spool.writer();
    let mut decoder = DataDecoder::new(ctx.bare_newline, max);
    if ctx.nul_bytes == NulBytes::Strip {
        decoder = decoder.strip_nul();
    }
    if let Some(end) = read_message(conn, &mut decoder, &mut body, ctx, &host).await? {
        return Ok(end);
    }
    if decoder.too_big() {
        return Ok(DataEnd::Reply(reply(
            552,
            Enhanced::new(5, 3, 4),
            "Message size exceeds fixed maximum",
        )));
    }
    // Refused whole rather than mended: what we would store is not what
    // was sent (and signed); the session goes on, as after any reject.
    if decoder.long_line() && ctx.long_lines == LongLines::Reject {
        tracing::info!("message refused: a line over 998 octets");
        return Ok(DataEnd::Reply(reply(
            554,
            Enhanced::new(5, 6, 0),
            "Message has a line longer than 998 octets (RFC 5321 4.5.3.1.6)",
        )));
    }
    if decoder.nul() && ctx.nul_bytes == NulBytes::Reject {
        tracing::info!("message refused: NUL bytes in the data");
        return Ok(DataEnd::Reply(reply(
            554,
            Enhanced::new(5, 6, 0),
            "NUL bytes in the message data are not accepted",
        )));
    }
    let body = match body.finish().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "message data not kept; answering 452");
            return Ok(DataEnd::Reply(reply(
                452,
                Enhanced::new(4, 3, 1),
                "Insufficient system storage, try again later",
            )));
        }
    };
    let Ok(id) = id else {
        return Ok(DataEnd::Reply(reply(
            451,
            Enhanced::new(4, 3, 0),
            "Temporary storage failure",
        )));
    };
    let received = session.received_header(&crate::store::fmt_id(id), &tx, chrono::Utc::now());
    let (envelope, stuck) = tx.into_parts();
    let arrival = Arrival {
        id,
        peer: session.peer(),
        info: session.tx_info(None),
        envelope,
        sticky: stuck.sticky,
        hold: stuck.hold,
        trace: stuck.trace,
        sender_addresses: session.sender_addresses(),
        received,
    };
    Ok(DataEnd::Reply(
        ctx.intake.accept(arrival, rules, body).await,
    ))
}

/// Feeds the message data through `decoder` into `body` up to the end
/// marker, within `data_timeout` and the idle deadline. Some when the
/// phase ends early with an answer that closes (bare newline, timeout).
async fn read_message(
    conn: &mut Conn,
    decoder: &mut DataDecoder,
    body: &mut BodyWriter,
    ctx: &SmtpContext,
    host: &str,
) -> std::io::Result<Option<DataEnd>> {
    let phase_end = conn.deadline_in(ctx.data_timeout);
    // What one read decodes to, handed on to `body` at once.
    let mut decoded = Vec::new();
    loop {
        if !conn.buffered().is_empty() {
            let fed = decoder.feed(conn.buffered(), &mut decoded);
            conn.consume(fed.consumed);
            if decoder.too_big() {
                body.discard();
            } else {
                body.push(&decoded).await;
            }
            decoded.clear();
            match fed.status {
                Status::End => return Ok(None),
                Status::BareNewline => {
                    tracing::warn!("message refused: bare CR or LF in DATA");
                    return Ok(Some(DataEnd::Close(reply(
                        521,
                        Enhanced::new(5, 5, 2),
                        &format!(
                            "{host} Bare CR or LF in the message data is not allowed (RFC 5321 2.3.8); closing"
                        ),
                    ))));
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
                return Ok(Some(DataEnd::Close(reply(
                    421,
                    Enhanced::new(4, 4, 2),
                    &format!("{host} {why}"),
                ))));
            }
        }
    }
}
