//! Content scanners whose answers feed the rules: clamd (INSTREAM) and
//! Rspamd (`POST /checkv2`).
//!
//! Both are asked at end of DATA, at the same time as each other and as
//! SPF/DKIM/DMARC, under one deadline (`[scan] timeout`). What they say
//! becomes [`ScanResults`] (the rules' `m.virus`, `m.rspamd_*`); a scanner
//! that cannot answer is an error that `[scan] on_error` decides about.
//! Nothing here keeps a connection open between messages: a scan is one
//! short loopback connection, so a scanner restart never leaves us stuck.

pub(crate) mod clamd;
pub(crate) mod rspamd;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::ValueError;
use crate::policy::{ScanResults, TxInfo};

/// Where clamd listens: `tcp:HOST:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl ClamdAddr {
    pub(crate) fn parse(s: &str) -> Result<ClamdAddr, ValueError> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            host_port(rest)?;
            Ok(ClamdAddr::Tcp(rest.to_string()))
        } else if let Some(rest) = s.strip_prefix("unix:") {
            if rest.is_empty() {
                return Err(
                    "unix: needs a socket path, e.g. \"unix:/run/clamav/clamd.ctl\"".into(),
                );
            }
            Ok(ClamdAddr::Unix(PathBuf::from(rest)))
        } else {
            Err(format!(
                "\"{s}\" is not a clamd address: write \"tcp:127.0.0.1:3310\" or \"unix:/run/clamav/clamd.ctl\""
            )
            .into())
        }
    }
}

impl fmt::Display for ClamdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClamdAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ClamdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Rspamd's normal worker: `http://HOST:PORT` (it speaks plain HTTP only;
/// keep it on loopback or a private network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RspamdAddr {
    /// `HOST:PORT`, also the `Host` header.
    pub(crate) authority: String,
}

impl RspamdAddr {
    pub(crate) fn parse(s: &str) -> Result<RspamdAddr, ValueError> {
        if s.starts_with("https://") {
            return Err(
                "Rspamd's worker speaks plain HTTP; write \"http://HOST:PORT\" and keep it on loopback"
                    .into(),
            );
        }
        let Some(rest) = s.strip_prefix("http://") else {
            return Err(format!(
                "\"{s}\" is not an Rspamd address: write \"http://127.0.0.1:11333\""
            )
            .into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!(
                "\"{s}\": give only http://HOST:PORT (the path /checkv2 is added)"
            )
            .into());
        }
        host_port(rest)?;
        Ok(RspamdAddr {
            authority: rest.to_string(),
        })
    }
}

impl fmt::Display for RspamdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

fn host_port(s: &str) -> Result<(), ValueError> {
    match s.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(())
        }
        _ => Err(format!("\"{s}\" is not HOST:PORT").into()),
    }
}

/// `""` (not configured) or an address; used for `[scan] clamd` / `rspamd`.
fn optional<'de, D, T>(
    d: D,
    parse: fn(&str) -> Result<T, ValueError>,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    let s = String::deserialize(d)?;
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    parse(s).map(Some).map_err(serde::de::Error::custom)
}

pub(crate) fn de_clamd<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ClamdAddr>, D::Error> {
    optional(d, ClamdAddr::parse)
}

pub(crate) fn de_rspamd<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RspamdAddr>, D::Error> {
    optional(d, RspamdAddr::parse)
}

/// Why a scanner gave no verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanError {
    /// clamd refused the stream as longer than its `StreamMaxLength`. It
    /// will be as long next time, so `on_error = "tempfail"` does not apply
    /// (the sender would retry forever): the message goes on unscanned, as
    /// clamd itself passes files over its size limits, and the error is
    /// recorded and counted.
    TooLarge,
    /// Down, timed out, or answered something we cannot use; retrying may help.
    Failed(String),
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::TooLarge => {
                f.write_str("message longer than clamd's StreamMaxLength, not scanned")
            }
            ScanError::Failed(why) => f.write_str(why),
        }
    }
}

/// What to do when a scanner cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanOnError {
    /// `451 4.3.0` at end of DATA; nothing is stored, the sender retries.
    #[default]
    Tempfail,
    /// Go on without that scanner's results (the error is in the trace).
    Accept,
}

/// The configured scanners (at least one), shared by every rule set.
#[derive(Debug, Clone)]
pub(crate) struct Scanners {
    clamd: Option<ClamdAddr>,
    rspamd: Option<RspamdAddr>,
    timeout: Duration,
    pub(crate) on_error: ScanOnError,
    /// Our host name, for `X-Virus-Scanned` and Rspamd's `MTA-Name`.
    hostname: String,
}

/// One message's scan: results for the rules, the headers to add, and
/// what to count.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scanned {
    pub(crate) results: ScanResults,
    /// `X-Virus-Scanned` / `X-Virus-Status` when clamd answered.
    pub(crate) headers: Vec<(String, String)>,
    /// Scanners that failed in a way `on_error` decides about: (scanner, why).
    pub(crate) failed: Vec<(&'static str, String)>,
    /// `postern_scan_results_total` increments: (scanner, result).
    pub(crate) counts: Vec<(&'static str, &'static str)>,
}

impl Scanners {
    /// `None` when `[scan]` names no scanner.
    pub(crate) fn new(cfg: &crate::config::ScanConfig, hostname: &str) -> Option<Scanners> {
        if cfg.clamd.is_none() && cfg.rspamd.is_none() {
            return None;
        }
        Some(Scanners {
            clamd: cfg.clamd.clone(),
            rspamd: cfg.rspamd.clone(),
            timeout: cfg.timeout.0,
            on_error: cfg.on_error,
            hostname: hostname.to_string(),
        })
    }

    /// Asks the scanners about `message` at once, under one deadline.
    /// clamd sees all mail, our own users' too (a compromised account
    /// spreading malware is caught like anyone else); Rspamd scores mail
    /// from outside only, as SPF/DKIM/DMARC are asked only of it.
    pub(crate) async fn scan(&self, tx: &TxInfo, message: &[u8]) -> Scanned {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let clamd = async {
            let addr = self.clamd.as_ref()?;
            Some(
                self.bounded(deadline, "clamd", clamd::scan(addr, message))
                    .await,
            )
        };
        let rspamd = async {
            let addr = self.rspamd.as_ref().filter(|_| !tx.trusted)?;
            let check = rspamd::check(addr, tx, &self.hostname, message);
            Some(self.bounded(deadline, "rspamd", check).await)
        };
        let (clamd, rspamd) = tokio::join!(clamd, rspamd);
        let mut out = Scanned::default();
        match clamd {
            None => {}
            Some(Ok(found)) => {
                out.headers.push((
                    "X-Virus-Scanned".into(),
                    format!("clamav at {}", self.hostname),
                ));
                match found {
                    Some(name) => {
                        out.headers
                            .push(("X-Virus-Status".into(), format!("Infected ({name})")));
                        out.counts.push(("clamd", "infected"));
                        out.results.virus = name;
                    }
                    None => {
                        out.headers.push(("X-Virus-Status".into(), "Clean".into()));
                        out.counts.push(("clamd", "clean"));
                    }
                }
            }
            Some(Err(e)) => out.error("clamd", e),
        }
        match rspamd {
            None => {}
            Some(Ok(a)) => {
                out.counts.push((
                    "rspamd",
                    if a.action == "no action" {
                        "clean"
                    } else {
                        "spam"
                    },
                ));
                out.results.rspamd_score = a.score;
                out.results.rspamd_action = a.action;
                out.results.rspamd_symbols = a.symbols;
            }
            Some(Err(e)) => out.error("rspamd", e),
        }
        out
    }
}

impl Scanners {
    /// `scan`, or a timeout error once `deadline` passes.
    async fn bounded<T>(
        &self,
        deadline: tokio::time::Instant,
        what: &str,
        scan: impl Future<Output = Result<T, ScanError>>,
    ) -> Result<T, ScanError> {
        tokio::time::timeout_at(deadline, scan)
            .await
            .unwrap_or_else(|_| {
                Err(ScanError::Failed(format!(
                    "no answer from {what} within {}",
                    humantime::format_duration(self.timeout)
                )))
            })
    }
}

impl Scanned {
    fn error(&mut self, scanner: &'static str, e: ScanError) {
        tracing::warn!(scanner, error = %e, "content scanner gave no verdict");
        self.counts.push((scanner, "error"));
        self.results.errors.push(format!("{scanner}: {e}"));
        if let ScanError::Failed(why) = e {
            self.failed.push((scanner, why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            ClamdAddr::parse("tcp:127.0.0.1:3310").unwrap(),
            ClamdAddr::Tcp("127.0.0.1:3310".into())
        );
        assert_eq!(
            ClamdAddr::parse("unix:/run/clamav/clamd.ctl").unwrap(),
            ClamdAddr::Unix("/run/clamav/clamd.ctl".into())
        );
        for bad in [
            "127.0.0.1:3310",
            "tcp:host",
            "tcp::3310",
            "tcp:h:0",
            "unix:",
        ] {
            assert!(ClamdAddr::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            RspamdAddr::parse("http://127.0.0.1:11333/")
                .unwrap()
                .authority,
            "127.0.0.1:11333"
        );
        for bad in [
            "https://127.0.0.1:11333",
            "127.0.0.1:11333",
            "http://127.0.0.1",
            "http://127.0.0.1:11333/checkv2",
        ] {
            assert!(RspamdAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
