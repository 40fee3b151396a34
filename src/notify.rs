//! The systemd readiness protocol (sd_notify): tell the service manager when
//! the gateway is ready, reloading and stopping, so `Type=notify` units order
//! their dependants after the listeners are bound and `systemctl reload`
//! returns only once the reload is done.
//!
//! The `sd-notify` crate supplies the message vocabulary and the
//! CLOCK_MONOTONIC reading `MONOTONIC_USEC` needs (std has no safe way to
//! read that clock); the datagram is sent here with std because the crate's
//! own send cannot reach an abstract socket (`NOTIFY_SOCKET=@name`), which
//! containers and nested managers hand out.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use sd_notify::NotifyState;

/// The socket systemd names for us, if any.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A send may wait this long for room in the manager's queue: long enough
/// that a busy systemd still gets READY=1 (else it times out the start and
/// kills us), short enough that a stuck one cannot stall a runtime thread.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// All listeners are bound and serving (also after a reload).
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A SIGHUP reload starts; [`ready`] follows when it is done.
pub fn reloading() {
    // systemd ≥ 253 matches the reload by this timestamp; older ones ignore it.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => {
            tracing::debug!(error = %e, "sd_notify: no CLOCK_MONOTONIC reading");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// SIGTERM/SIGINT: the drain begins.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// One datagram of `KEY=value` lines. A no-op without `NOTIFY_SOCKET`;
/// failures are logged at debug and never stop the gateway.
fn send(states: &[NotifyState]) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    if let Err(e) = send_to(&target, msg.as_bytes()) {
        tracing::debug!(socket = ?target, error = %e, message = %msg.trim_end(), "sd_notify failed");
    }
}

/// Send `msg` to `target`: a path, or `@name` for the abstract namespace.
fn send_to(target: &OsStr, msg: &[u8]) -> std::io::Result<()> {
    let addr = match target.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(target)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let n = sock.send_to_addr(msg, &addr)?;
    if n == msg.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {n} of {} bytes", msg.len()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_abstract_sockets_both_receive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let name = format!("postern-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        send_to(OsStr::new(&format!("@{name}")), b"STOPPING=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        assert!(send_to(OsStr::new("/nonexistent/postern/notify.sock"), b"READY=1\n").is_err());
    }
}
