//! Rspamd's `POST /checkv2`: the message as the body, the envelope in
//! request headers (`From`, one `Rcpt` per recipient, `IP`, `Helo`, `User`
//! for an authenticated sender, `MTA-Name`), and a JSON answer of which we
//! keep `score`, `action` and the names of the `symbols`.
//!
//! No `Hostname` header: we do not look up the client's reverse DNS, and
//! without it Rspamd does its own lookup (a wrong value would mislead its
//! rules). No `Queue-Id` either: the DATA stage does not know it.

use std::collections::BTreeMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_LENGTH, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::{RspamdAddr, ScanError};
use crate::policy::TxInfo;

/// Rspamd's answer with every symbol's details is a few kB; beyond this
/// it is not Rspamd.
const MAX_ANSWER: usize = 1 << 20;

/// What Rspamd said of a message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub(crate) score: f64,
    /// `no action`, `greylist`, `add header`, `rewrite subject`, `soft reject`, `reject`.
    pub(crate) action: String,
    /// The symbols that fired, by name, sorted.
    pub(crate) symbols: Vec<String>,
}

#[derive(Deserialize)]
struct Reply {
    score: f64,
    action: String,
    #[serde(default)]
    symbols: BTreeMap<String, serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct ErrorReply {
    error: String,
}

/// Asks Rspamd at `addr` about `message`, sent by `tx`.
pub(crate) async fn check(
    addr: &RspamdAddr,
    tx: &TxInfo,
    hostname: &str,
    message: &[u8],
) -> Result<Answer, ScanError> {
    let failed = |what: String| ScanError::Failed(format!("rspamd at {addr}: {what}"));
    let request = request(addr, tx, hostname, message).map_err(|e| failed(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect(addr.authority.as_str())
        .await
        .map_err(|e| failed(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| failed(e.to_string()))?;
    // The connection is driven here, not by a task of its own, so a scan
    // dropped at the deadline closes it at once.
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok::<_, ScanError>((status, body))
    };
    tokio::pin!(exchange, conn);
    let (status, body) = tokio::select! {
        biased;
        r = &mut exchange => r?,
        c = &mut conn => match c {
            // Closed after answering: what was read is still to be had.
            Ok(()) => exchange.await?,
            Err(e) => return Err(failed(e.to_string())),
        },
    };
    parse(status, &body).map_err(failed)
}

fn request(
    addr: &RspamdAddr,
    tx: &TxInfo,
    hostname: &str,
    message: &[u8],
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri("/checkv2")
        .header(HOST, addr.authority.as_str())
        .header(CONTENT_LENGTH, message.len());
    let mut add = |name: &'static str, value: &str| {
        // Envelope values were checked by the SMTP session; one that still
        // is no valid header value is left out rather than failing the scan.
        if let Ok(v) = HeaderValue::from_str(value) {
            b = std::mem::take(&mut b).header(HeaderName::from_static(name), v);
        }
    };
    // Rspamd reads a null reverse-path as "<>".
    add("from", if tx.from.is_empty() { "<>" } else { &tx.from });
    for r in &tx.rcpts {
        add("rcpt", r);
    }
    add("ip", &tx.conn.ip.to_string());
    if !tx.helo.is_empty() {
        add("helo", &tx.helo);
    }
    if let Some(user) = &tx.auth_user {
        add("user", user);
    }
    add("mta-name", hostname);
    b.body(Full::new(Bytes::copy_from_slice(message)))
}

fn parse(status: StatusCode, body: &[u8]) -> Result<Answer, String> {
    if status != StatusCode::OK {
        let why = serde_json::from_slice::<ErrorReply>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into());
        return Err(format!("HTTP {status}: {}", crate::mail::one_line(&why)));
    }
    let r: Reply = serde_json::from_slice(body).map_err(|e| format!("unreadable answer ({e})"))?;
    if !r.score.is_finite() {
        return Err("unreadable answer (score is not a number)".into());
    }
    Ok(Answer {
        score: r.score,
        action: crate::mail::one_line(&r.action),
        symbols: r
            .symbols
            .into_keys()
            .map(|s| crate::mail::one_line(&s))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let ok = br#"{"is_skipped":false,"score":7.25,"required_score":15.0,"action":"add header",
            "symbols":{"B":{"name":"B","score":7.0},"A":{"name":"A","score":0.25}},"message-id":"x"}"#;
        assert_eq!(
            parse(StatusCode::OK, ok),
            Ok(Answer {
                score: 7.25,
                action: "add header".into(),
                symbols: vec!["A".into(), "B".into()],
            })
        );
        let e = parse(
            StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"error":"message too large"}"#,
        );
        assert_eq!(
            e,
            Err("HTTP 500 Internal Server Error: message too large".into())
        );
        assert!(parse(StatusCode::OK, b"<html>").is_err());
    }
}

#[cfg(test)]
mod property {
    use hyper::StatusCode;

    /// Whatever JSON-ish bytes come back, with any status, the answer
    /// parses to a finite score or an error; never a panic.
    #[test]
    fn any_body_parses_or_errs() {
        let seeds: [&[u8]; 3] = [
            br#"{"score": 7.5, "action": "add header", "symbols": {"A": {"score": 1}}}"#,
            br#"{"error": "bad"}"#,
            br#"{"score": 1e999, "action": "reject", "symbols": {}}"#,
        ];
        crate::testing::cases(20_000, 0x5a3d, |rng| {
            let mut body = seeds[rng.below(seeds.len())].to_vec();
            for _ in 0..rng.below(4) {
                let i = rng.below(body.len() + 1);
                match rng.below(3) {
                    0 if i < body.len() => {
                        body.remove(i);
                    }
                    1 => body.insert(i, rng.pick(b"{}[]\":,0.-e\\\xffnull")),
                    _ => body.truncate(i),
                }
            }
            let status = if rng.below(4) == 0 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            if let Ok(a) = super::parse(status, &body) {
                assert!(a.score.is_finite());
            }
        });
    }
}
