//! The policy engine against a real DNS server on loopback: SPF, DKIM,
//! DMARC, every verdict at every stage, the sandbox, rate limits, reloads.

mod checks;
mod common;
mod rules;
