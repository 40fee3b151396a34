//! Shared mail types: what the SMTP side, the policy, the store, delivery
//! and the mailboxes all speak, so none of them has to import another's
//! internals. No sockets and no sled here.

pub(crate) mod envelope;
pub(crate) mod headers;
pub mod reply;

pub use envelope::{Envelope, Peer, Rcpt, split_address};
pub use reply::{Enhanced, Reply};

/// Longest peer-supplied text kept in a reply, header or log line.
const MAX_TEXT: usize = 512;
/// Longest peer-supplied token (HELO name, parameter) kept.
const MAX_TOKEN: usize = 255;

/// Peer- or script-supplied text made safe for one line of a reply, a
/// header or a log: control characters (CR, LF, NUL, TAB...) become
/// spaces, and the length is capped.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .take(MAX_TEXT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A peer-supplied token (HELO name, ESMTP parameter) made safe to echo:
/// anything but printable ASCII becomes `?`, and the length is capped.
pub(crate) fn token(s: &str) -> String {
    s.chars()
        .take(MAX_TOKEN)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sanitisers() {
        assert_eq!(super::one_line("a\r\nb\0c"), "a  b c");
        assert_eq!(super::token("h\u{e9} x"), "h??x");
        assert_eq!(super::token(&"x".repeat(300)).len(), 255);
    }
}
