//! clamd's INSTREAM command: `zINSTREAM\0`, then the message in chunks
//! each led by its length (4 bytes, big-endian), then a zero length; clamd
//! answers one NUL-terminated line: `stream: OK`, `stream: NAME FOUND`, or
//! `... ERROR`.
//!
//! clamd stops reading once the stream passes its `StreamMaxLength`
//! (Debian's default 25M, as our default `max_message_size`), answers
//! `INSTREAM size limit exceeded. ERROR` and closes; that is
//! [`ScanError::TooLarge`].

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClamdAddr, ScanError};

/// Bytes per INSTREAM chunk: large enough for few syscalls, well under
/// any StreamMaxLength.
const CHUNK: usize = 64 * 1024;

/// clamd's answer is one short line; anything longer is not clamd.
const MAX_ANSWER: usize = 4096;

/// The signature clamd found in `message`, or `None` when it is clean.
pub(crate) async fn scan(addr: &ClamdAddr, message: &[u8]) -> Result<Option<String>, ScanError> {
    let failed = |e: std::io::Error| ScanError::Failed(format!("clamd at {addr}: {e}"));
    let answer = match addr {
        ClamdAddr::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a.as_str())
                .await
                .map_err(failed)?;
            instream(s, message).await
        }
        ClamdAddr::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await.map_err(failed)?;
            instream(s, message).await
        }
    }
    .map_err(failed)?;
    parse(&answer)
}

/// Sends the stream and reads the answer. A write that fails part way may
/// be clamd refusing a stream over its limit: its answer is read anyway.
async fn instream<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    message: &[u8],
) -> std::io::Result<String> {
    let sent = send(&mut s, message).await;
    let mut answer = Vec::new();
    let read = read_answer(&mut s, &mut answer).await;
    if answer.is_empty() {
        sent?;
        read?;
    }
    Ok(String::from_utf8_lossy(&answer).trim().to_string())
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, message: &[u8]) -> std::io::Result<()> {
    s.write_all(b"zINSTREAM\0").await?;
    for chunk in message.chunks(CHUNK) {
        // A chunk is at most CHUNK bytes, so its length fits in 4 bytes.
        s.write_all(&(chunk.len() as u32).to_be_bytes()).await?;
        s.write_all(chunk).await?;
    }
    s.write_all(&0u32.to_be_bytes()).await?;
    s.flush().await
}

/// Reads up to the NUL that ends the answer (or EOF), at most [`MAX_ANSWER`] bytes.
async fn read_answer<S: AsyncRead + Unpin>(s: &mut S, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let part = &buf[..n];
        if let Some(end) = part.iter().position(|&b| b == 0) {
            out.extend_from_slice(&part[..end]);
            return Ok(());
        }
        out.extend_from_slice(part);
        if out.len() > MAX_ANSWER {
            return Err(std::io::Error::other("answer too long, not clamd?"));
        }
    }
}

/// `stream: OK` → clean, `stream: NAME FOUND` → NAME, anything else an error.
fn parse(answer: &str) -> Result<Option<String>, ScanError> {
    if answer.contains("size limit exceeded") {
        return Err(ScanError::TooLarge);
    }
    let body = answer.strip_prefix("stream:").map(str::trim);
    match body {
        Some("OK") => Ok(None),
        Some(b) if b.ends_with(" FOUND") => {
            let name = b.trim_end_matches(" FOUND").trim();
            if name.is_empty() {
                Err(ScanError::Failed(format!("clamd: odd answer \"{answer}\"")))
            } else {
                Ok(Some(crate::mail::one_line(name)))
            }
        }
        _ if answer.is_empty() => Err(ScanError::Failed(
            "clamd closed the connection without an answer".into(),
        )),
        _ => Err(ScanError::Failed(format!(
            "clamd: {}",
            crate::mail::one_line(answer)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(parse("stream: OK"), Ok(None));
        assert_eq!(
            parse("stream: Eicar-Test-Signature FOUND"),
            Ok(Some("Eicar-Test-Signature".into()))
        );
        assert_eq!(
            parse("INSTREAM size limit exceeded. ERROR"),
            Err(ScanError::TooLarge)
        );
        assert!(matches!(
            parse("stream: Can't allocate memory ERROR"),
            Err(ScanError::Failed(_))
        ));
        assert!(matches!(parse(""), Err(ScanError::Failed(_))));
        assert!(matches!(parse("stream:  FOUND"), Err(ScanError::Failed(_))));
    }
}

#[cfg(test)]
mod property {
    /// Any answer clamd (or something pretending to be it) sends gives a
    /// clean, a one-line name or an error: never a panic, never a line break.
    #[test]
    fn any_answer_parses_or_errs() {
        crate::testing::cases(20_000, 0xc1a3d, |rng| {
            let bytes = rng.bytes(64, b"stream: OKFUND \r\n\0\xff.:size limit exceeded");
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(Some(name)) = super::parse(&text) {
                assert!(!name.contains(['\r', '\n']), "{text:?}");
            }
        });
    }
}
