//! One buffered connection, whatever runs on it: plain TCP, TLS (implicit
//! or after an upgrade), a Unix socket, an in-memory duplex in tests.
//!
//! Every wait a peer can impose is bounded here, so no protocol shell can
//! forget one: a line must be complete within `idle` of the moment we
//! started reading it (a byte a second does not renew it), a write must
//! drain within `idle`, a TLS handshake must finish within `handshake`,
//! and nothing outlives the session deadline.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Any byte stream a session can run on.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The waits a peer may impose on one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    /// Per command line (and per write): fixed when the read starts.
    pub(crate) idle: Duration,
    /// A TLS handshake, implicit or after STARTTLS/STLS.
    pub(crate) handshake: Duration,
    /// The whole session; `None` for protocols whose sessions may
    /// legitimately last (IMAP IDLE is bounded by `idle` instead).
    pub(crate) session: Option<Duration>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            idle: Duration::from_secs(300),
            handshake: Duration::from_secs(10),
            session: None,
        }
    }
}

/// What a line read produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// One line ([`Conn::read_line`]: without its line end; [`Conn::read_line_raw`]: with it).
    Data(Vec<u8>),
    /// The line exceeded the bound; it was read and thrown away up to its end.
    TooLong,
    /// The peer closed the connection.
    Eof,
    /// The line was not complete in time (idle or session deadline).
    Timeout,
    /// Shutdown began while no byte of the line had arrived.
    Shutdown,
}

/// What [`Conn::fill`] produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// This many new bytes are in [`Conn::buffered`].
    Data(usize),
    Eof,
    Timeout,
}

/// How much to read at a time once a client sends in bulk (DATA, literals).
const READ_CHUNK: usize = 8192;
/// The first read of a line into an empty buffer: an idle connection
/// waiting for its next command holds this much, not [`READ_CHUNK`].
const FIRST_READ: usize = 512;

/// A connection with its read buffer and deadlines.
pub(crate) struct Conn {
    io: Box<dyn Stream>,
    buf: BytesMut,
    /// The stream is TLS (implicit, or upgraded).
    pub(crate) tls: bool,
    deadlines: Deadlines,
    session_end: Option<Instant>,
    shutdown: Option<watch::Receiver<bool>>,
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"))
}

impl Conn {
    /// A connection with default deadlines (tests, in-memory streams).
    #[cfg(test)]
    pub(crate) fn new(io: Box<dyn Stream>, tls: bool) -> Conn {
        Conn::with_deadlines(io, tls, Deadlines::default())
    }

    pub(crate) fn with_deadlines(io: Box<dyn Stream>, tls: bool, deadlines: Deadlines) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            tls,
            deadlines,
            session_end: deadlines.session.map(|d| Instant::now() + d),
            shutdown: None,
        }
    }

    /// The stream itself, for a shell that speaks through a library (the
    /// web pages: hyper). Nothing has been read yet on such a listener.
    pub(crate) fn into_stream(self) -> Box<dyn Stream> {
        debug_assert!(self.buf.is_empty());
        self.io
    }

    /// Let [`Conn::read_line_raw`] with `stoppable` end at shutdown.
    pub(crate) fn watch_shutdown(&mut self, rx: watch::Receiver<bool>) {
        self.shutdown = Some(rx);
    }

    /// Shutdown has begun (false when no shutdown signal is watched).
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.as_ref().is_some_and(|rx| *rx.borrow())
    }

    pub(crate) fn deadlines(&self) -> Deadlines {
        self.deadlines
    }

    /// Has the whole-session deadline passed?
    pub(crate) fn session_expired(&self) -> bool {
        self.session_end.is_some_and(|e| Instant::now() >= e)
    }

    /// `now + d`, but never past the session's end.
    pub(crate) fn deadline_in(&self, d: Duration) -> Instant {
        let at = Instant::now() + d;
        match self.session_end {
            Some(end) if end < at => end,
            _ => at,
        }
    }

    /// Waiting for a command again: give back what a burst grew (a line
    /// reader outside this file calls it before its first fill).
    pub(crate) fn shrink_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > FIRST_READ {
            self.buf = BytesMut::new();
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
    }

    /// Read more bytes into the buffer, waiting at most until `deadline`.
    pub(crate) async fn fill(&mut self, deadline: Instant) -> std::io::Result<Fill> {
        Self::fill_inner(&mut self.io, &mut self.buf, deadline).await
    }

    /// Read one line of at most `max` bytes (line end excluded), returned
    /// without its CRLF (or bare LF).
    pub(crate) async fn read_line(&mut self, max: usize) -> std::io::Result<Line> {
        Ok(match self.read_line_raw(max + 2, false).await? {
            Line::Data(mut l) => {
                l.pop();
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                if l.len() > max {
                    Line::TooLong
                } else {
                    Line::Data(l)
                }
            }
            other => other,
        })
    }

    /// Read one line of at most `max` bytes, line end included (what
    /// smtp-proto parses). The line must be complete within `idle` of the
    /// call, whatever trickles in meanwhile. With `stoppable`, shutdown
    /// ends the wait as long as no byte of the line has arrived.
    pub(crate) async fn read_line_raw(
        &mut self,
        max: usize,
        stoppable: bool,
    ) -> std::io::Result<Line> {
        let deadline = self.deadline_in(self.deadlines.idle);
        self.shrink_idle();
        let mut scanned = 0;
        let mut too_long = false;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos + 1;
                if too_long || end > max {
                    self.buf.advance(end);
                    return Ok(Line::TooLong);
                }
                return Ok(Line::Data(self.buf.split_to(end).to_vec()));
            }
            if self.buf.len() > max {
                // Keep nothing of an over-long line; discard up to its end.
                too_long = true;
                self.buf.clear();
            }
            scanned = self.buf.len();
            let idle_line = !too_long && self.buf.is_empty();
            // Disjoint borrows: the stream and buffer fill while the shutdown signal is watched.
            let Conn {
                io, buf, shutdown, ..
            } = self;
            let filled = match shutdown.as_mut() {
                Some(rx) if stoppable && idle_line => {
                    tokio::select! {
                        biased;
                        f = Self::fill_inner(io, buf, deadline) => f?,
                        _ = super::stopped(rx) => return Ok(Line::Shutdown),
                    }
                }
                _ => Self::fill_inner(io, buf, deadline).await?,
            };
            match filled {
                Fill::Data(_) => {}
                Fill::Eof => return Ok(Line::Eof),
                Fill::Timeout => return Ok(Line::Timeout),
            }
        }
    }

    async fn fill_inner(
        io: &mut Box<dyn Stream>,
        buf: &mut BytesMut,
        deadline: Instant,
    ) -> std::io::Result<Fill> {
        if buf.capacity() - buf.len() < FIRST_READ / 2 {
            buf.reserve(if buf.capacity() == 0 {
                FIRST_READ
            } else {
                READ_CHUNK
            });
        }
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) => Ok(Fill::Timeout),
            Ok(Ok(0)) => Ok(Fill::Eof),
            Ok(Ok(n)) => Ok(Fill::Data(n)),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Read exactly `n` bytes (an IMAP literal) within `idle`. `None` on EOF.
    pub(crate) async fn read_exact(&mut self, n: usize) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = self.deadline_in(self.deadlines.idle);
        while self.buf.len() < n {
            match self.fill(deadline).await? {
                Fill::Data(_) => {}
                Fill::Eof => return Ok(None),
                Fill::Timeout => return Err(timed_out("reading a literal")),
            }
        }
        Ok(Some(self.buf.split_to(n).to_vec()))
    }

    /// Write and flush; a peer that does not read gets `idle`, no more.
    pub(crate) async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let deadline = self.deadline_in(self.deadlines.idle);
        let io = &mut self.io;
        tokio::time::timeout_at(deadline, async {
            io.write_all(data).await?;
            io.flush().await
        })
        .await
        .map_err(|_| timed_out("writing"))?
    }

    /// Upgrade to TLS within the handshake deadline. Bytes the client
    /// pipelined after STARTTLS are discarded: they came in clear text and
    /// must not be taken as coming through TLS (CVE-2011-0411).
    pub(crate) async fn starttls(
        self,
        acceptor: &tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<Conn> {
        let deadline = self.deadline_in(self.deadlines.handshake);
        let tls = tokio::time::timeout_at(deadline, acceptor.accept(self.io))
            .await
            .map_err(|_| timed_out("TLS handshake"))??;
        Ok(Conn {
            io: Box::new(tls),
            buf: BytesMut::new(),
            tls: true,
            deadlines: self.deadlines,
            session_end: self.session_end,
            shutdown: self.shutdown,
        })
    }

    /// Close our side; bounded, like every write.
    pub(crate) async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.deadlines.handshake, self.io.shutdown()).await;
    }

    /// Close our side, then read and discard what the peer still sends for
    /// a moment, so our last reply is not lost to a reset when we hang up on
    /// a client that is still writing (a lingering close).
    pub(crate) async fn close_lingering(&mut self, linger: Duration) {
        self.shutdown().await;
        let deadline = Instant::now() + linger;
        let mut discarded = 0usize;
        while discarded < (1 << 20) {
            self.buf.clear();
            match self.fill(deadline).await {
                Ok(Fill::Data(n)) => discarded += n,
                _ => break,
            }
        }
    }
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

    #[tokio::test]
    async fn dripping_bytes_do_not_renew_the_line_deadline() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let d = Deadlines {
            idle: Duration::from_millis(600),
            ..Deadlines::default()
        };
        let mut conn = Conn::with_deadlines(Box::new(server), false, d);
        let drip = tokio::spawn(async move {
            for _ in 0..20 {
                if client.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            client
        });
        let started = Instant::now();
        assert_eq!(
            conn.read_line_raw(1000, false).await.unwrap(),
            Line::Timeout
        );
        // Bytes kept arriving every 100 ms, yet the line ended at its deadline.
        assert!(started.elapsed() < Duration::from_millis(1900));
        drop(drip);
    }

    #[tokio::test]
    async fn raw_lines_keep_their_end_and_shutdown_interrupts() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(Box::new(server), false);
        let (tx, rx) = watch::channel(false);
        conn.watch_shutdown(rx);
        client.write_all(b"NOOP\r\n").await.unwrap();
        assert_eq!(
            conn.read_line_raw(100, true).await.unwrap(),
            Line::Data(b"NOOP\r\n".to_vec())
        );
        tx.send(true).unwrap();
        assert_eq!(conn.read_line_raw(100, true).await.unwrap(), Line::Shutdown);
    }
}
