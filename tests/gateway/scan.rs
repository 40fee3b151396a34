//! `[scan]` against the real scanners: Debian's clamd with a signature
//! database written here (no freshclam, no download) and Debian's rspamd
//! with a minimal local config, both on loopback, started and stopped by
//! PID. Skipped, with the reason printed, when the binaries are absent
//! (`.ci/run` installs clamav-daemon and rspamd). The cases with a scanner
//! that is down need neither and always run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// What the test signature matches: a line in an attachment.
const PAYLOAD: &str = "POSTERN-SCAN-TEST-PAYLOAD-7f3a";
/// clamd appends `.UNOFFICIAL` to signatures of a local database.
const SIGNATURE: &str = "Postern.Test.Sig.UNOFFICIAL";

/// `name` in PATH or the sbin directories (clamd lives in /usr/sbin).
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A scanner process this test started; stopped by its PID when dropped
/// (SIGTERM, so rspamd's main process takes its workers down with it).
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, dir: tempfile::TempDir) -> Daemon {
        let log = dir.path().join(format!("{name}.out"));
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        Daemon {
            name,
            child,
            log,
            dir,
        }
    }

    fn output(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log).unwrap_or_default();
        for f in ["clamd.log", "rspamd.log"] {
            s.push_str(&std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default());
        }
        s
    }

    /// Waits until `ready` says so; panics with the daemon's output if it exits first.
    async fn wait_ready(&mut self, mut ready: impl AsyncFnMut() -> bool) {
        let start = Instant::now();
        while !ready().await {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.output());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{} did not come up:\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// clamd with one signature (an `.ndb` body pattern matching [`PAYLOAD`]),
/// listening on a loopback TCP port and a Unix socket in its temp dir.
struct Clamd {
    daemon: Daemon,
    port: u16,
    socket: PathBuf,
}

impl Clamd {
    async fn start(stream_max: &str) -> Option<Clamd> {
        let Some(bin) = find("clamd") else {
            eprintln!("SKIP: clamd not installed (apt-get install clamav-daemon)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("db")).unwrap();
        let hex: String = PAYLOAD.bytes().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            d.join("db/postern-test.ndb"),
            format!("Postern.Test.Sig:0:*:{hex}\n"),
        )
        .unwrap();
        let port = free_port();
        let socket = d.join("clamd.sock");
        let conf = d.join("clamd.conf");
        std::fs::write(
            &conf,
            format!(
                "Foreground yes\nLogFile {log}\nLocalSocket {sock}\nTCPSocket {port}\nTCPAddr 127.0.0.1\n\
                 DatabaseDirectory {db}\nStreamMaxLength {stream_max}\nSelfCheck 0\n",
                log = d.join("clamd.log").display(),
                sock = socket.display(),
                db = d.join("db").display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let mut daemon = Daemon::spawn("clamd", cmd, dir);
        let sock = socket.clone();
        daemon
            .wait_ready(async || {
                sock.exists()
                    && tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
            })
            .await;
        Some(Clamd {
            daemon,
            port,
            socket,
        })
    }
}

/// rspamd's normal worker alone on a loopback port, its DNS on the test's
/// stub (every name NXDOMAIN, nothing leaves the machine), the fuzzy
/// servers off, a three-entry TLD list (the full one takes half a minute
/// to compile), and two test symbols on the Subject: POSTERN_TEST_TAG
/// (7 points: "add header") and POSTERN_TEST_REJECT (20: "reject").
struct Rspamd {
    daemon: Daemon,
    port: u16,
}

impl Rspamd {
    async fn start() -> Option<Rspamd> {
        let Some(bin) = find("rspamd") else {
            eprintln!("SKIP: rspamd not installed (apt-get install rspamd)");
            return None;
        };
        let dns = crate::dns::start_dns(&[]).await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["db", "run", "log", "local/override.d", "local/local.d"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let port = free_port();
        std::fs::write(
            d.join("rspamd.conf"),
            format!(
                r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    url_tld = "$LOCAL_CONFDIR/tld.dat";
    disable_hyperscan = true;
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["{dns}"]; timeout = 1s; retransmits = 1; }}
}}
logging {{ type = "file"; filename = "$LOGDIR/rspamd.log"; level = "warning"; }}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
"#
            ),
        )
        .unwrap();
        std::fs::write(d.join("local/tld.dat"), "test\ncom\norg\n").unwrap();
        std::fs::write(
            d.join("local/override.d/fuzzy_check.conf"),
            "enabled = false;\n",
        )
        .unwrap();
        std::fs::write(
            d.join("local/local.d/multimap.conf"),
            r#"POSTERN_TEST_REJECT { type = "header"; header = "Subject"; regexp = true; map = "$LOCAL_CONFDIR/reject.map"; score = 20.0; }
POSTERN_TEST_TAG { type = "header"; header = "Subject"; regexp = true; map = "$LOCAL_CONFDIR/tag.map"; score = 7.0; }
"#,
        )
        .unwrap();
        std::fs::write(d.join("local/reject.map"), "/REJECTME/\n").unwrap();
        std::fs::write(d.join("local/tag.map"), "/TAGME/\n").unwrap();
        let var = |k: &str, sub: &str| format!("--var={k}={}", d.join(sub).display());
        let mut cmd = Command::new(bin);
        cmd.args(["-f", "-i", "-c"])
            .arg(d.join("rspamd.conf"))
            .arg(var("DBDIR", "db"))
            .arg(var("RUNDIR", "run"))
            .arg(var("LOGDIR", "log"))
            .arg(var("LOCAL_CONFDIR", "local"));
        if is_root() {
            cmd.args(["-u", "root", "-g", "root"]);
        }
        let mut daemon = Daemon::spawn("rspamd", cmd, dir);
        daemon.wait_ready(async || ping(port).await).await;
        Some(Rspamd { daemon, port })
    }
}

/// rspamd answers `GET /ping` with `pong`.
async fn ping(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"GET /ping HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    matches!(read, Ok(Ok(_))) && out.contains("pong")
}

/// The shipped scripts (see `common::shipped_rules`), this file's own among them.
fn shipped_rules() -> Vec<(String, String)> {
    let out = crate::common::shipped_rules();
    assert!(out.iter().any(|(n, _)| n == "40-scan.rhai"), "{out:?}");
    out
}

fn plain(subject: &str) -> String {
    format!(
        "From: a@far.test\r\nTo: b@local.test\r\nSubject: {subject}\r\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{}@far.test>\r\n\r\nHello there.\r\n",
        subject.replace(' ', "-")
    )
}

/// A message whose attachment (base64, an innocuous name) carries [`PAYLOAD`].
fn infected() -> String {
    let att = base64::engine::general_purpose::STANDARD.encode(format!("{PAYLOAD}\n"));
    format!(
        "From: a@far.test\r\nTo: b@local.test\r\nSubject: the report\r\nMessage-ID: <inf@far.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n\
         --BB\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n\
         --BB\r\nContent-Type: application/octet-stream; name=report.bin\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=report.bin\r\n\r\n\
         {att}\r\n--BB--\r\n"
    )
}

/// The value of the `postern_scan_results_total` series with these labels.
fn scan_count(metrics: &str, scanner: &str, result: &str) -> f64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("postern_scan_results_total{")
                && l.contains(&format!("scanner=\"{scanner}\""))
                && l.contains(&format!("result=\"{result}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {scanner}/{result} series:\n{metrics}"))
}

fn scan_table(keys: &str) -> String {
    format!("\n[scan]\n{keys}\n")
}

/// The header block of a stored message.
fn head(msg: &[u8]) -> String {
    let s = String::from_utf8_lossy(msg);
    s.split("\r\n\r\n").next().unwrap_or_default().to_string()
}

async fn delivered(gw: &Gateway, rcpt: &str, n: usize) -> Vec<Vec<u8>> {
    assert!(
        eventually(Duration::from_secs(20), || gw.maildir_files(rcpt).len()
            >= n)
        .await,
        "not delivered; log:\n{}",
        gw.log_plain()
    );
    gw.maildir_files(rcpt)
}

#[tokio::test]
async fn clamd_quarantines_a_virus_and_marks_clean_mail() {
    let Some(clamd) = Clamd::start("10M").await else {
        return;
    };
    let gw = Gateway::start(Opts {
        rules: shipped_rules(),
        extra: scan_table(&format!(
            "clamd = \"tcp:127.0.0.1:{}\"\ntimeout = \"30s\"",
            clamd.port
        )),
        ..Opts::default()
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO far.test").await;
    let r = c
        .mail("a@far.test", &["b@local.test"], infected().as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    let r = c
        .mail("a@far.test", &["b@local.test"], plain("lunch").as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;

    // The infected one is held by the shipped rule, the trace shows clamd's word.
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    let id = list
        .lines()
        .find(|l| l.contains(&format!("virus: {SIGNATURE}")))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("not held:\n{list}\nclamd:\n{}", clamd.daemon.output()))
        .to_string();
    let (ok, show, err) = gw.admin(&["quarantine", "show", &id]);
    assert!(ok, "{err}");
    assert!(
        show.contains("decision: quarantine by 40-scan.rhai"),
        "{show}"
    );
    assert!(show.contains(&format!("virus={SIGNATURE}")), "{show}");
    assert!(
        show.contains(&format!("X-Virus-Status: Infected ({SIGNATURE})")),
        "{show}"
    );

    // The clean one is delivered with the scanner's headers, once each.
    let got = delivered(&gw, "b@local.test", 1).await;
    assert_eq!(got.len(), 1);
    let h = head(&got[0]);
    assert_eq!(
        h.matches("X-Virus-Scanned: clamav at gw.test").count(),
        1,
        "{h}"
    );
    assert_eq!(h.matches("X-Virus-Status: Clean").count(), 1, "{h}");
    assert!(!h.contains("X-Spam"), "{h}");

    let m = gw.metrics_text().await;
    assert_eq!(scan_count(&m, "clamd", "infected"), 1.0);
    assert_eq!(scan_count(&m, "clamd", "clean"), 1.0);
    assert_eq!(scan_count(&m, "clamd", "error"), 0.0);
    // Rspamd is not configured: its series stay at 0.
    assert_eq!(scan_count(&m, "rspamd", "clean"), 0.0);
}

#[tokio::test]
async fn clamd_over_a_unix_socket_and_its_stream_limit() {
    let Some(clamd) = Clamd::start("64K").await else {
        return;
    };
    let gw = Gateway::start(Opts {
        rules: shipped_rules(),
        extra: scan_table(&format!(
            "clamd = \"unix:{}\"\non_error = \"tempfail\"",
            clamd.socket.display()
        )),
        ..Opts::default()
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO far.test").await;
    let r = c
        .mail("a@far.test", &["v@local.test"], infected().as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    // Past clamd's StreamMaxLength: not scanned, yet not refused (a retry
    // would be as long); no scanner header claims otherwise.
    let big = format!(
        "{}{}",
        plain("big"),
        format!("{}\r\n", "x".repeat(76)).repeat(2000)
    );
    let r = c
        .mail("a@far.test", &["big@local.test"], big.as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;

    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(list.contains(&format!("virus: {SIGNATURE}")), "{list}");
    let got = delivered(&gw, "big@local.test", 1).await;
    let h = head(&got[0]);
    assert!(!h.contains("X-Virus"), "{h}");
    let m = gw.metrics_text().await;
    assert_eq!(scan_count(&m, "clamd", "infected"), 1.0);
    assert_eq!(scan_count(&m, "clamd", "error"), 1.0);
    assert!(
        gw.log_plain().contains("StreamMaxLength"),
        "{}",
        gw.log_plain()
    );
}

#[tokio::test]
async fn rspamd_score_and_action_reach_the_rules() {
    let Some(rspamd) = Rspamd::start().await else {
        return;
    };
    let mut rules = shipped_rules();
    // A rule of the admin's own that shows what it was given.
    rules.push((
        "35-show.rhai".into(),
        r#"fn data(m) {
    if m.rspamd_action != "" {
        let tag = if m.rspamd_symbols.contains("POSTERN_TEST_TAG") { "tag" } else { "-" };
        m.add_header("X-Test-Rspamd", m.rspamd_action + "/" + tag + "/" + (m.rspamd_score >= 6.0));
    }
}
"#
        .into(),
    ));
    let gw = Gateway::start(Opts {
        rules,
        extra: scan_table(&format!(
            "rspamd = \"http://127.0.0.1:{}\"\ntimeout = \"60s\"",
            rspamd.port
        )),
        ..Opts::default()
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO far.test").await;
    let r = c
        .mail(
            "a@far.test",
            &["r@local.test"],
            plain("REJECTME please").as_bytes(),
        )
        .await;
    assert!(
        r.starts_with("550 5.7.1"),
        "{r}\nrspamd:\n{}",
        rspamd.daemon.output()
    );
    let r = c
        .mail(
            "a@far.test",
            &["t@local.test"],
            plain("TAGME please").as_bytes(),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let r = c
        .mail(
            "a@far.test",
            &["p@local.test"],
            plain("lunch on friday").as_bytes(),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;

    let tagged = head(&delivered(&gw, "t@local.test", 1).await[0]);
    assert!(tagged.contains("X-Spam: Yes"), "{tagged}");
    // Rspamd's own symbols move the 7 points a little; its add-header
    // threshold is 6.
    let score: f64 = tagged
        .lines()
        .find_map(|l| l.strip_prefix("X-Spam-Score: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{tagged}"));
    assert!((6.0..15.0).contains(&score), "{tagged}");
    assert!(
        tagged.contains("X-Test-Rspamd: add header/tag/true"),
        "{tagged}"
    );
    let clean = head(&delivered(&gw, "p@local.test", 1).await[0]);
    assert!(!clean.contains("X-Spam"), "{clean}");
    assert!(
        clean.contains("X-Test-Rspamd: no action/-/false"),
        "{clean}"
    );
    assert!(gw.maildir_files("r@local.test").is_empty());
    let m = gw.metrics_text().await;
    assert_eq!(scan_count(&m, "rspamd", "spam"), 2.0);
    assert_eq!(scan_count(&m, "rspamd", "clean"), 1.0);
    assert_eq!(scan_count(&m, "rspamd", "error"), 0.0);
}

/// A TCP listener that takes connections and never answers.
async fn mute_listener() -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (port, task)
}

#[tokio::test]
async fn a_scanner_that_is_down_tempfails_or_is_passed_over() {
    // clamd's socket does not exist; "Rspamd" takes the connection and never answers.
    let (mute, _task) = mute_listener().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = |on_error: &str| {
        scan_table(&format!(
            "clamd = \"unix:{}\"\nrspamd = \"http://127.0.0.1:{mute}\"\ntimeout = \"1s\"\non_error = \"{on_error}\"",
            dir.path().join("no-clamd.sock").display()
        ))
    };

    let gw = Gateway::start(Opts {
        rules: shipped_rules(),
        extra: keys("tempfail"),
        ..Opts::default()
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO far.test").await;
    let r = c
        .mail("a@far.test", &["d@local.test"], plain("hello").as_bytes())
        .await;
    assert!(r.starts_with("451 4.3.0"), "{r}");
    c.cmd("QUIT").await;
    let (_, list, _) = gw.admin(&["quarantine", "list"]);
    assert!(!list.contains("d@local.test"), "{list}");
    let m = gw.metrics_text().await;
    assert_eq!(scan_count(&m, "clamd", "error"), 1.0);
    assert_eq!(scan_count(&m, "rspamd", "error"), 1.0);
    let log = gw.log_plain();
    assert!(log.contains("decided_by=scan:clamd"), "{log}");
    assert!(log.contains("no answer from rspamd within 1s"), "{log}");
    assert!(gw.maildir_files("d@local.test").is_empty());

    let gw = Gateway::start(Opts {
        rules: shipped_rules(),
        extra: keys("accept"),
        ..Opts::default()
    })
    .await;
    let mut c = Client::connect(gw.smtp).await;
    c.cmd("EHLO far.test").await;
    let r = c
        .mail("a@far.test", &["d@local.test"], plain("hello").as_bytes())
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
    let h = head(&delivered(&gw, "d@local.test", 1).await[0]);
    assert!(!h.contains("X-Virus") && !h.contains("X-Spam"), "{h}");
    let m = gw.metrics_text().await;
    assert_eq!(scan_count(&m, "clamd", "error"), 1.0);
    assert_eq!(scan_count(&m, "rspamd", "error"), 1.0);
}
