//! The one DNS resolver factory: delivery (MX, A/AAAA) and the policy's
//! SPF/DKIM/DMARC checks both build their resolver here, from `[dns]`, with
//! the same options, so they cannot drift apart.

use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::DnsConfig;

/// Per-query timeout. The policy checks have their own overall deadline
/// (`[checks] deadline`), delivery its per-attempt timeout; this only keeps
/// one lost packet from eating all of either.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries per query and name server.
const ATTEMPTS: usize = 2;

/// Why a resolver could not be built or a lookup failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsError {
    #[error("reading /etc/resolv.conf: {0}")]
    SystemConf(#[source] NetError),
    #[error("building the DNS resolver: {0}")]
    Build(#[source] NetError),
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: NetError,
    },
}

/// A resolver for `[dns] nameservers`, or the system configuration
/// (`/etc/resolv.conf`) when none are set. With name servers set, neither
/// the system resolver nor the hosts file is consulted. Build it inside the
/// Tokio runtime.
pub(crate) fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, DnsError> {
    let mut opts = ResolverOpts::default();
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = ATTEMPTS;
    // Names we look up are fully qualified; never try search domains first.
    opts.ndots = 0;
    let builder = if cfg.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(DnsError::SystemConf)?
    } else {
        opts.use_hosts_file = ResolveHosts::Never;
        let servers = cfg
            .nameservers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder.with_options(opts).build().map_err(DnsError::Build)
}
