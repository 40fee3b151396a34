//! Next-hop lookup over hickory-resolver: MX records (RFC 5321 5.1), the
//! implicit MX, null MX (RFC 7505), and A/AAAA for host names, over the
//! resolver [`crate::dns::resolver`] builds.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;

use crate::dns::DnsError;

/// Where mail for a domain goes.
#[derive(Debug)]
pub(crate) enum MxAnswer {
    /// Exchange host names, most preferred first.
    Hosts(Vec<String>),
    /// The domain publishes a null MX: it accepts no mail (permanent).
    NullMx,
    /// The domain does not exist (permanent).
    NoDomain,
    /// DNS failed; try again later.
    TempFail(NetError),
}

pub(crate) async fn lookup_mx(resolver: &TokioResolver, domain: &str) -> MxAnswer {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(l) => {
            let mut mx: Vec<(u16, String)> = l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                    _ => None,
                })
                .collect();
            if mx.len() == 1 && (mx[0].1 == "." || mx[0].1.is_empty()) {
                return MxAnswer::NullMx;
            }
            if mx.is_empty() {
                return MxAnswer::Hosts(vec![domain.to_string()]);
            }
            mx.sort();
            MxAnswer::Hosts(
                mx.into_iter()
                    .map(|(_, h)| h.trim_end_matches('.').to_string())
                    .collect(),
            )
        }
        Err(e) if e.is_nx_domain() => MxAnswer::NoDomain,
        // No MX but the name exists: the implicit MX is the domain itself.
        Err(e) if e.is_no_records_found() => MxAnswer::Hosts(vec![domain.to_string()]),
        Err(e) => MxAnswer::TempFail(e),
    }
}

/// Addresses for `host` (an IP literal or a name) at `port`.
pub(crate) async fn resolve_host(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, DnsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    match resolver.lookup_ip(fqdn.as_str()).await {
        Ok(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
        Err(source) => Err(DnsError::Lookup {
            host: host.to_string(),
            source,
        }),
    }
}

/// Split `host:port` (as in `smtp://host:port`).
pub(crate) fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (h, p) = s.rsplit_once(':')?;
    Some((h, p.parse().ok()?))
}
