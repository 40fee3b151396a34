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
use crate::smtp::server::SmtpContext;
use crate::smtp::session::{ListenerKind, SessionConfig, reply};
use crate::store::Store;
use crate::store::wake::Scheduler;
use crate::{admin, tls};

/// Run until SIGTERM or SIGINT.
pub async fn serve(cfg: Config) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Install the signal handlers before anything listens: a SIGHUP or
    // SIGTERM that arrives early must not take the default action (exit).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let cfg = Arc::new(cfg);
    let data_dir = &cfg.server.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data_dir {}", data_dir.display()))?;
    let store = Store::open(&data_dir.join("store"))?;
    let metrics = Metrics::new();
    let policy = Arc::new(Policy::from_config(&cfg).map_err(|problems| {
        anyhow::anyhow!(
            "rules or policies do not load:\n{}",
            problems
                .iter()
                .map(|p| format!("  {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?);
    metrics.register_policy(policy.metrics())?;
    // Rules and policies reload when their files change, watched from the
    // moment they were loaded.
    let watcher = crate::policy::watch(policy.clone(), policy.dirs());
    let acceptor = tls::acceptor(&cfg)?;
    let tls_acceptor = acceptor.clone();
    let (scheduler, sched_rx) = Scheduler::channel();
    let delivery = Delivery::new(
        cfg.clone(),
        store.clone(),
        metrics.clone(),
        scheduler.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let resumed = delivery.resume()?;
    if resumed > 0 {
        tracing::info!(messages = resumed, "resuming the queue");
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let sessions = TaskTracker::new();
    let workers = TaskTracker::new();

    let smtp = Arc::new(SmtpContext {
        cfg: Arc::new(SessionConfig {
            hostname: cfg.server.hostname.clone(),
            relay: cfg.relay.clone(),
            max_message_size: cfg.smtp.max_message_size.0,
            max_recipients: cfg.smtp.max_recipients,
            tls_available: true,
        }),
        tls: Some(acceptor.clone()),
        intake: Arc::new(Intake {
            store: store.clone(),
            scheduler: scheduler.clone(),
            metrics: metrics.clone(),
            hostname: cfg.server.hostname.clone(),
        }),
        policy: policy.clone(),
        metrics: metrics.clone(),
        max_line_length: cfg.smtp.max_line_length,
        data_timeout: cfg.smtp.data_timeout.0,
        bare_newline: cfg.smtp.bare_newline,
    });
    let server = net::Server {
        shutdown: shutdown_rx.clone(),
        tracker: sessions.clone(),
    };
    // One set of caps for all SMTP listeners, so spreading over ports gains nothing.
    let smtp_admission = Admission::new(AdmissionConfig {
        max_connections: cfg.smtp.max_connections,
        max_per_ip: cfg.smtp.max_connections_per_ip,
        rate_per_ip: Some((
            cfg.smtp.connection_rate_per_ip.count,
            cfg.smtp.connection_rate_per_ip.per,
        )),
        exempt: cfg.relay.networks.clone(),
    });
    let smtp_deadlines = Deadlines {
        idle: cfg.smtp.idle_timeout.0,
        handshake: cfg.smtp.handshake_timeout.0,
        session: Some(cfg.smtp.session_timeout.0),
    };

    // Bind everything first so a port conflict fails the start, not later.
    let listeners = [
        (ListenerKind::Relay, &cfg.smtp.relay),
        (ListenerKind::Submission, &cfg.smtp.submission),
        (ListenerKind::Submissions, &cfg.smtp.submissions),
    ];
    let mut bound = Vec::new();
    for (kind, addrs) in listeners {
        for l in bind_all(addrs).await? {
            tracing::info!(listener = kind.label(), addr = %l.local_addr()?, "SMTP listening");
            bound.push((kind, l));
        }
    }
    for (kind, l) in bound {
        let spec = Arc::new(ListenerSpec {
            label: kind.label(),
            tls: (kind == ListenerKind::Submissions).then(|| acceptor.clone()),
            admission: smtp_admission.clone(),
            overload: reply(
                421,
                crate::mail::Enhanced::new(4, 7, 0),
                &format!(
                    "{} Too many connections, try again later",
                    cfg.server.hostname
                ),
            ),
            deadlines: smtp_deadlines,
            on_accept: Some(metrics.smtp_connections.with_label_values(&[kind.label()])),
        });
        let ctx = smtp.clone();
        tokio::spawn(net::serve(l, spec, server.clone(), move |conn, peer| {
            crate::smtp::server::handle(conn, peer, kind, ctx.clone())
        }));
    }
    if let Some(addr) = cfg.metrics.listen {
        let m = metrics.clone();
        let s = store.clone();
        let rx = shutdown_rx.clone();
        let listener_check = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics"))?;
        drop(listener_check);
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m, s, rx).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    // The quarantine mailboxes: POP3 and IMAP over the held messages.
    let accounts = Accounts::from_config(&cfg)?;
    let mut mailbox = MailboxCtx::new(
        Arc::new(SledQuarantine {
            store: store.clone(),
            scheduler: scheduler.clone(),
        }),
        Arc::new(accounts),
        tls_acceptor.clone(),
        &cfg.server.hostname,
        metrics.mailbox_logins.clone(),
    );
    mailbox.admission = Admission::new(AdmissionConfig {
        max_connections: cfg.quarantine.max_connections,
        max_per_ip: cfg.quarantine.max_connections_per_ip,
        rate_per_ip: None,
        exempt: Vec::new(),
    });
    mailbox.limits.handshake = cfg.smtp.handshake_timeout.0;
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
    let retention = cfg.quarantine.retention.0;
    let purge = tokio::spawn(crate::quarantine::purge_loop(
        store.clone(),
        retention,
        (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(600)),
    ));
    let (watch_cfg, watch_mailbox) = (cfg.clone(), mailbox.clone());
    let accounts_watch = crate::watch::spawn(
        vec![Accounts::file(&cfg)],
        Duration::from_secs(1),
        move || reload_accounts(&watch_cfg, &watch_mailbox),
    );

    let control = admin::socket_path(data_dir);
    tokio::spawn(admin::serve_control(
        control,
        store.clone(),
        scheduler.clone(),
        server.clone(),
    ));
    let dispatcher = tokio::spawn(delivery::run(
        delivery.clone(),
        sched_rx,
        shutdown_rx.clone(),
        workers.clone(),
    ));
    // Rules and policies also reload on SIGHUP (below).
    let housekeeping = crate::policy::spawn_housekeeping(policy.clone(), Duration::from_secs(60));
    let hup_policy = policy.clone();
    let (hup_cfg, hup_mailbox) = (cfg.clone(), mailbox.clone());
    let hup = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading rules, policies and accounts");
            // Errors are logged and counted by reload itself.
            let _ = hup_policy.reload();
            reload_accounts(&hup_cfg, &hup_mailbox);
        }
    });
    tracing::info!(hostname = %cfg.server.hostname, "Postern is running");
    println!(
        "postern: serving (hostname {}, data in {})",
        cfg.server.hostname,
        data_dir.display()
    );

    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    watcher.abort();
    purge.abort();
    accounts_watch.abort();
    housekeeping.abort();
    hup.abort();
    tracing::info!("shutting down: no new connections; finishing sessions in flight");
    let _ = shutdown_tx.send(true);
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
    store.flush()?;
    tracing::info!("stopped");
    Ok(())
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
