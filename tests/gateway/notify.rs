//! sd_notify: the real binary, started with `NOTIFY_SOCKET` pointing at a
//! datagram socket this test reads, says READY=1 only once it answers on
//! every listener, RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a
//! SIGHUP, and STOPPING=1 when SIGTERM starts the drain.

use std::net::TcpStream as StdTcp;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::common::*;

/// The gateway's config directory, restarted with extra environment (the
/// shared helper starts it without): stderr appends to the same log.
fn spawn_with_env(gw: &mut Gateway, env: &[(&str, &str)]) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&gw.log)
        .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(gw.config_path())
        .env("POSTERN_LOG", "info,postern=debug")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    gw.child = Some(child);
}

fn signal(gw: &Gateway, sig: &str) {
    let pid = gw.child.as_ref().expect("running").id().to_string();
    let st = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// The next datagram, as text.
fn next(sock: &UnixDatagram, gw: &Gateway, waiting_for: &str) -> String {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no sd_notify datagram ({e}) while waiting for {waiting_for}; log:\n{}",
            gw.log_text()
        ),
    }
}

fn monotonic_now() -> i128 {
    match NotifyState::monotonic_usec_now().unwrap() {
        NotifyState::MonotonicUsec(us) => us,
        other => panic!("not a timestamp: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_reloading_and_stopping_reach_the_notify_socket() {
    // Start once to lay out the directory, then again under "systemd".
    let mut gw = Gateway::start(Opts::default()).await;
    assert!(gw.term().success());
    let sockdir = tempfile::tempdir().unwrap();
    let path = sockdir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    spawn_with_env(&mut gw, &[("NOTIFY_SOCKET", path.to_str().unwrap())]);

    // The first word is READY=1, and at that instant every listener answers.
    let ready = next(&sock, &gw, "READY=1 at start");
    assert_eq!(ready, "READY=1\n");
    for (name, port) in [
        ("relay", gw.smtp),
        ("submission", gw.submission),
        ("submissions", gw.submissions),
        ("pop3", gw.pop3),
        ("pop3s", gw.pop3s),
        ("imap", gw.imap),
        ("imaps", gw.imaps),
        ("metrics", gw.metrics),
    ] {
        assert!(
            StdTcp::connect(("127.0.0.1", port)).is_ok(),
            "READY=1 came before the {name} listener (port {port}) was bound"
        );
    }
    let mut c = Client::connect(gw.smtp).await;
    assert!(c.cmd("EHLO notify.test").await.starts_with("250"));

    // SIGHUP: RELOADING=1 with a CLOCK_MONOTONIC stamp taken during it, then READY=1.
    let before = monotonic_now();
    signal(&gw, "-HUP");
    let reloading = next(&sock, &gw, "RELOADING=1");
    let after = monotonic_now();
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "got {reloading:?}");
    let stamp: i128 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        before <= stamp && stamp <= after,
        "MONOTONIC_USEC={stamp} not within [{before}, {after}]"
    );
    assert_eq!(next(&sock, &gw, "READY=1 after the reload"), "READY=1\n");
    assert!(gw.log_text().contains("SIGHUP: reloading"));
    assert!(c.cmd("NOOP").await.starts_with("250"));

    // SIGTERM: STOPPING=1 as the drain starts, then a clean exit.
    signal(&gw, "-TERM");
    assert_eq!(next(&sock, &gw, "STOPPING=1"), "STOPPING=1\n");
    drop(c);
    let status = gw.term_wait();
    assert!(status.success(), "exit {status}; log:\n{}", gw.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_notify_socket_does_not_stop_the_gateway() {
    let mut gw = Gateway::start(Opts::default()).await;
    assert!(gw.term().success());
    let gone = gw.dir.path().join("no-such-manager.sock");
    spawn_with_env(&mut gw, &[("NOTIFY_SOCKET", gone.to_str().unwrap())]);
    assert!(
        eventually(Duration::from_secs(20), || StdTcp::connect((
            "127.0.0.1",
            gw.smtp
        ))
        .is_ok())
        .await,
        "did not serve; log:\n{}",
        gw.log_text()
    );
    signal(&gw, "-HUP");
    let mut c = Client::connect(gw.smtp).await;
    assert!(c.cmd("EHLO notify.test").await.starts_with("250"));
    drop(c);
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log_text()
            .contains("sd_notify failed"))
        .await,
        "the failed send was not logged at debug; log:\n{}",
        gw.log_text()
    );
    let status = gw.term();
    assert!(status.success(), "exit {status}; log:\n{}", gw.log_text());
    assert!(!gw.log_text().contains("panicked"));
}
