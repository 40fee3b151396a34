//! Cluster mode (issue 14 item 1): three nodes on 127.0.0.2-4 share their
//! rate limits in one real `redis-server` on a loopback port. Skips, saying
//! why, when `redis-server` is not on PATH (.ci/run installs it).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Client, Gateway, Opts, free_port};

/// A `redis-server` of our own (no persistence), stopped by its PID on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// None (and a printed reason) when there is no `redis-server`.
    fn start() -> Option<Redis> {
        let on_path = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !on_path {
            eprintln!("skipped: redis-server is not on PATH (apt-get install redis-server)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Redis {
            child,
            port,
            _dir: dir,
        };
        let start = Instant::now();
        while r.conn().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        let c = redis::Client::open(self.url())?;
        let mut con = c.get_connection_with_timeout(Duration::from_secs(1))?;
        redis::cmd("PING").query::<String>(&mut con)?;
        Ok(con)
    }

    /// Every key and its PTTL (-1: no expiry, -2: gone).
    fn keys_and_ttls(&self) -> Vec<(String, i64)> {
        let mut con = self.conn().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
        keys.into_iter()
            .map(|k| {
                let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut con).unwrap();
                (k, ttl)
            })
            .collect()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} redis-server");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A stopped process would not act on SIGKILL's exit until continued.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three nodes (127.0.0.2, .3, .4) with their own data dirs, one Redis.
async fn cluster(redis: &Redis, on_error: &str, ratelimits: &str) -> Vec<Gateway> {
    let mut nodes = Vec::new();
    for n in 2..=4 {
        let gw = Gateway::start(Opts {
            bind: format!("127.0.0.{n}"),
            ratelimits: ratelimits.into(),
            extra: format!(
                "\n[cluster]\nnode = \"mx{n}\"\nredis = \"{}\"\non_backend_error = \"{on_error}\"\nnodes = 3\n",
                redis.url()
            ),
            ..Opts::default()
        })
        .await;
        nodes.push(gw);
    }
    for gw in &nodes {
        assert!(
            gauge_is(gw, 1).await,
            "backend_up never became 1; log:\n{}",
            gw.log_text()
        );
    }
    nodes
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (up to 10 s) for `postern_ratelimit_backend_up` to read `want`.
async fn gauge_is(gw: &Gateway, want: i64) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let text = gw.metrics_text().await;
        if metric(&text, "postern_ratelimit_backend_up") == Some(want as f64) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// One message from `from` through `gw`: the MAIL reply, and the reply
/// after the final dot when MAIL was accepted.
async fn send(gw: &Gateway, from: &str) -> (String, Option<String>) {
    let mut c = Client::connect_to(&gw.ip, gw.smtp).await;
    c.cmd("EHLO client.test").await;
    let mail = c.cmd(&format!("MAIL FROM:<{from}>")).await;
    if !mail.starts_with("250") {
        c.cmd("QUIT").await;
        return (mail, None);
    }
    let r = c.cmd("RCPT TO:<rcpt@local.test>").await;
    assert!(r.starts_with("250"), "RCPT: {r}");
    let r = c.cmd("DATA").await;
    assert!(r.starts_with("354"), "DATA: {r}");
    c.send(b"Subject: cluster\r\n\r\nhello\r\n.\r\n").await;
    let end = c.reply().await;
    c.cmd("QUIT").await;
    (mail, Some(end))
}

const TEN_A_MINUTE: &str =
    "[[limit]]\nname = \"per-sender\"\nkey = \"sender\"\nrate = \"10/1m\"\nburst = 10\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_a_minute_is_ten_across_three_nodes_and_every_key_expires() {
    let Some(redis) = Redis::start() else { return };
    let nodes = Arc::new(cluster(&redis, "local", TEN_A_MINUTE).await);
    // 30 messages of one sender, spread over the nodes, 20 clients at once.
    let gate = Arc::new(tokio::sync::Semaphore::new(20));
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (nodes, gate) = (nodes.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            send(&nodes[i % 3], "Flood+tag@Sender.example").await
        }));
    }
    let (mut accepted, mut limited) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (_, Some(end)) => {
                assert!(end.starts_with("250"), "end of DATA: {end}");
                accepted += 1;
            }
            (mail, None) => {
                assert!(mail.starts_with("450 4.7.1"), "MAIL: {mail}");
                limited += 1;
            }
        }
    }
    assert_eq!((accepted, limited), (10, 20));
    // Every node refused some (or accepted all) of its share: counts are shared.
    let keys = redis.keys_and_ttls();
    assert!(!keys.is_empty(), "no key written");
    for (k, ttl) in &keys {
        assert!(k.starts_with("postern:rl:"), "{k}");
        assert!(*ttl > 0 && *ttl <= 60_000, "{k} has PTTL {ttl}");
    }
    assert!(
        keys.iter()
            .any(|(k, _)| k.ends_with(":flood@sender.example")),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_on_one_limit_spends_nothing_on_the_others() {
    let Some(redis) = Redis::start() else { return };
    // The client IP (127.0.0.1 for every node) may send 3; each sender 1.
    let limits = "[[limit]]\nname = \"per-ip\"\nkey = \"client_ip\"\nrate = \"3/1m\"\n\n\
                  [[limit]]\nname = \"per-sender\"\nkey = \"sender\"\nrate = \"1/1m\"\n";
    let nodes = cluster(&redis, "local", limits).await;
    let (mail, end) = send(&nodes[0], "a@x.example").await;
    assert!(end.is_some_and(|e| e.starts_with("250")), "{mail}");
    // Refused by per-sender, on every node: per-ip must not pay for these.
    for gw in &nodes {
        let (mail, end) = send(gw, "a@x.example").await;
        assert!(end.is_none() && mail.contains("per-sender"), "{mail}");
    }
    for (gw, from) in nodes.iter().zip(["b@x.example", "c@x.example"]) {
        let (mail, end) = send(gw, from).await;
        assert!(end.is_some_and(|e| e.starts_with("250")), "{from}: {mail}");
    }
    let (mail, end) = send(&nodes[2], "d@x.example").await;
    assert!(end.is_none() && mail.contains("per-ip"), "{mail}");
}

/// Redis stopped (SIGSTOP) mid-run, then continued: what each node answers.
async fn stopped_backend(on_error: &str) {
    let Some(redis) = Redis::start() else { return };
    let limits = "[[limit]]\nname = \"per-sender\"\nkey = \"sender\"\nrate = \"30/1m\"\n";
    let nodes = cluster(&redis, on_error, limits).await;
    for gw in &nodes {
        let (mail, end) = send(gw, "before@x.example").await;
        assert!(end.is_some_and(|e| e.starts_with("250")), "{mail}");
    }
    redis.signal("-STOP");
    let (mut accepted, mut answers) = (0, Vec::new());
    // 12 messages on one node: its own share of 30/1m is 10.
    for _ in 0..12 {
        let asked = Instant::now();
        let mut c = Client::connect_to(&nodes[0].ip, nodes[0].smtp).await;
        c.cmd("EHLO client.test").await;
        let mail = c.cmd("MAIL FROM:<during@x.example>").await;
        let took = asked.elapsed();
        // The call's deadline is 250 ms: far inside this, however loaded.
        assert!(took < Duration::from_millis(1500), "MAIL took {took:?}");
        if mail.starts_with("250") {
            accepted += 1;
        }
        answers.push(mail);
        c.cmd("QUIT").await;
    }
    for gw in &nodes {
        assert!(
            gauge_is(gw, 0).await,
            "backend_up stayed 1 while Redis was stopped"
        );
    }
    let text = nodes[0].metrics_text().await;
    let errors = metric(&text, "postern_ratelimit_backend_errors_total").unwrap_or(0.0);
    assert!(errors >= 12.0, "backend errors: {errors}");
    match on_error {
        "local" => {
            assert_eq!(accepted, 10, "{answers:?}");
            assert!(answers[10].starts_with("450 4.7.1"), "{answers:?}");
        }
        _ => {
            assert_eq!(accepted, 0, "{answers:?}");
            assert!(
                answers.iter().all(|a| a.starts_with("451 4.4.3")),
                "{answers:?}"
            );
        }
    }
    redis.signal("-CONT");
    for gw in &nodes {
        assert!(
            gauge_is(gw, 1).await,
            "backend_up did not recover after SIGCONT"
        );
    }
    // The calls that sat in Redis's queue while it was stopped reached it
    // after their deadline: they spent nothing.
    let during: Vec<_> = redis
        .keys_and_ttls()
        .into_iter()
        .filter(|(k, _)| k.contains("during@"))
        .collect();
    assert!(during.is_empty(), "{during:?}");
    let (mail, end) = send(&nodes[1], "after@x.example").await;
    assert!(end.is_some_and(|e| e.starts_with("250")), "{mail}");
    assert!(
        redis
            .keys_and_ttls()
            .iter()
            .any(|(k, t)| k.ends_with(":after@x.example") && *t > 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_falls_back_to_local_shares_and_recovers() {
    stopped_backend("local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_answers_451_under_tempfail_and_recovers() {
    stopped_backend("tempfail").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_says_whether_redis_answers_and_refuses_postgres() {
    let Some(redis) = Redis::start() else { return };
    let nodes = cluster(&redis, "tempfail", TEN_A_MINUTE).await;
    let (ok, out, err) = nodes[0].admin(&["check"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("[cluster] redis") && out.contains("answers"),
        "{out}"
    );
    redis.signal("-STOP");
    let (ok, out, err) = nodes[0].admin(&["check"]);
    redis.signal("-CONT");
    assert!(!ok, "{out}");
    assert!(
        err.contains("[cluster] redis") && (err.contains("no answer") || err.contains("timed out")),
        "{err}"
    );
    // The shared quarantine is not built yet: said at its line.
    let path = nodes[1].config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "nodes = 3\n",
            "nodes = 3\npostgres = \"postgres://postern@127.0.0.1/postern\"\n",
        ),
    )
    .unwrap();
    let (ok, _, err) = nodes[1].admin(&["check"]);
    assert!(!ok);
    assert!(
        err.contains("[cluster] postgres") && err.contains("not implemented"),
        "{err}"
    );
}
