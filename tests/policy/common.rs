//! Test helpers: a loopback DNS server (hickory-server, in-memory root
//! zone, so every unknown name is an authoritative NXDOMAIN at once) and
//! temporary rule/policy directories.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use postern::config::{ChecksConfig, DnsConfig, RulesConfig};
use postern::policy::{ConnInfo, Policy, Problem, TxInfo};

/// Starts a DNS server on 127.0.0.1 (UDP and TCP, one port) serving
/// `records` (name, TXT text). It lives as long as the test's runtime.
pub async fn start_dns(records: &[(&str, &str)]) -> SocketAddr {
    start_dns_with(records, &[], &[]).await
}

/// Like [`start_dns`], plus MX records `(domain, preference, exchange)`
/// and A records `(name, address)`.
pub async fn start_dns_with(
    records: &[(&str, &str)],
    mx: &[(&str, u16, &str)],
    a: &[(&str, Ipv4Addr)],
) -> SocketAddr {
    let origin = Name::root();
    let mut zone: InMemoryZoneHandler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let serial = 1;
    let soa = SOA::new(
        Name::from_str("ns.test.").expect("name"),
        Name::from_str("hostmaster.test.").expect("name"),
        serial,
        3600,
        600,
        86400,
        1,
    );
    zone.upsert_mut(
        Record::from_rdata(origin.clone(), 60, RData::SOA(soa)),
        serial,
    );
    for (name, text) in records {
        let name = Name::from_str(&format!("{}.", name.trim_end_matches('.'))).expect("name");
        // TXT strings are at most 255 bytes each.
        let chunks: Vec<String> = text
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        assert!(zone.upsert_mut(
            Record::from_rdata(name, 60, RData::TXT(TXT::new(chunks))),
            serial
        ));
    }
    let fqdn = |n: &str| Name::from_str(&format!("{}.", n.trim_end_matches('.'))).expect("name");
    for (domain, pref, exchange) in mx {
        let rdata = RData::MX(hickory_server::proto::rr::rdata::MX::new(
            *pref,
            fqdn(exchange),
        ));
        assert!(zone.upsert_mut(Record::from_rdata(fqdn(domain), 60, rdata), serial));
    }
    for (name, ip) in a {
        let rdata = RData::A(hickory_server::proto::rr::rdata::A(*ip));
        assert!(zone.upsert_mut(Record::from_rdata(fqdn(name), 60, rdata), serial));
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);

    // UDP and TCP on one port: retry when the UDP port is taken on TCP.
    let (udp, tcp, addr) = loop {
        let udp = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind udp");
        let addr = udp.local_addr().expect("addr");
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            break (udp, tcp, addr);
        }
    };
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, std::time::Duration::from_secs(5), 1 << 16);
    tokio::spawn(async move {
        let _ = server.block_until_done().await;
    });
    addr
}

/// A UDP "nameserver" that never answers (for deadline tests).
pub async fn silent_dns() -> (SocketAddr, tokio::net::UdpSocket) {
    let udp = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    (udp.local_addr().expect("addr"), udp)
}

/// A temporary directory with `rules/` and `policies/`.
pub struct Dirs {
    pub tmp: tempfile::TempDir,
}

impl Dirs {
    pub fn new(scripts: &[(&str, &str)], ratelimits: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("rules")).expect("mkdir");
        std::fs::create_dir(tmp.path().join("policies")).expect("mkdir");
        let d = Self { tmp };
        for (name, text) in scripts {
            d.write_rule(name, text);
        }
        d.write_limits(ratelimits);
        d
    }

    pub fn rules(&self) -> PathBuf {
        self.tmp.path().join("rules")
    }

    pub fn policies(&self) -> PathBuf {
        self.tmp.path().join("policies")
    }

    pub fn write_rule(&self, name: &str, text: &str) {
        std::fs::write(self.rules().join(name), text).expect("write rule");
    }

    pub fn write_limits(&self, text: &str) {
        std::fs::write(self.policies().join("ratelimits.toml"), text).expect("write limits");
    }

    pub fn load(
        &self,
        rules: RulesConfig,
        checks: ChecksConfig,
        dns: Vec<SocketAddr>,
    ) -> Result<Policy, Vec<Problem>> {
        Policy::load(
            RulesConfig {
                dir: self.rules(),
                ..rules
            },
            self.policies(),
            checks,
            DnsConfig { nameservers: dns },
            "mx.postern.test",
        )
    }

    /// Rules only: no DNS checks.
    pub fn load_rules_only(&self) -> Policy {
        self.load(RulesConfig::default(), no_checks(), Vec::new())
            .unwrap_or_else(|p| panic!("load: {p:?}"))
    }
}

pub fn no_checks() -> ChecksConfig {
    ChecksConfig {
        spf: false,
        dkim: false,
        dmarc: false,
        ..ChecksConfig::default()
    }
}

pub fn conn(ip: &str, port: u16) -> ConnInfo {
    ConnInfo {
        ip: IpAddr::from_str(ip).expect("ip"),
        port,
        tls: false,
    }
}

pub fn tx(ip: &str, helo: &str, from: &str, rcpts: &[&str]) -> TxInfo {
    TxInfo {
        conn: conn(ip, 2525),
        helo: helo.to_string(),
        from: from.to_string(),
        auth_user: None,
        rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
        submission: false,
        trusted: false,
    }
}

pub fn message(from: &str, to: &str, subject: &str, body: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@{host}>\r\n\r\n{body}\r\n",
        host = from.rsplit_once('@').map_or("x.test", |(_, d)| d)
    )
}

pub fn shipped_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")
}

pub fn shipped_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}
