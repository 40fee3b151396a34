//! IDLE (RFC 2177): the shell waits for `DONE` and, whenever the quarantine or some
//! user's flags change, asks for the updates. With nothing changed an update is answered
//! from the cached view (see `state::Shared`), so a tick costs no store reads.

use super::core::{ImapCore, Step, tagged, unavailable};

impl ImapCore {
    /// IDLE: the updates so far, then `+ idling`. If the store fails, no idle starts.
    pub(super) fn idle(&mut self, tag: &str) -> Step {
        let mut out = Vec::new();
        if let Err(e) = self.sync(&mut out, true) {
            out.extend_from_slice(&unavailable(tag, "IDLE", &e));
            return Step::Reply(out);
        }
        out.extend_from_slice(b"+ idling\r\n");
        self.idle_tag = Some(tag.to_string());
        Step::Idle(out)
    }

    /// Untagged updates while idling (call when the store or some user's flags changed).
    /// A store failure sends nothing: the updates come with the next tick or DONE.
    pub(crate) fn idle_update(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.sync_after(&mut out, true);
        out
    }

    /// The line that ended IDLE.
    pub(crate) fn idle_done(&mut self, line: &[u8]) -> Vec<u8> {
        let tag = self.idle_tag.take().unwrap_or_else(|| "*".to_string());
        if !line.trim_ascii().eq_ignore_ascii_case(b"DONE") {
            return tagged(&tag, "BAD", "Expected DONE");
        }
        let mut out = Vec::new();
        if let Err(e) = self.sync(&mut out, true) {
            out.extend_from_slice(&unavailable(&tag, "IDLE", &e));
            return out;
        }
        out.extend_from_slice(&tagged(&tag, "OK", "IDLE terminated"));
        out
    }
}
