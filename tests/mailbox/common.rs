//! Test harness: self-signed TLS, three accounts, all four listeners on ephemeral ports.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use postern::mailbox::accounts::{Accounts, hash_password};
use postern::mailbox::store::MemStore;
use postern::mailbox::{MailboxCtx, serve_imap, serve_pop3};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub const PASSWORD: &str = "correct horse";

pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub cert_der: Vec<u8>,
}

pub fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let cert_der = ck.cert.der().to_vec();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert_der.clone())], key)
            .expect("server config");
        Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            cert_der,
        }
    })
}

pub fn accounts() -> Arc<Accounts> {
    static ACC: OnceLock<Arc<Accounts>> = OnceLock::new();
    ACC.get_or_init(|| {
        let h = hash_password(PASSWORD);
        let text = format!(
            r#"
[[user]]
login = "alice@example.test"
password = "{h}"
addresses = ["alice@example.test", "sales@example.test"]
role = "user"

[[user]]
login = "bob@example.test"
password = "{h}"
addresses = ["bob@example.test"]
role = "user"

[[user]]
login = "admin"
password = "{h}"
role = "admin"
"#
        );
        Arc::new(Accounts::parse(&text, "users.toml").expect("users parse"))
    })
    .clone()
}

pub struct Servers {
    pub ctx: Arc<MailboxCtx>,
    pub pop3: SocketAddr,
    pub pop3s: SocketAddr,
    pub imap: SocketAddr,
    pub imaps: SocketAddr,
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Every session, as the gateway tracks them for its shutdown grace.
    pub sessions: tokio_util::task::TaskTracker,
}

impl Servers {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.sessions.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.sessions.wait()).await;
    }
}

pub async fn start(store: Arc<MemStore>) -> Servers {
    let ctx = MailboxCtx::new(
        store,
        accounts(),
        tls().acceptor.clone(),
        "mx.example.test",
        MailboxCtx::logins_metric(),
    );
    let ctx = Arc::new(ctx);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let sessions = tokio_util::task::TaskTracker::new();
    let server = postern::net::Server {
        shutdown: rx,
        tracker: sessions.clone(),
    };
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for (imap, implicit) in [(false, false), (false, true), (true, false), (true, true)] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        addrs.push(l.local_addr().expect("addr"));
        let ctx = ctx.clone();
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            if imap {
                serve_imap(l, implicit, ctx, server).await
            } else {
                serve_pop3(l, implicit, ctx, server).await
            }
        }));
    }
    Servers {
        ctx,
        pop3: addrs[0],
        pop3s: addrs[1],
        imap: addrs[2],
        imaps: addrs[3],
        shutdown: tx,
        tasks,
        sessions,
    }
}

/// Run a Python script (stdlib only) with arguments; returns its stdout; panics with its
/// stderr if it fails.
pub async fn python(script: &str, args: Vec<String>) -> String {
    let script = script.to_string();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(&script)
            .args(&args)
            .output()
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "python failed\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    })
    .await
    .expect("join")
}

pub fn held_message(subject: &str, to: &str) -> Vec<u8> {
    format!(
        "From: Spammer <spam@evil.test>\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@evil.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XYZ\"\r\n\r\n--XYZ\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nBuy now.\r\n.leading dot line\r\n--XYZ\r\nContent-Type: application/octet-stream; name=\"x.bin\"\r\nContent-Disposition: attachment; filename=\"x.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--XYZ--\r\n"
    )
    .into_bytes()
}

pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TLS client handshake trusting the test certificate.
pub async fn tls_client(tcp: tokio::net::TcpStream) -> TlsStream {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(tls().cert_der.clone()))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await.expect("tls")
}
