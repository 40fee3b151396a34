//! Integration tests: the real `postern` binary over real sockets.
//! One test binary (modules below) so the suite links once.

mod admin;
mod common;
mod delivery;
mod durability;
mod smtp_front;
