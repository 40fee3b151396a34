//! The relay decision: who may send mail to which recipient.
//!
//! Mail for `[relay] domains` is accepted from anyone; mail for any other
//! domain only from `[relay] networks` or an authenticated user. The classic
//! tricks that make a gateway relay by accident are refused for everyone who
//! may not relay: `user%other@local`, `user!other@local`,
//! `"user@other"@local`, `user@other@local`, source routes
//! (`@local:user@other`, which smtp-proto strips, leaving `user@other`),
//! address literals and trailing dots.

use crate::config::RelayConfig;
use crate::mail::{Enhanced, Reply};

/// What to do with one `RCPT TO` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RcptDecision {
    /// A recipient in one of our domains.
    Local,
    /// Any other domain; only trusted or authenticated clients get this.
    Outbound,
    /// Refused, with the reply to give.
    Refuse(Reply),
}

pub(crate) use crate::mail::split_address as split;

/// Decide for one recipient. `may_relay` is true for trusted networks and
/// authenticated users.
pub(crate) fn decide(relay: &RelayConfig, address: &str, may_relay: bool) -> RcptDecision {
    let refuse = |why: &str| {
        RcptDecision::Refuse(Reply::new(
            550,
            Enhanced::new(5, 7, 1),
            format!("<{address}>: {why}"),
        ))
    };
    let syntax = |why: &str| {
        RcptDecision::Refuse(Reply::new(
            501,
            Enhanced::new(5, 1, 3),
            format!("<{address}>: {why}"),
        ))
    };
    let Some((local, domain)) = split(address) else {
        return syntax("address needs a domain");
    };
    if local.is_empty() || domain.is_empty() {
        return syntax("bad address syntax");
    }
    // A domain literal or trailing dot never names one of our domains.
    let odd_domain = domain.starts_with('[') || domain.ends_with('.');
    // Routing characters in the local part ask the next hop to relay further.
    let routed_local = local.contains(['@', '%', '!']);
    if !odd_domain && relay.is_local_domain(domain) {
        if routed_local && !may_relay {
            return refuse("relay through the local part is not allowed");
        }
        return RcptDecision::Local;
    }
    if may_relay {
        if odd_domain && domain.ends_with('.') {
            return syntax("bad domain");
        }
        return RcptDecision::Outbound;
    }
    refuse("relay access denied")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RelayConfig {
        RelayConfig {
            domains: vec!["local.test".into()],
            ..RelayConfig::default()
        }
    }

    #[test]
    fn untrusted_cannot_relay() {
        let c = cfg();
        assert_eq!(decide(&c, "bob@local.test", false), RcptDecision::Local);
        assert_eq!(decide(&c, "Bob@LOCAL.test", false), RcptDecision::Local);
        for trick in [
            "bob@other.test",
            "bob%other.test@local.test",
            "bob!other.test@local.test",
            "bob@other.test@local.test",
            "bob@local.test.",
            "bob@[127.0.0.1]",
            "bob@local.test.other.test",
        ] {
            assert!(
                matches!(decide(&c, trick, false), RcptDecision::Refuse(r) if r.code == 550),
                "{trick} was not refused"
            );
        }
    }

    #[test]
    fn trusted_may_relay() {
        assert_eq!(decide(&cfg(), "x@other.test", true), RcptDecision::Outbound);
    }
}
