//! Per-destination connection slots (`[delivery] per_destination`), so one
//! slow domain cannot hold every one of `[delivery] concurrency`.
//!
//! An attempt that finds its destination full does not wait (it would hold
//! a worker while waiting): it leaves those recipients pending, its message
//! id joins the destination's waiting line, and the attempt ends. When a
//! slot frees, the first waiting message is woken at once (its attempt
//! then runs even though its timer is later); a fallback timer covers a
//! wake-up that finds nothing to do.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use crate::store::wake::Scheduler;

#[derive(Default)]
struct Slot {
    active: usize,
    waiting: VecDeque<u64>,
    queued: HashSet<u64>,
}

pub(crate) struct Slots {
    cap: usize,
    state: Mutex<HashMap<String, Slot>>,
    /// Messages woken by a freed slot whose attempt has not started yet.
    woken: Mutex<HashSet<u64>>,
    scheduler: Scheduler,
}

/// A held slot; dropping it frees the slot and wakes the next message.
pub(crate) struct SlotGuard {
    slots: Arc<Slots>,
    dest: String,
}

impl Slots {
    pub(crate) fn new(cap: usize, scheduler: Scheduler) -> Arc<Slots> {
        Arc::new(Slots {
            cap: cap.max(1),
            state: Mutex::default(),
            woken: Mutex::default(),
            scheduler,
        })
    }

    /// A slot towards `dest` for message `id`, or `None` (and `id` waits
    /// in line) when all are taken.
    pub(crate) fn acquire(self: &Arc<Self>, dest: &str, id: u64) -> Option<SlotGuard> {
        let mut state = self.state.lock().ok()?;
        let slot = state.entry(dest.to_string()).or_default();
        if slot.active < self.cap {
            slot.active += 1;
            return Some(SlotGuard {
                slots: self.clone(),
                dest: dest.to_string(),
            });
        }
        if slot.queued.insert(id) {
            slot.waiting.push_back(id);
        }
        None
    }

    /// Was `id` woken by a freed slot? Clears the mark.
    pub(crate) fn take_woken(&self, id: u64) -> bool {
        self.woken
            .lock()
            .map(|mut w| w.remove(&id))
            .unwrap_or(false)
    }

    /// Is `id` marked as woken (a wake-up that came while it was in flight)?
    pub(crate) fn is_woken(&self, id: u64) -> bool {
        self.woken.lock().map(|w| w.contains(&id)).unwrap_or(false)
    }

    /// Slots in use towards `dest` (tests).
    #[cfg(test)]
    fn active(&self, dest: &str) -> usize {
        self.state
            .lock()
            .map(|s| s.get(dest).map_or(0, |d| d.active))
            .unwrap_or(0)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let next = {
            let Ok(mut state) = self.slots.state.lock() else {
                return;
            };
            let Some(slot) = state.get_mut(&self.dest) else {
                return;
            };
            slot.active = slot.active.saturating_sub(1);
            let next = slot.waiting.pop_front();
            if let Some(id) = next {
                slot.queued.remove(&id);
            }
            if slot.active == 0 && slot.waiting.is_empty() {
                state.remove(&self.dest);
            }
            next
        };
        if let Some(id) = next {
            if let Ok(mut w) = self.slots.woken.lock() {
                w.insert(id);
            }
            self.slots.scheduler.now(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_destination_queues_and_wakes_in_order() {
        let (scheduler, mut rx) = Scheduler::channel();
        let slots = Slots::new(2, scheduler);
        let a = slots.acquire("mx:slow.test", 1).unwrap();
        let _b = slots.acquire("mx:slow.test", 2).unwrap();
        assert!(slots.acquire("mx:slow.test", 3).is_none());
        assert!(slots.acquire("mx:slow.test", 3).is_none(), "queued once");
        assert!(slots.acquire("mx:slow.test", 4).is_none());
        // Another destination is not affected.
        assert!(slots.acquire("mx:fast.test", 5).is_some());
        assert_eq!(slots.active("mx:slow.test"), 2);
        drop(a);
        assert_eq!(slots.active("mx:slow.test"), 1);
        assert_eq!(rx.try_recv().ok().map(|(_, id)| id), Some(3));
        assert!(slots.is_woken(3) && slots.take_woken(3) && !slots.take_woken(3));
        assert!(rx.try_recv().is_err(), "one wake per freed slot");
    }
}
