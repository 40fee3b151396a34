//! Sender allow and block lists (SPEC `postern lists`, the rules'
//! `m.allowed` / `m.blocked`), in the store's `lists` tree.
//!
//! A key is `SCOPE \0 ENTRY`: the scope is `site` or `user:LOGIN` (login
//! lower-cased), the entry an address (lower-cased, `+tag` dropped, as the
//! rate limiter keys senders) or `@domain` (lower-cased, no trailing dot).
//! The value says which list (`allow` or `block`) and when: an entry is on
//! at most one list per scope, so adding it to one takes it off the other
//! (a user who releases-and-allows a sender they once blocked means it).
//!
//! Matching, at intake (one or two gets per scope, no scans): the envelope
//! sender's address entry, else its `@domain` entry (the more specific
//! wins within a scope). `@domain` is that domain only, not its
//! subdomains. The null sender (bounces) is never allowed or blocked.
//! The header From addresses are looked up for blocking only: a forged
//! envelope does not get a blocked author through, but an author does not
//! get allowed by a header anyone can write.

use serde::{Deserialize, Serialize};

use super::{Result, Store, now_unix};
use crate::policy::{ListHits, normalize_address};

/// Which of the two lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Allow,
    Block,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Allow => "allow",
            ListKind::Block => "block",
        }
    }
}

/// Whose list: the site's, or one user's (by login, as in users.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Site,
    User(&'a str),
}

impl Scope<'_> {
    fn prefix(&self) -> Vec<u8> {
        let mut k = match self {
            Scope::Site => b"site".to_vec(),
            Scope::User(login) => format!("user:{}", login.trim().to_lowercase()).into_bytes(),
        };
        k.push(0);
        k
    }

    /// "the site" / "alice@example.test's", for messages.
    pub fn describe(&self) -> String {
        match self {
            Scope::Site => "the site".into(),
            Scope::User(login) => format!("{login}'s"),
        }
    }
}

/// A list entry: one address, or every address of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListEntry {
    Address(String),
    Domain(String),
}

impl ListEntry {
    /// Parse what an admin (or a mail client) names: `user@domain` or
    /// `@domain`; the error says what is wrong in words.
    pub fn parse(s: &str) -> std::result::Result<ListEntry, String> {
        let t = s
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .trim();
        let bad = |why: &str| format!("\"{s}\" is not an address or @domain: {why}");
        if let Some(d) = t.strip_prefix('@') {
            return domain(d).map(ListEntry::Domain).map_err(|w| bad(&w));
        }
        let Some((local, d)) = t.rsplit_once('@') else {
            return Err(bad("no @"));
        };
        if local.is_empty() {
            return Err(bad("empty local part"));
        }
        if local
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>()[],;:\\\"@".contains(c))
        {
            return Err(bad("the local part has characters an address cannot have"));
        }
        let d = domain(d).map_err(|w| bad(&w))?;
        let address = normalize_address(&format!("{local}@{d}"));
        // `+tag@domain` has nothing left of its local part: stored as is it
        // would read as the `@domain` entry.
        if address.starts_with('@') {
            return Err(bad("nothing is left of the local part without its +tag"));
        }
        Ok(ListEntry::Address(address))
    }

    /// As stored and shown: `user@domain` or `@domain`.
    pub fn as_text(&self) -> String {
        match self {
            ListEntry::Address(a) => a.clone(),
            ListEntry::Domain(d) => format!("@{d}"),
        }
    }

    fn key(&self, scope: Scope) -> Vec<u8> {
        let mut k = scope.prefix();
        k.extend_from_slice(self.as_text().as_bytes());
        k
    }
}

/// A domain as lists keep it, or why it is not one.
fn domain(d: &str) -> std::result::Result<String, String> {
    let d = d.trim_end_matches('.').to_lowercase();
    if d.is_empty() {
        return Err("empty domain".into());
    }
    if d.len() > 253 {
        return Err("the domain is too long".into());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
    };
    if !d.split('.').all(label_ok) {
        return Err(format!("\"{d}\" is not a domain name"));
    }
    Ok(d)
}

/// The address and `@domain` entries an address is looked up under (none
/// for the null sender or something unparsable).
fn lookup_keys(address: &str) -> Option<(ListEntry, ListEntry)> {
    let ListEntry::Address(a) = ListEntry::parse(address).ok()? else {
        return None;
    };
    let d = a.rsplit_once('@')?.1.to_string();
    Some((ListEntry::Address(a), ListEntry::Domain(d)))
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    list: ListKind,
    /// Unix seconds.
    added: i64,
}

/// One row of `lists ... show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub entry: String,
    pub list: ListKind,
    pub added: i64,
}

/// What adding an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New,
    /// It was on this list already.
    Already,
    /// It was on the other list of the same scope, and moved.
    Moved,
}

impl Store {
    /// Put `entry` on `scope`'s `kind` list (off the other one). Not yet
    /// durable: call [`Store::durable`], or use [`Store::list_add_durable`].
    pub fn list_add(&self, scope: Scope, kind: ListKind, entry: &ListEntry) -> Result<Added> {
        let k = entry.key(scope);
        let v = super::encode(&Stored {
            list: kind,
            added: now_unix(),
        });
        let old = self.lists.insert(&k, v)?;
        let was = old.and_then(|o| serde_json::from_slice::<Stored>(&o).ok());
        Ok(match was {
            None => Added::New,
            Some(s) if s.list == kind => {
                // Keep the first date: re-adding is not news.
                self.lists.insert(&k, super::encode(&s))?;
                Added::Already
            }
            Some(_) => Added::Moved,
        })
    }

    /// [`Store::list_add`], waiting until it is on disk.
    pub async fn list_add_durable(
        &self,
        scope: Scope<'_>,
        kind: ListKind,
        entry: &ListEntry,
    ) -> Result<Added> {
        let added = self.list_add(scope, kind, entry)?;
        self.durable().await?;
        Ok(added)
    }

    /// Take `entry` off `scope`'s `kind` list; false when it was not on it
    /// (an entry on the other list stays there). Not yet durable.
    pub fn list_remove(&self, scope: Scope, kind: ListKind, entry: &ListEntry) -> Result<bool> {
        let k = entry.key(scope);
        // Compare-and-swap: only remove what is on this list.
        loop {
            let Some(old) = self.lists.get(&k)? else {
                return Ok(false);
            };
            match serde_json::from_slice::<Stored>(&old) {
                Ok(s) if s.list != kind => return Ok(false),
                _ => {}
            }
            if self
                .lists
                .compare_and_swap(&k, Some(old), None::<&[u8]>)?
                .is_ok()
            {
                return Ok(true);
            }
        }
    }

    /// [`Store::list_remove`], waiting until it is on disk.
    pub async fn list_remove_durable(
        &self,
        scope: Scope<'_>,
        kind: ListKind,
        entry: &ListEntry,
    ) -> Result<bool> {
        let removed = self.list_remove(scope, kind, entry)?;
        if removed {
            self.durable().await?;
        }
        Ok(removed)
    }

    /// Which list of `scope` holds exactly `entry`, if any.
    pub fn list_get(&self, scope: Scope, entry: &ListEntry) -> Result<Option<ListKind>> {
        Ok(self
            .lists
            .get(entry.key(scope))?
            .and_then(|v| serde_json::from_slice::<Stored>(&v).ok())
            .map(|s| s.list))
    }

    /// Is `entry` on `scope`'s `kind` list?
    pub fn list_contains(&self, scope: Scope, kind: ListKind, entry: &ListEntry) -> Result<bool> {
        Ok(self.list_get(scope, entry)? == Some(kind))
    }

    /// Every entry of `scope`'s `kind` list, in key order (a prefix scan:
    /// for `show`, not for mail).
    pub fn list_entries(&self, scope: Scope, kind: ListKind) -> Result<Vec<Listed>> {
        let prefix = scope.prefix();
        let mut out = Vec::new();
        for kv in self.lists.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let Ok(s) = serde_json::from_slice::<Stored>(&v) else {
                continue;
            };
            if s.list == kind {
                out.push(Listed {
                    entry: String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                    list: s.list,
                    added: s.added,
                });
            }
        }
        Ok(out)
    }

    /// How `address` matches in one scope: its own entry, else its domain's.
    fn match_in(&self, scope: Scope, keys: &(ListEntry, ListEntry)) -> Result<Option<ListKind>> {
        match self.list_get(scope, &keys.0)? {
            Some(k) => Ok(Some(k)),
            None => self.list_get(scope, &keys.1),
        }
    }

    /// The list hits of a message (see the module doc). `owners` has one
    /// element per recipient: the logins of the users who own it. Blocked
    /// when the envelope sender or a header From address is on the site's
    /// block list or on that of any recipient's owner. Allowed when the
    /// envelope sender is on the site's allow list, or every recipient has
    /// an owner who allows it: one user's allow list does not wave a
    /// message past the checks for the other recipients.
    pub(crate) fn list_hits(
        &self,
        sender: &str,
        header_from: &[String],
        owners: &[Vec<String>],
    ) -> Result<ListHits> {
        let mut hits = ListHits::default();
        let Some(sender) = lookup_keys(sender) else {
            return Ok(hits);
        };
        let mut authors: Vec<(ListEntry, ListEntry)> = Vec::new();
        for a in header_from.iter().take(8) {
            if let Some(k) = lookup_keys(a)
                && k.0 != sender.0
                && !authors.iter().any(|x| x.0 == k.0)
            {
                authors.push(k);
            }
        }
        // (allowed, blocked) in one scope.
        let judge = |scope: Scope| -> Result<(bool, bool)> {
            let s = self.match_in(scope, &sender)?;
            let mut blocked = s == Some(ListKind::Block);
            for a in &authors {
                if blocked {
                    break;
                }
                blocked = self.match_in(scope, a)? == Some(ListKind::Block);
            }
            Ok((s == Some(ListKind::Allow), blocked))
        };
        let (site_allowed, site_blocked) = judge(Scope::Site)?;
        hits.blocked = site_blocked;
        let mut seen: std::collections::HashMap<&str, (bool, bool)> = Default::default();
        let mut every_rcpt_allowed = !owners.is_empty();
        for logins in owners {
            let mut allowed = false;
            for login in logins {
                let (a, b) = match seen.get(login.as_str()) {
                    Some(r) => *r,
                    None => {
                        let r = judge(Scope::User(login))?;
                        seen.insert(login, r);
                        r
                    }
                };
                allowed |= a;
                hits.blocked |= b;
            }
            every_rcpt_allowed &= allowed;
        }
        hits.allowed = site_allowed || every_rcpt_allowed;
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(s: &str) -> ListEntry {
        ListEntry::parse(s).unwrap()
    }

    #[test]
    fn entries_normalise_like_the_rate_limiter() {
        assert_eq!(e("Bob+News@Far.TEST").as_text(), "bob@far.test");
        assert_eq!(e("<bob@far.test>").as_text(), "bob@far.test");
        assert_eq!(e("@Far.Test.").as_text(), "@far.test");
        assert_eq!(e(" @sub.far.test ").as_text(), "@sub.far.test");
        for bad in [
            "",
            "bob",
            "@",
            "bob@",
            "@bad..test",
            "b ob@far.test",
            "bob@far test",
            "@-x.test",
            "a@b@",
            "x@[127.0.0.1]",
        ] {
            let err = ListEntry::parse(bad).unwrap_err();
            assert!(err.contains("is not an address or @domain"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn add_move_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let bob = e("bob@far.test");
            assert_eq!(
                s.list_add_durable(Scope::Site, ListKind::Allow, &bob)
                    .await
                    .unwrap(),
                Added::New
            );
            assert_eq!(
                s.list_add(Scope::Site, ListKind::Allow, &e("Bob+x@far.test"))
                    .unwrap(),
                Added::Already
            );
            assert_eq!(
                s.list_add(Scope::Site, ListKind::Block, &bob).unwrap(),
                Added::Moved
            );
            assert!(s.list_contains(Scope::Site, ListKind::Block, &bob).unwrap());
            assert!(!s.list_contains(Scope::Site, ListKind::Allow, &bob).unwrap());
            // Removing from the wrong list leaves it be.
            assert!(!s.list_remove(Scope::Site, ListKind::Allow, &bob).unwrap());
            s.list_add(
                Scope::User("Alice@Local.test"),
                ListKind::Allow,
                &e("@far.test"),
            )
            .unwrap();
            s.durable().await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let s = Store::open(dir.path()).unwrap();
        let site = s.list_entries(Scope::Site, ListKind::Block).unwrap();
        assert_eq!(site.len(), 1);
        assert_eq!(site[0].entry, "bob@far.test");
        assert!(
            s.list_entries(Scope::Site, ListKind::Allow)
                .unwrap()
                .is_empty()
        );
        let alice = s
            .list_entries(Scope::User("alice@local.test"), ListKind::Allow)
            .unwrap();
        assert_eq!(alice[0].entry, "@far.test");
        assert!(
            s.list_remove_durable(Scope::Site, ListKind::Block, &e("bob@far.test"))
                .await
                .unwrap()
        );
        assert!(
            s.list_entries(Scope::Site, ListKind::Block)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn matching() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let owners = |v: &[&[&str]]| -> Vec<Vec<String>> {
            v.iter()
                .map(|o| o.iter().map(|l| l.to_string()).collect())
                .collect()
        };
        let hits = |from: &str, hdr: &[&str], o: &[&[&str]]| {
            let hdr: Vec<String> = hdr.iter().map(|h| h.to_string()).collect();
            let h = s.list_hits(from, &hdr, &owners(o)).unwrap();
            (h.allowed, h.blocked)
        };
        s.list_add(Scope::Site, ListKind::Block, &e("@spam.test"))
            .unwrap();
        s.list_add(Scope::Site, ListKind::Allow, &e("good@spam.test"))
            .unwrap();
        s.list_add(Scope::User("bob"), ListKind::Block, &e("pest@far.test"))
            .unwrap();
        s.list_add(Scope::User("bob"), ListKind::Allow, &e("@friend.test"))
            .unwrap();
        s.list_add(Scope::User("carol"), ListKind::Allow, &e("@friend.test"))
            .unwrap();

        // Domain entries: that domain, any case and +tag; not subdomains.
        assert_eq!(hits("X+y@Spam.Test", &[], &[&[]]), (false, true));
        assert_eq!(hits("x@mail.spam.test", &[], &[&[]]), (false, false));
        // The address entry beats its domain's within a scope.
        assert_eq!(hits("good@spam.test", &[], &[&[]]), (true, false));
        // Bounces are never listed, whatever their header From says.
        assert_eq!(hits("", &["x@spam.test"], &[&["bob"]]), (false, false));
        // A blocked author behind a clean envelope; an author is not allowed.
        assert_eq!(hits("ok@far.test", &["x@spam.test"], &[&[]]), (false, true));
        assert_eq!(
            hits("ok@far.test", &["a@friend.test"], &[&["bob"]]),
            (false, false)
        );
        // Per user: only that user's recipients.
        assert_eq!(hits("pest@far.test", &[], &[&["bob"]]), (false, true));
        assert_eq!(hits("pest@far.test", &[], &[&["carol"]]), (false, false));
        assert_eq!(
            hits("pest@far.test", &[], &[&["carol"], &["bob"]]),
            (false, true)
        );
        // Allowed only when every recipient's owner allows it.
        assert_eq!(hits("a@friend.test", &[], &[&["bob"]]), (true, false));
        assert_eq!(
            hits("a@friend.test", &[], &[&["bob"], &["carol"]]),
            (true, false)
        );
        assert_eq!(hits("a@friend.test", &[], &[&["bob"], &[]]), (false, false));
        assert_eq!(
            hits("a@friend.test", &[], &[&["bob"], &["dave"]]),
            (false, false)
        );
        // A shared address: one of its owners allowing it is enough.
        assert_eq!(
            hits("a@friend.test", &[], &[&["dave", "carol"]]),
            (true, false)
        );
    }
}

#[cfg(test)]
mod property {
    use super::ListEntry;

    /// Whatever an admin (or, later, a mail client) types is an entry or a
    /// clear error, and an entry parses back to itself.
    #[test]
    fn any_text_is_an_entry_or_an_error() {
        crate::testing::cases(20_000, 0x115, |rng| {
            let bytes = rng.bytes(24, b"aB@.+-_ \r\n\0\xc3\xa9<>\"");
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(e) = ListEntry::parse(&text) {
                let again = ListEntry::parse(&e.as_text());
                assert_eq!(again.as_ref().ok(), Some(&e), "{text:?} -> {e:?}");
            }
        });
    }
}

#[cfg(test)]
mod regression {
    /// Found by the property test: `+tag@domain` normalised to `@domain`,
    /// which is the domain entry's key (a block of one address became a
    /// block of the whole domain).
    #[test]
    fn a_tag_only_local_part_is_refused() {
        assert!(super::ListEntry::parse("+news@far.test").is_err());
        assert!(super::ListEntry::parse("a+news@far.test").is_ok());
    }
}
