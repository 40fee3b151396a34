//! The delivery wake-up channel, beside the queue it wakes: whoever puts a
//! message on the queue (intake, a bounce, a quarantine release, an admin
//! retry) says when delivery should look at it next.

use tokio::sync::mpsc;

/// What the delivery dispatcher receives: `(due_ms, queue id)`, `due_ms`
/// 0 meaning now.
pub(crate) type Wakeups = mpsc::UnboundedReceiver<(i64, u64)>;

/// Asks the delivery dispatcher to attempt a message now or at a given time.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<(i64, u64)>,
}

impl Scheduler {
    /// A scheduler and the receiving end the dispatcher runs on.
    pub(crate) fn channel() -> (Scheduler, Wakeups) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Scheduler { tx }, rx)
    }

    pub(crate) fn now(&self, id: u64) {
        // The dispatcher is gone only at shutdown; the message stays queued.
        let _ = self.tx.send((0, id));
    }

    pub(crate) fn at(&self, id: u64, due_ms: i64) {
        let _ = self.tx.send((due_ms, id));
    }
}
