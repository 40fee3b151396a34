//! Test support: the real `postern` binary on ephemeral loopback ports, a
//! real SMTP/LMTP sink as the mailbox backend, and a plain-socket SMTP client.

#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_postern");

/// A port nobody listens on right now. Taken from 20000-31999, below the
/// kernel's ephemeral range (32768+), so the many client connections the
/// tests make cannot grab it between this call and the gateway's bind; a
/// per-process counter keeps tests in one run apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 96) as u16 * 125,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..12_000 {
        let mut p = NEXT.fetch_add(1, Ordering::SeqCst);
        if p >= 32_000 {
            NEXT.store(20_000, Ordering::SeqCst);
            p = 20_000;
        }
        if StdListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in 20000-31999")
}

/// Poll `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

// ---------------------------------------------------------------- the sink

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Got {
    pub from: String,
    pub rcpts: Vec<String>,
    pub body: Vec<u8>,
    /// It came over TLS (after STARTTLS).
    pub tls: bool,
}

/// A real SMTP (or LMTP) server standing in for the mailbox backend.
#[derive(Clone)]
pub struct Sink {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Got>>>,
    /// Answer 451 at the end of DATA this many more times.
    pub tempfail_data: Arc<AtomicUsize>,
    /// Recipients refused with 550 (at RCPT for SMTP, after DATA for LMTP).
    pub reject: Arc<Mutex<Vec<String>>>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    pub lmtp: bool,
    /// Offer STARTTLS with this certificate (None: no STARTTLS).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Offer STARTTLS, answer 220, then fail the handshake (garbage, close).
    pub break_tls: bool,
    /// TLS handshakes completed.
    pub tls_sessions: Arc<AtomicUsize>,
}

/// What a sink's session reads from and writes to (plain TCP or TLS).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Sink {
    pub async fn start(lmtp: bool) -> Sink {
        Sink::start_on(0, lmtp).await
    }

    /// Listen on a given port (0: any), e.g. one a gateway was configured with earlier.
    pub async fn start_on(port: u16, lmtp: bool) -> Sink {
        Sink::listen(std::net::Ipv4Addr::LOCALHOST, port, lmtp, None, false).await
    }

    /// An SMTP sink on `ip:port` (any loopback address; port 0: any) that
    /// offers STARTTLS when `tls` is set, or offers it and then breaks
    /// the handshake when `break_tls` is.
    pub async fn start_at(
        ip: std::net::Ipv4Addr,
        port: u16,
        tls: Option<tokio_rustls::TlsAcceptor>,
        break_tls: bool,
    ) -> Sink {
        Sink::listen(ip, port, false, tls, break_tls).await
    }

    async fn listen(
        ip: std::net::Ipv4Addr,
        port: u16,
        lmtp: bool,
        tls: Option<tokio_rustls::TlsAcceptor>,
        break_tls: bool,
    ) -> Sink {
        let listener = TcpListener::bind((ip, port)).await.unwrap();
        let sink = Sink {
            port: listener.local_addr().unwrap().port(),
            got: Arc::default(),
            tempfail_data: Arc::default(),
            reject: Arc::default(),
            connections: Arc::default(),
            lmtp,
            tls,
            break_tls,
            tls_sessions: Arc::default(),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = s.session(tcp).await;
                });
            }
        });
        sink
    }

    pub fn messages(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    async fn session(&self, tcp: TcpStream) -> std::io::Result<()> {
        let mut r: BufReader<Box<dyn Io>> = BufReader::new(Box::new(tcp));
        r.get_mut().write_all(b"220 sink.test ESMTP\r\n").await?;
        let mut from = String::new();
        let mut rcpts: Vec<String> = Vec::new();
        let mut secure = false;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let w = r.get_mut();
            let upper = line.to_ascii_uppercase();
            let offer_tls = !secure && (self.tls.is_some() || self.break_tls);
            let reply: String = if upper.starts_with("EHLO") || upper.starts_with("LHLO") {
                format!(
                    "250-sink.test\r\n250-PIPELINING\r\n{}250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n",
                    if offer_tls { "250-STARTTLS\r\n" } else { "" }
                )
            } else if upper.starts_with("STARTTLS") && offer_tls {
                w.write_all(b"220 2.0.0 go ahead\r\n").await?;
                if self.break_tls {
                    // Wait for the ClientHello, then answer nonsense.
                    let mut hello = [0u8; 512];
                    let _ = tokio::io::AsyncReadExt::read(w, &mut hello).await?;
                    w.write_all(b"this is not a TLS server hello\r\n").await?;
                    return Ok(());
                }
                let Some(acceptor) = self.tls.clone() else {
                    return Ok(());
                };
                // What was buffered before TLS is dropped (RFC 3207).
                let plain = std::mem::replace(&mut r, BufReader::new(Box::new(tokio::io::empty())));
                let tls = acceptor.accept(plain.into_inner()).await?;
                self.tls_sessions.fetch_add(1, Ordering::SeqCst);
                r = BufReader::new(Box::new(tls));
                secure = true;
                from.clear();
                rcpts.clear();
                continue;
            } else if upper.starts_with("HELO") {
                "250 sink.test\r\n".into()
            } else if upper.starts_with("MAIL FROM:") {
                from = addr(&line);
                rcpts.clear();
                "250 2.1.0 ok\r\n".into()
            } else if upper.starts_with("RCPT TO:") {
                let a = addr(&line);
                let refused = self.reject.lock().unwrap().contains(&a);
                if refused && !self.lmtp {
                    "550 5.1.1 no such user here\r\n".into()
                } else {
                    rcpts.push(a);
                    "250 2.1.5 ok\r\n".into()
                }
            } else if upper.starts_with("DATA") {
                if rcpts.is_empty() {
                    "554 5.5.1 no valid recipients\r\n".into()
                } else {
                    w.write_all(b"354 go ahead\r\n").await?;
                    let body = read_data(&mut r).await?;
                    let temp = self
                        .tempfail_data
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if self.lmtp {
                        let mut out = String::new();
                        let mut ok_rcpts = Vec::new();
                        for a in &rcpts {
                            if temp {
                                out.push_str("451 4.3.0 try later\r\n");
                            } else if self.reject.lock().unwrap().contains(a) {
                                out.push_str("550 5.1.1 no such mailbox\r\n");
                            } else {
                                ok_rcpts.push(a.clone());
                                out.push_str("250 2.0.0 delivered\r\n");
                            }
                        }
                        if !ok_rcpts.is_empty() {
                            self.got.lock().unwrap().push(Got {
                                from: from.clone(),
                                rcpts: ok_rcpts,
                                body,
                                tls: secure,
                            });
                        }
                        out
                    } else if temp {
                        "451 4.3.0 try again later\r\n".into()
                    } else {
                        self.got.lock().unwrap().push(Got {
                            from: from.clone(),
                            rcpts: rcpts.clone(),
                            body,
                            tls: secure,
                        });
                        "250 2.0.0 queued\r\n".into()
                    }
                }
            } else if upper.starts_with("RSET") || upper.starts_with("NOOP") {
                rcpts.clear();
                "250 2.0.0 ok\r\n".into()
            } else if upper.starts_with("QUIT") {
                w.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            } else {
                "500 5.5.2 what?\r\n".into()
            };
            r.get_mut().write_all(reply.as_bytes()).await?;
        }
    }
}

fn addr(line: &str) -> String {
    let s = line.find('<').map(|i| i + 1).unwrap_or(0);
    let e = line.find('>').unwrap_or(line.len());
    line.get(s..e).unwrap_or("").to_string()
}

async fn read_data<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" {
            return Ok(body);
        }
        let start = usize::from(line.first() == Some(&b'.'));
        body.extend_from_slice(&line[start..]);
    }
}

// ---------------------------------------------------------------- the gateway

/// Settings a test may change; everything else is the test default.
#[derive(Clone)]
pub struct Opts {
    pub route: String,
    pub outbound: String,
    pub networks: Vec<String>,
    pub max_message_size: String,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub idle_timeout: String,
    pub retry: String,
    pub max_age: String,
    /// Rule scripts (file name, text) written into the gateway's rules/.
    pub rules: Vec<(String, String)>,
    /// policies/ratelimits.toml (empty: no limits).
    pub ratelimits: String,
    /// Accounts for policies/users.toml: (login, password, addresses, role).
    pub users: Vec<(String, String, Vec<String>, String)>,
    /// `[quarantine] retention`.
    pub retention: String,
    /// `[delivery] mx_port` (25 when unset).
    pub mx_port: Option<u16>,
    /// SPF/DKIM/DMARC on, against this DNS server.
    pub dns: Option<std::net::SocketAddr>,
    /// More keys for the `[smtp]` table (e.g. `handshake_timeout = "2s"`).
    pub smtp_extra: String,
    /// More keys for the `[quarantine]` table.
    pub quarantine_extra: String,
    /// More keys for the `[delivery]` table (e.g. `per_destination = 2`).
    pub delivery_extra: String,
    /// More keys for the `[server]` table (e.g. `min_free_space = "16MB"`).
    pub server_extra: String,
    /// More keys for the `[relay]` table (e.g. `verify_recipients = "off"`).
    pub relay_extra: String,
    /// More keys for the `[checks]` table (e.g. `authserv_ids = [..]`).
    pub checks_extra: String,
    /// `[rules] on_error` ("tempfail" unless a test says otherwise).
    pub on_error: String,
    pub extra: String,
    /// Run under `ulimit -n N` (soft and hard), to exhaust descriptors.
    pub nofile: Option<u64>,
    /// The loopback address every listener binds (several gateways side by side).
    pub bind: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            route: "maildir:data/maildir".into(),
            outbound: "smtp://127.0.0.1:9".into(),
            networks: vec![],
            max_message_size: "1MB".into(),
            max_recipients: 50,
            max_connections: 100,
            idle_timeout: "30s".into(),
            retry: "[\"1s\"]".into(),
            max_age: "1h".into(),
            rules: Vec::new(),
            ratelimits: String::new(),
            users: Vec::new(),
            mx_port: None,
            retention: "30d".into(),
            dns: None,
            smtp_extra: String::new(),
            quarantine_extra: String::new(),
            delivery_extra: String::new(),
            server_extra: String::new(),
            relay_extra: String::new(),
            checks_extra: String::new(),
            on_error: "tempfail".into(),
            extra: String::new(),
            nofile: None,
            bind: "127.0.0.1".into(),
        }
    }
}

impl Opts {
    pub fn sink(port: u16) -> Opts {
        Opts {
            route: format!("smtp://127.0.0.1:{port}"),
            outbound: format!("smtp://127.0.0.1:{port}"),
            ..Opts::default()
        }
    }
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub smtp: u16,
    pub submission: u16,
    pub submissions: u16,
    pub metrics: u16,
    pub pop3: u16,
    pub pop3s: u16,
    pub imap: u16,
    pub imaps: u16,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub nofile: Option<u64>,
    /// The address its listeners are bound to (`Opts::bind`).
    pub ip: String,
}

impl Gateway {
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("postern.toml")
    }

    /// Write a config into a fresh directory and start `postern serve`.
    pub async fn start(opts: Opts) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let g = Gateway {
            smtp: free_port(),
            submission: free_port(),
            submissions: free_port(),
            metrics: free_port(),
            pop3: free_port(),
            pop3s: free_port(),
            imap: free_port(),
            imaps: free_port(),
            log: dir.path().join("postern.log"),
            dir,
            child: None,
            nofile: opts.nofile,
            ip: opts.bind.clone(),
        };
        let nets: Vec<String> = opts.networks.iter().map(|n| format!("\"{n}\"")).collect();
        let cfg = format!(
            r#"
[server]
hostname = "gw.test"
data_dir = "data"
shutdown_grace = "3s"
{server_extra}

[smtp]
relay = ["{bind}:{smtp}"]
submission = ["{bind}:{sub}"]
submissions = ["{bind}:{subs}"]
max_message_size = "{size}"
max_recipients = {rcpts}
max_connections = {conns}
idle_timeout = "{idle}"
{smtp_extra}

[relay]
domains = ["local.test"]
networks = [{nets}]
{relay_extra}

[delivery]
route = "{route}"
outbound = "{outbound}"
concurrency = 16
retry = {retry}
max_age = "{max_age}"
timeout = "5s"
mx_port = {mx_port}
{delivery_extra}

[dns]
nameservers = ["{dns}"]

[checks]
spf = {checks}
dkim = {checks}
dmarc = {checks}
deadline = "5s"
{checks_extra}

[rules]
dir = "rules"
max_operations = 100000
on_error = "{on_error}"
quarantine_score = 10

[policies]
dir = "policies"

[quarantine]
pop3 = ["{bind}:{pop3}"]
pop3s = ["{bind}:{pop3s}"]
imap = ["{bind}:{imap}"]
imaps = ["{bind}:{imaps}"]
retention = "{retention}"
{quarantine_extra}

[metrics]
listen = "{bind}:{metrics}"
{extra}
"#,
            smtp = g.smtp,
            sub = g.submission,
            subs = g.submissions,
            metrics = g.metrics,
            server_extra = opts.server_extra,
            size = opts.max_message_size,
            rcpts = opts.max_recipients,
            conns = opts.max_connections,
            idle = opts.idle_timeout,
            nets = nets.join(", "),
            route = opts.route,
            outbound = opts.outbound,
            retry = opts.retry,
            max_age = opts.max_age,
            dns = opts
                .dns
                .map(|a| a.to_string())
                .unwrap_or("127.0.0.1:9".into()),
            checks = opts.dns.is_some(),
            pop3 = g.pop3,
            pop3s = g.pop3s,
            imap = g.imap,
            imaps = g.imaps,
            retention = opts.retention,
            mx_port = opts.mx_port.unwrap_or(25),
            smtp_extra = opts.smtp_extra,
            quarantine_extra = opts.quarantine_extra,
            delivery_extra = opts.delivery_extra,
            relay_extra = opts.relay_extra,
            checks_extra = opts.checks_extra,
            on_error = opts.on_error,
            extra = opts.extra,
            bind = opts.bind,
        );
        std::fs::write(g.config_path(), cfg).unwrap();
        let rules = g.dir.path().join("rules");
        let policies = g.dir.path().join("policies");
        std::fs::create_dir_all(&rules).unwrap();
        std::fs::create_dir_all(&policies).unwrap();
        for (name, text) in &opts.rules {
            // A name may hold a subdirectory (`tests/case.toml`: the rule suite).
            let path = rules.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(path, text).unwrap();
        }
        std::fs::write(policies.join("ratelimits.toml"), &opts.ratelimits).unwrap();
        let mut users = String::new();
        for (login, pw, addrs, role) in &opts.users {
            let addrs: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
            users.push_str(&format!(
                "[[user]]\nlogin = \"{login}\"\npassword = \"{}\"\naddresses = [{}]\nrole = \"{role}\"\n\n",
                postern::mailbox::accounts::hash_password(pw),
                addrs.join(", ")
            ));
        }
        std::fs::write(policies.join("users.toml"), users).unwrap();
        let mut g = g;
        g.spawn().await;
        g
    }

    /// Start (or restart) the process on the same directory and wait until it answers.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env("POSTERN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if TcpStream::connect((self.ip.as_str(), self.smtp))
                .await
                .is_ok()
            {
                break;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("postern exited early ({status}); log:\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "postern did not start; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The id of the first entry `postern quarantine list` shows ("" when
    /// none), and the whole listing.
    pub fn first_held(&self) -> (String, String) {
        let (_, list, _) = self.admin(&["quarantine", "list"]);
        let id = list
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        (id, list)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log without ANSI colour codes, so fields read `k=v`.
    pub fn log_plain(&self) -> String {
        let raw = self.log_text();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters, ending in a letter.
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("not running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().unwrap()
    }

    /// Wait for a process already told to stop.
    pub fn term_wait(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("not running");
        c.wait().unwrap()
    }

    /// Run a `postern` admin command against this gateway's config.
    pub fn admin(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect((self.ip.as_str(), self.metrics))
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out)
            .await
            .unwrap();
        out
    }

    pub fn maildir_files(&self, rcpt: &str) -> Vec<Vec<u8>> {
        let dir = self.data_dir().join("maildir").join(rcpt).join("new");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------- a raw client

/// A line-level SMTP client that shows the server's exact replies.
pub struct Client<S> {
    r: BufReader<S>,
}

impl Client<TcpStream> {
    pub async fn connect(port: u16) -> Client<TcpStream> {
        Client::connect_to("127.0.0.1", port).await
    }

    /// [`Client::connect`] to a listener on another loopback address.
    pub async fn connect_to(ip: &str, port: u16) -> Client<TcpStream> {
        let tcp = TcpStream::connect((ip, port)).await.unwrap();
        let mut c = Client {
            r: BufReader::new(tcp),
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220"), "greeting: {greeting}");
        c
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Read one full reply (all its lines), joined with '\n'.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line))
                .await
                .expect("reply timed out")
                .unwrap();
            if n == 0 {
                return if all.is_empty() { "EOF".into() } else { all };
            }
            all.push_str(line.trim_end());
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
            all.push('\n');
        }
    }

    pub async fn send(&mut self, raw: &[u8]) {
        self.r.get_mut().write_all(raw).await.unwrap();
    }

    /// The socket itself, for tests that read or write around the reply framing.
    pub fn stream(&mut self) -> &mut S {
        self.r.get_mut()
    }

    /// Send one command line and return the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// A whole transaction that reports instead of asserting (for crash tests).
    pub async fn try_mail(&mut self, from: &str, to: &str, data: &[u8]) -> Result<String, String> {
        let steps = [
            format!("MAIL FROM:<{from}>"),
            format!("RCPT TO:<{to}>"),
            "DATA".into(),
        ];
        for s in steps {
            let line = format!("{s}\r\n");
            self.r
                .get_mut()
                .write_all(line.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let r = self.reply_checked().await?;
            if !(r.starts_with('2') || r.starts_with('3')) {
                return Err(r);
            }
        }
        let w = self.r.get_mut();
        w.write_all(data).await.map_err(|e| e.to_string())?;
        w.write_all(b"\r\n.\r\n").await.map_err(|e| e.to_string())?;
        self.reply_checked().await
    }

    async fn reply_checked(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line)).await {
            Ok(Ok(0)) => Err("EOF".into()),
            Ok(Ok(_)) => {
                let mut all = line.trim_end().to_string();
                while line.len() >= 4 && line.as_bytes()[3] == b'-' {
                    line.clear();
                    match self.r.read_line(&mut line).await {
                        Ok(n) if n > 0 => all.push_str(line.trim_end()),
                        _ => return Err("EOF".into()),
                    }
                }
                Ok(all)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timeout".into()),
        }
    }

    /// A whole transaction; returns the reply after the final dot.
    pub async fn mail(&mut self, from: &str, to: &[&str], data: &[u8]) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert!(r.starts_with("250"), "MAIL: {r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>")).await;
            assert!(r.starts_with("250"), "RCPT {t}: {r}");
        }
        let r = self.cmd("DATA").await;
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(data).await;
        self.send(b"\r\n.\r\n").await;
        self.reply().await
    }
}

/// Run a Python 3 script (stdlib only) and return its stdout; panics with stderr on failure.
/// The value of one series (`name{labels}` as exported) in a scrape, or 0
/// when absent (a counter not yet counted).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 is needed for the tests");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn read_dir_count(p: &Path) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

/// The rule scripts shipped in the repository's rules/ (file name, text).
pub fn shipped_rules() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no shipped rules in {}", dir.display());
    out
}
