//! Integration tests: the real `postern` binary over real sockets.
//! One test binary (modules below) so the suite links once.

mod admin;
mod common;
mod delivery;
mod durability;
#[path = "../policy/common.rs"]
mod dns;
mod policy;
mod smtp_front;
