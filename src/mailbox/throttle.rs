//! The login slow-down POP3 and IMAP share: per-IP throttling of failed logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Slows down password guessing: every failed login from an IP raises the delay that IP's
/// next login attempts wait before they are checked (0.25 s doubling up to 16 s); it decays
/// after 15 minutes without failures and is cleared by a success.
#[derive(Default)]
pub(crate) struct Throttle {
    map: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

const THROTTLE_FORGET: Duration = Duration::from_secs(15 * 60);
const THROTTLE_MAX_KEYS: usize = 100_000;

impl Throttle {
    /// How long an attempt from `ip` must wait before its password is checked.
    pub(crate) fn delay(&self, ip: IpAddr) -> Duration {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&ip) {
            Some(&(n, at)) if n > 0 && at.elapsed() < THROTTLE_FORGET => {
                let ms = 250u64.saturating_mul(1u64 << (n - 1).min(6));
                Duration::from_millis(ms)
            }
            _ => Duration::ZERO,
        }
    }

    pub(crate) fn failed(&self, ip: IpAddr) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= THROTTLE_MAX_KEYS {
            map.retain(|_, (_, at)| at.elapsed() < THROTTLE_FORGET);
        }
        let e = map.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= THROTTLE_FORGET {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = Instant::now();
    }

    pub(crate) fn succeeded(&self, ip: IpAddr) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_grows() {
        let t = Throttle::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert_eq!(t.delay(ip), Duration::ZERO);
        t.failed(ip);
        assert_eq!(t.delay(ip), Duration::from_millis(250));
        t.failed(ip);
        assert_eq!(t.delay(ip), Duration::from_millis(500));
        t.succeeded(ip);
        assert_eq!(t.delay(ip), Duration::ZERO);
    }
}
