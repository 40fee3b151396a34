//! The POP3 and IMAP servers over an in-memory quarantine, with Python's
//! poplib/imaplib and the async-imap crate as independent clients.
//! (tests/gateway/quarantine.rs drives the same servers inside the real
//! binary, over the sled store.)

mod common;
mod failing;
mod imap;
mod imap_conformance;
mod pop3;
mod robustness;
