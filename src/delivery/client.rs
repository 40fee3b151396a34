//! The SMTP/LMTP client that delivers to the next hop.
//!
//! Connections are pooled per destination and reused for many messages;
//! when the server offers PIPELINING, MAIL, every RCPT and DATA go out in
//! one write (RFC 2920). LMTP answers once per accepted recipient after the
//! final dot (RFC 2033), so each recipient gets its own result.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use smtp_proto::Response;
use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;

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
}

/// A live connection to a next hop.
pub(crate) struct Conn {
    stream: BufWriter<TcpStream>,
    rbuf: Vec<u8>,
    rpos: usize,
    receiver: ResponseReceiver,
    lmtp: bool,
    pipelining: bool,
    timeout: Duration,
    /// Messages sent on this connection (for logging and limits).
    pub(crate) sent: u32,
}

impl Conn {
    /// Connect, read the greeting, say EHLO (or LHLO).
    pub(crate) async fn connect(
        addr: std::net::SocketAddr,
        lmtp: bool,
        helo_name: &str,
        timeout: Duration,
    ) -> Result<Conn, ClientError> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout)??;
        let _ = tcp.set_nodelay(true);
        let mut c = Conn {
            stream: BufWriter::with_capacity(64 * 1024, tcp),
            rbuf: Vec::with_capacity(4096),
            rpos: 0,
            receiver: ResponseReceiver::default(),
            lmtp,
            pipelining: false,
            timeout,
            sent: 0,
        };
        let greeting = c.read_reply().await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused(greeting));
        }
        let verb = if lmtp { "LHLO" } else { "EHLO" };
        c.send(format!("{verb} {helo_name}\r\n").as_bytes()).await?;
        c.flush().await?;
        let ehlo_raw = c.read_response().await?;
        let ehlo = reply_of(&ehlo_raw);
        if !is_ok(&ehlo) {
            if lmtp {
                return Err(ClientError::Refused(ehlo));
            }
            // A server that does not speak ESMTP: fall back to HELO.
            c.send(format!("HELO {helo_name}\r\n").as_bytes()).await?;
            c.flush().await?;
            let helo = c.read_reply().await?;
            if !is_ok(&helo) {
                return Err(ClientError::Refused(helo));
            }
        } else {
            // From the raw reply: the sanitised text is capped in length.
            c.pipelining = ehlo_raw
                .message
                .split_whitespace()
                .any(|w| w.eq_ignore_ascii_case("PIPELINING"));
        }
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
    }
}

fn is_8bit(body: &[u8]) -> bool {
    body.iter().any(|&b| b >= 0x80)
}

/// Idle connections per destination, reused by the next message to the same place.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<(Conn, Instant)>>>,
}

/// How long an idle connection is kept; servers commonly drop idle clients after a minute or more.
const IDLE_KEEP: Duration = Duration::from_secs(20);
/// Messages per connection before it is closed and a fresh one opened.
const MAX_PER_CONN: u32 = 1000;

impl Pool {
    pub(crate) fn take(&self, key: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(key)?;
        while let Some((c, at)) = list.pop() {
            if at.elapsed() < IDLE_KEEP {
                return Some(c);
            }
        }
        None
    }

    pub(crate) fn put(&self, key: &str, conn: Conn) {
        if conn.sent >= MAX_PER_CONN {
            tokio::spawn(conn.quit());
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.entry(key.to_string())
                .or_default()
                .push((conn, Instant::now()));
        }
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

/// Deliver one message to the next hop called `key`, at one of `addrs`,
/// reusing a pooled connection when there is one. An `Err` means nothing
/// was delivered (connection-level failure).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn deliver(
    pool: &Pool,
    key: &str,
    addrs: &[std::net::SocketAddr],
    lmtp: bool,
    helo_name: &str,
    timeout: Duration,
    from: &str,
    rcpts: &[String],
    body: &[u8],
) -> Result<Vec<Reply>, ClientError> {
    // A pooled connection may have been closed by the server while idle:
    // if it fails, go on with a fresh one.
    if let Some(mut c) = pool.take(key)
        && let Ok(r) = c.transaction(from, rcpts, body).await
    {
        pool.put(key, c);
        return Ok(r);
    }
    let mut last = ClientError::Protocol("no address to connect to".into());
    for &a in addrs {
        match Conn::connect(a, lmtp, helo_name, timeout).await {
            Ok(mut c) => {
                let r = c.transaction(from, rcpts, body).await?;
                pool.put(key, c);
                return Ok(r);
            }
            // A refusal in the greeting is an answer from that host: stop there.
            Err(e @ ClientError::Refused(_)) => return Err(e),
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
