//! Maildir delivery: one copy per recipient, written to `tmp/`, fsynced,
//! renamed into `new/`, and the directory fsynced, so a delivered message
//! survives a crash and a reader never sees half a file.
//!
//! Layout: `ROOT/<recipient address, lower-cased>/{tmp,new,cur}`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The mailbox folder of one recipient. Characters that could escape the
/// root or confuse a shell are percent-encoded.
pub(crate) fn mailbox_dir(root: &Path, recipient: &str) -> PathBuf {
    let mut name = String::new();
    for (i, c) in recipient.to_lowercase().chars().enumerate() {
        let safe = c.is_ascii_alphanumeric() || "@-_+=".contains(c) || (c == '.' && i > 0);
        if safe {
            name.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                name.push_str(&format!("%{b:02X}"));
            }
        }
    }
    root.join(name)
}

/// Write `body` into the recipient's Maildir. Blocking: call from `spawn_blocking`.
pub(crate) fn deliver(
    root: &Path,
    recipient: &str,
    hostname: &str,
    body: &[u8],
) -> std::io::Result<PathBuf> {
    let dir = mailbox_dir(root, recipient);
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let unique = format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        hostname.replace(['/', ':'], "_")
    );
    let tmp = dir.join("tmp").join(&unique);
    let new = dir.join("new").join(format!("{unique},S={}", body.len()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &new)?;
    std::fs::File::open(dir.join("new"))?.sync_all()?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_escape_from_root() {
        let root = Path::new("/m");
        assert_eq!(
            mailbox_dir(root, "Bob@Example.test"),
            Path::new("/m/bob@example.test")
        );
        let evil = mailbox_dir(root, "../../etc/passwd@x");
        assert!(evil.starts_with("/m"));
        assert_eq!(evil.components().count(), 3, "{}", evil.display());
    }

    #[test]
    fn writes_into_new() {
        let d = tempfile::tempdir().unwrap();
        let p = deliver(d.path(), "a@b.test", "h", b"Subject: x\r\n\r\nhi\r\n").unwrap();
        assert!(p.starts_with(d.path().join("a@b.test/new")));
        assert_eq!(std::fs::read(p).unwrap(), b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(
            std::fs::read_dir(d.path().join("a@b.test/tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}
