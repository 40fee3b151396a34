//! TLS to the next hop, MTA-STS and per-destination slots, against real
//! sinks on loopback addresses (127.0.0.1-4, one port: `[delivery] mx_port`),
//! a loopback DNS server for MX/A/TXT, and a loopback HTTPS server for the
//! MTA-STS policies whose certificate comes from a test CA (rcgen) named
//! in `[outbound_tls] ca`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::common::*;

/// A test certificate authority; its PEM is written where `[outbound_tls] ca` points.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "Postern test CA");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        let pem = dir.join("test-ca.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca { cert, key, pem }
    }

    /// A server certificate for `names`, signed by this CA.
    fn acceptor(&self, names: &[&str]) -> TlsAcceptor {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = p.signed_by(&key, &self.cert, &self.key).unwrap();
        acceptor(leaf.der().clone(), &key)
    }
}

/// A self-signed certificate (no CA anyone trusts).
fn self_signed(names: &[&str]) -> TlsAcceptor {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    acceptor(ck.cert.der().clone(), &ck.key_pair)
}

fn acceptor(cert: CertificateDer<'static>, key: &KeyPair) -> TlsAcceptor {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    TlsAcceptor::from(Arc::new(cfg))
}

/// A loopback HTTPS server answering `GET /.well-known/mta-sts.txt` with
/// the policy for the request's Host, 404 for others.
struct StsServer {
    port: u16,
    fetches: Arc<Mutex<Vec<String>>>,
}

async fn start_sts(tls: TlsAcceptor, policies: &[(&str, &str)]) -> StsServer {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let policies: Arc<HashMap<String, String>> = Arc::new(
        policies
            .iter()
            .map(|(h, p)| (h.to_string(), p.to_string()))
            .collect(),
    );
    let fetches: Arc<Mutex<Vec<String>>> = Arc::default();
    let f = fetches.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, policies, f) = (tls.clone(), policies.clone(), f.clone());
            tokio::spawn(async move {
                let Ok(s) = tls.accept(tcp).await else { return };
                let mut r = BufReader::new(s);
                let (mut host, mut path) = (String::new(), String::new());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(rest) = l.strip_prefix("GET ") {
                        path = rest.split(' ').next().unwrap_or("").to_string();
                    }
                    if let Some((k, v)) = l.split_once(':')
                        && k.eq_ignore_ascii_case("host")
                    {
                        host = v.trim().to_string();
                    }
                }
                f.lock().unwrap().push(host.clone());
                let resp = match policies.get(&host) {
                    Some(p) if path == "/.well-known/mta-sts.txt" => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{p}",
                        p.len()
                    ),
                    _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string(),
                };
                let s = r.get_mut();
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    StsServer { port, fetches }
}

/// EHLO, one message to `to` from `from`; the queue id from the 250.
async fn submit(gw: &Gateway, from: &str, to: &[&str], subject: &str) -> String {
    let mut c = Client::connect(gw.smtp).await;
    let r = c.cmd("EHLO inside.test").await;
    assert!(r.starts_with("250"), "{r}");
    let data = format!("From: <{from}>\r\nSubject: {subject}\r\n\r\nhello over the next hop\r\n");
    let r = c.mail(from, to, data.as_bytes()).await;
    assert!(r.starts_with("250"), "{r}");
    let _ = c.cmd("QUIT").await;
    r.rsplit(' ').next().unwrap_or("").trim().to_string()
}

fn queue_show(gw: &Gateway, id: &str) -> String {
    let (ok, out, err) = gw.admin(&["queue", "show", id]);
    assert!(ok, "queue show {id}: {err}");
    out
}

/// The `rcpt:` line of `addr` in `queue show` and the line after it.
fn rcpt_lines(show: &str, addr: &str) -> String {
    let lines: Vec<&str> = show.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with("rcpt:") && l.contains(addr))
        .unwrap_or_else(|| panic!("no rcpt line for {addr}:\n{show}"));
    format!("{}\n{}", lines[i], lines.get(i + 1).unwrap_or(&""))
}

fn mx_opts(route: &Sink, dns: std::net::SocketAddr, mx_port: u16) -> Opts {
    let mut o = Opts::sink(route.port);
    o.outbound = "mx".into();
    o.networks = vec!["127.0.0.0/8".into()];
    o.dns = Some(dns);
    o.mx_port = Some(mx_port);
    o
}

/// STARTTLS is used where offered (`may`: any certificate, recorded as
/// not verified), plain text where not, one plain retry after a broken
/// handshake; `encrypt` towards a host without STARTTLS defers (4.7.5) and
/// moves on to the next MX, which has TLS. The queue, the log line and
/// the metric say which was used.
#[tokio::test(flavor = "multi_thread")]
async fn starttls_when_offered_plain_when_not_and_encrypt_never_plain() {
    let route = Sink::start(false).await;
    let port = free_port();
    let tls_sink = Sink::start_at(
        Ipv4Addr::new(127, 0, 0, 1),
        port,
        Some(self_signed(&["mx.tls.test", "mx2.failover.test"])),
        false,
    )
    .await;
    let plain = Sink::start_at(Ipv4Addr::new(127, 0, 0, 2), port, None, false).await;
    let broken = Sink::start_at(Ipv4Addr::new(127, 0, 0, 3), port, None, true).await;
    let dns = crate::dns::start_dns_with(
        &[],
        &[
            ("tls.test", 10, "mx.tls.test"),
            ("plain.test", 10, "mx.plain.test"),
            ("must.test", 10, "mx.must.test"),
            ("broken.test", 10, "mx.broken.test"),
            ("failover.test", 10, "mx1.failover.test"),
            ("failover.test", 20, "mx2.failover.test"),
        ],
        &[
            ("mx.tls.test", Ipv4Addr::new(127, 0, 0, 1)),
            ("mx.plain.test", Ipv4Addr::new(127, 0, 0, 2)),
            ("mx.must.test", Ipv4Addr::new(127, 0, 0, 2)),
            ("mx.broken.test", Ipv4Addr::new(127, 0, 0, 3)),
            ("mx1.failover.test", Ipv4Addr::new(127, 0, 0, 2)),
            ("mx2.failover.test", Ipv4Addr::new(127, 0, 0, 1)),
        ],
    )
    .await;
    let mut opts = mx_opts(&route, dns, port);
    opts.retry = "[\"1h\"]".into();
    opts.extra = "[outbound_tls]\ndefault = \"may\"\n[outbound_tls.domains]\n\"must.test\" = \"encrypt\"\n\"failover.test\" = \"encrypt\"\n".into();
    let gw = Gateway::start(opts).await;
    let id = submit(
        &gw,
        "app@local.test",
        &[
            "a@tls.test",
            "b@plain.test",
            "c@must.test",
            "d@broken.test",
            "e@failover.test",
        ],
        "next hop",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || tls_sink.count() == 2
            && plain.count() == 1
            && broken.count() == 1)
        .await,
        "tls {} plain {} broken {}; log:\n{}",
        tls_sink.count(),
        plain.count(),
        broken.count(),
        gw.log_text()
    );
    // The sinks saw TLS where it was offered and finished, plain elsewhere.
    assert!(tls_sink.messages().iter().all(|g| g.tls));
    assert_eq!(tls_sink.tls_sessions.load(Ordering::SeqCst), 2);
    assert!(!plain.messages()[0].tls);
    assert_eq!(plain.messages()[0].rcpts, vec!["b@plain.test".to_string()]);
    assert!(!broken.messages()[0].tls);
    // must.test got nothing: its only MX offers no STARTTLS.
    assert!(
        plain
            .messages()
            .iter()
            .all(|g| !g.rcpts.contains(&"c@must.test".to_string()))
    );
    let show = {
        let start = Instant::now();
        loop {
            let s = queue_show(&gw, &id);
            if s.contains("c@must.test [pending] 451 4.7.5") || start.elapsed().as_secs() > 10 {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    println!("queue show {id}:\n{show}");
    let a = rcpt_lines(&show, "a@tls.test");
    assert!(
        a.contains("[delivered] 250")
            && a.contains("tls:     TLSv1.3 TLS13_")
            && a.contains("certificate not verified")
            && a.contains("(mx.tls.test)"),
        "{show}"
    );
    let b = rcpt_lines(&show, "b@plain.test");
    assert!(
        b.contains("[delivered]") && b.contains("tls:     none (mx.plain.test)"),
        "{show}"
    );
    let c = rcpt_lines(&show, "c@must.test");
    assert!(
        c.contains("[pending] 451 4.7.5") && c.contains("STARTTLS not offered"),
        "{show}"
    );
    let d = rcpt_lines(&show, "d@broken.test");
    assert!(
        d.contains("[delivered]") && d.contains("tls:     none"),
        "{show}"
    );
    let e = rcpt_lines(&show, "e@failover.test");
    assert!(
        e.contains("[delivered]") && e.contains("TLSv1.3") && e.contains("(mx2.failover.test)"),
        "{show}"
    );
    let log = gw.log_plain();
    assert!(
        log.lines().any(|l| l.contains("delivery attempt")
            && l.contains("host=mx.tls.test")
            && l.contains("tls=true")
            && l.contains("tls_detail=TLSv1.3")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("delivery attempt")
            && l.contains("host=mx.plain.test")
            && l.contains("tls=false")),
        "{log}"
    );
    assert!(log.contains("retrying once in plain text"), "{log}");
    let m = gw.metrics_text().await;
    assert!(
        metric(
            &m,
            "postern_delivery_attempts_total{result=\"ok\",tls=\"yes\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "postern_delivery_attempts_total{result=\"ok\",tls=\"no\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "postern_delivery_attempts_total{result=\"tempfail\",tls=\"no\"}"
        ) >= 1.0,
        "{m}"
    );
}

/// A null MX (`MX 0 .`, RFC 7505) fails at once: the DSN goes to the
/// sender on the first attempt, nothing is retried.
#[tokio::test(flavor = "multi_thread")]
async fn a_null_mx_bounces_at_once() {
    let route = Sink::start(false).await;
    let dns = crate::dns::start_dns_with(&[], &[("null.test", 0, ".")], &[]).await;
    let mut opts = mx_opts(&route, dns, free_port());
    opts.retry = "[\"1h\"]".into();
    let gw = Gateway::start(opts).await;
    let started = Instant::now();
    let id = submit(&gw, "app@local.test", &["nobody@null.test"], "to a null MX").await;
    assert!(
        eventually(Duration::from_secs(5), || route.count() == 1).await,
        "{}",
        gw.log_text()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let dsn = &route.messages()[0];
    assert_eq!(dsn.from, "");
    assert_eq!(dsn.rcpts, vec!["app@local.test".to_string()]);
    let t = String::from_utf8_lossy(&dsn.body);
    assert!(
        t.contains("nobody@null.test") && t.contains("5.1.10"),
        "{t}"
    );
    let (ok, out, _) = gw.admin(&["queue", "show", &id]);
    assert!(!ok || !out.contains("nobody@null.test [pending]"), "{out}");
}

/// MTA-STS: the policy is fetched over HTTPS (its certificate from the test
/// CA in `[outbound_tls] ca`), cached by the TXT id. `enforce` whose MX has
/// no TLS: nothing sent, deferred; `enforce` whose MX has a valid
/// certificate: delivered, verified; `enforce` whose MX is outside the
/// policy's patterns: never contacted; `testing` whose MX has no TLS:
/// delivered, and the log says what enforce would have refused.
#[tokio::test(flavor = "multi_thread")]
async fn mta_sts_enforce_and_testing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let route = Sink::start(false).await;
    let port = free_port();
    let plain = Sink::start_at(Ipv4Addr::new(127, 0, 0, 2), port, None, false).await;
    let secure = Sink::start_at(
        Ipv4Addr::new(127, 0, 0, 3),
        port,
        Some(ca.acceptor(&["mx.secure.test", "mx.outside.test"])),
        false,
    )
    .await;
    let policy = |mode: &str, mx: &str| {
        format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
    };
    let sts = start_sts(
        ca.acceptor(&[
            "mta-sts.enforce.test",
            "mta-sts.secure.test",
            "mta-sts.outside.test",
            "mta-sts.testing.test",
        ]),
        &[
            ("mta-sts.enforce.test", &policy("enforce", "*.enforce.test")),
            ("mta-sts.secure.test", &policy("enforce", "mx.secure.test")),
            (
                "mta-sts.outside.test",
                &policy("enforce", "mx.elsewhere.test"),
            ),
            ("mta-sts.testing.test", &policy("testing", "*.testing.test")),
        ],
    )
    .await;
    let txt = "v=STSv1; id=20261201T000000;";
    let lo = Ipv4Addr::LOCALHOST;
    let dns = crate::dns::start_dns_with(
        &[
            ("_mta-sts.enforce.test", txt),
            ("_mta-sts.secure.test", txt),
            ("_mta-sts.outside.test", txt),
            ("_mta-sts.testing.test", txt),
        ],
        &[
            ("enforce.test", 10, "mx.enforce.test"),
            ("secure.test", 10, "mx.secure.test"),
            ("outside.test", 10, "mx.outside.test"),
            ("testing.test", 10, "mx.testing.test"),
        ],
        &[
            ("mx.enforce.test", Ipv4Addr::new(127, 0, 0, 2)),
            ("mx.secure.test", Ipv4Addr::new(127, 0, 0, 3)),
            ("mx.outside.test", Ipv4Addr::new(127, 0, 0, 3)),
            ("mx.testing.test", Ipv4Addr::new(127, 0, 0, 2)),
            ("mta-sts.enforce.test", lo),
            ("mta-sts.secure.test", lo),
            ("mta-sts.outside.test", lo),
            ("mta-sts.testing.test", lo),
        ],
    )
    .await;
    let mut opts = mx_opts(&route, dns, port);
    opts.retry = "[\"1h\"]".into();
    opts.extra = format!(
        "[outbound_tls]\ndefault = \"may\"\nmta_sts = true\nca = \"{}\"\nmta_sts_port = {}\n",
        ca.pem.display(),
        sts.port
    );
    let gw = Gateway::start(opts).await;
    let id = submit(
        &gw,
        "app@local.test",
        &[
            "a@enforce.test",
            "b@secure.test",
            "c@outside.test",
            "d@testing.test",
        ],
        "sts",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || plain.count() == 1
            && secure.count() == 1)
        .await,
        "plain {} secure {}; log:\n{}",
        plain.count(),
        secure.count(),
        gw.log_text()
    );
    // testing.test went to the plain sink; enforce.test never did.
    assert_eq!(
        plain.messages()[0].rcpts,
        vec!["d@testing.test".to_string()]
    );
    assert_eq!(
        secure.messages()[0].rcpts,
        vec!["b@secure.test".to_string()]
    );
    assert!(secure.messages()[0].tls);
    let show = {
        let start = Instant::now();
        loop {
            let s = queue_show(&gw, &id);
            let done = [
                "a@enforce.test [pending] 451 4.7.5",
                "c@outside.test [pending] 451 4.7.5",
            ]
            .iter()
            .all(|w| s.contains(w));
            if done || start.elapsed().as_secs() > 10 {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    println!("queue show {id}:\n{show}");
    let a = rcpt_lines(&show, "a@enforce.test");
    assert!(
        a.contains("[pending] 451 4.7.5") && a.contains("STARTTLS not offered"),
        "{show}"
    );
    let b = rcpt_lines(&show, "b@secure.test");
    assert!(
        b.contains("[delivered]") && b.contains("TLSv1.3") && b.contains("certificate verified"),
        "{show}"
    );
    let c = rcpt_lines(&show, "c@outside.test");
    assert!(
        c.contains("[pending] 451 4.7.5") && c.contains("not in the MTA-STS policy"),
        "{show}"
    );
    let d = rcpt_lines(&show, "d@testing.test");
    assert!(
        d.contains("[delivered]") && d.contains("tls:     none"),
        "{show}"
    );
    // The outside MX was never contacted: the secure sink had one session.
    assert_eq!(secure.connections.load(Ordering::SeqCst), 1);
    let log = gw.log_plain();
    assert!(
        log.contains("MTA-STS testing: enforce would have refused this delivery")
            && log.contains("no TLS"),
        "{log}"
    );
    assert_eq!(log.matches("MTA-STS policy fetched").count(), 4, "{log}");
    // A second message: the policies come from the cache (same TXT id).
    let fetched = sts.fetches.lock().unwrap().len();
    assert_eq!(fetched, 4);
    submit(&gw, "app@local.test", &["d2@testing.test"], "again").await;
    assert!(eventually(Duration::from_secs(10), || plain.count() == 2).await);
    assert_eq!(sts.fetches.lock().unwrap().len(), fetched);
}

/// A tiny SMTP server that takes `delay` to answer the final dot, and
/// counts how many transactions it has in DATA at once.
struct SlowSink {
    got: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

async fn start_slow(ip: Ipv4Addr, port: u16, delay: Duration) -> SlowSink {
    let listener = TcpListener::bind((ip, port)).await.unwrap();
    let (got, peak, now): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
        (Arc::default(), Arc::default(), Arc::default());
    let (g, p) = (got.clone(), peak.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (g, p, now) = (g.clone(), p.clone(), now.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(tcp);
                let _ = r.get_mut().write_all(b"220 slow.test\r\n").await;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let u = line.to_ascii_uppercase();
                    let reply: &[u8] = if u.starts_with("EHLO") {
                        b"250 slow.test\r\n"
                    } else if u.starts_with("DATA") {
                        let _ = r.get_mut().write_all(b"354 go\r\n").await;
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(n, Ordering::SeqCst);
                        loop {
                            let mut l = String::new();
                            if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if l == ".\r\n" {
                                break;
                            }
                        }
                        tokio::time::sleep(delay).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        g.fetch_add(1, Ordering::SeqCst);
                        b"250 2.0.0 ok\r\n"
                    } else if u.starts_with("QUIT") {
                        let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    if r.get_mut().write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    SlowSink { got, peak }
}

/// `[delivery] per_destination = 2`: a slow domain never has more than two
/// transactions in flight, another domain is delivered meanwhile, and the
/// waiting messages are woken as slots free (well before the fallback timer).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_domain_gets_its_slots_and_no_more() {
    let route = Sink::start(false).await;
    let port = free_port();
    let slow = start_slow(
        Ipv4Addr::new(127, 0, 0, 1),
        port,
        Duration::from_millis(1500),
    )
    .await;
    let fast = Sink::start_at(Ipv4Addr::new(127, 0, 0, 2), port, None, false).await;
    let dns = crate::dns::start_dns_with(
        &[],
        &[
            ("slow.test", 10, "mx.slow.test"),
            ("fast.test", 10, "mx.fast.test"),
        ],
        &[
            ("mx.slow.test", Ipv4Addr::new(127, 0, 0, 1)),
            ("mx.fast.test", Ipv4Addr::new(127, 0, 0, 2)),
        ],
    )
    .await;
    let mut opts = mx_opts(&route, dns, port);
    opts.delivery_extra = "per_destination = 2".into();
    opts.retry = "[\"1h\"]".into();
    let gw = Gateway::start(opts).await;
    let started = Instant::now();
    for i in 0..6 {
        submit(&gw, "app@local.test", &[&format!("u{i}@slow.test")], "slow").await;
    }
    submit(&gw, "app@local.test", &["x@fast.test"], "fast").await;
    assert!(
        eventually(Duration::from_secs(3), || fast.count() == 1).await,
        "the fast domain waited behind the slow one:\n{}",
        gw.log_text()
    );
    assert!(slow.got.load(Ordering::SeqCst) < 6);
    assert!(
        eventually(Duration::from_secs(20), || slow.got.load(Ordering::SeqCst)
            == 6)
        .await,
        "{} of 6 after {:?}:\n{}",
        slow.got.load(Ordering::SeqCst),
        started.elapsed(),
        gw.log_text()
    );
    // Three rounds of two at 1.5 s, woken at once: far below the 30 s fallback.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.peak.load(Ordering::SeqCst), 2);
}
