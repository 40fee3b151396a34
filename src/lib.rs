//! Postern, a mail gateway: SMTP front → checks → durable sled queue →
//! delivery to the mailbox backend or the recipient's MX; quarantine over
//! POP3 and IMAP; Prometheus metrics.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into here.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod delivery;
pub mod dns;
pub mod gateway;
pub mod intake;
pub mod mail;
pub mod mailbox;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod quarantine;
pub mod rules_test;
pub mod smtp;
pub mod store;
pub mod tls;
pub(crate) mod watch;

pub(crate) use net::stopped;
