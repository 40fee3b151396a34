//! The POP3 I/O shell: reads lines, drives [`Pop3Core`], runs STLS, the password
//! check and the maildrop lock. Once logged in, every core call runs on the
//! blocking pool, because the core reads and deletes through the (blocking) store.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{MAX_LINE, Pop3Core, Step, err};
use crate::mailbox::MailboxCtx;
use crate::mailbox::store::offload;
use crate::net::{Conn, Line};

/// Releases a user's POP3 maildrop lock when the session ends.
struct MaildropLock {
    ctx: Arc<MailboxCtx>,
    key: String,
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        let mut locks = self
            .ctx
            .pop3_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        locks.remove(&self.key);
    }
}

/// Check the credentials, take the maildrop lock and enter TRANSACTION
/// (listing the store on the blocking pool). The lock is kept only if the
/// session really is in TRANSACTION afterwards.
async fn log_in(
    ctx: &Arc<MailboxCtx>,
    peer: IpAddr,
    mut core: Pop3Core,
    lock: &mut Option<MaildropLock>,
    login: String,
    password: String,
) -> std::io::Result<(Pop3Core, Step)> {
    let account = match crate::mailbox::check_login(ctx, peer, "pop3", login, password).await {
        crate::mailbox::Login::Ok(a) => a,
        crate::mailbox::Login::Failed => {
            let step = core.login_failed();
            return Ok((core, step));
        }
        crate::mailbox::Login::Refused => {
            let step = core.login_refused();
            return Ok((core, step));
        }
    };
    let key = account.login.to_ascii_lowercase();
    let locked = {
        let mut locks = ctx.pop3_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.insert(key.clone())
    };
    if !locked {
        let reply = core.login_in_use();
        return Ok((core, Step::Reply(reply)));
    }
    *lock = Some(MaildropLock {
        ctx: ctx.clone(),
        key,
    });
    let (core, reply) = offload(core, move |c| c.login_ok(account)).await?;
    if core.account().is_none() {
        // The store failed: no TRANSACTION, so no lock.
        *lock = None;
    }
    Ok((core, Step::Reply(reply)))
}

/// Run one POP3 session on `conn` (the I/O shell).
pub(crate) async fn run_session(
    mut conn: Conn,
    peer: IpAddr,
    ctx: Arc<MailboxCtx>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut core = Pop3Core::new(ctx.store.clone(), &ctx.hostname, conn.tls);
    let mut _lock: Option<MaildropLock> = None;
    conn.write(&core.greeting()).await?;
    let idle: Duration = ctx.limits.pop3_idle;
    let login_by = tokio::time::Instant::now() + ctx.limits.login;
    loop {
        let logged_in = core.account().is_some();
        let wait = if logged_in {
            idle
        } else {
            login_by
                .saturating_duration_since(tokio::time::Instant::now())
                .min(idle)
        };
        let line = tokio::select! {
            r = tokio::time::timeout(wait, conn.read_line(MAX_LINE)) => match r {
                Ok(r) => r?,
                Err(_) if !logged_in => {
                    conn.write(&err("login timeout")).await?;
                    return Ok(());
                }
                Err(_) => {
                    conn.write(&err("autologout; idle for too long")).await?;
                    return Ok(());
                }
            },
            _ = crate::net::stopped(&mut shutdown) => {
                // No UPDATE state: nothing marked is deleted.
                conn.write(&err("server shutting down")).await?;
                return Ok(());
            }
        };
        let step = match line {
            Line::Eof | Line::Shutdown => return Ok(()),
            Line::Timeout => {
                conn.write(&err("autologout; idle for too long")).await?;
                return Ok(());
            }
            Line::TooLong => core.line_too_long(),
            Line::Data(l) if core.uses_store() => {
                let (c, step) = offload(core, move |c| c.handle(&l)).await?;
                core = c;
                step
            }
            Line::Data(l) => core.handle(&l),
        };
        let step = match step {
            Step::Login { login, password } => {
                let (c, step) = log_in(&ctx, peer, core, &mut _lock, login, password).await?;
                core = c;
                step
            }
            s => s,
        };
        match step {
            Step::Reply(bytes) => conn.write(&bytes).await?,
            Step::Close(bytes) => {
                if !bytes.is_empty() {
                    conn.write(&bytes).await?;
                }
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
            }
            Step::Login { .. } => conn.write(&err("internal error")).await?,
        }
    }
}
