//! The one login failure budget of the gateway, shared by POP3, IMAP and
//! SMTP AUTH: a slow-down per IP, failure budgets per IP and per login,
//! and a cap on checks in flight per IP, so parallel guesses gain nothing.
//!
//! Why each part:
//! - the delay (0.25 s doubling to 16 s per recent failure of the IP)
//!   slows one client; it alone is beaten by sending many at once, so
//! - at most [`MAX_IN_FLIGHT_PER_IP`] checks of one IP run at a time; more
//!   wait their turn (at most [`MAX_QUEUE_WAIT`]) and are then measured
//!   against the budget like any other: users behind one NAT address who
//!   log in together all get in, while parallel guesses are checked no
//!   faster than sequential ones;
//! - past [`IP_BUDGET`] failures in [`WINDOW`] an IP is refused outright
//!   until the window passes (a success clears its count);
//! - past [`LOGIN_BUDGET`] failures for one login from one network
//!   (IPv4 /24, IPv6 /64) in [`WINDOW`] that login is refused from that
//!   network. Keyed by network, not by login alone: an attacker can then
//!   lock a user out only from the attacker's own network, never from
//!   everywhere; the price is that guesses spread over many networks are
//!   bounded only by the per-IP budget of each.
//!
//! Memory is bounded: at most [`MAX_KEYS`] IPs and as many (login,
//! network) pairs; beyond that, expired entries go, and if none has
//! expired new keys are not tracked (their attempts still wait the delay
//! of nothing and are capped in flight by nobody: an attacker with that
//! many addresses is past what a per-address budget can stop).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures counted per IP and per (login, network) over this window.
pub(crate) const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Failed logins one IP may make in [`WINDOW`].
pub(crate) const IP_BUDGET: u32 = 10;
/// Failed logins for one login from one /24 (/64) in [`WINDOW`].
pub(crate) const LOGIN_BUDGET: u32 = 5;
/// Password checks one IP may have running at once.
pub(crate) const MAX_IN_FLIGHT_PER_IP: u32 = 2;
/// Keys kept per map.
pub(crate) const MAX_KEYS: usize = 100_000;
/// How long an attempt waits for one of its IP's check slots before it is
/// refused; longer than the delays up to the IP budget take (about 32 s
/// for two at a time).
pub(crate) const MAX_QUEUE_WAIT: Duration = Duration::from_secs(45);

#[derive(Default)]
struct IpState {
    failures: u32,
    /// When the first failure of the current window happened.
    since: Option<Instant>,
    in_flight: u32,
}

#[derive(Default)]
struct State {
    ips: HashMap<IpAddr, IpState>,
    logins: HashMap<(String, IpAddr), (u32, Instant)>,
}

/// Why an attempt is refused without a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The IP or the (login, network) spent its budget.
    OverBudget,
    /// The IP has [`MAX_IN_FLIGHT_PER_IP`] checks running.
    TooManyAtOnce,
}

#[derive(Default)]
pub(crate) struct LoginGuard {
    state: Mutex<State>,
    /// Told whenever a check slot frees, for attempts waiting their turn.
    freed: tokio::sync::Notify,
}

/// An admitted attempt: wait `delay`, check, then [`Ticket::finish`].
/// Dropping it unfinished (a client gone mid-check) frees its slot.
pub(crate) struct Ticket<'a> {
    guard: &'a LoginGuard,
    ip: IpAddr,
    key: (String, IpAddr),
    pub(crate) delay: Duration,
    tracked: bool,
}

/// The network a login budget is kept for: /24 for IPv4, /64 for IPv6.
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
            }
        },
    }
}

fn fresh(since: Option<Instant>, now: Instant) -> bool {
    since.is_some_and(|t| now.saturating_duration_since(t) < WINDOW)
}

impl LoginGuard {
    /// Resolves when some check slot frees. Create (and `enable`) it before
    /// the [`LoginGuard::begin`] that may say [`Refusal::TooManyAtOnce`], so
    /// a slot freed in between is not missed.
    pub(crate) fn slot_freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Admit an attempt by `login` from `ip` at `now`, or refuse it.
    pub(crate) fn begin(
        &self,
        ip: IpAddr,
        login: &str,
        now: Instant,
    ) -> Result<Ticket<'_>, Refusal> {
        let key = (login.trim().to_lowercase(), network(ip));
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(n, since)) = st.logins.get(&key)
            && n >= LOGIN_BUDGET
            && fresh(Some(since), now)
        {
            return Err(Refusal::OverBudget);
        }
        if st.ips.len() >= MAX_KEYS && !st.ips.contains_key(&ip) {
            st.ips.retain(|_, s| s.in_flight > 0 || fresh(s.since, now));
        }
        let tracked = st.ips.len() < MAX_KEYS || st.ips.contains_key(&ip);
        if !tracked {
            return Ok(Ticket {
                guard: self,
                ip,
                key,
                delay: Duration::ZERO,
                tracked,
            });
        }
        let s = st.ips.entry(ip).or_default();
        if !fresh(s.since, now) {
            s.failures = 0;
            s.since = None;
        }
        if s.failures >= IP_BUDGET {
            return Err(Refusal::OverBudget);
        }
        if s.in_flight >= MAX_IN_FLIGHT_PER_IP {
            return Err(Refusal::TooManyAtOnce);
        }
        s.in_flight += 1;
        let delay = match s.failures {
            0 => Duration::ZERO,
            n => Duration::from_millis(250u64 << (n - 1).min(6)),
        };
        Ok(Ticket {
            guard: self,
            ip,
            key,
            delay,
            tracked,
        })
    }
}

impl Ticket<'_> {
    /// The password was checked: a success clears the IP's and the login's
    /// failures, a failure counts against both.
    pub(crate) fn finish(self, ok: bool, now: Instant) {
        let mut st = self.guard.state.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            if let Some(s) = st.ips.get_mut(&self.ip) {
                s.failures = 0;
                s.since = None;
            }
            st.logins.remove(&self.key);
            return;
        }
        if let Some(s) = st.ips.get_mut(&self.ip) {
            if !fresh(s.since, now) {
                s.failures = 0;
                s.since = Some(now);
            }
            s.failures = s.failures.saturating_add(1);
        }
        if st.logins.len() >= MAX_KEYS && !st.logins.contains_key(&self.key) {
            st.logins.retain(|_, (_, since)| fresh(Some(*since), now));
        }
        if st.logins.len() < MAX_KEYS || st.logins.contains_key(&self.key) {
            let e = st.logins.entry(self.key.clone()).or_insert((0, now));
            if !fresh(Some(e.1), now) {
                *e = (0, now);
            }
            e.0 = e.0.saturating_add(1);
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.tracked {
            return;
        }
        let mut st = self.guard.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = st.ips.get_mut(&self.ip) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        drop(st);
        self.guard.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_delay_grows_and_a_success_clears_it() {
        let g = LoginGuard::default();
        let now = Instant::now();
        let a = ip("127.0.0.9");
        let t = g.begin(a, "x", now).unwrap();
        assert_eq!(t.delay, Duration::ZERO);
        t.finish(false, now);
        let t = g.begin(a, "y", now).unwrap();
        assert_eq!(t.delay, Duration::from_millis(250));
        t.finish(false, now);
        assert_eq!(
            g.begin(a, "z", now).unwrap().delay,
            Duration::from_millis(500)
        );
        g.begin(a, "z", now).unwrap().finish(true, now);
        assert_eq!(g.begin(a, "z", now).unwrap().delay, Duration::ZERO);
    }

    #[test]
    fn parallel_checks_of_one_ip_are_capped() {
        let g = LoginGuard::default();
        let now = Instant::now();
        let a = ip("127.0.0.9");
        let t1 = g.begin(a, "x", now).unwrap();
        let _t2 = g.begin(a, "x", now).unwrap();
        assert_eq!(g.begin(a, "x", now).err(), Some(Refusal::TooManyAtOnce));
        // Another IP is not affected.
        assert!(g.begin(ip("127.0.0.10"), "x", now).is_ok());
        drop(t1);
        assert!(g.begin(a, "x", now).is_ok());
    }

    #[test]
    fn budgets_per_ip_and_per_login_network_then_the_window_passes() {
        let g = LoginGuard::default();
        let now = Instant::now();
        let a = ip("10.1.2.3");
        for i in 0..IP_BUDGET {
            g.begin(a, &format!("u{i}"), now)
                .unwrap()
                .finish(false, now);
        }
        assert_eq!(g.begin(a, "new", now).err(), Some(Refusal::OverBudget));
        assert!(g.begin(a, "new", now + WINDOW).is_ok());
        // One login guessed from several IPs of one /24: refused there,
        // not from another network, and not for another login.
        for i in 0..LOGIN_BUDGET {
            let from = ip(&format!("192.0.2.{}", 10 + i));
            g.begin(from, "Alice", now).unwrap().finish(false, now);
        }
        assert_eq!(
            g.begin(ip("192.0.2.99"), "alice", now).err(),
            Some(Refusal::OverBudget)
        );
        assert!(g.begin(ip("198.51.100.7"), "alice", now).is_ok());
        assert!(g.begin(ip("192.0.2.99"), "bob", now).is_ok());
        assert!(g.begin(ip("192.0.2.99"), "alice", now + WINDOW).is_ok());
        assert_eq!(network(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(network(ip("::ffff:192.0.2.7")), ip("192.0.2.0"));
    }
}
