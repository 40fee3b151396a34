//! Postern, a mail gateway: SMTP front → checks → durable sled queue →
//! delivery to the mailbox backend or the recipient's MX; quarantine over
//! POP3 and IMAP; Prometheus metrics.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into here.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub(crate) mod delivery;
pub mod dkim;
pub(crate) mod dns;
pub mod fds;
/// The cargo-fuzz targets' door to the private cores (`fuzz/`).
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod gateway;
pub(crate) mod intake;
pub mod mail;
pub mod mailbox;
pub(crate) mod metrics;
pub mod net;
pub(crate) mod notify;
pub mod policy;
pub(crate) mod quarantine;
pub mod replay;
pub mod rules_test;
pub(crate) mod scan;
pub(crate) mod smtp;
pub(crate) mod spool;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod tls;
pub mod verify;
pub(crate) mod watch;
pub(crate) mod web;

pub(crate) use net::stopped;
