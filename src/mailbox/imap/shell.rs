//! The IMAP I/O shell: frames commands (lines and literals, bounded), drives [`ImapCore`],
//! runs STARTTLS, password checks, AUTHENTICATE continuations and IDLE. Once logged in,
//! every core call runs on the blocking pool ([`offload`]): the core reads the store.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::mailbox::MailboxCtx;
use crate::mailbox::imap::core::{ImapCore, Step};
use crate::mailbox::imap::resp::tag_of;
use crate::mailbox::store::offload;
use crate::net::{Conn, Fill, Line, stopped as wait_shutdown};

/// One command line (a command may have several, joined by literals).
const MAX_LINE: usize = 8192;
/// A whole command, lines and literals together.
const MAX_COMMAND: usize = 256 * 1024;

/// A framed command, or why there is none.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framed {
    Command(Vec<u8>),
    /// A line or the whole command was too long (the tag, if one was read); the rest of
    /// the line was read and thrown away.
    TooLong(Option<String>),
    /// A synchronising literal larger than allowed was announced; the client waits for our
    /// answer and will not send it.
    LiteralRefused(Option<String>),
    /// A non-synchronising literal larger than allowed: we cannot find the next command
    /// (the tag, if one was read).
    Fatal(Option<String>),
    Eof,
    /// The command was not complete within the idle deadline.
    Timeout,
}

/// `{123}` or `{123+}` at the end of a line: (length, synchronising).
pub(crate) fn literal_suffix(line: &[u8]) -> Option<(usize, bool)> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let mut digits = &body[open + 1..];
    let sync = match digits.strip_suffix(b"+") {
        Some(d) => {
            digits = d;
            false
        }
        None => true,
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((usize::try_from(n).ok()?, sync))
}

/// What [`read_line_kept`] read.
enum CmdLine {
    /// Without its line end.
    Data(Vec<u8>),
    /// Over the bound; read and thrown away to its end. `head` is its start
    /// (enough for a tag), `non_sync_literal` whether it ended by announcing
    /// a non-synchronising literal (whose octets would follow).
    TooLong {
        head: Vec<u8>,
        non_sync_literal: bool,
    },
    Eof,
    Timeout,
}

/// How much of an over-long line is kept: more than the longest tag we accept.
const HEAD: usize = 80;

/// Like [`Conn::read_line`], but an over-long line keeps its start, so that
/// the BAD can carry the command's tag (RFC 3501 7.1.5: a client waits for
/// its tag), and its end, to see whether a literal follows.
async fn read_line_kept(conn: &mut Conn, max: usize) -> std::io::Result<CmdLine> {
    let deadline = conn.deadline_in(conn.deadlines().idle);
    conn.shrink_idle();
    let mut scanned = 0;
    let mut head: Option<Vec<u8>> = None;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let buf = conn.buffered();
        if let Some(pos) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + pos + 1;
            let mut line = buf[..end].to_vec();
            conn.consume(end);
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if head.is_none() && line.len() <= max {
                return Ok(CmdLine::Data(line));
            }
            let head = head.unwrap_or_else(|| line[..line.len().min(HEAD)].to_vec());
            tail.extend_from_slice(&line);
            let keep = tail.len().saturating_sub(16);
            tail.drain(..keep);
            let non_sync_literal = literal_suffix(&tail).is_some_and(|(_, sync)| !sync);
            return Ok(CmdLine::TooLong {
                head,
                non_sync_literal,
            });
        }
        if buf.len() > max + 2 {
            // Keep the start and the last octets; discard the rest as it comes.
            if head.is_none() {
                head = Some(buf[..HEAD].to_vec());
            }
            tail.extend_from_slice(&buf[buf.len().saturating_sub(16)..]);
            let keep = tail.len().saturating_sub(16);
            tail.drain(..keep);
            let n = buf.len();
            conn.consume(n);
            scanned = 0;
        } else {
            scanned = buf.len();
        }
        match conn.fill(deadline).await? {
            Fill::Data(_) => {}
            Fill::Eof => return Ok(CmdLine::Eof),
            Fill::Timeout => return Ok(CmdLine::Timeout),
        }
    }
}

/// Read one complete command, answering synchronising literals with `+`.
pub(crate) async fn read_command(conn: &mut Conn, max_literal: usize) -> std::io::Result<Framed> {
    let mut cmd: Vec<u8> = Vec::new();
    loop {
        let line = match read_line_kept(conn, MAX_LINE).await? {
            CmdLine::Eof => return Ok(Framed::Eof),
            CmdLine::Timeout => return Ok(Framed::Timeout),
            // The literal's octets would be read as commands: no way back in step.
            CmdLine::TooLong {
                non_sync_literal: true,
                head,
            } => {
                let first = if cmd.is_empty() { &head } else { &cmd };
                return Ok(Framed::Fatal(tag_of(first).map(str::to_string)));
            }
            CmdLine::TooLong { head, .. } => {
                let first = if cmd.is_empty() { &head } else { &cmd };
                return Ok(Framed::TooLong(tag_of(first).map(str::to_string)));
            }
            CmdLine::Data(l) => l,
        };
        let lit = literal_suffix(&line);
        cmd.extend_from_slice(&line);
        cmd.extend_from_slice(b"\r\n");
        let Some((n, sync)) = lit else {
            return Ok(Framed::Command(cmd));
        };
        if n > max_literal || cmd.len().saturating_add(n) > MAX_COMMAND {
            let tag = tag_of(&cmd).map(str::to_string);
            return Ok(if sync {
                Framed::LiteralRefused(tag)
            } else {
                Framed::Fatal(tag)
            });
        }
        if sync {
            conn.write(b"+ Ready for literal data\r\n").await?;
        }
        match conn.read_exact(n).await? {
            Some(data) => cmd.extend_from_slice(&data),
            None => return Ok(Framed::Eof),
        }
    }
}

/// Resolves when the channel fired (or lagged); never when it is closed.
async fn fired(rx: &mut broadcast::Receiver<()>) {
    loop {
        match rx.recv().await {
            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

fn drain(rx: &mut broadcast::Receiver<()>) {
    while !matches!(
        rx.try_recv(),
        Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
    ) {}
}

const BYE_IDLE: &[u8] = b"* BYE Autologout; idle for too long\r\n";
const BYE_LOGIN: &[u8] = b"* BYE Login timeout\r\n";
const BYE_SHUTDOWN: &[u8] = b"* BYE Server shutting down\r\n";

/// What a session's helpers borrow for its whole life. The connection and
/// the core are passed by value instead: STARTTLS replaces the one, the
/// blocking pool takes the other.
struct Session {
    peer: IpAddr,
    ctx: Arc<MailboxCtx>,
    /// Autologout after this long without a command (also within IDLE).
    idle_timeout: Duration,
    /// Before login, the session ends here (`[quarantine] login_timeout`).
    login_by: tokio::time::Instant,
    store_rx: broadcast::Receiver<()>,
    changes_rx: broadcast::Receiver<()>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Run one IMAP session on `conn`.
pub(crate) async fn run_session(
    mut conn: Conn,
    peer: IpAddr,
    ctx: Arc<MailboxCtx>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut core = ImapCore::new(ctx.imap.clone(), &ctx.hostname, conn.tls);
    let mut s = Session {
        peer,
        store_rx: ctx.store.subscribe(),
        changes_rx: ctx.imap.subscribe_changes(),
        idle_timeout: ctx.limits.imap_idle,
        login_by: tokio::time::Instant::now() + ctx.limits.login,
        shutdown,
        ctx,
    };
    conn.write(&core.greeting()).await?;
    loop {
        let Some((c, step)) = s.read_step(&mut conn, core).await? else {
            return Ok(());
        };
        let Some((next_conn, c)) = s.run_steps(conn, c, step).await? else {
            return Ok(());
        };
        conn = next_conn;
        core = c;
    }
}

impl Session {
    /// Reads the next command and has the core handle it. None when the
    /// session is over: EOF, autologout, shutdown, or a literal we cannot
    /// skip.
    async fn read_step(
        &mut self,
        conn: &mut Conn,
        mut core: ImapCore,
    ) -> std::io::Result<Option<(ImapCore, Step)>> {
        let max_literal = self.ctx.limits.max_literal;
        let logged_in = core.uses_store();
        let wait = if logged_in {
            self.idle_timeout
        } else {
            self.login_by
                .saturating_duration_since(tokio::time::Instant::now())
                .min(self.idle_timeout)
        };
        let framed = tokio::select! {
            r = tokio::time::timeout(wait, read_command(conn, max_literal)) => match r {
                Ok(r) => r?,
                Err(_) if !logged_in => {
                    conn.write(BYE_LOGIN).await?;
                    return Ok(None);
                }
                Err(_) => {
                    conn.write(BYE_IDLE).await?;
                    return Ok(None);
                }
            },
            _ = wait_shutdown(&mut self.shutdown) => {
                conn.write(BYE_SHUTDOWN).await?;
                return Ok(None);
            }
        };
        let step = match framed {
            Framed::Eof => return Ok(None),
            Framed::Timeout => {
                conn.write(BYE_IDLE).await?;
                return Ok(None);
            }
            Framed::Command(bytes) if core.uses_store() => {
                let (c, step) = offload(core, move |c| c.handle(&bytes)).await?;
                core = c;
                step
            }
            Framed::Command(bytes) => core.handle(&bytes),
            Framed::TooLong(tag) => core.too_long(tag.as_deref()),
            Framed::LiteralRefused(tag) => core.too_long(tag.as_deref()),
            Framed::Fatal(tag) => {
                // BYE, then the command's own answer, then close (RFC 7888 4: TOOBIG).
                let mut out = b"* BYE Command or literal too large\r\n".to_vec();
                if let Some(tag) = tag {
                    out.extend_from_slice(
                        format!("{tag} BAD [TOOBIG] Command or literal too large\r\n").as_bytes(),
                    );
                }
                conn.write(&out).await?;
                conn.shutdown().await;
                return Ok(None);
            }
        };
        Ok(Some((core, step)))
    }

    /// Carries a step through until a reply is written: checks a login,
    /// continues a SASL exchange, runs STARTTLS or IDLE. Some((conn, core))
    /// to read the next command, None when the session is over.
    async fn run_steps(
        &mut self,
        mut conn: Conn,
        mut core: ImapCore,
        mut step: Step,
    ) -> std::io::Result<Option<(Conn, ImapCore)>> {
        loop {
            match step {
                Step::Login {
                    tag,
                    login,
                    password,
                } => {
                    step = match crate::mailbox::check_login(
                        &self.ctx, self.peer, "imap", login, password,
                    )
                    .await
                    {
                        crate::mailbox::Login::Ok(a) => core.login_result(&tag, Some(a)),
                        crate::mailbox::Login::Failed => core.login_result(&tag, None),
                        crate::mailbox::Login::Refused => core.login_refused(&tag),
                    };
                }
                Step::SaslContinue { tag } => {
                    conn.write(b"+ \r\n").await?;
                    step = match conn.read_line(MAX_LINE).await? {
                        Line::Eof | Line::Shutdown | Line::Timeout => return Ok(None),
                        Line::TooLong => core.too_long(Some(&tag)),
                        Line::Data(l) => core.sasl_response(&tag, &l),
                    };
                }
                Step::Reply(bytes) => {
                    conn.write(&bytes).await?;
                    return Ok(Some((conn, core)));
                }
                Step::Close(bytes) => {
                    conn.write(&bytes).await?;
                    conn.shutdown().await;
                    return Ok(None);
                }
                Step::StartTls(bytes) => {
                    conn.write(&bytes).await?;
                    // The handshake deadline is the connection's own.
                    let Ok(tls) = conn.starttls(&self.ctx.tls).await else {
                        return Ok(None);
                    };
                    core.tls_started();
                    return Ok(Some((tls, core)));
                }
                Step::Idle(bytes) => {
                    let core = self.idle_loop(&mut conn, core, &bytes).await?;
                    return Ok(core.map(|core| (conn, core)));
                }
            }
        }
    }

    /// IDLE: writes the continuation, then pushes untagged updates whenever
    /// the store or another session changes something, until the client
    /// sends a line. A notification interrupts only the wait: a partly read
    /// line stays buffered in the `Conn`. Some(core) when the session goes on.
    async fn idle_loop(
        &mut self,
        conn: &mut Conn,
        mut core: ImapCore,
        continuation: &[u8],
    ) -> std::io::Result<Option<ImapCore>> {
        drain(&mut self.store_rx);
        drain(&mut self.changes_rx);
        conn.write(continuation).await?;
        loop {
            tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, conn.read_line(MAX_LINE)) => {
                    return idle_end(conn, core, r).await;
                }
                _ = fired(&mut self.store_rx) => core = idle_update(conn, core).await?,
                _ = fired(&mut self.changes_rx) => core = idle_update(conn, core).await?,
                _ = wait_shutdown(&mut self.shutdown) => {
                    conn.write(BYE_SHUTDOWN).await?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Writes what changed since the last update, if anything, during IDLE.
async fn idle_update(conn: &mut Conn, core: ImapCore) -> std::io::Result<ImapCore> {
    let (core, out) = offload(core, |c| c.idle_update()).await?;
    if !out.is_empty() {
        conn.write(&out).await?;
    }
    Ok(core)
}

/// Ends IDLE on what the client sent: any line (DONE, or one too long)
/// gets the tagged completion; EOF and autologout end the session (None).
async fn idle_end(
    conn: &mut Conn,
    core: ImapCore,
    read: Result<std::io::Result<Line>, tokio::time::error::Elapsed>,
) -> std::io::Result<Option<ImapCore>> {
    let line = match read {
        Err(_) | Ok(Ok(Line::Timeout)) => {
            conn.write(BYE_IDLE).await?;
            return Ok(None);
        }
        Ok(Ok(Line::Eof | Line::Shutdown)) => return Ok(None),
        Ok(Ok(Line::TooLong)) => Vec::new(),
        Ok(Ok(Line::Data(l))) => l,
        Ok(Err(e)) => return Err(e),
    };
    let (core, out) = offload(core, move |c| c.idle_done(&line)).await?;
    conn.write(&out).await?;
    Ok(Some(core))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_suffixes() {
        assert_eq!(literal_suffix(b"a LOGIN {5}"), Some((5, true)));
        assert_eq!(literal_suffix(b"a LOGIN {5+}"), Some((5, false)));
        assert_eq!(literal_suffix(b"a LOGIN \"{5}\""), None);
        assert_eq!(literal_suffix(b"a LOGIN {}"), None);
        assert_eq!(literal_suffix(b"a LOGIN {99999999999}"), None);
    }
}
