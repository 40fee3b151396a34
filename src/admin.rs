//! Queue and quarantine administration, and the local control channel.
//!
//! sled lets one process open the store. While `serve` runs, the admin
//! commands send their request over a Unix socket in `data_dir`
//! (`control.sock`, mode 0600) and `serve` executes it against its store;
//! otherwise they open the store themselves. Both paths run [`execute`], so
//! they cannot disagree.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::quarantine::digest::Digester;
use crate::store::lists::{Added, ListEntry, ListKind, Scope};
use crate::store::wake::Scheduler;
use crate::store::{
    self, HeldEntry, QueueEntry, QueueState, RcptStatus, Store, fmt_id, now_ms, now_unix, parse_id,
};

/// Filters shared by `queue list` and `quarantine list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Filter {
    pub sender: Option<String>,
    pub rcpt: Option<String>,
    pub domain: Option<String>,
    pub state: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", content = "arg", rename_all = "kebab-case")]
pub enum Request {
    QueueList(Filter),
    QueueShow(String),
    QueueRetry(String),
    QueueDelete(String),
    QueueHold(String),
    QueueRelease(String),
    QuarantineList(Filter),
    QuarantineShow(String),
    QuarantineRelease(String),
    QuarantineDelete(String),
    /// `rules replay --recent`: write the `keep_recent` copies received
    /// at or after `since_ms` (Unix ms) into `dir`, a new directory under
    /// [`export_root`] (see [`Store::export_recent`]).
    RecentExport {
        since_ms: i64,
        dir: PathBuf,
    },
    ListsAdd(ListRequest),
    ListsRemove(ListRequest),
    ListsShow(ListRequest),
    /// `quarantine digest`: a digest round now, for every user or one;
    /// `all` lists all their held mail, not only what is new to them.
    QuarantineDigest {
        user: Option<String>,
        all: bool,
    },
}

/// `postern lists allow|block add|remove|show [--user LOGIN] [ENTRY]`.
/// The CLI checks `user` against users.toml before it asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListRequest {
    pub list: ListKind,
    /// A login; `None` for the site-wide list.
    pub user: Option<String>,
    /// An address or `@domain` (for `show`, optional: the whole list).
    pub entry: Option<String>,
}

/// What the command prints, and whether it succeeded (exit status).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub output: String,
}

fn fail(msg: impl Into<String>) -> Response {
    Response {
        ok: false,
        output: msg.into(),
    }
}

fn ok(msg: impl Into<String>) -> Response {
    Response {
        ok: true,
        output: msg.into(),
    }
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Where `rules replay --recent` has the copies written: the gateway
/// writes only directly under it, and the command removes what it asked for.
pub fn export_root(data_dir: &Path) -> PathBuf {
    data_dir.join("replay")
}

fn id_arg(s: &str, what: &str) -> Result<u64, Response> {
    parse_id(s).ok_or_else(|| {
        fail(format!(
            "\"{s}\" is not a {what} id (16 hex digits, as `list` shows)"
        ))
    })
}

fn matches(f: &Filter, sender: &str, rcpts: &[&str], state: &str) -> bool {
    let has = |needle: &Option<String>, hay: &str| {
        needle
            .as_ref()
            .is_none_or(|n| hay.to_ascii_lowercase().contains(&n.to_ascii_lowercase()))
    };
    has(&f.sender, sender)
        && f.rcpt
            .as_ref()
            .is_none_or(|_| rcpts.iter().any(|r| has(&f.rcpt, r)))
        && f.domain.as_ref().is_none_or(|d| {
            let d = d.to_ascii_lowercase();
            std::iter::once(sender)
                .chain(rcpts.iter().copied())
                .any(|a| a.to_ascii_lowercase().ends_with(&format!("@{d}")))
        })
        && f.state
            .as_ref()
            .is_none_or(|s| s.eq_ignore_ascii_case(state))
}

fn age(created: i64) -> String {
    let secs = (now_unix() - created).max(0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs))
        .to_string()
        .split(' ')
        .next()
        .unwrap_or("0s")
        .to_string()
}

fn sender_or_null(s: &str) -> &str {
    if s.is_empty() { "<>" } else { s }
}

/// Run one admin request against the store. `scheduler` is set when the
/// gateway runs, so retried and released messages go out at once.
pub async fn execute(store: &Store, scheduler: Option<&Scheduler>, req: Request) -> Response {
    match run(store, scheduler, req).await {
        Ok(r) => r,
        Err(e) => fail(e.to_string()),
    }
}

/// A request with no gateway running: the CLI opened the store itself.
/// A digest queued here goes out when `serve` starts.
pub async fn execute_offline(cfg: &crate::config::Config, store: &Store, req: Request) -> Response {
    match req {
        Request::QuarantineDigest { user, all } => {
            let key = match crate::quarantine::links::LinkKey::load_or_create(&cfg.server.data_dir)
            {
                Ok(k) => Arc::new(k),
                Err(e) => return fail(format!("the digest link key: {e}")),
            };
            let d = Digester {
                cfg: Arc::new(cfg.clone()),
                store: store.clone(),
                key,
                scheduler: None,
                sent: None,
            };
            digest(&d, user.as_deref(), all).await
        }
        req => execute(store, None, req).await,
    }
}

/// `quarantine digest`: one line per digest queued.
pub(crate) async fn digest(d: &Digester, user: Option<&str>, all: bool) -> Response {
    match d.run(user, all).await {
        Ok(sent) if sent.is_empty() => ok(match user {
            Some(u) => format!("no digest for {u}: no held mail that is new to them\n"),
            None => "no digests: no user has held mail that is new to them\n".to_string(),
        }),
        Ok(sent) => ok(sent
            .iter()
            .map(|s| {
                format!(
                    "digest for {} to {}: {} message{} (queued as {})\n",
                    s.login,
                    s.to,
                    s.messages,
                    if s.messages == 1 { "" } else { "s" },
                    fmt_id(s.queue_id)
                )
            })
            .collect::<String>()),
        Err(e) => fail(format!("digest: {e}")),
    }
}

/// Dispatches one request to its handler; each handler answers a bad id
/// or a missing message with a failed `Response`, store errors with `Err`.
async fn run(
    store: &Store,
    scheduler: Option<&Scheduler>,
    req: Request,
) -> store::Result<Response> {
    match req {
        Request::QueueList(f) => queue_list(store, &f),
        Request::QueueShow(id) => queue_show(store, &id),
        Request::QueueRetry(id) => queue_change(store, scheduler, &id, |e| {
            if e.state == QueueState::Held {
                return Err("it is held: release it instead".into());
            }
            e.next_attempt_ms = now_ms();
            Ok("will be retried now")
        }),
        Request::QueueHold(id) => queue_change(store, scheduler, &id, |e| {
            e.state = QueueState::Held;
            Ok("held")
        }),
        Request::QueueRelease(id) => queue_change(store, scheduler, &id, |e| {
            if e.state != QueueState::Held {
                return Err("it is not held".into());
            }
            e.state = QueueState::Queued;
            e.next_attempt_ms = now_ms();
            Ok("released to the queue")
        }),
        Request::QueueDelete(id) => queue_delete(store, &id).await,
        Request::QuarantineList(f) => quarantine_list(store, &f),
        Request::QuarantineShow(id) => quarantine_show(store, &id),
        Request::QuarantineRelease(id) => quarantine_release(store, scheduler, &id).await,
        Request::QuarantineDelete(id) => quarantine_delete(store, &id).await,
        Request::ListsAdd(r) => lists_add(store, &r).await,
        Request::ListsRemove(r) => lists_remove(store, &r).await,
        Request::ListsShow(r) => lists_show(store, &r),
        Request::RecentExport { since_ms, dir } => Ok(recent_export(store, since_ms, dir).await),
        // Needs the configuration: see `serve_control` and `execute_offline`.
        Request::QuarantineDigest { .. } => Ok(fail("a digest needs the gateway's configuration")),
    }
}

/// Writes the recent copies on the blocking pool (it may be a lot of mail).
async fn recent_export(store: &Store, since_ms: i64, dir: PathBuf) -> Response {
    let (s, d) = (store.clone(), dir.clone());
    match tokio::task::spawn_blocking(move || s.export_recent(since_ms, &d)).await {
        Ok(Ok(n)) => ok(format!("{n} message(s) written to {}\n", dir.display())),
        Ok(Err(e)) => {
            let _ = std::fs::remove_dir_all(&dir);
            fail(format!("writing {}: {e}", dir.display()))
        }
        Err(e) => fail(format!("export failed: {e}")),
    }
}

/// The scope and parsed entry of a list request, or the failed response.
fn list_args(r: &ListRequest) -> Result<(Scope<'_>, Option<ListEntry>), Response> {
    let scope = match r.user.as_deref() {
        Some(u) if !u.trim().is_empty() => Scope::User(u.trim()),
        Some(_) => return Err(fail("--user needs a login")),
        None => Scope::Site,
    };
    let entry = match r.entry.as_deref() {
        Some(e) => Some(ListEntry::parse(e).map_err(fail)?),
        None => None,
    };
    Ok((scope, entry))
}

/// "the site allow list", "alice@example.test's block list".
fn list_name(scope: Scope, kind: ListKind) -> String {
    format!("{} {} list", scope.describe(), kind.as_str())
}

/// `lists ... add`: on the list (off the other one) and durable.
async fn lists_add(store: &Store, r: &ListRequest) -> store::Result<Response> {
    let (scope, entry) = match list_args(r) {
        Ok((s, Some(e))) => (s, e),
        Ok((_, None)) => return Ok(fail("add needs an address or @domain")),
        Err(resp) => return Ok(resp),
    };
    let name = list_name(scope, r.list);
    let text = entry.as_text();
    Ok(ok(
        match store.list_add_durable(scope, r.list, &entry).await? {
            Added::New => format!("{text} added to {name}\n"),
            Added::Already => format!("{text} is on {name} already\n"),
            Added::Moved => {
                let other = match r.list {
                    ListKind::Allow => ListKind::Block,
                    ListKind::Block => ListKind::Allow,
                };
                format!("{text} moved from {} to {name}\n", list_name(scope, other))
            }
        },
    ))
}

/// `lists ... remove`: fails when the entry is not on that list.
async fn lists_remove(store: &Store, r: &ListRequest) -> store::Result<Response> {
    let (scope, entry) = match list_args(r) {
        Ok((s, Some(e))) => (s, e),
        Ok((_, None)) => return Ok(fail("remove needs an address or @domain")),
        Err(resp) => return Ok(resp),
    };
    let name = list_name(scope, r.list);
    let text = entry.as_text();
    Ok(if store.list_remove_durable(scope, r.list, &entry).await? {
        ok(format!("{text} removed from {name}\n"))
    } else {
        fail(format!("{text} is not on {name}"))
    })
}

/// `lists ... show`: the whole list, or whether one entry is on it (exit
/// 1 when not, naming the domain entry that would match an address).
fn lists_show(store: &Store, r: &ListRequest) -> store::Result<Response> {
    let (scope, entry) = match list_args(r) {
        Ok(x) => x,
        Err(resp) => return Ok(resp),
    };
    let name = list_name(scope, r.list);
    if let Some(entry) = entry {
        let text = entry.as_text();
        if store.list_contains(scope, r.list, &entry)? {
            return Ok(ok(format!("{text} is on {name}\n")));
        }
        let via = match &entry {
            ListEntry::Address(a) => a
                .rsplit_once('@')
                .map(|(_, d)| ListEntry::Domain(d.to_string()))
                .filter(|d| store.list_contains(scope, r.list, d).unwrap_or(false)),
            ListEntry::Domain(_) => None,
        };
        return Ok(fail(match via {
            Some(d) => format!(
                "{text} is not on {name} itself, but {} is, and matches it",
                d.as_text()
            ),
            None => format!("{text} is not on {name}"),
        }));
    }
    let rows = store.list_entries(scope, r.list)?;
    let mut out = format!("{:<48} ADDED\n", "ENTRY");
    for row in &rows {
        let added = chrono::DateTime::from_timestamp(row.added, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        out.push_str(&format!("{:<48} {added}\n", row.entry));
    }
    out.push_str(&format!(
        "{} entr{} on {name}\n",
        rows.len(),
        if rows.len() == 1 { "y" } else { "ies" }
    ));
    Ok(ok(out))
}

/// `queue list`: one line per queued message the filter matches, with
/// its pending recipients.
fn queue_list(store: &Store, f: &Filter) -> store::Result<Response> {
    if let Some(s) = &f.state
        && QueueState::parse(s).is_none()
    {
        return Ok(fail(format!(
            "unknown state \"{s}\": use queued, deferred or held"
        )));
    }
    let mut out = String::from("ID               STATE     SIZE     AGE    SENDER -> RECIPIENTS\n");
    let mut n = 0;
    for e in store.queue_entries()? {
        let rcpts: Vec<&str> = e.pending().map(|r| r.address.as_str()).collect();
        if !matches(f, &e.sender, &rcpts, e.state.as_str()) {
            continue;
        }
        n += 1;
        out.push_str(&format!(
            "{} {:<9} {:<8} {:<6} {} -> {}\n",
            fmt_id(e.id),
            e.state.as_str(),
            e.size,
            age(e.created),
            sender_or_null(&e.sender),
            rcpts.join(", ")
        ));
    }
    out.push_str(&format!("{n} message(s)\n"));
    Ok(ok(out))
}

/// `queue show`: the entry and its message.
fn queue_show(store: &Store, id: &str) -> store::Result<Response> {
    let id = match id_arg(id, "queue") {
        Ok(i) => i,
        Err(r) => return Ok(r),
    };
    Ok(match store.entry(id)? {
        None => fail(format!("no queued message {}", fmt_id(id))),
        Some(e) => {
            let body = store.body(id)?.map(|b| b.to_vec()).unwrap_or_default();
            ok(show_queue(&e, &body))
        }
    })
}

/// `queue delete`: removes the entry and waits until that is durable.
async fn queue_delete(store: &Store, id: &str) -> store::Result<Response> {
    let id = match id_arg(id, "queue") {
        Ok(i) => i,
        Err(r) => return Ok(r),
    };
    Ok(match store.remove(id)? {
        Some(_) => {
            store.durable().await?;
            ok(format!("{} deleted\n", fmt_id(id)))
        }
        None => fail(format!("no queued message {}", fmt_id(id))),
    })
}

/// `quarantine list`: one line per held copy the filter matches.
fn quarantine_list(store: &Store, f: &Filter) -> store::Result<Response> {
    let mut out = String::from("ID               SIZE     AGE    SENDER -> RECIPIENT  (REASON)\n");
    let mut n = 0;
    for e in store.held_entries()? {
        if !matches(f, &e.sender, &[e.recipient.as_str()], "held") {
            continue;
        }
        n += 1;
        out.push_str(&format!(
            "{} {:<8} {:<6} {} -> {}  ({})\n",
            fmt_id(e.id),
            e.size,
            age(e.received),
            sender_or_null(&e.sender),
            e.recipient,
            e.reason
        ));
    }
    out.push_str(&format!("{n} message(s)\n"));
    Ok(ok(out))
}

/// `quarantine show`: the held entry and its message.
fn quarantine_show(store: &Store, id: &str) -> store::Result<Response> {
    let id = match id_arg(id, "quarantine") {
        Ok(i) => i,
        Err(r) => return Ok(r),
    };
    Ok(match store.held_entry(id)? {
        None => fail(format!("no quarantined message {}", fmt_id(id))),
        Some(e) => {
            let body = store.held_body(&e)?.map(|b| b.to_vec()).unwrap_or_default();
            ok(show_held(&e, &body))
        }
    })
}

/// `quarantine release`: queues the held copy; with a running gateway it
/// goes out at once.
async fn quarantine_release(
    store: &Store,
    scheduler: Option<&Scheduler>,
    id: &str,
) -> store::Result<Response> {
    let id = match id_arg(id, "quarantine") {
        Ok(i) => i,
        Err(r) => return Ok(r),
    };
    let who = store::Releaser {
        by: "operator".into(),
        via: store::Via::Cli,
    };
    Ok(match store.release_held(id, &who).await? {
        Some(qid) => {
            if let Some(s) = scheduler {
                s.now(qid);
            }
            ok(format!(
                "{} released: queued as {}\n",
                fmt_id(id),
                fmt_id(qid)
            ))
        }
        None => fail(format!(
            "no quarantined message {} (already released or deleted?)",
            fmt_id(id)
        )),
    })
}

/// `quarantine delete`: drops the held copy and waits until that is
/// durable.
async fn quarantine_delete(store: &Store, id: &str) -> store::Result<Response> {
    let id = match id_arg(id, "quarantine") {
        Ok(i) => i,
        Err(r) => return Ok(r),
    };
    Ok(match store.unhold(id)? {
        Some(_) => {
            store.durable().await?;
            ok(format!("{} deleted\n", fmt_id(id)))
        }
        None => fail(format!("no quarantined message {}", fmt_id(id))),
    })
}

fn queue_change(
    store: &Store,
    scheduler: Option<&Scheduler>,
    id: &str,
    change: impl Fn(&mut QueueEntry) -> Result<&'static str, String>,
) -> store::Result<Response> {
    let id = match id_arg(id, "queue") {
        Ok(i) => i,
        Err(r) => return Ok(r),
    };
    // Retry a few times: a delivery task may update the entry concurrently.
    for _ in 0..5 {
        let Some(mut e) = store.entry(id)? else {
            return Ok(fail(format!("no queued message {}", fmt_id(id))));
        };
        let what = match change(&mut e) {
            Ok(w) => w,
            Err(why) => return Ok(fail(format!("{}: {why}", fmt_id(id)))),
        };
        if store.update(&e)? {
            if e.state != QueueState::Held
                && let Some(s) = scheduler
            {
                s.at(id, e.next_attempt_ms);
            }
            return Ok(ok(format!("{} {what}\n", fmt_id(id))));
        }
    }
    Ok(fail(format!("{}: busy, try again", fmt_id(id))))
}

/// The header fields of a message for `show`; a message without an empty
/// line is cut at 8 KiB, so a huge headerless body does not flood the screen.
fn header_block(body: &[u8]) -> String {
    let mut h = crate::mail::headers::header_fields_only(body);
    if h.len() == body.len() {
        h = &h[..h.len().min(8192)];
    }
    String::from_utf8_lossy(h).replace("\r\n", "\n")
}

fn show_queue(e: &QueueEntry, body: &[u8]) -> String {
    let mut s = format!(
        "id:        {}\nstate:     {}\nsender:    {}\nsize:      {}\nage:       {}\nattempts:  {}\nclient:    {} ({})\n",
        fmt_id(e.id),
        e.state.as_str(),
        sender_or_null(&e.sender),
        e.size,
        age(e.created),
        e.attempts,
        e.client_ip,
        e.helo
    );
    if e.state != QueueState::Held && e.attempts > 0 {
        let secs = ((e.next_attempt_ms - now_ms()) / 1000).max(0);
        s.push_str(&format!("next try:  in {secs}s\n"));
    }
    for r in &e.recipients {
        let st = match r.status {
            RcptStatus::Pending => "pending",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Failed => "failed",
        };
        s.push_str(&format!(
            "rcpt:      {} [{st}] {}\n",
            r.address,
            r.last_reply.as_deref().unwrap_or("")
        ));
        // What the session that answered for this recipient used.
        if let Some(tls) = &r.tls {
            let via = r.remote.as_deref().unwrap_or("");
            s.push_str(&format!("  tls:     {tls} ({via})\n"));
        }
    }
    s.push_str(&trace_block(e.trace.as_ref()));
    s.push('\n');
    s.push_str(&header_block(body));
    s
}

/// The decision trace (SPEC "Rules"): what each stage and script said.
fn trace_block(trace: Option<&crate::policy::Trace>) -> String {
    match trace {
        None => String::new(),
        Some(t) => {
            let mut s = String::from("trace:\n");
            for line in t.lines() {
                s.push_str("  ");
                s.push_str(&line);
                s.push('\n');
            }
            s
        }
    }
}

fn show_held(e: &HeldEntry, body: &[u8]) -> String {
    format!(
        "id:        {}\nsender:    {}\nrecipient: {}\nreason:    {}\nscript:    {}\nsize:      {}\nage:       {}\nclient:    {} ({})\n{}\n{}",
        fmt_id(e.id),
        sender_or_null(&e.sender),
        e.recipient,
        e.reason,
        e.script.as_deref().unwrap_or("-"),
        e.size,
        age(e.received),
        e.client_ip,
        e.helo,
        trace_block(e.trace.as_ref()),
        header_block(body)
    )
}

/// Longest control request accepted (a JSON line).
const MAX_CONTROL_LINE: usize = 64 * 1024;

/// Answer control requests on a Unix socket (mode 0600) until shutdown,
/// through the shared `net` layer: bounded lines, deadlines, one span each.
pub(crate) async fn serve_control(
    path: PathBuf,
    store: Store,
    scheduler: Scheduler,
    server: crate::net::Server,
    releases: prometheus::IntCounter,
    digester: Arc<Digester>,
) -> std::io::Result<()> {
    use crate::net::{Admission, AdmissionConfig, Deadlines, Line, ListenerSpec};
    use std::os::unix::fs::PermissionsExt;
    let export_root = Arc::new(export_root(path.parent().unwrap_or(Path::new("."))));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let spec = Arc::new(ListenerSpec {
        label: "control",
        tls: None,
        admission: Admission::new(AdmissionConfig {
            max_connections: 64,
            max_per_ip: 0,
            rate_per_ip: None,
            exempt: Vec::new(),
        }),
        overload: b"{\"ok\":false,\"error\":\"the gateway is busy\"}\n".to_vec(),
        deadlines: Deadlines {
            idle: std::time::Duration::from_secs(30),
            ..Deadlines::default()
        },
        on_accept: None,
    });
    crate::net::serve(listener, spec, server, move |mut conn, _peer| {
        let (store, scheduler, releases) = (store.clone(), scheduler.clone(), releases.clone());
        let (export_root, digester) = (export_root.clone(), digester.clone());
        async move {
            let resp = match conn.read_line(MAX_CONTROL_LINE).await {
                Ok(Line::Data(line)) => match serde_json::from_slice::<Request>(&line) {
                    Ok(Request::RecentExport { dir, .. })
                        if dir.parent() != Some(export_root.as_path()) =>
                    {
                        fail(format!(
                            "an export goes directly under {}",
                            export_root.display()
                        ))
                    }
                    Ok(Request::QuarantineDigest { user, all }) => {
                        digest(&digester, user.as_deref(), all).await
                    }
                    Ok(req) => {
                        let release = matches!(req, Request::QuarantineRelease(_));
                        let resp = execute(&store, Some(&scheduler), req).await;
                        if release && resp.ok {
                            // `postern_releases_total{via="cli"}`: only a
                            // running gateway has a registry to count in.
                            releases.inc();
                        }
                        resp
                    }
                    Err(e) => fail(format!("bad control request: {e}")),
                },
                Ok(Line::TooLong) => fail("control request too long".to_string()),
                _ => return,
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = conn.write(&out).await;
        }
    })
    .await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Send a request to a running gateway; `None` if none is listening.
pub async fn send_control(path: &Path, req: &Request) -> Option<Response> {
    let stream = tokio::net::UnixStream::connect(path).await.ok()?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).ok()?;
    line.push(b'\n');
    w.write_all(&line).await.ok()?;
    let mut lines = BufReader::new(r).lines();
    let resp = lines.next_line().await.ok()??;
    serde_json::from_str(&resp).ok()
}
