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
    // Without RCPT-time verification, which would answer 451 while the backend is down.
    let gw_opts = Opts {
        relay_extra: "verify_recipients = \"off\"".into(),
        ..Opts::sink(sink_port)
    };
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
                let body = format!(
                    "Subject: {tag}\r\n\r\n{}",
                    "payload payload\r\n".repeat(100)
                );
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

/// The data dir on a small tmpfs, filled up: mail is refused with `452 4.3.1`
/// before sled could meet ENOSPC (after which it stops answering until a
/// restart), nothing acknowledged is lost, and mail is taken again as soon as
/// space returns, without a restart. Needs root (mount); skips otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn disk_full_refuses_with_452_and_recovers_without_restart() {
    let sink = Sink::start(false).await;
    let mut opts = Opts::sink(sink.port);
    opts.server_extra = "min_free_space = \"16MB\"".into();
    opts.max_message_size = "1MB".into();
    let mut gw = Gateway::start(opts).await;
    gw.term();
    let data = gw.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&data)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIP disk_full: cannot mount a small tmpfs here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP disk_full: no mount command: {e}");
            return;
        }
    }
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _umount = Umount(data.clone());
    gw.spawn().await;
    // Leave 30 MB: room for about (30 - 16) / 0.2 messages of 100 KB.
    let free = fs_free(&data);
    let filler = data.join("filler");
    std::fs::write(&filler, vec![0u8; (free - 30 * 1024 * 1024) as usize]).unwrap();
    let mut acked = HashSet::new();
    let mut refusal = None;
    let mut cl = Client::connect(gw.smtp).await;
    cl.cmd("EHLO full.test").await;
    for i in 0..300 {
        let tag = format!("full-{i}");
        let body = format!(
            "Subject: {tag}\r\n\r\n{}",
            "0123456789abcdef\r\n".repeat(5600)
        );
        match cl
            .try_mail("load@local.test", "bob@local.test", body.as_bytes())
            .await
        {
            Ok(r) if r.starts_with("250") => {
                acked.insert(tag);
            }
            Ok(r) | Err(r) => {
                refusal = Some(r);
                break;
            }
        }
    }
    let refusal = refusal.expect("the disk never filled up");
    assert!(refusal.starts_with("452 4.3.1"), "{refusal}");
    assert!(
        !acked.is_empty(),
        "nothing was taken before the disk filled"
    );
    // Space returns: the very next message is taken, no restart.
    std::fs::remove_file(&filler).unwrap();
    let r = cl
        .try_mail(
            "load@local.test",
            "bob@local.test",
            b"Subject: after\r\n\r\nspace again\r\n",
        )
        .await;
    assert!(matches!(&r, Ok(x) if x.starts_with("250")), "{r:?}");
    acked.insert("after".to_string());
    let all = eventually(Duration::from_secs(60), || {
        let got: HashSet<String> = sink
            .messages()
            .iter()
            .filter_map(|m| subject_of(&m.body))
            .collect();
        acked.is_subset(&got)
    })
    .await;
    assert!(all, "an acknowledged message was not delivered");
    gw.term();
}

fn subject_of(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .map(|s| s.trim().to_string())
}

fn fs_free(p: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}
