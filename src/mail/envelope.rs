//! The envelope and the peer: what the SMTP session hands to the intake at
//! the end of DATA, so the intake never needs the session itself.

use std::net::IpAddr;

/// One accepted recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rcpt {
    pub(crate) address: String,
    /// In one of `[relay] domains` (else: outbound).
    pub(crate) local: bool,
}

/// MAIL FROM and the accepted RCPT TOs of one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `""` for the null sender `<>`.
    pub(crate) from: String,
    pub(crate) rcpts: Vec<Rcpt>,
    /// The `SIZE=` the client declared (0 when none).
    pub(crate) declared_size: u64,
}

impl Envelope {
    pub(crate) fn rcpt_addresses(&self) -> Vec<String> {
        self.rcpts.iter().map(|r| r.address.clone()).collect()
    }
}

/// The client as the session knows it when a message arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    /// The EHLO/HELO name, already made safe ([`super::token`]).
    pub(crate) helo: String,
    pub(crate) tls: bool,
    pub(crate) auth_user: Option<String>,
    /// The listener's label: `relay`, `submission`, `submissions`.
    pub(crate) listener: &'static str,
}

/// Split `local@domain` at the last `@` (either part may be empty: the
/// caller decides what that means).
pub fn split_address(address: &str) -> Option<(&str, &str)> {
    address.rsplit_once('@')
}
