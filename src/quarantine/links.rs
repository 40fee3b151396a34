//! Signed digest links: who may do what to which held message, until when.
//!
//! A token is `base64url(payload).base64url(HMAC-SHA256(key, payload))`,
//! the payload `1\n<action>\n<entry id>\n<expiry, unix s>\n<login>`. The key
//! is 32 random bytes made in the data dir on first start, so links survive
//! restarts and a token from another gateway (another key) is forged here.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;

/// What a link asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Release,
    /// Release, and put the sender on the user's allow list.
    Allow,
    /// Put the sender on the user's block list and delete the message.
    Block,
    Delete,
}

impl Action {
    pub(crate) const ALL: [Action; 4] = [
        Action::Release,
        Action::Allow,
        Action::Block,
        Action::Delete,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Release => "release",
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The button and link text.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Action::Release => "Release",
            Action::Allow => "Release and allow sender",
            Action::Block => "Block sender",
            Action::Delete => "Delete",
        }
    }
}

/// The signed content of a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) login: String,
    pub(crate) id: u64,
    pub(crate) action: Action,
    /// Unix seconds.
    pub(crate) expires: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkError {
    /// Not a token of ours, or altered: the signature does not match.
    Forged,
    Expired,
}

/// The HMAC key for links.
pub(crate) struct LinkKey(hmac::Key);

/// The key's file in the data dir.
pub(crate) fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("links.key")
}

const KEY_LEN: usize = 32;
/// Longest token accepted: logins are at most
/// [`crate::mailbox::accounts::MAX_LOGIN`] bytes, so a token of ours is
/// well under this, and one past it is not ours.
const MAX_TOKEN: usize = 2048;

impl LinkKey {
    /// Read the key, or make it (mode 0600) when the data dir has none.
    pub(crate) fn load_or_create(data_dir: &Path) -> std::io::Result<LinkKey> {
        let path = key_path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= KEY_LEN => return Ok(LinkKey::from_bytes(&bytes)),
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is shorter than {KEY_LEN} bytes: delete it to make a new key (old digest links stop working)",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| std::io::Error::other("no random bytes for the link key"))?;
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(&bytes)?;
                f.sync_all()?;
                Ok(LinkKey::from_bytes(&bytes))
            }
            // Another process (the CLI beside `serve`) made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                LinkKey::load_or_create(data_dir)
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> LinkKey {
        LinkKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    pub(crate) fn sign(&self, link: &Link) -> String {
        let payload = format!(
            "1\n{}\n{}\n{}\n{}",
            link.action.as_str(),
            link.id,
            link.expires,
            link.login
        );
        let tag = hmac::sign(&self.0, payload.as_bytes());
        format!("{}.{}", B64.encode(payload), B64.encode(tag.as_ref()))
    }

    /// The link a token carries, if this key signed it and it has not expired at `now`.
    pub(crate) fn verify(&self, token: &str, now: i64) -> Result<Link, LinkError> {
        if token.len() > MAX_TOKEN {
            return Err(LinkError::Forged);
        }
        let (p, t) = token.split_once('.').ok_or(LinkError::Forged)?;
        let (Ok(payload), Ok(tag)) = (B64.decode(p), B64.decode(t)) else {
            return Err(LinkError::Forged);
        };
        hmac::verify(&self.0, &payload, &tag).map_err(|_| LinkError::Forged)?;
        // Signed by us, so well-formed unless the format changed.
        let text = String::from_utf8(payload).map_err(|_| LinkError::Forged)?;
        let mut f = text.splitn(5, '\n');
        let (Some("1"), Some(action), Some(id), Some(expires), Some(login)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return Err(LinkError::Forged);
        };
        let link = Link {
            action: Action::parse(action).ok_or(LinkError::Forged)?,
            id: id.parse().map_err(|_| LinkError::Forged)?,
            expires: expires.parse().map_err(|_| LinkError::Forged)?,
            login: login.to_string(),
        };
        if now >= link.expires {
            return Err(LinkError::Expired);
        }
        Ok(link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link {
            login: "alice".into(),
            id: 42,
            action: Action::Allow,
            expires: 1_000,
        }
    }

    #[test]
    fn a_signed_link_verifies_until_it_expires() {
        let key = LinkKey::from_bytes(&[7; 32]);
        let t = key.sign(&link());
        assert_eq!(key.verify(&t, 999), Ok(link()));
        assert_eq!(key.verify(&t, 1_000), Err(LinkError::Expired));
    }

    #[test]
    fn altered_or_foreign_tokens_are_forged() {
        let key = LinkKey::from_bytes(&[7; 32]);
        let t = key.sign(&link());
        // Another gateway's key.
        assert_eq!(
            LinkKey::from_bytes(&[8; 32]).verify(&t, 0),
            Err(LinkError::Forged)
        );
        // Bob's login put into Alice's payload, signature kept.
        let (_, tag) = t.split_once('.').unwrap();
        let bob = B64.encode("1\nallow\n42\n1000\nbob");
        assert_eq!(
            key.verify(&format!("{bob}.{tag}"), 0),
            Err(LinkError::Forged)
        );
        for junk in ["", ".", "abc", "a.b.c", &"x".repeat(5000)] {
            assert_eq!(key.verify(junk, 0), Err(LinkError::Forged), "{junk}");
        }
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = LinkKey::load_or_create(dir.path()).unwrap().sign(&link());
        let again = LinkKey::load_or_create(dir.path()).unwrap();
        assert_eq!(again.verify(&t, 0), Ok(link()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
