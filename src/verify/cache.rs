//! The verification cache: what the backend said of an address, kept for a
//! while (known longer than unknown), bounded; the clock is the caller's.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A known address is asked again after this long.
pub(crate) const POSITIVE_TTL: Duration = Duration::from_secs(60 * 60);
/// An unknown one sooner: a mailbox may have been created meanwhile.
pub(crate) const NEGATIVE_TTL: Duration = Duration::from_secs(10 * 60);
/// Most addresses remembered; the oldest entry goes first beyond it.
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// Known or unknown, with when the entry was made (temporary failures are
/// never cached: the next RCPT asks again).
pub(crate) struct Cache {
    map: HashMap<String, (bool, Instant)>,
    /// Insertion order, for evicting the oldest; may hold keys replaced or
    /// removed since (skipped when met).
    order: VecDeque<(String, Instant)>,
    max: usize,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::with_capacity(MAX_ENTRIES)
    }
}

impl Cache {
    pub(crate) fn with_capacity(max: usize) -> Cache {
        Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// `Some(known)` while the entry for `key` is fresh at `now`.
    pub(crate) fn get(&mut self, key: &str, now: Instant) -> Option<bool> {
        let &(known, at) = self.map.get(key)?;
        let ttl = if known { POSITIVE_TTL } else { NEGATIVE_TTL };
        if now.saturating_duration_since(at) < ttl {
            Some(known)
        } else {
            self.map.remove(key);
            None
        }
    }

    pub(crate) fn put(&mut self, key: String, known: bool, now: Instant) {
        while self.map.len() >= self.max && !self.map.contains_key(&key) {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            // Only the entry made at that moment: a newer one for the key stays.
            if self.map.get(&old).is_some_and(|&(_, t)| t == at) {
                self.map.remove(&old);
            }
        }
        self.map.insert(key.clone(), (known, now));
        self.order.push_back((key, now));
        // The order queue never grows far beyond the map.
        if self.order.len() > 2 * self.max {
            let map = &self.map;
            self.order
                .retain(|(k, at)| map.get(k).is_some_and(|&(_, t)| t == *at));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_by_kind() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.put("a@x".into(), true, t0);
        c.put("b@x".into(), false, t0);
        let later = t0 + NEGATIVE_TTL + Duration::from_secs(1);
        assert_eq!(c.get("a@x", later), Some(true));
        assert_eq!(c.get("b@x", later), None);
        assert_eq!(c.get("a@x", t0 + POSITIVE_TTL), None);
        assert_eq!(c.get("c@x", t0), None);
    }

    #[test]
    fn bounded_oldest_first() {
        let mut c = Cache::with_capacity(3);
        let t0 = Instant::now();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            c.put((*k).into(), true, t0 + Duration::from_millis(i as u64));
        }
        // "a" is refreshed: "b" is now the oldest.
        c.put("a".into(), true, t0 + Duration::from_millis(5));
        c.put("d".into(), true, t0 + Duration::from_millis(6));
        assert_eq!(c.len(), 3);
        let now = t0 + Duration::from_millis(7);
        assert_eq!(c.get("b", now), None);
        assert_eq!(c.get("a", now), Some(true));
        assert_eq!(c.get("d", now), Some(true));
        for i in 0..1000 {
            c.put(format!("k{i}"), false, now);
        }
        assert_eq!(c.len(), 3);
        assert!(c.order.len() <= 6);
    }
}
