//! The I/O shell shared by POP3 and IMAP: a buffered connection over any async byte stream,
//! line framing with a hard length bound, STARTTLS upgrade, per-IP login throttling.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Any byte stream a session can run on: TCP, TLS over TCP, an in-memory duplex in tests.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What a line read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// One line without its CRLF (or bare LF).
    Data(Vec<u8>),
    /// The line exceeded the bound; it was read and thrown away up to its end.
    TooLong,
    /// The peer closed the connection.
    Eof,
}

/// A connection with its read buffer.
pub struct Conn {
    io: Box<dyn Stream>,
    buf: Vec<u8>,
    pub tls: bool,
}

const READ_CHUNK: usize = 8192;

impl Conn {
    pub fn new(io: Box<dyn Stream>, tls: bool) -> Conn {
        Conn {
            io,
            buf: Vec::with_capacity(READ_CHUNK),
            tls,
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = self.io.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Read one line of at most `max` bytes (excluding the line end).
    pub async fn read_line(&mut self, max: usize) -> std::io::Result<Line> {
        let mut scanned = 0;
        let mut too_long = false;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                if too_long {
                    self.buf.drain(..=end);
                    return Ok(Line::TooLong);
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > max {
                    return Ok(Line::TooLong);
                }
                return Ok(Line::Data(line));
            }
            if self.buf.len() > max + 2 {
                // Keep nothing of an over-long line; go on discarding up to its end.
                too_long = true;
                self.buf.clear();
            }
            scanned = self.buf.len();
            if self.fill().await? == 0 {
                return Ok(Line::Eof);
            }
        }
    }

    /// Read exactly `n` bytes (an IMAP literal). `None` on EOF.
    pub async fn read_exact(&mut self, n: usize) -> std::io::Result<Option<Vec<u8>>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
        Ok(Some(self.buf.drain(..n).collect()))
    }

    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    /// Upgrade to TLS. Bytes the client pipelined after the STARTTLS command are discarded
    /// (they were sent in clear text and must not be taken as coming through TLS).
    pub async fn starttls(self, acceptor: &tokio_rustls::TlsAcceptor) -> std::io::Result<Conn> {
        let tls = acceptor.accept(self.io).await?;
        Ok(Conn::new(Box::new(tls), true))
    }

    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

/// Slows down password guessing: every failed login from an IP raises the delay that IP's
/// next login attempts wait before they are checked (0.25 s doubling up to 16 s); it decays
/// after 15 minutes without failures and is cleared by a success.
#[derive(Default)]
pub struct Throttle {
    map: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

const THROTTLE_FORGET: Duration = Duration::from_secs(15 * 60);
const THROTTLE_MAX_KEYS: usize = 100_000;

impl Throttle {
    /// How long an attempt from `ip` must wait before its password is checked.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&ip) {
            Some(&(n, at)) if n > 0 && at.elapsed() < THROTTLE_FORGET => {
                let ms = 250u64.saturating_mul(1u64 << (n - 1).min(6));
                Duration::from_millis(ms)
            }
            _ => Duration::ZERO,
        }
    }

    pub fn failed(&self, ip: IpAddr) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= THROTTLE_MAX_KEYS {
            map.retain(|_, (_, at)| at.elapsed() < THROTTLE_FORGET);
        }
        let e = map.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= THROTTLE_FORGET {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = Instant::now();
    }

    pub fn succeeded(&self, ip: IpAddr) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&ip);
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone, which also means: stop).
pub async fn wait_shutdown(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_session_continues() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(Box::new(server), false);
        let mut client = client;
        let long = vec![b'a'; 5000];
        client.write_all(b"one\r\n").await.unwrap();
        client.write_all(&long).await.unwrap();
        client.write_all(b"\r\ntwo\nthree").await.unwrap();
        drop(client);
        assert_eq!(
            conn.read_line(100).await.unwrap(),
            Line::Data(b"one".to_vec())
        );
        assert_eq!(conn.read_line(100).await.unwrap(), Line::TooLong);
        assert_eq!(
            conn.read_line(100).await.unwrap(),
            Line::Data(b"two".to_vec())
        );
        assert_eq!(conn.read_line(100).await.unwrap(), Line::Eof);
    }

    #[test]
    fn throttle_grows() {
        let t = Throttle::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert_eq!(t.delay(ip), Duration::ZERO);
        t.failed(ip);
        assert_eq!(t.delay(ip), Duration::from_millis(250));
        t.failed(ip);
        assert_eq!(t.delay(ip), Duration::from_millis(500));
        t.succeeded(ip);
        assert_eq!(t.delay(ip), Duration::ZERO);
    }
}
