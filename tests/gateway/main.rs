//! Integration tests: the real `postern` binary over real sockets.
//! One test binary (modules below) so the suite links once.

mod admin;
mod cluster;
mod common;
mod delivery;
mod digest;
mod dkim;
#[path = "../policy/common.rs"]
mod dns;
mod durability;
mod fds;
mod folders;
mod limits;
mod lists;
mod logins;
mod memory;
mod notify;
mod ops;
mod outbound;
mod policy;
mod quarantine;
mod replay;
mod scan;
mod smtp_front;
mod submission;
mod trust;
mod verify;
mod wire;
