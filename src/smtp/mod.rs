//! The SMTP front: listeners on the relay and submission ports.
//!
//! `session` is the protocol core (no I/O); `server` is the tokio shell.
//! smtp-proto parses commands; see README "Dependencies" for why the front
//! is not built on mailin-embedded.

pub(crate) mod data;
pub(crate) mod server;
pub(crate) mod session;
