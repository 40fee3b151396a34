//! MTA-STS (RFC 8461): a domain says, in a `_mta-sts` TXT record and a
//! policy file served over verified HTTPS, that its MX hosts must be
//! reached over TLS with a valid certificate and must match its `mx`
//! patterns. Delivery asks [`MtaSts::policy`] before it picks MX hosts.
//!
//! Policies are cached in memory, per domain, for their `max_age` (a
//! restart fetches them again: the cache is an optimisation, and a domain's
//! TXT record says when its policy changed). A policy is fetched again when
//! the TXT record's `id` changes. When the TXT record is gone or DNS or the
//! fetch fails, a cached policy that has not expired is kept (RFC 8461 5.1),
//! so an attacker who blocks the lookup cannot downgrade a known domain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::mx;
use super::tls::OutboundTls;

/// The policy file's size limit (RFC 8461 3.3 suggests 64 KiB).
const MAX_BODY: usize = 64 * 1024;
/// Headers are bounded too.
const MAX_HEAD: usize = 16 * 1024;
/// The whole fetch (DNS, TCP, TLS, HTTP) must end within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// RFC 8461 3.2: max_age is at most 31557600 seconds (about a year).
const MAX_AGE_CAP: u64 = 31_557_600;
/// Domains kept in the cache; beyond, expired then oldest entries go.
const MAX_CACHED: usize = 10_000;

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Only matching MX hosts, only over verified TLS; otherwise defer.
    Enforce,
    /// Deliver as if there were no policy, and log what would have failed.
    Testing,
    /// The domain withdrew its policy.
    None,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) mode: Mode,
    /// MX patterns: a host name, or `*.` and a domain (one label).
    pub(crate) mx: Vec<String>,
    pub(crate) max_age: Duration,
}

impl Policy {
    /// Parses the `key: value` lines of RFC 8461 3.2; unknown keys are
    /// ignored, as the RFC asks.
    pub(crate) fn parse(text: &str) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "version" => version = Some(v.to_string()),
                "mode" => {
                    mode = Some(match v {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" => {
                    let n: u64 = v
                        .parse()
                        .ok()
                        .filter(|_| v.len() <= 10)
                        .ok_or_else(|| format!("bad max_age {v:?}"))?;
                    max_age = Some(n.min(MAX_AGE_CAP));
                }
                "mx" => mx.push(v.trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("no \"version: STSv1\"".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("no mx pattern".into());
        }
        Ok(Policy {
            mode,
            mx,
            max_age: Duration::from_secs(max_age),
        })
    }

    /// Does MX host `host` match one of the patterns (RFC 8461 4.1)? A
    /// `*.` pattern stands for exactly one label.
    pub(crate) fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(rest) => host
                .split_once('.')
                .is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
            None => *p == host,
        })
    }
}

/// The `id` of the one `v=STSv1` TXT record (RFC 8461 3.1); `None` when
/// there is none, or more than one (which the RFC says means no policy).
pub(crate) fn txt_id(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.split(';').next().is_some_and(|f| f.trim() == "v=STSv1"))
        .collect();
    let [record] = sts.as_slice() else {
        return None;
    };
    record.split(';').find_map(|f| {
        let (k, v) = f.trim().split_once('=')?;
        (k.trim() == "id"
            && (1..=32).contains(&v.trim().len())
            && v.trim().chars().all(|c| c.is_ascii_alphanumeric()))
        .then(|| v.trim().to_string())
    })
}

struct Cached {
    id: String,
    policy: Arc<Policy>,
    fetched: Instant,
}

impl Cached {
    fn fresh(&self) -> bool {
        self.fetched.elapsed() < self.policy.max_age
    }
}

/// The MTA-STS client and its per-domain cache.
pub(crate) struct MtaSts {
    cache: Mutex<HashMap<String, Cached>>,
    /// 443; a test knob (`[outbound_tls] mta_sts_port`).
    port: u16,
}

impl MtaSts {
    pub(crate) fn new(port: u16) -> MtaSts {
        MtaSts {
            cache: Mutex::default(),
            port,
        }
    }

    fn cached(&self, domain: &str) -> Option<(String, Arc<Policy>)> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(domain)
            .filter(|c| c.fresh())
            .map(|c| (c.id.clone(), c.policy.clone()))
    }

    /// The policy in force for `domain`, or `None` (no policy: deliver as
    /// configured).
    pub(crate) async fn policy(
        &self,
        resolver: &TokioResolver,
        tls: &OutboundTls,
        domain: &str,
    ) -> Option<Arc<Policy>> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.cached(&domain);
        let name = format!("_mta-sts.{domain}.");
        let id = match resolver.txt_lookup(name.as_str()).await {
            Ok(l) => {
                let records: Vec<String> = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(t) => Some(
                            t.txt_data
                                .iter()
                                .map(|s| String::from_utf8_lossy(s))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect();
                txt_id(&records)
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => None,
            Err(e) => {
                tracing::debug!(domain, error = %e, "MTA-STS TXT lookup failed");
                None
            }
        };
        // No (valid) record: a cached policy stays in force until it expires.
        let Some(id) = id else {
            return cached.map(|(_, p)| p);
        };
        if let Some((cid, p)) = &cached
            && *cid == id
        {
            return Some(p.clone());
        }
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch(resolver, tls, &domain)).await {
            Ok(Ok(policy)) => {
                tracing::info!(
                    domain,
                    id,
                    mode = policy.mode.as_str(),
                    max_age = policy.max_age.as_secs(),
                    mx = policy.mx.join(" "),
                    "MTA-STS policy fetched"
                );
                let policy = Arc::new(policy);
                self.store(&domain, id, policy.clone());
                Some(policy)
            }
            Ok(Err(why)) => {
                tracing::warn!(domain, id, error = %why, "MTA-STS policy fetch failed");
                cached.map(|(_, p)| p)
            }
            Err(_) => {
                tracing::warn!(domain, id, "MTA-STS policy fetch timed out");
                cached.map(|(_, p)| p)
            }
        }
    }

    fn store(&self, domain: &str, id: String, policy: Arc<Policy>) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.fresh());
            while cache.len() >= MAX_CACHED {
                let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.fetched)
                    .map(|(d, _)| d.clone())
                else {
                    break;
                };
                cache.remove(&oldest);
            }
        }
        cache.insert(
            domain.to_string(),
            Cached {
                id,
                policy,
                fetched: Instant::now(),
            },
        );
    }

    /// `GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt`, certificate
    /// verified for that name, no redirects (RFC 8461 3.3).
    async fn fetch(
        &self,
        resolver: &TokioResolver,
        tls: &OutboundTls,
        domain: &str,
    ) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        let addrs = mx::resolve_host(resolver, &host, self.port)
            .await
            .map_err(|e| e.to_string())?;
        let mut last = format!("{host} has no address");
        for a in addrs {
            match get_policy(a, &host, tls).await {
                Ok(body) => return Policy::parse(&body),
                Err(e) => last = format!("{host} ({a}): {e}"),
            }
        }
        Err(last)
    }
}

/// One HTTPS GET of the policy file; returns its text.
async fn get_policy(addr: SocketAddr, host: &str, tls: &OutboundTls) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut s = tls
        .https()
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let req = format!(
        "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nUser-Agent: postern\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(done) = complete(&raw)? {
            return Ok(done);
        }
        if raw.len() > MAX_HEAD + MAX_BODY + MAX_BODY / 8 {
            return Err("policy larger than 64 KiB".into());
        }
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            // A server that closes without close_notify: what came is judged below.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    match complete(&raw)? {
        Some(done) => Ok(done),
        None => body_at_eof(&raw),
    }
}

/// The status and headers of a response, once they are all there.
struct Head {
    body_at: usize,
    length: Option<usize>,
    chunked: bool,
}

fn head(raw: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        if raw.len() > MAX_HEAD {
            return Err("response headers too long".into());
        }
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with("HTTP/1.") || code != "200" {
        // Redirects are not followed (RFC 8461 3.3).
        return Err(format!("HTTP status {:?}", status.trim()));
    }
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => {
                let n: usize = v.parse().map_err(|_| "bad Content-Length".to_string())?;
                if n > MAX_BODY {
                    return Err("policy larger than 64 KiB".into());
                }
                length = Some(n);
            }
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "content-type" if !v.to_ascii_lowercase().starts_with("text/plain") => {
                return Err(format!("Content-Type {v:?}, not text/plain"));
            }
            _ => {}
        }
    }
    Ok(Some(Head {
        body_at: end + 4,
        length,
        chunked,
    }))
}

/// The body, when the response is complete by its own framing.
fn complete(raw: &[u8]) -> Result<Option<String>, String> {
    let Some(h) = head(raw)? else {
        return Ok(None);
    };
    let body = &raw[h.body_at..];
    if h.chunked {
        return dechunk(body).map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()));
    }
    match h.length {
        Some(n) if body.len() >= n => Ok(Some(String::from_utf8_lossy(&body[..n]).into_owned())),
        _ => Ok(None),
    }
}

/// A response without length or chunks ends at EOF.
fn body_at_eof(raw: &[u8]) -> Result<String, String> {
    let h = head(raw)?.ok_or("connection closed before the headers ended")?;
    if h.chunked || h.length.is_some() {
        return Err("connection closed before the body ended".into());
    }
    let body = &raw[h.body_at..];
    if body.len() > MAX_BODY {
        return Err("policy larger than 64 KiB".into());
    }
    Ok(String::from_utf8_lossy(body).into_owned())
}

/// Decodes a chunked body; `None` while the last chunk has not come.
fn dechunk(mut b: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        if out.len() + size > MAX_BODY {
            return Err("policy larger than 64 KiB".into());
        }
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_parses() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmx: *.Backup.example.test.\r\nmax_age: 86400\r\nfuture: ignored\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, Duration::from_secs(86400));
        assert!(p.allows("mail.example.test"));
        assert!(p.allows("MX1.backup.example.test."));
        // `*.` is one label: not the domain itself, not two labels.
        assert!(!p.allows("backup.example.test"));
        assert!(!p.allows("a.b.backup.example.test"));
        assert!(!p.allows("evil.test"));
        assert!(!p.allows("xmail.example.test"));
    }

    #[test]
    fn bad_policies_are_refused() {
        for bad in [
            "mode: enforce\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.test\n",
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -5\n",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        let capped = Policy::parse("version: STSv1\nmode: none\nmax_age: 9999999999\n").unwrap();
        assert_eq!(capped.max_age, Duration::from_secs(MAX_AGE_CAP));
    }

    #[test]
    fn the_txt_record_gives_the_id() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            txt_id(&r(&["v=STSv1; id=20260101T000000;"])).as_deref(),
            Some("20260101T000000")
        );
        assert_eq!(
            txt_id(&r(&["v=spf1 -all", "v=STSv1;id=abc"])).as_deref(),
            Some("abc")
        );
        // Two STS records: no policy (RFC 8461 3.1).
        assert_eq!(txt_id(&r(&["v=STSv1; id=a", "v=STSv1; id=b"])), None);
        assert_eq!(txt_id(&r(&["v=STSv1; id=not-alnum"])), None);
        assert_eq!(txt_id(&r(&["id=a; v=STSv1"])), None);
    }

    #[test]
    fn http_framing() {
        let plain =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(complete(plain).unwrap().as_deref(), Some("hello"));
        assert_eq!(complete(&plain[..plain.len() - 1]).unwrap(), None);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n";
        assert_eq!(complete(chunked).unwrap().as_deref(), Some("hello"));
        assert!(complete(b"HTTP/1.1 301 Moved\r\nLocation: x\r\n\r\n").is_err());
        assert!(complete(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n").is_err());
        assert!(complete(b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n").is_err());
        let eof = b"HTTP/1.0 200 OK\r\n\r\nversion: STSv1\n";
        assert_eq!(complete(eof).unwrap(), None);
        assert_eq!(body_at_eof(eof).unwrap(), "version: STSv1\n");
    }
}
