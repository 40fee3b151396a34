//! IMAP4rev1 (RFC 3501) with IDLE (RFC 2177), UIDPLUS (RFC 4315), MOVE (RFC 6851),
//! UNSELECT (RFC 3691), LITERAL+ (RFC 7888), ID (RFC 2971) and NAMESPACE (RFC 2342) over
//! the quarantine.
//!
//! Folders: `INBOX` shows the held entries the user may see. `Release` is a drop box: COPY
//! or MOVE into it re-queues each entry for delivery (`QuarantineStore::release`), after
//! which the entry leaves INBOX (EXPUNGE); `Release` itself always stays empty, so no
//! COPYUID is returned. `\Deleted` + EXPUNGE/CLOSE deletes from the quarantine.
//!
//! Layout: `core` (session state, dispatch, sync) and one file per command group (`auth`,
//! `select`, `fetch`, `search`, `flags` for STORE, `copy`, `expunge`, `idle`); `state`
//! (per-user UIDs and flags, cached views), `message` (MIME for FETCH), `resp` (encoding),
//! `shell` (framing and I/O).

mod auth;
mod copy;
pub(crate) mod core;
mod expunge;
mod fetch;
mod flags;
mod idle;
pub(crate) mod message;
pub(crate) mod resp;
mod search;
mod select;
pub(crate) mod shell;
pub(crate) mod state;

pub(crate) use shell::run_session;
