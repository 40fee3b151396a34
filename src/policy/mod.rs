//! Policy: who may send what where.
//!
//! `relay` is the open-relay guard every RCPT goes through.

pub mod relay;
