//! Out of file descriptors: under `ulimit -n 256` with more clients than
//! descriptors, the gateway says so at start, accept backs off instead of
//! spinning, waiting clients are greeted once others close, and rule
//! reloads and mail work again afterwards.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use crate::common::*;

/// The first line within `wait`, or None.
async fn greeting(s: &mut BufReader<TcpStream>, wait: Duration) -> Option<String> {
    let mut line = String::new();
    match tokio::time::timeout(wait, s.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => Some(line.trim_end().to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_descriptors_waiting_clients_are_greeted_once_others_close() {
    let mut gw = Gateway::start(Opts {
        nofile: Some(256),
        max_connections: 1000,
        smtp_extra: "max_connections_per_ip = 1000\nconnection_rate_per_ip = \"100000/1m\"".into(),
        quarantine_extra: "max_connections = 10".into(),
        ..Opts::default()
    })
    .await;
    let log = gw.log_plain();
    assert!(log.contains("file descriptor limit"), "{log}");
    assert!(
        log.contains("file descriptors, but the limit is 256"),
        "the caps exceed the limit; the start must say so: {log}"
    );

    const N: usize = 400;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(BufReader::new(
            TcpStream::connect(("127.0.0.1", gw.smtp)).await.unwrap(),
        ));
    }
    let waits = clients.into_iter().map(|mut c| async move {
        let g = greeting(&mut c, Duration::from_secs(3)).await;
        (c, g)
    });
    let read = futures::future::join_all(waits).await;
    let (greeted, waiting): (Vec<_>, Vec<_>) = read.into_iter().partition(|(_, g)| g.is_some());
    assert!(
        !greeted.is_empty() && !waiting.is_empty(),
        "with 256 descriptors some of {N} clients wait: {} greeted",
        greeted.len()
    );
    for (_, g) in &greeted {
        assert!(g.as_deref().is_some_and(|l| l.starts_with("220")), "{g:?}");
    }
    let plain = gw.log_plain();
    let warnings = plain.matches("accept failed").count();
    assert!(plain.contains("Too many open files"), "no EMFILE seen");
    assert!(
        warnings < 100,
        "accept must back off, not fill the log: {warnings} warnings"
    );

    // The greeted leave; the waiting ones are greeted now.
    drop(greeted);
    let waits = waiting
        .into_iter()
        .map(|(mut c, _)| async move { greeting(&mut c, Duration::from_secs(20)).await });
    let late = futures::future::join_all(waits).await;
    let unanswered = late
        .iter()
        .filter(|g| !g.as_deref().is_some_and(|l| l.starts_with("220")))
        .count();
    assert_eq!(unanswered, 0, "clients never greeted: {late:?}");
    drop(late);

    // Reloads and mail work again.
    std::fs::write(
        gw.dir.path().join("rules/20-new.rhai"),
        "fn data(m) { if m.subject == \"nope\" { return reject(\"no\"); } }\n",
    )
    .unwrap();
    let reloaded = eventually(Duration::from_secs(15), || {
        gw.log_plain().contains("rules and policies reloaded")
    })
    .await;
    assert!(reloaded, "no reload: {}", gw.log_plain());
    let mut c = Client::connect(gw.smtp).await;
    assert!(c.cmd("EHLO after.test").await.starts_with("250"));
    let r = c
        .mail(
            "a@remote.test",
            &["u@local.test"],
            b"Subject: after\r\n\r\nhi",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    gw.term();
}
