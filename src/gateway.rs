//! `postern serve`: open the store, bind every listener, start the workers,
//! and shut down gracefully on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::delivery::{self, Delivery};
use crate::intake::Intake;
use crate::mailbox::accounts::Accounts;
use crate::mailbox::{self, MailboxCtx};
use crate::metrics::{self, Metrics};
use crate::net::{self, Admission, AdmissionConfig, Deadlines, ListenerSpec, bind_all};
use crate::policy::Policy;
use crate::quarantine::SledQuarantine;
use crate::quarantine::digest::Digester;
use crate::quarantine::links::LinkKey;
use crate::smtp::server::SmtpContext;
use crate::smtp::session::{ListenerKind, SessionConfig, reply};
use crate::store::Store;
use crate::store::wake::Scheduler;
use crate::{admin, tls};

/// What the listeners and workers are built from.
struct Core {
    cfg: Arc<Config>,
    store: Store,
    metrics: Arc<Metrics>,
    policy: Arc<Policy>,
    scheduler: Scheduler,
    tls: tokio_rustls::TlsAcceptor,
    signers: Arc<crate::dkim::Signers>,
}

/// Run until SIGTERM or SIGINT.
pub async fn serve(cfg: Config) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Install the signal handlers before anything listens: a SIGHUP or
    // SIGTERM that arrives early must not take the default action (exit).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    crate::fds::at_start(&cfg);
    let (core, wakeups) = open(cfg)?;
    let cfg = core.cfg.clone();
    // Rules and policies reload when their files change, watched from the
    // moment they were loaded.
    let watcher = crate::policy::watch(core.policy.clone(), core.policy.dirs());
    let delivery = Delivery::new(
        cfg.clone(),
        core.store.clone(),
        core.metrics.clone(),
        core.scheduler.clone(),
    )?;
    let resumed = delivery.resume()?;
    if resumed > 0 {
        tracing::info!(messages = resumed, "resuming the queue");
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = net::Server {
        shutdown: shutdown_rx.clone(),
        tracker: TaskTracker::new(),
    };
    let workers = TaskTracker::new();
    // Every port is bound before READY=1 (sent below). The mailbox context
    // comes before SMTP: submission AUTH shares its accounts.
    start_metrics(&core, shutdown_rx.clone()).await?;
    let mailbox = start_mailbox(&core, &server).await?;
    let verifier = Arc::new(
        crate::verify::Verifier::new(
            &cfg,
            delivery.clone(),
            core.metrics.recipient_verify.clone(),
        )
        .map_err(|p| problems("the recipients file does not load", &p))?,
    );
    start_smtp(&core, &server, mailbox.clone(), verifier.clone()).await?;
    let retention = cfg.quarantine.retention.0;
    let purge = tokio::spawn(crate::quarantine::purge_loop(
        core.store.clone(),
        retention,
        (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(600)),
    ));
    // `[rules] keep_recent`: the copies older than that go.
    let recent = tokio::spawn(crate::store::recent::purge_loop(
        core.store.clone(),
        cfg.rules.keep_recent.0,
    ));
    // `[relay] recipients` reloads when it changes, like the policies.
    let recipients_watch = verifier.watched().map(|file| {
        let v = verifier.clone();
        crate::watch::spawn(
            vec![file.to_path_buf()],
            Duration::from_secs(1),
            move || v.reload(),
        )
    });
    let (watch_cfg, watch_mailbox) = (cfg.clone(), mailbox.clone());
    let accounts_watch = crate::watch::spawn(
        vec![Accounts::file(&cfg)],
        Duration::from_secs(1),
        move || reload_accounts(&watch_cfg, &watch_mailbox),
    );
    // Digest links are signed with a key kept in the data dir.
    let key = Arc::new(
        LinkKey::load_or_create(&cfg.server.data_dir).with_context(|| {
            format!(
                "the digest link key {}",
                crate::quarantine::links::key_path(&cfg.server.data_dir).display()
            )
        })?,
    );
    let digester = Arc::new(Digester {
        cfg: cfg.clone(),
        store: core.store.clone(),
        key: key.clone(),
        scheduler: Some(core.scheduler.clone()),
        sent: Some(core.metrics.digests_sent.clone()),
    });
    start_web(&core, &server, key, mailbox.clone()).await?;
    let digests = tokio::spawn(crate::quarantine::digest::schedule_loop(
        digester.clone(),
        cfg.quarantine.digest,
    ));
    tokio::spawn(admin::serve_control(
        admin::socket_path(&cfg.server.data_dir),
        core.store.clone(),
        core.scheduler.clone(),
        server.clone(),
        core.metrics.releases.with_label_values(&["cli"]),
        digester,
    ));
    let dispatcher = tokio::spawn(delivery::run(
        delivery.clone(),
        wakeups,
        shutdown_rx.clone(),
        workers.clone(),
    ));
    // Rules and policies also reload on SIGHUP (below).
    let housekeeping =
        crate::policy::spawn_housekeeping(core.policy.clone(), Duration::from_secs(60));
    let cluster_probe = crate::policy::spawn_cluster_probe(core.policy.clone());
    if !cfg.cluster.redis.is_empty() {
        tracing::info!(node = %cfg.cluster.node, redis = %cfg.cluster.redis, on_backend_error = ?cfg.cluster.on_backend_error, nodes = cfg.cluster.nodes, "cluster mode: rate limits shared in Redis");
    }
    let (hup_policy, hup_cfg, hup_mailbox) = (core.policy.clone(), cfg.clone(), mailbox.clone());
    let hup_verifier = verifier.clone();
    let hup = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading rules, policies and accounts");
            crate::notify::reloading();
            // Errors are logged and counted by reload itself.
            let _ = hup_policy.reload();
            reload_accounts(&hup_cfg, &hup_mailbox);
            hup_verifier.reload();
            crate::notify::ready();
        }
    });
    tracing::info!(hostname = %cfg.server.hostname, "Postern is running");
    println!(
        "postern: serving (hostname {}, data in {})",
        cfg.server.hostname,
        cfg.server.data_dir.display()
    );
    // Every listener is bound: a `Type=notify` unit counts as started now.
    crate::notify::ready();

    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    crate::notify::stopping();
    for task in [
        watcher,
        purge,
        recent,
        accounts_watch,
        housekeeping,
        hup,
        digests,
    ]
    .into_iter()
    .chain(recipients_watch)
    .chain(cluster_probe)
    {
        task.abort();
    }
    tracing::info!("shutting down: no new connections; finishing sessions in flight");
    let _ = shutdown_tx.send(true);
    drain(&cfg, server.tracker, dispatcher, workers).await;
    core.store.flush()?;
    tracing::info!("stopped");
    Ok(())
}

/// A start-up error listing every problem, one per line.
fn problems(what: &str, list: &[crate::config::Problem]) -> anyhow::Error {
    let lines: Vec<String> = list.iter().map(|p| format!("  {p}")).collect();
    anyhow::anyhow!("{what}:\n{}", lines.join("\n"))
}

/// Open the store, load the policy, make the TLS acceptor and the wake-up channel.
fn open(cfg: Config) -> Result<(Core, crate::store::wake::Wakeups)> {
    let cfg = Arc::new(cfg);
    let data_dir = &cfg.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data_dir {}", data_dir.display()))?;
    let store = Store::open(&data_dir.join("store"))?;
    store.set_min_free(cfg.server.min_free_space.0);
    let metrics = Metrics::new();
    let policy =
        Arc::new(Policy::serving(&cfg).map_err(|p| problems("rules or policies do not load", &p))?);
    metrics.register_policy(policy.metrics())?;
    let tls = tls::acceptor(&cfg)?;
    let signers = Arc::new(
        crate::dkim::Signers::load(&cfg)
            .map_err(|p| problems("DKIM signing keys do not load", &p))?,
    );
    for d in &cfg.dkim_sign {
        tracing::info!(domain = %d.domain, selector = %d.selector, "DKIM signing");
    }
    let (scheduler, wakeups) = Scheduler::channel();
    let core = Core {
        cfg,
        store,
        metrics,
        policy,
        scheduler,
        tls,
        signers,
    };
    Ok((core, wakeups))
}

/// Bind every SMTP listener (a port conflict fails the start) and serve them
/// over the shared connection layer, with one set of caps for all of them,
/// so spreading over ports gains nothing.
async fn start_smtp(
    core: &Core,
    server: &net::Server,
    logins: Arc<MailboxCtx>,
    verifier: Arc<crate::verify::Verifier>,
) -> Result<()> {
    let cfg = &core.cfg;
    let smtp = Arc::new(SmtpContext {
        cfg: Arc::new(SessionConfig {
            hostname: cfg.server.hostname.clone(),
            relay: cfg.relay.clone(),
            max_message_size: cfg.smtp.max_message_size.0,
            max_recipients: cfg.smtp.max_recipients,
            tls_available: true,
            received_auth_user: cfg.smtp.received_auth_user,
            bare_newline: cfg.smtp.bare_newline,
        }),
        tls: Some(core.tls.clone()),
        intake: Arc::new(Intake {
            store: core.store.clone(),
            scheduler: core.scheduler.clone(),
            metrics: core.metrics.clone(),
            authserv_ids: std::iter::once(cfg.server.hostname.clone())
                .chain(cfg.checks.authserv_ids.iter().cloned())
                .collect(),
            signers: core.signers.clone(),
            keep_recent: !cfg.rules.keep_recent.0.is_zero(),
            accounts: logins.clone(),
            spool: crate::spool::Spool::open(
                &cfg.server.data_dir.join("spool"),
                usize::try_from(cfg.smtp.data_memory.0).unwrap_or(usize::MAX),
            )
            .with_context(|| {
                format!(
                    "preparing the spool directory {}",
                    cfg.server.data_dir.join("spool").display()
                )
            })?,
        }),
        policy: core.policy.clone(),
        metrics: core.metrics.clone(),
        logins,
        verifier,
        max_line_length: cfg.smtp.max_line_length,
        data_timeout: cfg.smtp.data_timeout.0,
        bare_newline: cfg.smtp.bare_newline,
        long_lines: cfg.smtp.long_lines,
        nul_bytes: cfg.smtp.nul_bytes,
    });
    let admission = Admission::new(AdmissionConfig {
        max_connections: cfg.smtp.max_connections,
        max_per_ip: cfg.smtp.max_connections_per_ip,
        rate_per_ip: Some((
            cfg.smtp.connection_rate_per_ip.count,
            cfg.smtp.connection_rate_per_ip.per,
        )),
        exempt: cfg.relay.networks.clone(),
    });
    let deadlines = Deadlines {
        idle: cfg.smtp.idle_timeout.0,
        handshake: cfg.smtp.handshake_timeout.0,
        session: Some(cfg.smtp.session_timeout.0),
    };
    let overload = reply(
        421,
        crate::mail::Enhanced::new(4, 7, 0),
        &format!(
            "{} Too many connections, try again later",
            cfg.server.hostname
        ),
    );
    let mut bound = Vec::new();
    for (kind, addrs) in [
        (ListenerKind::Relay, &cfg.smtp.relay),
        (ListenerKind::Submission, &cfg.smtp.submission),
        (ListenerKind::Submissions, &cfg.smtp.submissions),
    ] {
        for l in bind_all(addrs).await? {
            tracing::info!(listener = kind.label(), addr = %l.local_addr()?, "SMTP listening");
            core.metrics.smtp_listener(kind.label());
            bound.push((kind, l));
        }
    }
    for (kind, l) in bound {
        let spec = Arc::new(ListenerSpec {
            label: kind.label(),
            tls: (kind == ListenerKind::Submissions).then(|| core.tls.clone()),
            admission: admission.clone(),
            overload: overload.clone(),
            deadlines,
            on_accept: Some(
                core.metrics
                    .smtp_connections
                    .with_label_values(&[kind.label()]),
            ),
        });
        let ctx = smtp.clone();
        tokio::spawn(net::serve(l, spec, server.clone(), move |conn, peer| {
            crate::smtp::server::handle(conn, peer, kind, ctx.clone())
        }));
    }
    Ok(())
}

/// `GET /metrics`, when `[metrics] listen` is set (the port is checked now).
async fn start_metrics(core: &Core, shutdown: watch::Receiver<bool>) -> Result<()> {
    let Some(addr) = core.cfg.metrics.listen else {
        return Ok(());
    };
    // Bound here, before READY=1, and served from this very socket.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    tracing::info!(%addr, token = !core.cfg.metrics.token.is_empty(), "metrics listening");
    let (m, s) = (core.metrics.clone(), core.store.clone());
    let token = core.cfg.metrics.token.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, token, m, s, shutdown).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(())
}

/// The quarantine mailboxes: POP3 and IMAP over the held messages, sharing
/// one set of connection caps.
async fn start_mailbox(core: &Core, server: &net::Server) -> Result<Arc<MailboxCtx>> {
    let cfg = &core.cfg;
    let accounts = Accounts::from_config(cfg)?;
    let mut mailbox = MailboxCtx::new(
        Arc::new(SledQuarantine {
            store: core.store.clone(),
            scheduler: core.scheduler.clone(),
        }),
        Arc::new(accounts),
        core.tls.clone(),
        &cfg.server.hostname,
        core.metrics.mailbox_logins.clone(),
    );
    mailbox.admission = Admission::new(AdmissionConfig {
        max_connections: cfg.quarantine.max_connections,
        max_per_ip: cfg.quarantine.max_connections_per_ip,
        rate_per_ip: None,
        exempt: Vec::new(),
    });
    mailbox.limits.handshake = cfg.smtp.handshake_timeout.0;
    mailbox.limits.login = cfg.quarantine.login_timeout.0;
    mailbox.count_releases(core.metrics.releases.with_label_values(&["imap"]));
    let mailbox = Arc::new(mailbox);
    let q = &cfg.quarantine;
    for (addrs, imap, tls) in [
        (&q.pop3, false, false),
        (&q.pop3s, false, true),
        (&q.imap, true, false),
        (&q.imaps, true, true),
    ] {
        for l in bind_all(addrs).await? {
            let proto = if imap { "IMAP" } else { "POP3" };
            tracing::info!(addr = %l.local_addr()?, tls, "{proto} listening");
            let (ctx, srv) = (mailbox.clone(), server.clone());
            if imap {
                tokio::spawn(mailbox::serve_imap(l, tls, ctx, srv));
            } else {
                tokio::spawn(mailbox::serve_pop3(l, tls, ctx, srv));
            }
        }
    }
    Ok(mailbox)
}

/// `[quarantine] web`: the pages digest links open, over the shared
/// connection layer (its caps and deadlines), over TLS with `web_tls`.
async fn start_web(
    core: &Core,
    server: &net::Server,
    key: Arc<LinkKey>,
    mailbox: Arc<MailboxCtx>,
) -> Result<()> {
    let q = &core.cfg.quarantine;
    if q.web.is_empty() {
        return Ok(());
    }
    let app = crate::web::router(Arc::new(crate::web::WebCtx {
        store: core.store.clone(),
        key,
        mailbox,
        scheduler: core.scheduler.clone(),
        releases: core.metrics.releases.with_label_values(&["web"]),
    }));
    let spec = Arc::new(ListenerSpec {
        label: "web",
        tls: q.web_tls.then(|| core.tls.clone()),
        admission: Admission::new(AdmissionConfig {
            max_connections: 256,
            max_per_ip: 32,
            rate_per_ip: None,
            exempt: Vec::new(),
        }),
        overload:
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        deadlines: Deadlines {
            handshake: core.cfg.smtp.handshake_timeout.0,
            ..Deadlines::default()
        },
        on_accept: None,
    });
    for l in bind_all(&q.web).await? {
        tracing::info!(addr = %l.local_addr()?, tls = q.web_tls, "quarantine web pages listening");
        let app = app.clone();
        tokio::spawn(net::serve(
            l,
            spec.clone(),
            server.clone(),
            move |conn, _peer| crate::web::serve_conn(conn, app.clone()),
        ));
    }
    Ok(())
}

/// After the shutdown signal: sessions get `[server] shutdown_grace`, then
/// the dispatcher stops and delivery attempts in flight finish.
async fn drain(
    cfg: &Config,
    sessions: TaskTracker,
    dispatcher: tokio::task::JoinHandle<()>,
    workers: TaskTracker,
) {
    sessions.close();
    let grace = cfg.server.shutdown_grace.0;
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "sessions still open after the grace period; closing them"
        );
    }
    let _ = dispatcher.await;
    workers.close();
    // Delivery attempts stop at a message boundary: wait for those running.
    if tokio::time::timeout(grace + Duration::from_secs(5), workers.wait())
        .await
        .is_err()
    {
        tracing::warn!("delivery attempts still running; their messages stay queued");
    }
}

/// Reload `users.toml`; a broken file keeps the accounts in use.
fn reload_accounts(cfg: &Config, mailbox: &MailboxCtx) {
    match Accounts::from_config(cfg) {
        Ok(a) => {
            tracing::info!(accounts = a.len(), "accounts loaded");
            mailbox.set_accounts(Arc::new(a));
        }
        Err(e) => {
            tracing::error!(error = %e, "users.toml does not load; keeping the accounts in use")
        }
    }
}
