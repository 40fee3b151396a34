//! The pages digest links open (`[quarantine] web`).
//!
//! A GET only shows the message and a confirm button; the action happens on
//! the POST, so mail scanners and browsers that prefetch links change
//! nothing. Every page is plain HTML without scripts or outside resources,
//! escapes everything it shows, and forbids the rest by
//! `Content-Security-Policy`. The token in the URL is the whole authority
//! (see [`crate::quarantine::links`]); pages are never cached and never sent
//! as a referrer.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::mailbox::MailboxCtx;
use crate::mailbox::accounts::Account;
use crate::mailbox::store::ListKind;
use crate::quarantine::digest::{esc, human_size, local_time, subject_of};
use crate::quarantine::links::{Action, Link, LinkError, LinkKey};
use crate::store::lists::{ListEntry, Scope};
use crate::store::outcomes::{Gone, Outcome};
use crate::store::wake::Scheduler;
use crate::store::{HeldEntry, Releaser, Store, Via, now_unix};

/// Reading a request's head may take this long; a whole connection this long.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                   base-uri 'none'; frame-ancestors 'none'";

pub(crate) struct WebCtx {
    pub(crate) store: Store,
    pub(crate) key: Arc<LinkKey>,
    /// The accounts in use (reloaded with the users file).
    pub(crate) mailbox: Arc<MailboxCtx>,
    pub(crate) scheduler: Scheduler,
    pub(crate) releases: prometheus::IntCounter,
}

pub(crate) fn router(ctx: Arc<WebCtx>) -> Router {
    Router::new()
        .route("/q/{token}", get(show).post(act))
        .fallback(|| async {
            page(
                StatusCode::NOT_FOUND,
                "Not found",
                "<p>There is nothing here. Quarantine links come in the digest mail.</p>",
            )
        })
        .with_state(ctx)
}

/// Serve one connection (from the shared connection layer) with `app`.
pub(crate) async fn serve_conn(conn: crate::net::Conn, app: Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let io = TokioIo::new(conn.into_stream());
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc);
    match tokio::time::timeout(CONNECTION_LIFETIME, http).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "web connection ended"),
        Err(_) => tracing::debug!("web connection closed after its lifetime"),
    }
}

fn page(status: StatusCode, title: &str, body_html: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · Postern quarantine</title>\
         <style>body{{font-family:sans-serif;max-width:42em;margin:2em auto;padding:0 1em;line-height:1.4}}\
         th{{text-align:left;padding-right:1em;vertical-align:top}}td{{word-break:break-word}}\
         button{{font-size:1.1em;padding:.5em 1.2em;margin-top:1em}}</style></head>\
         <body><h1>{t}</h1>{body_html}</body></html>\n",
        t = esc(title)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        html,
    )
        .into_response()
}

fn unavailable() -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again later",
        "<p>The quarantine cannot be read just now. Nothing was changed.</p>",
    )
}

/// What a valid link for an entry that is still held resolves to.
struct Target {
    link: Link,
    account: Account,
    entry: HeldEntry,
}

/// The token checked against the key, the clock, the users file and the
/// entry; any failure is the page to show, and nothing is changed.
fn resolve(ctx: &WebCtx, token: &str) -> Result<Target, Box<Response>> {
    let link = match ctx.key.verify(token, now_unix()) {
        Ok(l) => l,
        Err(LinkError::Forged) => {
            return Err(Box::new(page(
                StatusCode::FORBIDDEN,
                "This link is not valid",
                "<p>This link was not made by this gateway, or it was changed. Nothing was done.</p>",
            )));
        }
        Err(LinkError::Expired) => {
            return Err(Box::new(page(
                StatusCode::GONE,
                "This link has expired",
                "<p>Digest links work for a limited time. Nothing was done. The message may still be in \
                 your quarantine: a newer digest, or your mail client's quarantine account, has it.</p>",
            )));
        }
    };
    let Some(account) = ctx.mailbox.accounts().account(&link.login) else {
        return Err(Box::new(page(
            StatusCode::FORBIDDEN,
            "This link is not valid",
            "<p>The account this link was made for no longer exists. Nothing was done.</p>",
        )));
    };
    let entry = match ctx.store.held_entry(link.id) {
        Ok(Some(e)) => e,
        Ok(None) => return Err(Box::new(gone_page(ctx, link.id))),
        Err(e) => {
            tracing::error!(error = %e, "web: quarantine read failed");
            return Err(Box::new(unavailable()));
        }
    };
    if !account.can_see_mail_for(&entry.recipient) {
        return Err(Box::new(page(
            StatusCode::FORBIDDEN,
            "This link is not valid",
            "<p>This message is not addressed to the account the link was made for. Nothing was done.</p>",
        )));
    }
    Ok(Target {
        link,
        account,
        entry,
    })
}

/// An entry no longer held: say what became of it, if we know.
fn gone_page(ctx: &WebCtx, id: u64) -> Response {
    let said = match ctx.store.gone(id) {
        Ok(Some(Gone {
            outcome,
            by,
            via,
            at,
        })) => {
            let what = match outcome {
                Outcome::Released => "released",
                Outcome::Deleted => "deleted",
            };
            let how = match via.as_str() {
                "web" => "from a digest link".to_string(),
                "cli" => "by the administrator".to_string(),
                "mailbox" => "from a mail client".to_string(),
                v => format!("over {}", v.to_uppercase()),
            };
            let by = if by.is_empty() || via == "mailbox" || via == "cli" {
                String::new()
            } else {
                format!(" by {}", esc(&by))
            };
            format!(
                "<p>This message was already <strong>{what}</strong>{by} {how} on {}. Nothing more was done.</p>",
                esc(&local_time(at)),
                how = esc(&how)
            )
        }
        Ok(None) => "<p>This message is no longer in the quarantine: it was released or deleted, \
                     or it expired. Nothing was done.</p>"
            .to_string(),
        Err(e) => {
            tracing::error!(error = %e, "web: quarantine read failed");
            return unavailable();
        }
    };
    page(StatusCode::OK, "Already done", &said)
}

fn summary(store: &Store, e: &HeldEntry) -> String {
    let from = if e.sender.is_empty() {
        "<> (a bounce)".to_string()
    } else {
        e.sender.clone()
    };
    format!(
        "<table><tr><th>Date</th><td>{}</td></tr><tr><th>From</th><td>{}</td></tr>\
         <tr><th>To</th><td>{}</td></tr><tr><th>Subject</th><td>{}</td></tr>\
         <tr><th>Reason</th><td>{}</td></tr><tr><th>Size</th><td>{}</td></tr></table>",
        esc(&local_time(e.received)),
        esc(&from),
        esc(&e.recipient),
        esc(&subject_of(store, e)),
        esc(&e.reason),
        esc(&human_size(e.size)),
    )
}

fn question(a: Action, sender: &str) -> String {
    let s = esc(sender);
    match a {
        Action::Release => "Release this message? It will be delivered to your mailbox.".into(),
        Action::Allow => format!(
            "Release this message and allow <strong>{s}</strong>? It will be delivered, and mail \
             from that sender will not be held for you again."
        ),
        Action::Block => format!(
            "Block <strong>{s}</strong>? This message will be deleted, and mail from that sender \
             will be held or refused for you."
        ),
        Action::Delete => "Delete this message? It cannot be brought back.".into(),
    }
}

async fn show(State(ctx): State<Arc<WebCtx>>, Path(token): Path<String>) -> Response {
    let t = match resolve(&ctx, &token) {
        Ok(t) => t,
        Err(page) => return *page,
    };
    let a = t.link.action;
    let body = format!(
        "{}<p>{}</p><form method=\"post\"><button type=\"submit\">{}</button></form>\
         <p><small>Nothing happens until you press the button.</small></p>",
        summary(&ctx.store, &t.entry),
        question(a, &t.entry.sender),
        esc(a.label()),
    );
    page(StatusCode::OK, &format!("{}?", a.label()), &body)
}

async fn act(State(ctx): State<Arc<WebCtx>>, Path(token): Path<String>) -> Response {
    let t = match resolve(&ctx, &token) {
        Ok(t) => t,
        Err(page) => return *page,
    };
    match perform(&ctx, &t).await {
        Ok(Some(done)) => {
            tracing::info!(user = %t.account.login, id = %crate::store::fmt_id(t.entry.id), action = t.link.action.as_str(), "digest link used");
            page(StatusCode::OK, "Done", &done)
        }
        // Another click, a mail client or the CLI was first.
        Ok(None) => gone_page(&ctx, t.entry.id),
        Err(e) => {
            tracing::error!(error = %e, "web: quarantine action failed");
            unavailable()
        }
    }
}

/// The action, once: `None` when the entry went meanwhile.
async fn perform(ctx: &WebCtx, t: &Target) -> crate::store::Result<Option<String>> {
    let (e, login) = (&t.entry, t.account.login.as_str());
    let who = Releaser {
        by: login.to_string(),
        via: Via::Web,
    };
    let sender = ListEntry::parse(&e.sender).ok();
    let sender_html = esc(&e.sender);
    Ok(Some(match t.link.action {
        Action::Release | Action::Allow => {
            let Some(qid) = ctx.store.release_held(e.id, &who).await? else {
                return Ok(None);
            };
            ctx.scheduler.now(qid);
            ctx.releases.inc();
            let mut said = format!(
                "<p>Released: the message is on its way to {}.</p>",
                esc(&e.recipient)
            );
            if t.link.action == Action::Allow {
                match &sender {
                    Some(s) => {
                        ctx.store
                            .list_add_durable(Scope::User(login), ListKind::Allow, s)
                            .await?;
                        said.push_str(&format!(
                            "<p><strong>{sender_html}</strong> is on your allow list.</p>"
                        ));
                    }
                    None => said.push_str("<p>A bounce has no sender to allow.</p>"),
                }
            }
            said
        }
        Action::Block | Action::Delete => {
            if ctx.store.unhold(e.id)?.is_none() {
                return Ok(None);
            }
            ctx.store.note_gone(e.id, Outcome::Deleted, login, "web")?;
            let mut said = "<p>Deleted.</p>".to_string();
            if t.link.action == Action::Block {
                match &sender {
                    Some(s) => {
                        ctx.store.list_add(Scope::User(login), ListKind::Block, s)?;
                        said.push_str(&format!(
                            "<p><strong>{sender_html}</strong> is on your block list.</p>"
                        ));
                    }
                    None => said.push_str("<p>A bounce has no sender to block.</p>"),
                }
            }
            ctx.store.durable().await?;
            said
        }
    }))
}
