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
use crate::mailbox::io::{Conn, Line, wait_shutdown};
use crate::mailbox::store::offload;

/// One command line (a command may have several, joined by literals).
const MAX_LINE: usize = 8192;
/// A whole command, lines and literals together.
const MAX_COMMAND: usize = 256 * 1024;

/// A framed command, or why there is none.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framed {
    Command(Vec<u8>),
    /// A line or the whole command was too long (the tag, if one was read).
    TooLong(Option<String>),
    /// A synchronising literal larger than allowed was announced; the client waits for our
    /// answer and will not send it.
    LiteralRefused(Option<String>),
    /// A non-synchronising literal larger than allowed: we cannot find the next command.
    Fatal,
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

/// Read one complete command, answering synchronising literals with `+`.
pub(crate) async fn read_command(conn: &mut Conn, max_literal: usize) -> std::io::Result<Framed> {
    let mut cmd: Vec<u8> = Vec::new();
    loop {
        let line = match conn.read_line(MAX_LINE).await? {
            Line::Eof | Line::Shutdown => return Ok(Framed::Eof),
            Line::Timeout => return Ok(Framed::Timeout),
            Line::TooLong => return Ok(Framed::TooLong(tag_of(&cmd).map(str::to_string))),
            Line::Data(l) => l,
        };
        let lit = literal_suffix(&line);
        cmd.extend_from_slice(&line);
        cmd.extend_from_slice(b"\r\n");
        let Some((n, sync)) = lit else {
            return Ok(Framed::Command(cmd));
        };
        if n > max_literal || cmd.len().saturating_add(n) > MAX_COMMAND {
            return Ok(if sync {
                Framed::LiteralRefused(tag_of(&cmd).map(str::to_string))
            } else {
                Framed::Fatal
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

/// Run one IMAP session on `conn`.
pub(crate) async fn run_session(
    mut conn: Conn,
    peer: IpAddr,
    ctx: Arc<MailboxCtx>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut core = ImapCore::new(ctx.imap.clone(), &ctx.hostname, conn.tls);
    let mut store_rx = ctx.store.subscribe();
    let mut changes_rx = ctx.imap.subscribe_changes();
    let idle: Duration = ctx.limits.imap_idle;
    conn.write(&core.greeting()).await?;
    loop {
        let framed = tokio::select! {
            r = tokio::time::timeout(idle, read_command(&mut conn, ctx.limits.max_literal)) => match r {
                Ok(r) => r?,
                Err(_) => {
                    conn.write(b"* BYE Autologout; idle for too long\r\n").await?;
                    return Ok(());
                }
            },
            _ = wait_shutdown(&mut shutdown) => {
                conn.write(b"* BYE Server shutting down\r\n").await?;
                return Ok(());
            }
        };
        let mut step = match framed {
            Framed::Eof => return Ok(()),
            Framed::Timeout => {
                conn.write(b"* BYE Autologout; idle for too long\r\n")
                    .await?;
                return Ok(());
            }
            Framed::Command(bytes) if core.uses_store() => {
                let (c, step) = offload(core, move |c| c.handle(&bytes)).await?;
                core = c;
                step
            }
            Framed::Command(bytes) => core.handle(&bytes),
            Framed::TooLong(tag) => core.too_long(tag.as_deref()),
            Framed::LiteralRefused(tag) => core.too_long(tag.as_deref()),
            Framed::Fatal => {
                conn.write(b"* BYE Literal too large\r\n").await?;
                return Ok(());
            }
        };
        loop {
            match step {
                Step::Login {
                    tag,
                    login,
                    password,
                } => {
                    let account =
                        crate::mailbox::check_login(&ctx, peer, "imap", login, password).await;
                    step = core.login_result(&tag, account);
                }
                Step::SaslContinue { tag } => {
                    conn.write(b"+ \r\n").await?;
                    step = match conn.read_line(MAX_LINE).await? {
                        Line::Eof | Line::Shutdown | Line::Timeout => return Ok(()),
                        Line::TooLong => core.too_long(Some(&tag)),
                        Line::Data(l) => core.sasl_response(&tag, &l),
                    };
                }
                Step::Reply(bytes) => {
                    conn.write(&bytes).await?;
                    break;
                }
                Step::Close(bytes) => {
                    conn.write(&bytes).await?;
                    conn.shutdown().await;
                    return Ok(());
                }
                Step::StartTls(bytes) => {
                    conn.write(&bytes).await?;
                    // The handshake deadline is the connection's own.
                    conn = match conn.starttls(&ctx.tls).await {
                        Ok(c) => c,
                        Err(_) => return Ok(()),
                    };
                    core.tls_started();
                    break;
                }
                Step::Idle(bytes) => {
                    drain(&mut store_rx);
                    drain(&mut changes_rx);
                    conn.write(&bytes).await?;
                    loop {
                        tokio::select! {
                            r = tokio::time::timeout(idle, conn.read_line(MAX_LINE)) => {
                                match r {
                                    Err(_) => {
                                        conn.write(b"* BYE Autologout; idle for too long\r\n").await?;
                                        return Ok(());
                                    }
                                    Ok(Ok(Line::Eof | Line::Shutdown)) => return Ok(()),
                                    Ok(Ok(Line::Timeout)) => {
                                        conn.write(b"* BYE Autologout; idle for too long\r\n").await?;
                                        return Ok(());
                                    }
                                    Ok(Ok(Line::TooLong)) => {
                                        let (c, out) = offload(core, |c| c.idle_done(b"")).await?;
                                        core = c;
                                        conn.write(&out).await?;
                                    }
                                    Ok(Ok(Line::Data(l))) => {
                                        let (c, out) = offload(core, move |c| c.idle_done(&l)).await?;
                                        core = c;
                                        conn.write(&out).await?;
                                    }
                                    Ok(Err(e)) => return Err(e),
                                }
                                break;
                            }
                            _ = fired(&mut store_rx) => {
                                let (c, out) = offload(core, |c| c.idle_update()).await?;
                                core = c;
                                if !out.is_empty() {
                                    conn.write(&out).await?;
                                }
                            }
                            _ = fired(&mut changes_rx) => {
                                let (c, out) = offload(core, |c| c.idle_update()).await?;
                                core = c;
                                if !out.is_empty() {
                                    conn.write(&out).await?;
                                }
                            }
                            _ = wait_shutdown(&mut shutdown) => {
                                conn.write(b"* BYE Server shutting down\r\n").await?;
                                return Ok(());
                            }
                        }
                    }
                    break;
                }
            }
        }
    }
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
