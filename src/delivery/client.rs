//! The SMTP/LMTP client that delivers to the next hop.
//!
//! Connections are pooled per destination and reused for many messages;
//! when the server offers PIPELINING, MAIL, every RCPT and DATA go out in
//! one write (RFC 2920). LMTP answers once per accepted recipient after the
//! final dot (RFC 2033), so each recipient gets its own result.
//!
//! After EHLO the client upgrades with STARTTLS (RFC 3207) as the hop's
//! [`TlsLevel`] asks, and says EHLO again over TLS; a pooled connection is
//! kept under a key that names its level, so a session opened under `may`
//! is never reused where `verify` is required.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use smtp_proto::Response;
use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::net::TcpStream;

use super::tls::{Channel, OutboundTls, TlsInfo, Verdict};
use crate::config::TlsLevel;
use crate::mail::{Enhanced, Reply};
use crate::smtp::data::DotStuffer;

/// A server's reply as the typed [`Reply`]: its enhanced code (when it
/// sent one) apart from the text, which is made one safe line.
fn reply_of(r: &Response<String>) -> Reply {
    let enhanced =
        (r.esc[0] > 0).then(|| Enhanced::new(r.esc[0], u16::from(r.esc[1]), u16::from(r.esc[2])));
    let mut reply = Reply::plain(r.code, r.message.trim());
    reply.enhanced = enhanced;
    reply
}

/// 2xx: the command (or the message) was taken.
fn is_ok(r: &Reply) -> bool {
    (200..300).contains(&r.code)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused the session itself (greeting or EHLO).
    #[error("{0}")]
    Refused(Reply),
    /// The hop's TLS requirement was not met; nothing was sent.
    #[error("{0}")]
    Tls(TlsFailure),
}

/// Why a session could not be secured as required.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TlsFailure {
    #[error("STARTTLS not offered")]
    NotOffered,
    #[error("STARTTLS refused: {0}")]
    Refused(Reply),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("certificate not valid for {name}: {why}")]
    Certificate { name: String, why: String },
}

/// The socket under a connection: plain TCP, or TLS after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a session to one hop must be: the protocol, our name, the
/// timeout, and how much TLS, checked against which host name.
pub(crate) struct Want<'a> {
    pub(crate) lmtp: bool,
    pub(crate) helo_name: &'a str,
    pub(crate) timeout: Duration,
    pub(crate) level: TlsLevel,
    /// SNI, and the name the certificate must carry under `verify`.
    pub(crate) host: &'a str,
    pub(crate) tls: &'a OutboundTls,
}

/// A live connection to a next hop.
pub(crate) struct Conn {
    stream: BufWriter<Stream>,
    rbuf: Vec<u8>,
    rpos: usize,
    receiver: ResponseReceiver,
    lmtp: bool,
    pipelining: bool,
    /// The last EHLO offered STARTTLS.
    starttls: bool,
    timeout: Duration,
    /// How this connection is carried (plain, or the TLS it negotiated).
    pub(crate) channel: Channel,
    /// Messages sent on this connection (for logging and limits).
    pub(crate) sent: u32,
}

impl Conn {
    /// Connect, read the greeting, say EHLO (or LHLO), and secure the
    /// session as `want.level` asks; `plain` skips STARTTLS (the one plain
    /// retry after a failed handshake under `may`).
    pub(crate) async fn connect(
        addr: std::net::SocketAddr,
        want: &Want<'_>,
        plain: bool,
    ) -> Result<Conn, ClientError> {
        let tcp = tokio::time::timeout(want.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout)??;
        let _ = tcp.set_nodelay(true);
        let mut c = Conn::over(Stream::Plain(tcp), want, Channel::Plain);
        let greeting = c.read_reply().await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused(greeting));
        }
        c.hello(want).await?;
        if want.level == TlsLevel::None || plain {
            return Ok(c);
        }
        let required = want.level >= TlsLevel::Encrypt;
        if !c.starttls {
            if required {
                c.quit().await;
                return Err(ClientError::Tls(TlsFailure::NotOffered));
            }
            return Ok(c);
        }
        c.send(b"STARTTLS\r\n").await?;
        c.flush().await?;
        let r = c.read_reply().await?;
        if r.code != 220 {
            if required {
                c.quit().await;
                return Err(ClientError::Tls(TlsFailure::Refused(r)));
            }
            // `may`: the session goes on in plain text (RFC 3207 4.1).
            return Ok(c);
        }
        c.upgrade(want).await
    }

    fn over(stream: Stream, want: &Want<'_>, channel: Channel) -> Conn {
        Conn {
            stream: BufWriter::with_capacity(64 * 1024, stream),
            rbuf: Vec::with_capacity(4096),
            rpos: 0,
            receiver: ResponseReceiver::default(),
            lmtp: want.lmtp,
            pipelining: false,
            starttls: false,
            timeout: want.timeout,
            channel,
            sent: 0,
        }
    }

    /// EHLO (LHLO), or HELO for a server that does not speak ESMTP; notes
    /// what the server offers.
    async fn hello(&mut self, want: &Want<'_>) -> Result<(), ClientError> {
        let verb = if self.lmtp { "LHLO" } else { "EHLO" };
        self.send(format!("{verb} {}\r\n", want.helo_name).as_bytes())
            .await?;
        self.flush().await?;
        let ehlo_raw = self.read_response().await?;
        let ehlo = reply_of(&ehlo_raw);
        if !is_ok(&ehlo) {
            if self.lmtp {
                return Err(ClientError::Refused(ehlo));
            }
            self.send(format!("HELO {}\r\n", want.helo_name).as_bytes())
                .await?;
            self.flush().await?;
            let helo = self.read_reply().await?;
            if !is_ok(&helo) {
                return Err(ClientError::Refused(helo));
            }
            self.pipelining = false;
            self.starttls = false;
        } else {
            // From the raw reply: the sanitised text is capped in length.
            let has = |kw: &str| {
                ehlo_raw
                    .message
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .any(|w| w.eq_ignore_ascii_case(kw))
            };
            self.pipelining = has("PIPELINING");
            self.starttls = has("STARTTLS");
        }
        Ok(())
    }

    /// The TLS handshake after the server's `220` to STARTTLS, then EHLO
    /// again (RFC 3207 4.2: what was said before TLS is forgotten).
    async fn upgrade(self, want: &Want<'_>) -> Result<Conn, ClientError> {
        // Bytes after the 220 were sent before TLS: a server (or someone
        // on the path) injecting commands. Never carry them over.
        if self.rpos < self.rbuf.len() {
            return Err(ClientError::Protocol(
                "data after the STARTTLS reply".into(),
            ));
        }
        let Stream::Plain(tcp) = self.stream.into_inner() else {
            return Err(ClientError::Protocol("STARTTLS twice".into()));
        };
        let verify = want.level == TlsLevel::Verify;
        let name = ServerName::try_from(want.host.trim_end_matches('.').to_string())
            .map_err(|e| ClientError::Tls(TlsFailure::Handshake(e.to_string())))?;
        let handshake = want.tls.connector(verify).connect(name.clone(), tcp);
        let tls = match tokio::time::timeout(want.timeout, handshake).await {
            Err(_) => return Err(ClientError::Tls(TlsFailure::Handshake("timed out".into()))),
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let cert = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                return Err(ClientError::Tls(if verify && cert {
                    TlsFailure::Certificate {
                        name: want.host.to_string(),
                        why: e.to_string(),
                    }
                } else {
                    TlsFailure::Handshake(e.to_string())
                }));
            }
        };
        let verdict = if verify {
            Verdict::Verified
        } else {
            want.tls.verdict(tls.get_ref().1, &name)
        };
        let info = TlsInfo::of(tls.get_ref().1, verdict);
        let mut c = Conn::over(Stream::Tls(Box::new(tls)), want, Channel::Tls(info));
        c.hello(want).await?;
        Ok(c)
    }

    async fn send(&mut self, b: &[u8]) -> Result<(), ClientError> {
        tokio::time::timeout(self.timeout, self.stream.write_all(b))
            .await
            .map_err(|_| ClientError::Timeout)??;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        tokio::time::timeout(self.timeout, self.stream.flush())
            .await
            .map_err(|_| ClientError::Timeout)??;
        Ok(())
    }

    /// Read one (possibly multi-line) reply.
    async fn read_reply(&mut self) -> Result<Reply, ClientError> {
        Ok(reply_of(&self.read_response().await?))
    }

    /// Read one (possibly multi-line) reply as the parser gives it.
    async fn read_response(&mut self) -> Result<Response<String>, ClientError> {
        loop {
            if self.rpos < self.rbuf.len() {
                let mut it = self.rbuf[self.rpos..].iter();
                let res = self.receiver.parse(&mut it);
                self.rpos = self.rbuf.len() - it.as_slice().len();
                match res {
                    Ok(r) => {
                        self.receiver.reset();
                        return Ok(r);
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(e) => {
                        self.receiver.reset();
                        return Err(ClientError::Protocol(format!("{e:?}")));
                    }
                }
            }
            if self.rpos >= self.rbuf.len() {
                self.rbuf.clear();
                self.rpos = 0;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(self.timeout, self.stream.get_mut().read(&mut chunk))
                .await
                .map_err(|_| ClientError::Timeout)??;
            if n == 0 {
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                )));
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Send one message. Returns one reply per recipient, in order.
    /// An `Err` means the connection failed and must not be reused.
    pub(crate) async fn transaction(
        &mut self,
        from: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> Result<Vec<Reply>, ClientError> {
        let mail = format!(
            "MAIL FROM:<{from}>{}\r\n",
            if is_8bit(body) { " BODY=8BITMIME" } else { "" }
        );
        let mut results: Vec<Option<Reply>> = vec![None; rcpts.len()];
        let (mail_reply, rcpt_replies, data_reply) = if self.pipelining {
            let mut cmds = mail.into_bytes();
            for r in rcpts {
                cmds.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
            }
            cmds.extend_from_slice(b"DATA\r\n");
            self.send(&cmds).await?;
            self.flush().await?;
            let m = self.read_reply().await?;
            let mut rr = Vec::with_capacity(rcpts.len());
            for _ in rcpts {
                rr.push(self.read_reply().await?);
            }
            let d = self.read_reply().await?;
            (m, rr, Some(d))
        } else {
            self.send(mail.as_bytes()).await?;
            self.flush().await?;
            let m = self.read_reply().await?;
            let mut rr = Vec::new();
            let mut d = None;
            if is_ok(&m) {
                for r in rcpts {
                    self.send(format!("RCPT TO:<{r}>\r\n").as_bytes()).await?;
                    self.flush().await?;
                    rr.push(self.read_reply().await?);
                }
                if rr.iter().any(is_ok) {
                    self.send(b"DATA\r\n").await?;
                    self.flush().await?;
                    d = Some(self.read_reply().await?);
                }
            }
            (m, rr, d)
        };
        if !is_ok(&mail_reply) {
            if data_reply.as_ref().is_some_and(|d| d.code == 354) {
                self.finish_empty_data().await?;
            }
            self.reset().await?;
            return Ok(vec![mail_reply; rcpts.len()]);
        }
        let mut accepted = Vec::new();
        for (i, r) in rcpt_replies.into_iter().enumerate() {
            if is_ok(&r) {
                accepted.push(i);
            } else {
                results[i] = Some(r);
            }
        }
        match data_reply {
            Some(d) if d.code == 354 => {
                if accepted.is_empty() {
                    self.finish_empty_data().await?;
                    self.reset().await?;
                } else {
                    self.send_body(body).await?;
                    if self.lmtp {
                        for &i in &accepted {
                            results[i] = Some(self.read_reply().await?);
                        }
                    } else {
                        let r = self.read_reply().await?;
                        for &i in &accepted {
                            results[i] = Some(r.clone());
                        }
                    }
                }
            }
            Some(d) => {
                for &i in &accepted {
                    results[i] = Some(d.clone());
                }
                self.reset().await?;
            }
            None => {
                self.reset().await?;
            }
        }
        self.sent += 1;
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Reply::new(451, Enhanced::new(4, 3, 0), "No reply for this recipient")
                })
            })
            .collect())
    }

    /// Ask whether the server takes `rcpt`, sending nothing: `MAIL FROM:<>`,
    /// `RCPT TO:<rcpt>`, `RSET`. The reply to RCPT is the answer; a refused
    /// MAIL says nothing of the recipient (`Refused`).
    pub(crate) async fn probe(&mut self, rcpt: &str) -> Result<Reply, ClientError> {
        self.send(b"MAIL FROM:<>\r\n").await?;
        self.flush().await?;
        let m = self.read_reply().await?;
        if !is_ok(&m) {
            return Err(ClientError::Refused(m));
        }
        self.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
            .await?;
        self.flush().await?;
        let r = self.read_reply().await?;
        self.reset().await?;
        Ok(r)
    }

    /// The server said 354 although no recipient was accepted: end the data with nothing.
    async fn finish_empty_data(&mut self) -> Result<(), ClientError> {
        self.send(b".\r\n").await?;
        self.flush().await?;
        let _ = self.read_reply().await?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), ClientError> {
        self.send(b"RSET\r\n").await?;
        self.flush().await?;
        let _ = self.read_reply().await?;
        Ok(())
    }

    /// Send the message with dot-stuffing (RFC 5321 4.5.2) and the final
    /// dot, a slice at a time, so a large body is never copied whole.
    async fn send_body(&mut self, body: &[u8]) -> Result<(), ClientError> {
        const CHUNK: usize = 64 * 1024;
        let mut stuffer = DotStuffer::new();
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 8);
        for chunk in body.chunks(CHUNK) {
            stuffer.feed(chunk, &mut out);
            self.send(&out).await?;
            out.clear();
        }
        stuffer.finish(&mut out);
        self.send(&out).await?;
        self.flush().await
    }

    pub(crate) async fn quit(mut self) {
        let _ = self.send(b"QUIT\r\n").await;
        let _ = self.flush().await;
        // Over TLS this sends close_notify, so the server sees a clean end.
        let _ = tokio::time::timeout(self.timeout, self.stream.shutdown()).await;
    }
}

fn is_8bit(body: &[u8]) -> bool {
    body.iter().any(|&b| b >= 0x80)
}

/// Idle connections per destination, reused by the next message to the same place.
/// At most [`MAX_IDLE_PER_KEY`] per destination; expired ones are closed
/// whenever the pool is used, so a destination never used again does not
/// keep its sockets.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<(Conn, Instant)>>>,
}

/// How long an idle connection is kept; servers commonly drop idle clients after a minute or more.
const IDLE_KEEP: Duration = Duration::from_secs(20);
/// Messages per connection before it is closed and a fresh one opened.
const MAX_PER_CONN: u32 = 1000;
/// Idle connections kept per destination (a burst's extra ones are closed).
pub(crate) const MAX_IDLE_PER_KEY: usize = 8;

impl Pool {
    pub(crate) fn take(&self, key: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        let stale = Self::sweep(&mut idle);
        let found = idle.get_mut(key).and_then(Vec::pop).map(|(c, _)| c);
        drop(idle);
        close_all(stale);
        found
    }

    pub(crate) fn put(&self, key: &str, conn: Conn) {
        if conn.sent >= MAX_PER_CONN {
            tokio::spawn(conn.quit());
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let mut stale = Self::sweep(&mut idle);
        let list = idle.entry(key.to_string()).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push((conn, Instant::now()));
        } else {
            stale.push(conn);
        }
        drop(idle);
        close_all(stale);
    }

    /// Takes out every connection idle longer than [`IDLE_KEEP`].
    fn sweep(idle: &mut HashMap<String, Vec<(Conn, Instant)>>) -> Vec<Conn> {
        let mut stale = Vec::new();
        for list in idle.values_mut() {
            let (keep, old): (Vec<_>, Vec<_>) =
                list.drain(..).partition(|(_, at)| at.elapsed() < IDLE_KEEP);
            *list = keep;
            stale.extend(old.into_iter().map(|(c, _)| c));
        }
        idle.retain(|_, l| !l.is_empty());
        stale
    }

    /// Close everything idle (shutdown).
    pub(crate) fn drain(&self) -> Vec<Conn> {
        match self.idle.lock() {
            Ok(mut idle) => idle
                .drain()
                .flat_map(|(_, v)| v.into_iter().map(|(c, _)| c))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Says QUIT on each, off the caller's path (when inside the runtime).
fn close_all(conns: Vec<Conn>) {
    if conns.is_empty() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            for c in conns {
                c.quit().await;
            }
        });
    }
}

/// Deliver one message to the next hop called `key`, at one of `addrs`,
/// reusing a pooled connection when there is one. Returns each
/// recipient's reply and how the session was carried. An `Err` means
/// nothing was delivered (no session, or not one secured as required).
pub(crate) async fn deliver(
    pool: &Pool,
    key: &str,
    addrs: &[std::net::SocketAddr],
    want: &Want<'_>,
    from: &str,
    rcpts: &[String],
    body: &[u8],
) -> Result<(Vec<Reply>, Channel), ClientError> {
    // The level is part of the key: a `may` session (perhaps plain) is
    // never reused where `encrypt` or `verify` is required.
    let key = format!("{key} tls={} host={}", want.level.as_str(), want.host);
    // A pooled connection may have been closed by the server while idle:
    // if it fails, go on with a fresh one.
    if let Some(mut c) = pool.take(&key)
        && let Ok(r) = c.transaction(from, rcpts, body).await
    {
        let channel = c.channel.clone();
        pool.put(&key, c);
        return Ok((r, channel));
    }
    let mut last = ClientError::Protocol("no address to connect to".into());
    for &a in addrs {
        let conn = match Conn::connect(a, want, false).await {
            // `may` only: one retry in plain text after a failed handshake
            // (the server offered TLS it could not finish).
            Err(ClientError::Tls(TlsFailure::Handshake(why))) if want.level == TlsLevel::May => {
                tracing::info!(host = want.host, %a, error = %why, "TLS handshake failed; retrying once in plain text");
                Conn::connect(a, want, true).await
            }
            other => other,
        };
        match conn {
            Ok(mut c) => {
                let r = c.transaction(from, rcpts, body).await?;
                let channel = c.channel.clone();
                pool.put(&key, c);
                return Ok((r, channel));
            }
            // A refusal in the greeting, or TLS not as required, is an
            // answer from that host: stop there.
            Err(e @ (ClientError::Refused(_) | ClientError::Tls(_))) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_reply_keeps_its_enhanced_code_apart() {
        let r = Response {
            code: 550,
            esc: [5, 1, 1],
            message: "no such\r\nuser".to_string(),
        };
        let reply = reply_of(&r);
        assert_eq!(reply.enhanced, Some(Enhanced::new(5, 1, 1)));
        assert_eq!(reply.to_string(), "550 5.1.1 no such  user");
        let r = Response {
            code: 250,
            esc: [0, 0, 0],
            message: "ok".to_string(),
        };
        assert_eq!(reply_of(&r).enhanced, None);
    }
}
