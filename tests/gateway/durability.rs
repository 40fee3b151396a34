//! "250" means on disk: kill -9 while clients send, restart, and every
//! acknowledged message is delivered.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_acknowledged_message() {
    // The backend is down at first, so acknowledged mail piles up in the queue.
    let sink_port = free_port();
    let gw_opts = Opts::sink(sink_port);
    let mut gw = Gateway::start(gw_opts).await;
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..4 {
        let acked = acked.clone();
        let port = gw.smtp;
        clients.push(tokio::spawn(async move {
            let mut cl = Client::connect(port).await;
            cl.cmd("EHLO load.test").await;
            for i in 0.. {
                let tag = format!("c{c}-{i}");
                let body = format!("Subject: {tag}\r\n\r\n{}", "payload payload\r\n".repeat(100));
                match cl
                    .try_mail("load@local.test", "bob@local.test", body.as_bytes())
                    .await
                {
                    Ok(r) if r.starts_with("250") => {
                        acked.lock().unwrap().insert(tag);
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.kill9();
    for c in clients {
        let _ = c.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "too few messages sent before the kill: {}",
        acked.len()
    );

    // Restart on the same store with the backend up.
    let sink = Sink::start_on(sink_port, false).await;
    gw.spawn().await;
    let ok = eventually(Duration::from_secs(60), || {
        let got: HashSet<String> = sink
            .messages()
            .iter()
            .filter_map(|g| {
                String::from_utf8_lossy(&g.body)
                    .lines()
                    .find(|l| l.starts_with("Subject: "))
                    .map(|l| l[9..].to_string())
            })
            .collect();
        acked.is_subset(&got)
    })
    .await;
    let got = sink.count();
    assert!(
        ok,
        "{} acknowledged, {got} delivered after restart; log:\n{}",
        acked.len(),
        gw.log_text()
    );
}
