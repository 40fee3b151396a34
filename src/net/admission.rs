//! Who may open a session: a cap on all connections of a group of
//! listeners, a cap per client IP, and a rate of new connections per IP.
//!
//! One [`Admission`] serves a group (all SMTP listeners share one, all
//! mailbox listeners another), so one address cannot take every slot by
//! spreading over ports. As Postfix's anvil exempts `$mynetworks`, the
//! trusted networks are not held to the per-IP caps (they are still
//! counted in the total).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of one group of listeners.
#[derive(Debug, Clone)]
pub(crate) struct AdmissionConfig {
    pub(crate) max_connections: usize,
    /// 0 = no per-IP cap.
    pub(crate) max_per_ip: usize,
    /// New connections per IP: `(count, per)`; `None` = no rate.
    pub(crate) rate_per_ip: Option<(u32, std::time::Duration)>,
    /// Not held to the per-IP cap and rate.
    pub(crate) exempt: Vec<IpNet>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Every slot of the group is taken.
    Full,
    /// This IP has its share of open connections.
    PerIp,
    /// This IP opens connections too fast.
    Rate,
}

impl Refusal {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::Full => "full",
            Refusal::PerIp => "per_ip",
            Refusal::Rate => "rate",
        }
    }
}

pub(crate) struct Admission {
    cfg: AdmissionConfig,
    slots: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    admitted: AtomicU64,
}

/// Held for as long as the session lives; gives its slots back on drop.
pub(crate) struct Ticket {
    _slot: OwnedSemaphorePermit,
    ip: Option<IpAddr>,
    admission: Arc<Admission>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut map = self.admission.lock();
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// v4-mapped v6 addresses count as their v4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl Admission {
    pub(crate) fn new(cfg: AdmissionConfig) -> Arc<Admission> {
        let rate = cfg.rate_per_ip.and_then(|(count, per)| {
            let count = NonZeroU32::new(count)?;
            let quota = Quota::with_period(per / count.get())?.allow_burst(count);
            Some(DefaultKeyedRateLimiter::keyed(quota))
        });
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
            per_ip: Mutex::new(HashMap::new()),
            rate,
            admitted: AtomicU64::new(0),
            cfg,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_ip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admit a connection from `ip` (`None`: a local socket, only the total applies).
    pub(crate) fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Ticket, Refusal> {
        let ip = ip.map(canonical);
        let limited = ip.filter(|ip| !self.cfg.exempt.iter().any(|n| n.contains(ip)));
        if let (Some(ip), Some(rate)) = (limited, &self.rate) {
            // Forget idle keys now and then, so a scan of many sources
            // does not grow the map for ever.
            if self.admitted.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
                rate.retain_recent();
                rate.shrink_to_fit();
            }
            if rate.check_key(&ip).is_err() {
                return Err(Refusal::Rate);
            }
        }
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Full)?;
        let counted = match limited {
            Some(ip) if self.cfg.max_per_ip > 0 => {
                let mut map = self.lock();
                let n = map.entry(ip).or_insert(0);
                if *n >= self.cfg.max_per_ip {
                    return Err(Refusal::PerIp);
                }
                *n += 1;
                Some(ip)
            }
            _ => None,
        };
        Ok(Ticket {
            _slot: slot,
            ip: counted,
            admission: self.clone(),
        })
    }
}

#[cfg(test)]
impl Admission {
    /// Open connections of `ip` counted against its cap.
    fn open_from(&self, ip: IpAddr) -> usize {
        self.lock().get(&canonical(ip)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn adm(max: usize, per_ip: usize, rate: Option<(u32, Duration)>) -> Arc<Admission> {
        Admission::new(AdmissionConfig {
            max_connections: max,
            max_per_ip: per_ip,
            rate_per_ip: rate,
            exempt: vec!["10.0.0.0/8".parse().unwrap()],
        })
    }

    #[test]
    fn caps_per_ip_and_total() {
        let a = adm(3, 2, None);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t1 = a.admit(Some(ip)).unwrap();
        let _t2 = a.admit(Some(ip)).unwrap();
        assert_eq!(a.admit(Some(ip)).err(), Some(Refusal::PerIp));
        let _other = a.admit(Some("192.0.2.2".parse().unwrap())).unwrap();
        assert_eq!(
            a.admit(Some("192.0.2.3".parse().unwrap())).err(),
            Some(Refusal::Full)
        );
        drop(t1);
        assert_eq!(a.open_from(ip), 1);
        assert!(a.admit(Some(ip)).is_ok());
    }

    #[test]
    fn exempt_networks_skip_per_ip_limits() {
        let a = adm(10, 1, Some((1, Duration::from_secs(60))));
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let _a = a.admit(Some(ip)).unwrap();
        let _b = a.admit(Some(ip)).unwrap();
        let out: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        let _c = a.admit(Some(out)).unwrap();
        // The second connection within the minute is over the rate.
        assert_eq!(
            a.admit(Some("192.0.2.9".parse().unwrap())).err(),
            Some(Refusal::Rate)
        );
    }
}
