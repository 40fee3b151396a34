//! `postern.toml`: the configuration model, its defaults and its validation.
//!
//! Parsing is strict (`deny_unknown_fields`) and every error names the file,
//! the line and the key, because an administrator reads these at 3 a.m.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// One problem found in a configuration file (postern.toml, a rule, a
/// policy file): `file:line: message`. Config problems name their key in
/// the message (`[table] key: ...`), so every problem reads the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    pub(crate) fn new(
        file: impl Into<PathBuf>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for Problem {}

/// Why a config file did not load: every problem found, one per line when
/// shown. TOML syntax stops at its first error; the checks after parsing
/// all run, so an administrator fixes everything in one round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub(crate) problems: Vec<Problem>,
}

impl From<Problem> for ConfigError {
    fn from(p: Problem) -> Self {
        ConfigError { problems: vec![p] }
    }
}

/// The whole configuration, with relative paths already resolved against the
/// directory of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub(crate) tls: Option<TlsConfig>,
    #[serde(default)]
    pub(crate) smtp: SmtpConfig,
    #[serde(default)]
    pub(crate) relay: RelayConfig,
    #[serde(default)]
    pub(crate) delivery: DeliveryConfig,
    #[serde(default)]
    pub(crate) outbound_tls: OutboundTlsConfig,
    #[serde(default)]
    pub(crate) dns: DnsConfig,
    #[serde(default)]
    pub(crate) checks: ChecksConfig,
    /// `[dkim_sign]` (one domain) or `[[dkim_sign]]` (several).
    #[serde(default, deserialize_with = "one_or_many")]
    pub(crate) dkim_sign: Vec<DkimSignConfig>,
    #[serde(default)]
    pub(crate) scan: ScanConfig,
    #[serde(default)]
    pub(crate) rules: RulesConfig,
    #[serde(default)]
    pub(crate) policies: PoliciesConfig,
    #[serde(default)]
    pub(crate) quarantine: QuarantineConfig,
    #[serde(default)]
    pub(crate) metrics: MetricsConfig,
    /// `[cluster]`: empty = one node on its own (today's behaviour).
    #[serde(default)]
    pub(crate) cluster: ClusterConfig,
    /// Where the file was read from (not a TOML key).
    #[serde(skip)]
    pub(crate) source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub(crate) hostname: String,
    pub data_dir: PathBuf,
    /// How long `serve` waits for sessions in flight after SIGTERM.
    pub(crate) shutdown_grace: DurationStr,
    /// Mail is refused (`452 4.3.1`) while less than this (plus twice the
    /// message) is free on the data dir's filesystem; "0" turns the check off.
    pub(crate) min_free_space: Size,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            data_dir: "data".into(),
            shutdown_grace: DurationStr(Duration::from_secs(10)),
            min_free_space: Size(100 * 1024 * 1024),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SmtpConfig {
    pub(crate) relay: Vec<SocketAddr>,
    pub(crate) submission: Vec<SocketAddr>,
    pub(crate) submissions: Vec<SocketAddr>,
    pub(crate) max_message_size: Size,
    /// Message data all sessions may hold in memory at once (arriving
    /// messages beyond 1 MiB go to `data_dir/spool/`; the checks read them
    /// back within this); `452 4.3.1` at the end of DATA beyond it.
    pub(crate) data_memory: Size,
    pub(crate) max_recipients: usize,
    pub(crate) max_connections: usize,
    /// Open connections per client IP across the SMTP listeners; `421 4.7.0` beyond.
    pub(crate) max_connections_per_ip: usize,
    /// New connections per client IP per period; `421 4.7.0` beyond.
    pub(crate) connection_rate_per_ip: Rate,
    /// Per command: renewed by each complete line, never by a byte.
    pub(crate) idle_timeout: DurationStr,
    /// A TLS handshake (implicit or after STARTTLS) must finish within this.
    pub(crate) handshake_timeout: DurationStr,
    /// The whole DATA phase of one message.
    pub(crate) data_timeout: DurationStr,
    /// A whole SMTP session.
    pub(crate) session_timeout: DurationStr,
    /// What a bare LF or bare CR in DATA does.
    pub(crate) bare_newline: BareNewline,
    /// What a message line over 998 octets (RFC 5321 4.5.3.1.6) does.
    pub(crate) long_lines: LongLines,
    /// What NUL bytes in message data do.
    pub(crate) nul_bytes: NulBytes,
    /// Longest command line accepted, CRLF included (RFC 5321 says at least 512).
    pub(crate) max_line_length: usize,
    /// Name the authenticated login in `Received:` (off: a login is half a
    /// password guess, and recipients need only `with ESMTPSA`).
    pub(crate) received_auth_user: bool,
}

/// What a bare LF or CR in message data does (SMTP smuggling defence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BareNewline {
    /// `521 5.5.2` at once, and the connection closes.
    Reject,
    /// Such lines are taken as CRLF lines; only CRLF.CRLF after a
    /// CRLF-ended line ends the data.
    Normalize,
}

/// What a message line longer than RFC 5321's 1000 octets (CRLF included) does.
/// There is no "fold": folding changes signed bodies and breaks DKIM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LongLines {
    /// `554 5.6.0` at the end of DATA; nothing is stored, the session goes on.
    Reject,
    /// Stored as sent (for senders that cannot be fixed).
    Accept,
}

/// What NUL bytes in message data do (RFC 5322 2.3 text never has them;
/// backends and scanners written in C may stop reading at one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NulBytes {
    /// `554 5.6.0` at the end of DATA; nothing is stored, the session goes on.
    Reject,
    /// Removed from the message.
    Strip,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            relay: vec![],
            submission: vec![],
            submissions: vec![],
            max_message_size: Size(25 * 1000 * 1000),
            data_memory: Size(256 * 1000 * 1000),
            max_recipients: 100,
            max_connections: 10_000,
            max_connections_per_ip: 50,
            connection_rate_per_ip: Rate {
                count: 120,
                per: Duration::from_secs(60),
            },
            idle_timeout: DurationStr(Duration::from_secs(300)),
            handshake_timeout: DurationStr(Duration::from_secs(10)),
            data_timeout: DurationStr(Duration::from_secs(600)),
            session_timeout: DurationStr(Duration::from_secs(3600)),
            bare_newline: BareNewline::Reject,
            long_lines: LongLines::Reject,
            nul_bytes: NulBytes::Reject,
            max_line_length: 2048,
            received_auth_user: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RelayConfig {
    pub(crate) domains: Vec<String>,
    pub(crate) networks: Vec<IpNet>,
    /// How a recipient in one of `domains` is known to exist at RCPT time.
    pub(crate) verify_recipients: VerifyRecipients,
    /// With `list`: the file of addresses and `@domain` catch-alls
    /// (relative to the config file's directory).
    pub(crate) recipients: PathBuf,
}

/// `[relay] verify_recipients`: refuse unknown users at RCPT time instead
/// of bouncing them later (backscatter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum VerifyRecipients {
    /// Ask the mailbox backend (an SMTP/LMTP RCPT probe, cached); a
    /// Maildir route has every address, so this is safe as the default.
    #[default]
    Backend,
    /// Only the addresses (and `@domain`s) in `recipients`.
    List,
    /// Accept every address of a relay domain.
    Off,
}

impl RelayConfig {
    /// Is `domain` one we accept mail for from anyone? Exact, case-insensitive.
    pub(crate) fn is_local_domain(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// May this client relay to any domain?
    pub(crate) fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.networks.iter().any(|n| n.contains(&ip))
    }
}

/// Where mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Route {
    Smtp(String),
    Lmtp(String),
    Maildir(PathBuf),
    /// Look up the recipient domain's MX.
    Mx,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Smtp(a) => write!(f, "smtp://{a}"),
            Route::Lmtp(a) => write!(f, "lmtp://{a}"),
            Route::Maildir(p) => write!(f, "maildir:{}", p.display()),
            Route::Mx => write!(f, "mx"),
        }
    }
}

impl Route {
    pub(crate) fn parse(s: &str) -> Result<Route, ValueError> {
        if let Some(rest) = s.strip_prefix("smtp://") {
            check_host_port(rest)?;
            Ok(Route::Smtp(rest.trim_end_matches('/').to_string()))
        } else if let Some(rest) = s.strip_prefix("lmtp://") {
            check_host_port(rest)?;
            Ok(Route::Lmtp(rest.trim_end_matches('/').to_string()))
        } else if let Some(rest) = s.strip_prefix("maildir:") {
            if rest.is_empty() {
                return Err("maildir: needs a path, e.g. \"maildir:data/maildir\"".into());
            }
            Ok(Route::Maildir(PathBuf::from(rest)))
        } else if s == "mx" {
            Ok(Route::Mx)
        } else {
            Err(format!(
                "unknown route \"{s}\": expected \"smtp://host:port\", \"lmtp://host:port\", \"maildir:PATH\" or \"mx\""
            ).into())
        }
    }
}

fn check_host_port(s: &str) -> Result<(), ValueError> {
    let s = s.trim_end_matches('/');
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("\"{s}\" is not host:port").into()),
    }
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Route::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct DeliveryConfig {
    pub(crate) route: Route,
    pub(crate) outbound: Route,
    pub(crate) concurrency: usize,
    pub(crate) retry: Vec<DurationStr>,
    pub(crate) max_age: DurationStr,
    /// Per-attempt network timeout towards the next hop.
    pub(crate) timeout: DurationStr,
    /// Port of the MX hosts (25; tests point it at a loopback sink).
    pub(crate) mx_port: u16,
    /// Connections in flight to one destination (an MX domain or a route),
    /// so one slow domain cannot take every one of `concurrency`.
    pub(crate) per_destination: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            route: Route::Maildir("data/maildir".into()),
            outbound: Route::Mx,
            concurrency: 64,
            retry: ["1m", "5m", "15m", "1h", "4h"]
                .iter()
                .filter_map(|s| humantime::parse_duration(s).ok().map(DurationStr))
                .collect(),
            max_age: DurationStr(Duration::from_secs(5 * 86400)),
            timeout: DurationStr(Duration::from_secs(60)),
            mx_port: 25,
            per_destination: 8,
        }
    }
}

/// How much TLS a next hop must give (`[outbound_tls]`), weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, any certificate; plain when not offered, and
    /// once in plain text after a failed handshake (RFC 7435 opportunistic).
    May,
    /// STARTTLS required, any certificate; never plain.
    Encrypt,
    /// STARTTLS required with a certificate valid for the host name.
    Verify,
}

impl TlsLevel {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
        }
    }
}

/// `[outbound_tls]`: TLS towards the next hop (route, smarthost and MX).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OutboundTlsConfig {
    pub(crate) default: TlsLevel,
    /// Per recipient domain (MX delivery) or route host name; lower-cased at load.
    pub(crate) domains: std::collections::BTreeMap<String, TlsLevel>,
    /// Honour a domain's MTA-STS policy (RFC 8461) on MX delivery.
    pub(crate) mta_sts: bool,
    /// DANE-TLSA (RFC 7672): not implemented; `true` is a config error.
    pub(crate) dane: bool,
    /// Extra trust anchors (PEM) besides the system roots; empty = none.
    pub(crate) ca: PathBuf,
    /// Port of the MTA-STS policy host (443; a test knob like `mx_port`).
    pub(crate) mta_sts_port: u16,
}

impl Default for OutboundTlsConfig {
    fn default() -> Self {
        OutboundTlsConfig {
            default: TlsLevel::May,
            domains: Default::default(),
            mta_sts: true,
            dane: false,
            ca: PathBuf::new(),
            mta_sts_port: 443,
        }
    }
}

impl OutboundTlsConfig {
    /// The configured level for a recipient domain or a route's host.
    pub(crate) fn level_for(&self, name: &str) -> TlsLevel {
        self.domains
            .get(&name.trim_end_matches('.').to_ascii_lowercase())
            .copied()
            .unwrap_or(self.default)
    }
}

/// `[dns]`: the one source of every resolver (see `dns::resolver`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    pub nameservers: Vec<SocketAddr>,
}

/// `[checks]`: which of SPF, DKIM and DMARC run, under one deadline.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    pub spf: bool,
    pub dkim: bool,
    pub dmarc: bool,
    /// One deadline for all DNS work of one message; what is not done by then is `temperror`.
    pub deadline: DurationStr,
    /// More authserv-ids (besides `[server] hostname`) whose inbound
    /// `Authentication-Results` fields are removed: other names of this
    /// gateway or of filters behind it whose results recipients trust.
    pub authserv_ids: Vec<String>,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        ChecksConfig {
            spf: true,
            dkim: true,
            dmarc: true,
            deadline: DurationStr(Duration::from_secs(10)),
            authserv_ids: Vec::new(),
        }
    }
}

/// A table or an array of tables: `[dkim_sign]` or `[[dkim_sign]]`. A
/// visitor rather than an untagged enum, so an error inside still names
/// its key and line.
fn one_or_many<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a table or an array of tables")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(|t| vec![t])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Vec<T>, A::Error> {
            Vec::deserialize(SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DkimSignConfig {
    pub(crate) domain: String,
    pub(crate) selector: String,
    pub(crate) key: PathBuf,
}

/// `[scan]`: the content scanners whose results feed the rules (see
/// `crate::scan`). Both optional; an address that does not parse is an
/// error at its line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ScanConfig {
    /// `"tcp:HOST:PORT"` or `"unix:/path"`; `""` = no clamd.
    #[serde(deserialize_with = "crate::scan::de_clamd")]
    pub(crate) clamd: Option<crate::scan::ClamdAddr>,
    /// `"http://HOST:PORT"`; `""` = no Rspamd.
    #[serde(deserialize_with = "crate::scan::de_rspamd")]
    pub(crate) rspamd: Option<crate::scan::RspamdAddr>,
    /// One deadline for both scanners of one message.
    pub(crate) timeout: DurationStr,
    pub(crate) on_error: crate::scan::ScanOnError,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            clamd: None,
            rspamd: None,
            timeout: DurationStr(Duration::from_secs(15)),
            on_error: crate::scan::ScanOnError::Tempfail,
        }
    }
}

/// What to do when a script fails at run time or runs away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Answer 451 (the sender retries later).
    #[default]
    Tempfail,
    /// Ignore the failing script and let the next one decide.
    Accept,
    /// Hold the message in quarantine.
    Quarantine,
}

/// `[rules]`: where the scripts are and how they run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub dir: PathBuf,
    /// Operations allowed per script call; beyond it the call is an error.
    pub max_operations: u64,
    pub on_error: OnError,
    /// A total score at or above this quarantines.
    pub quarantine_score: f64,
    /// How long a copy of every received message is kept for `rules replay
    /// --recent`; `0s` keeps none.
    pub keep_recent: DurationStr,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: "rules".into(),
            max_operations: 100_000,
            on_error: OnError::Tempfail,
            quarantine_score: 10.0,
            keep_recent: DurationStr(Duration::ZERO),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PoliciesConfig {
    pub(crate) dir: PathBuf,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        PoliciesConfig {
            dir: "policies".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct QuarantineConfig {
    pub(crate) pop3: Vec<SocketAddr>,
    pub(crate) pop3s: Vec<SocketAddr>,
    pub(crate) imap: Vec<SocketAddr>,
    pub(crate) imaps: Vec<SocketAddr>,
    pub(crate) retention: DurationStr,
    /// Sessions across the POP3/IMAP listeners; `-ERR [SYS/TEMP]` / `* BYE` beyond.
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: usize,
    /// From the greeting to a successful login; then `-ERR` / `* BYE` and close.
    pub(crate) login_timeout: DurationStr,
    /// HTTP listeners for the pages digest links open; empty = no pages.
    pub(crate) web: Vec<SocketAddr>,
    /// Serve those pages over TLS with the `[tls]` certificate.
    pub(crate) web_tls: bool,
    /// The base URL written into digests (a TLS proxy in front, usually).
    pub(crate) web_url: String,
    pub(crate) digest: DigestSchedule,
    pub(crate) link_lifetime: DurationStr,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            pop3: vec![],
            pop3s: vec![],
            imap: vec![],
            imaps: vec![],
            retention: DurationStr(Duration::from_secs(30 * 86400)),
            max_connections: 1000,
            max_connections_per_ip: 20,
            login_timeout: DurationStr(Duration::from_secs(60)),
            web: vec![],
            web_tls: false,
            web_url: "http://127.0.0.1:2080".into(),
            digest: DigestSchedule::Off,
            link_lifetime: DurationStr(Duration::from_secs(14 * 86400)),
        }
    }
}

/// `[quarantine] digest`: when each user hears of their newly held mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DigestSchedule {
    Off,
    /// Every day at this local time (the server's time zone).
    Daily {
        hour: u32,
        minute: u32,
    },
    Every(Duration),
}

impl DigestSchedule {
    pub(crate) fn parse(s: &str) -> Result<DigestSchedule, ValueError> {
        let t = s.trim();
        let help = "write \"off\", \"daily HH:MM\" or \"every DURATION\" (e.g. \"every 4h\")";
        if t.eq_ignore_ascii_case("off") {
            return Ok(DigestSchedule::Off);
        }
        if let Some(at) = t.strip_prefix("daily ") {
            let bad = || format!("\"{s}\": {:?} is not a time HH:MM; {help}", at.trim());
            let (h, m) = at.trim().split_once(':').ok_or_else(bad)?;
            let (hour, minute) = match (h.parse::<u32>(), m.parse::<u32>()) {
                (Ok(hh), Ok(mm)) if hh < 24 && mm < 60 && m.len() == 2 => (hh, mm),
                _ => return Err(bad().into()),
            };
            return Ok(DigestSchedule::Daily { hour, minute });
        }
        if let Some(every) = t.strip_prefix("every ") {
            let d = humantime::parse_duration(every.trim())
                .map_err(|e| format!("\"{s}\": bad duration ({e}); {help}"))?;
            if d < Duration::from_secs(1) {
                return Err(format!("\"{s}\": the period must be at least 1s").into());
            }
            return Ok(DigestSchedule::Every(d));
        }
        Err(format!("\"{s}\" is not a schedule; {help}").into())
    }
}

impl<'de> Deserialize<'de> for DigestSchedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DigestSchedule::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MetricsConfig {
    pub(crate) listen: Option<SocketAddr>,
    /// When not empty, `GET /metrics` needs `Authorization: Bearer TOKEN`.
    pub(crate) token: String,
}

/// `[cluster]`: several gateways behind one MX share their rate limits in
/// Redis/Valkey. All empty = a single node, nothing shared.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClusterConfig {
    /// This node's unique name (logs; needed once anything is shared).
    pub(crate) node: String,
    /// `"redis://HOST:PORT[/DB]"`: cluster-wide rate limits; `""` = local.
    pub(crate) redis: String,
    /// The shared quarantine (issue 14 item 2): not implemented, refused when set.
    pub(crate) postgres: String,
    pub(crate) on_backend_error: BackendOnError,
    /// How many gateways share the limits: with Redis unreachable and
    /// `on_backend_error = "local"`, each node allows limit / nodes.
    pub(crate) nodes: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: String::new(),
            redis: String::new(),
            postgres: String::new(),
            on_backend_error: BackendOnError::Local,
            nodes: 1,
        }
    }
}

/// What a node does when the shared rate-limit backend does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendOnError {
    /// Count in this node's own buckets, at the limit divided by `nodes`.
    #[default]
    Local,
    /// Answer `451 4.4.3`: nothing passes uncounted.
    Tempfail,
}

/// A duration written as `"30s"`, `"5m"`, `"4h"`, `"5d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationStr(pub Duration);

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(DurationStr)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration \"{s}\" ({e}); write e.g. \"30s\", \"5m\", \"4h\", \"5d\""
                ))
            })
    }
}

/// Why a value written in the config (a route, a rate, a size) does not
/// parse; it becomes the serde message, so it reads as a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl From<String> for ValueError {
    fn from(s: String) -> Self {
        ValueError(s)
    }
}

impl From<&str> for ValueError {
    fn from(s: &str) -> Self {
        ValueError(s.to_string())
    }
}

/// A rate written as `"120/1m"`: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub(crate) count: u32,
    pub(crate) per: Duration,
}

impl Rate {
    pub(crate) fn parse(rate: &str) -> Result<Rate, ValueError> {
        let (count, per) = rate
            .split_once('/')
            .ok_or_else(|| format!("rate {rate:?} is not N/duration, e.g. \"100/1h\""))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("rate {rate:?}: {count:?} is not a whole number"))?;
        if count == 0 {
            return Err(format!("rate {rate:?}: the count must be at least 1").into());
        }
        let per = per.trim();
        // "100/h" reads as "100/1h".
        let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
            per.to_string()
        } else {
            format!("1{per}")
        };
        let per = humantime::parse_duration(&per)
            .map_err(|e| format!("rate {rate:?}: bad duration: {e}"))?;
        if per.is_zero() {
            return Err(format!("rate {rate:?}: the period must be longer than 0").into());
        }
        Ok(Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A size written as `"25MB"`, `"512KB"`, `"1GiB"` or a plain byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub(crate) u64);

impl Size {
    pub(crate) fn parse(s: &str) -> Result<Size, ValueError> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size \"{s}\"; write e.g. \"25MB\""))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1024,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1024 * 1024,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1024 * 1024 * 1024,
            other => return Err(format!("invalid size unit \"{other}\" in \"{s}\"").into()),
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("size \"{s}\" is too large").into())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => Size::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Turn a byte offset into a 1-based line number.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(1)
}

/// A TOML error as a [`Problem`] with its line.
pub(crate) fn toml_problem(path: &Path, text: &str, e: &toml::de::Error) -> Problem {
    let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
    Problem::new(path, Some(line), e.message().trim_end())
}

/// Find the line of `key = ...` inside `[table]`, for errors found after parsing.
fn line_of_key(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut in_table = table.is_empty();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            in_table = l.trim_matches(|c| c == '[' || c == ']').trim() == table;
            continue;
        }
        if in_table
            && let Some((k, _)) = l.split_once('=')
            && k.trim() == key
        {
            return Some(i + 1);
        }
    }
    None
}

impl Config {
    /// The embedded default, as shipped in the repository's `postern.toml`.
    #[cfg(test)]
    pub(crate) const DEFAULT_TOML: &'static str = include_str!("../postern.toml");

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Problem::new(path, None, format!("cannot read: {e}")))?;
        Config::from_str(&text, path)
    }

    /// Parse `text` as if read from `path`; resolve relative paths against
    /// its directory; check what the types alone cannot (every problem).
    pub(crate) fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| toml_problem(path, text, &e))?;
        cfg.source = path.to_path_buf();
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        cfg.server.data_dir = abs(&cfg.server.data_dir);
        if let Some(tls) = &mut cfg.tls {
            tls.cert = abs(&tls.cert);
            tls.key = abs(&tls.key);
        }
        if let Route::Maildir(p) = &cfg.delivery.route {
            cfg.delivery.route = Route::Maildir(abs(p));
        }
        for d in &mut cfg.dkim_sign {
            d.key = abs(&d.key);
        }
        if !cfg.outbound_tls.ca.as_os_str().is_empty() {
            cfg.outbound_tls.ca = abs(&cfg.outbound_tls.ca);
        }
        cfg.outbound_tls.domains = std::mem::take(&mut cfg.outbound_tls.domains)
            .into_iter()
            .map(|(d, l)| (d.trim_end_matches('.').to_ascii_lowercase(), l))
            .collect();
        if let Some(crate::scan::ClamdAddr::Unix(p)) = &mut cfg.scan.clamd {
            *p = abs(p);
        }
        cfg.rules.dir = abs(&cfg.rules.dir);
        cfg.policies.dir = abs(&cfg.policies.dir);
        if !cfg.relay.recipients.as_os_str().is_empty() {
            cfg.relay.recipients = abs(&cfg.relay.recipients);
        }

        let problems = cfg.validate(text, path);
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The checks after parsing, each problem with the line of its key.
    fn validate(&self, text: &str, path: &Path) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut err = |table: &str, key: &str, msg: String| {
            let line = line_of_key(text, table, key).unwrap_or(1);
            problems.push(Problem::new(
                path,
                Some(line),
                format!("[{table}] {key}: {msg}"),
            ));
        };
        let host = &self.server.hostname;
        if host.trim().is_empty() || host.contains(char::is_whitespace) {
            err("server", "hostname", "must be a host name".into());
        }
        if matches!(self.delivery.route, Route::Mx) {
            err(
                "delivery",
                "route",
                "the mailbox backend cannot be \"mx\"; use smtp://, lmtp:// or maildir:".into(),
            );
        }
        if matches!(self.delivery.outbound, Route::Maildir(_)) {
            err(
                "delivery",
                "outbound",
                "outbound mail goes to \"mx\" or a smarthost (smtp://host:port)".into(),
            );
        }
        if self.delivery.retry.is_empty() {
            err("delivery", "retry", "needs at least one step".into());
        }
        if self.delivery.concurrency == 0 {
            err("delivery", "concurrency", "must be at least 1".into());
        }
        if self.delivery.per_destination == 0 {
            err("delivery", "per_destination", "must be at least 1".into());
        }
        if self.outbound_tls.dane {
            err(
                "outbound_tls",
                "dane",
                "DANE is not implemented (no DNSSEC-validated answers to trust); set dane = false"
                    .into(),
            );
        }
        let ca = &self.outbound_tls.ca;
        if !ca.as_os_str().is_empty() && !ca.is_file() {
            err(
                "outbound_tls",
                "ca",
                format!("{} is not a readable file", ca.display()),
            );
        }
        if self.smtp.data_memory.0 < self.smtp.max_message_size.0 {
            err(
                "smtp",
                "data_memory",
                "must be at least max_message_size (a message that large could never be checked)"
                    .into(),
            );
        }
        if self.smtp.max_recipients == 0 {
            err("smtp", "max_recipients", "must be at least 1".into());
        }
        let url = self.quarantine.web_url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.len() < "http://x".len()
            || url.contains(char::is_whitespace)
        {
            err(
                "quarantine",
                "web_url",
                format!("\"{url}\" is not an http:// or https:// URL"),
            );
        }
        if self.quarantine.link_lifetime.0 < Duration::from_secs(60) {
            err(
                "quarantine",
                "link_lifetime",
                "must be at least 1m (a digest link must live long enough to be clicked)".into(),
            );
        }
        if self.smtp.max_line_length < 512 {
            err(
                "smtp",
                "max_line_length",
                "RFC 5321 requires at least 512".into(),
            );
        }
        for d in &self.relay.domains {
            if d.is_empty()
                || d.contains('@')
                || d.ends_with('.')
                || d.contains(char::is_whitespace)
            {
                err("relay", "domains", format!("\"{d}\" is not a domain"));
            }
        }
        if self.relay.verify_recipients == VerifyRecipients::List {
            let r = &self.relay.recipients;
            if r.as_os_str().is_empty() {
                err(
                    "relay",
                    "verify_recipients",
                    "\"list\" needs `recipients = \"FILE\"`".into(),
                );
            } else if let Err(e) = std::fs::read_to_string(r) {
                err(
                    "relay",
                    "recipients",
                    format!("{} cannot be read: {e}", r.display()),
                );
            }
        }
        let t = self.scan.timeout.0;
        if t.is_zero() || t > Duration::from_secs(300) {
            err(
                "scan",
                "timeout",
                "must be more than 0s and at most 5m (the client waits for our answer to DATA)"
                    .into(),
            );
        }
        let c = &self.cluster;
        if !c.postgres.trim().is_empty() {
            err(
                "cluster",
                "postgres",
                "the shared quarantine in PostgreSQL is not implemented yet (issue 14 item 2); leave it \"\"".into(),
            );
        }
        if !c.redis.trim().is_empty() {
            if let Err(why) = crate::policy::cluster::parse_redis_url(&c.redis) {
                err("cluster", "redis", why);
            }
            if c.node.trim().is_empty() {
                err(
                    "cluster",
                    "node",
                    "a cluster node needs its own name (set `node = \"mx1\"`)".into(),
                );
            }
        }
        if !c
            .node
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            err(
                "cluster",
                "node",
                format!(
                    "\"{}\" may hold only letters, digits, '-', '_' and '.'",
                    c.node
                ),
            );
        }
        if c.nodes == 0 || c.nodes > 1000 {
            err("cluster", "nodes", "must be from 1 to 1000".into());
        }
        let mut signing = std::collections::HashSet::new();
        for d in &self.dkim_sign {
            if !signing.insert(d.domain.to_ascii_lowercase()) {
                err(
                    "dkim_sign",
                    "domain",
                    format!(
                        "\"{}\" has two signing keys; give each domain one",
                        d.domain
                    ),
                );
            }
            if d.domain.is_empty() || d.domain.contains(['@', ' ']) || d.domain.ends_with('.') {
                err(
                    "dkim_sign",
                    "domain",
                    format!("\"{}\" is not a domain", d.domain),
                );
            }
            if d.selector.is_empty()
                || !d
                    .selector
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                err(
                    "dkim_sign",
                    "selector",
                    format!("\"{}\" is not a DNS label", d.selector),
                );
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::from_str(Config::DEFAULT_TOML, Path::new("postern.toml")).unwrap();
        assert!(!c.smtp.relay.is_empty());
        assert_eq!(c.smtp.max_message_size, Size(25_000_000));
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let t = "[server]\nhostname = \"a\"\n\n[smtp]\nrelai = []\n";
        let e = Config::from_str(t, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:5:"), "{e}");
        assert!(e.contains("relai"), "{e}");
    }

    #[test]
    fn bad_duration_names_line() {
        let t = "[smtp]\nidle_timeout = \"5 parsecs\"\n";
        let e = Config::from_str(t, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:2:"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");
    }

    #[test]
    fn digest_settings_parse_or_name_their_line() {
        let c = Config::from_str(Config::DEFAULT_TOML, Path::new("postern.toml")).unwrap();
        assert_eq!(
            c.quarantine.digest,
            DigestSchedule::Daily { hour: 8, minute: 0 }
        );
        for (text, want) in [
            ("off", DigestSchedule::Off),
            (
                "daily 23:59",
                DigestSchedule::Daily {
                    hour: 23,
                    minute: 59,
                },
            ),
            (
                "every 4h",
                DigestSchedule::Every(Duration::from_secs(4 * 3600)),
            ),
        ] {
            assert_eq!(DigestSchedule::parse(text), Ok(want), "{text}");
        }
        for (value, says) in [
            ("daily 24:00", "is not a time HH:MM"),
            ("daily 8:5", "is not a time HH:MM"),
            ("every 0s", "at least 1s"),
            ("weekly", "is not a schedule"),
        ] {
            let t = format!("[quarantine]\nretention = \"30d\"\ndigest = \"{value}\"\n");
            let e = Config::from_str(&t, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("x.toml:3:") && e.contains(says),
                "{value}: {e}"
            );
        }
        let t = "[quarantine]\nweb_url = \"127.0.0.1:2080\"\nlink_lifetime = \"5s\"\n";
        let e = Config::from_str(t, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.toml:2: [quarantine] web_url")
                && e.contains("x.toml:3: [quarantine] link_lifetime"),
            "{e}"
        );
    }

    #[test]
    fn bad_route_named() {
        let t = "[delivery]\nroute = \"ftp://x\"\n";
        let e = Config::from_str(t, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml:2:") && e.contains("unknown route"),
            "{e}"
        );
    }

    #[test]
    fn every_bad_key_is_a_problem_with_its_line() {
        let t = "[server]\nhostname = \"two words\"\n\n[smtp]\nmax_recipients = 0\nmax_line_length = 100\n\n[relay]\ndomains = [\"a@b\", \"ok.test\"]\n\n[delivery]\nconcurrency = 0\n";
        let e = Config::from_str(t, Path::new("x.toml")).unwrap_err();
        let shown: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "x.toml:2: [server] hostname: must be a host name",
                "x.toml:12: [delivery] concurrency: must be at least 1",
                "x.toml:5: [smtp] max_recipients: must be at least 1",
                "x.toml:6: [smtp] max_line_length: RFC 5321 requires at least 512",
                "x.toml:9: [relay] domains: \"a@b\" is not a domain",
            ],
            "{e}"
        );
        // Shown together, one per line.
        assert_eq!(e.to_string().lines().count(), 5);
    }

    #[test]
    fn scan_addresses_and_timeout() {
        use crate::scan::{ClamdAddr, ScanOnError};
        let c = Config::from_str(
            "[scan]\nclamd = \"unix:clamd.sock\"\nrspamd = \"http://127.0.0.1:11333\"\non_error = \"accept\"\n",
            Path::new("/etc/postern/postern.toml"),
        )
        .unwrap();
        assert_eq!(
            c.scan.clamd,
            Some(ClamdAddr::Unix("/etc/postern/clamd.sock".into()))
        );
        assert_eq!(c.scan.rspamd.unwrap().authority, "127.0.0.1:11333");
        assert_eq!(c.scan.on_error, ScanOnError::Accept);
        assert_eq!(c.scan.timeout.0, Duration::from_secs(15));
        let none = Config::from_str("[scan]\nclamd = \"\"\n", Path::new("x.toml")).unwrap();
        assert_eq!((none.scan.clamd, none.scan.rspamd), (None, None));
        for (text, want) in [
            ("[scan]\n\nclamd = \"127.0.0.1:3310\"\n", "x.toml:3:"),
            ("[scan]\nrspamd = \"https://h:1\"\n", "x.toml:2:"),
            ("[scan]\non_error = \"quarantine\"\n", "x.toml:2:"),
            (
                "[scan]\nclamd = \"tcp:h:1\"\ntimeout = \"0s\"\n",
                "x.toml:3: [scan] timeout",
            ),
            ("[scan]\nclam = \"tcp:h:1\"\n", "x.toml:2:"),
        ] {
            let e = Config::from_str(text, Path::new("x.toml")).unwrap_err();
            assert!(e.to_string().starts_with(want), "{text}: {e}");
        }
    }

    #[test]
    fn cluster_keys_are_validated_at_their_line() {
        let empty = Config::from_str("", Path::new("x.toml")).unwrap();
        assert_eq!(empty.cluster, ClusterConfig::default());
        let c = Config::from_str(
            "[cluster]\nnode = \"mx1\"\nredis = \"redis://127.0.0.1:6379\"\non_backend_error = \"tempfail\"\nnodes = 3\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.cluster.on_backend_error, BackendOnError::Tempfail);
        assert_eq!(c.cluster.nodes, 3);
        for (text, want) in [
            (
                "[cluster]\nnode = \"a\"\n\nredis = \"127.0.0.1:6379\"\n",
                "x.toml:4: [cluster] redis",
            ),
            (
                "[cluster]\nredis = \"redis://127.0.0.1\"\n",
                "x.toml:1: [cluster] node",
            ),
            ("[cluster]\nnode = \"a b\"\n", "x.toml:2: [cluster] node"),
            ("[cluster]\nnodes = 0\n", "x.toml:2: [cluster] nodes"),
            ("[cluster]\non_backend_error = \"accept\"\n", "x.toml:2:"),
            (
                "[cluster]\npostgres = \"postgres://p@h/db\"\n",
                "x.toml:2: [cluster] postgres",
            ),
            ("[cluster]\nreddis = \"x\"\n", "x.toml:2:"),
        ] {
            let e = Config::from_str(text, Path::new("x.toml")).unwrap_err();
            assert!(e.to_string().starts_with(want), "{text}: {e}");
        }
    }

    #[test]
    fn outbound_tls_levels_and_overrides() {
        let t = "[outbound_tls]\ndefault = \"encrypt\"\nmta_sts = false\n[outbound_tls.domains]\n\"Bank.Test\" = \"verify\"\n\"old.test\" = \"none\"\n";
        let c = Config::from_str(t, Path::new("x.toml")).unwrap();
        let o = &c.outbound_tls;
        assert!(!o.mta_sts);
        assert_eq!(o.level_for("bank.test"), TlsLevel::Verify);
        assert_eq!(o.level_for("BANK.test."), TlsLevel::Verify);
        assert_eq!(o.level_for("old.test"), TlsLevel::None);
        assert_eq!(o.level_for("other.test"), TlsLevel::Encrypt);
        let d = Config::from_str("", Path::new("x.toml")).unwrap();
        assert_eq!(d.outbound_tls.default, TlsLevel::May);
        assert!(d.outbound_tls.mta_sts && !d.outbound_tls.dane);
        let e = Config::from_str(
            "[outbound_tls]\ndefault = \"always\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("x.toml:2:"), "{e}");
    }

    #[test]
    fn dane_is_refused_until_it_is_honest() {
        let t = "[outbound_tls]\ndane = true\nca = \"nope.pem\"\n";
        let e = Config::from_str(t, Path::new("/tmp/x.toml")).unwrap_err();
        let shown: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
        assert!(
            shown[0].starts_with("/tmp/x.toml:2: [outbound_tls] dane: DANE is not implemented"),
            "{shown:?}"
        );
        assert!(
            shown[1].starts_with("/tmp/x.toml:3: [outbound_tls] ca: /tmp/nope.pem"),
            "{shown:?}"
        );
    }

    #[test]
    fn a_missing_file_is_one_problem() {
        let e = Config::load(Path::new("/nonexistent/postern.toml")).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/postern.toml: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn recipient_verification_modes() {
        let d = Config::from_str("", Path::new("x.toml")).unwrap();
        assert_eq!(d.relay.verify_recipients, VerifyRecipients::Backend);
        let e = Config::from_str(
            "[relay]\nverify_recipients = \"list\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("x.toml:2: [relay] verify_recipients"), "{e}");
        let e = Config::from_str(
            "[relay]\nverify_recipients = \"list\"\nrecipients = \"nope.txt\"\n",
            Path::new("/tmp/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/tmp/x.toml:3: [relay] recipients: /tmp/nope.txt cannot be read"),
            "{e}"
        );
        let e = Config::from_str(
            "[relay]\nverify_recipients = \"ldap\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("x.toml:2:"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("25MB").unwrap(), Size(25_000_000));
        assert_eq!(Size::parse("1KiB").unwrap(), Size(1024));
        assert!(Size::parse("12 parsecs").is_err());
    }

    #[test]
    fn trusted_networks_handle_mapped_v6() {
        let r = RelayConfig {
            networks: vec!["127.0.0.0/8".parse().unwrap()],
            ..RelayConfig::default()
        };
        assert!(r.is_trusted("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!r.is_trusted("10.0.0.1".parse().unwrap()));
    }
}
