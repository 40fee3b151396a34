//! Quarantine accounts: `policies/users.toml`, argon2id password hashes.

use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use serde::Deserialize;

use crate::mailbox::store::HeldMeta;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    User,
    Admin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    login: String,
    password: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default = "default_role")]
    role: Role,
}

fn default_role() -> Role {
    Role::User
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<UserEntry>,
}

/// One account, as the servers see it after a successful login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) login: String,
    /// Lower-cased.
    pub(crate) addresses: Vec<String>,
    pub(crate) role: Role,
}

impl Account {
    /// Whether this account may see (read, delete, release) the entry.
    pub(crate) fn can_see(&self, meta: &HeldMeta) -> bool {
        self.can_see_mail_for(&meta.recipient)
    }

    /// [`Account::can_see`] for an entry held for `recipient`.
    pub(crate) fn can_see_mail_for(&self, recipient: &str) -> bool {
        self.role == Role::Admin || self.is_addressed(recipient)
    }

    /// `recipient` is one of this account's own addresses (whatever the
    /// role): whose held mail its digest lists.
    pub(crate) fn is_addressed(&self, recipient: &str) -> bool {
        self.addresses
            .iter()
            .any(|a| a.eq_ignore_ascii_case(recipient.trim()))
    }
}

/// May a user whose `addresses` these are (lower-cased, as [`Account`]
/// keeps them) send as `address`? Case-insensitive, and a `+tag`
/// subaddress of one of them is theirs too. The submission ports ask it of
/// MAIL FROM and of every header From address; no role is exempt.
pub(crate) fn owns(addresses: &[String], address: &str) -> bool {
    let exact = address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase();
    if exact.is_empty() {
        return false;
    }
    let base = crate::policy::normalize_address(&exact);
    addresses.iter().any(|a| {
        let a = a.to_lowercase();
        a == exact || a == base
    })
}

#[derive(Clone, Debug)]
struct Entry {
    account: Account,
    phc: String,
}

/// The parsed users file.
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    users: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// Longest login: what mail clients send, and what a digest link carries.
pub(crate) const MAX_LOGIN: usize = 255;

/// A hash of a random password nobody knows: verified against when the login is unknown, so
/// that unknown and known logins take the same time.
const DUMMY_PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$4pO0xn6Sk3BeGoU7D4W9UYkKjLdrzyXf0TK+2JYZKbc";

impl Accounts {
    /// Parse the TOML text of `users.toml`; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Accounts, AccountsError> {
        let file: UsersFile = toml::from_str(text).map_err(|e| AccountsError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut users: Vec<Entry> = Vec::new();
        for (i, u) in file.user.into_iter().enumerate() {
            let err = |m: String| AccountsError::Parse {
                path: origin.to_string(),
                message: format!("[[user]] #{} ({}): {m}", i + 1, u.login),
            };
            if u.login.trim().is_empty() {
                return Err(err("empty login".into()));
            }
            if u.login.len() > MAX_LOGIN {
                return Err(err(format!("login longer than {MAX_LOGIN} bytes")));
            }
            match PasswordHash::new(&u.password) {
                Ok(h) if h.algorithm.as_str() == "argon2id" => {}
                Ok(h) => {
                    return Err(err(format!(
                        "password hash uses {}, not argon2id",
                        h.algorithm
                    )));
                }
                Err(e) => return Err(err(format!("password is not an argon2id PHC string: {e}"))),
            }
            if users
                .iter()
                .any(|x| x.account.login.eq_ignore_ascii_case(&u.login))
            {
                return Err(err("duplicate login".into()));
            }
            let addresses = u
                .addresses
                .iter()
                .map(|a| a.trim().to_ascii_lowercase())
                .collect();
            users.push(Entry {
                account: Account {
                    login: u.login.clone(),
                    addresses,
                    role: u.role,
                },
                phc: u.password,
            });
        }
        Ok(Accounts { users })
    }

    /// `policies/users.toml` of `cfg`: the quarantine (and, later,
    /// submission) accounts.
    pub fn file(cfg: &crate::config::Config) -> std::path::PathBuf {
        cfg.policies.dir.join("users.toml")
    }

    /// The accounts `cfg` names; a missing users file means no accounts.
    pub fn from_config(cfg: &crate::config::Config) -> Result<Accounts, AccountsError> {
        let path = Self::file(cfg);
        if !path.exists() {
            return Self::parse("", &path.display().to_string());
        }
        Self::load(&path)
    }

    /// Read and parse a users file.
    pub(crate) fn load(path: &Path) -> Result<Accounts, AccountsError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccountsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The account for `login` if `password` matches its hash. CPU-heavy (argon2): call it
    /// from a blocking thread in async code.
    pub(crate) fn verify(&self, login: &str, password: &str) -> Option<Account> {
        let entry = self
            .users
            .iter()
            .find(|e| e.account.login.eq_ignore_ascii_case(login));
        let phc = entry.map(|e| e.phc.as_str()).unwrap_or(DUMMY_PHC);
        let ok = verify_phc(phc, password.as_bytes());
        match (ok, entry) {
            (true, Some(e)) => Some(e.account.clone()),
            _ => None,
        }
    }

    /// Every account, in file order (the digest writes to each).
    pub(crate) fn all(&self) -> impl Iterator<Item = &Account> {
        self.users.iter().map(|e| &e.account)
    }

    /// The account of `login` (case-insensitive), without a password: for
    /// what a signed link or an admin command does in that user's name.
    pub(crate) fn account(&self, login: &str) -> Option<Account> {
        self.entry(login).map(|e| e.account.clone())
    }

    /// Number of accounts.
    pub(crate) fn len(&self) -> usize {
        self.users.len()
    }

    /// The login as users.toml spells it, if there is such an account
    /// (logins compare case-insensitively): `postern lists --user` checks it.
    pub fn find_login(&self, login: &str) -> Option<&str> {
        self.entry(login).map(|e| e.account.login.as_str())
    }

    fn entry(&self, login: &str) -> Option<&Entry> {
        self.users
            .iter()
            .find(|e| e.account.login.eq_ignore_ascii_case(login.trim()))
    }

    /// The logins of the accounts that own `address` ([`owns`]): whose
    /// allow and block lists apply to mail for it. A walk over the users:
    /// fine for a users file of hundreds, not of a hundred thousand.
    pub(crate) fn owners(&self, address: &str) -> Vec<String> {
        self.users
            .iter()
            .filter(|e| owns(&e.account.addresses, address))
            .map(|e| e.account.login.clone())
            .collect()
    }
}

/// Reusable argon2 work areas. Each check needs `m` KiB (19 MiB with the
/// defaults); allocated per login, glibc kept the freed areas and memory grew
/// by ~19 MiB per concurrent login without ever shrinking (found by
/// bench/mailbox/login_rss.sh). Callers bound how many checks run at once
/// (see `mailbox::check_login`), so the pool stays that small.
static WORK_AREAS: std::sync::Mutex<Vec<Vec<argon2::Block>>> = std::sync::Mutex::new(Vec::new());

/// Check `password` against an argon2id PHC string, in a pooled work area.
fn verify_phc(phc: &str, password: &[u8]) -> bool {
    use argon2::{Algorithm, Block, Params, Version};
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(&h) else {
        return false;
    };
    let version = h
        .version
        .and_then(|v| Version::try_from(v).ok())
        .unwrap_or_default();
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut blocks = WORK_AREAS
        .lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_default();
    blocks.resize(params.block_count(), Block::default());
    let mut out = vec![0u8; expected.len()];
    let computed = Argon2::new(Algorithm::Argon2id, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, &mut blocks[..])
        .is_ok();
    if let Ok(mut pool) = WORK_AREAS.lock() {
        pool.push(blocks);
    }
    // Constant time: every byte is compared whatever the first difference.
    computed
        && out.len() == expected.len()
        && out
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// An argon2id PHC string for `password` (for `postern passwd`), with a random salt.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    match Argon2::default().hash_password(password.as_bytes(), &salt) {
        Ok(h) => h.to_string(),
        // Only fails for absurd parameters or lengths; the defaults are fixed.
        Err(e) => panic!("argon2 hashing failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_verify_and_visibility() {
        let h = hash_password("s3cret");
        let text = format!(
            "[[user]]\nlogin = \"alice@example.test\"\npassword = \"{h}\"\naddresses = [\"Alice@Example.test\", \"sales@example.test\"]\nrole = \"user\"\n\n[[user]]\nlogin = \"root\"\npassword = \"{h}\"\nrole = \"admin\"\n"
        );
        let a = Accounts::parse(&text, "users.toml").expect("parses");
        assert_eq!(a.len(), 2);
        let alice = a.verify("alice@example.test", "s3cret").expect("ok");
        assert!(a.verify("alice@example.test", "wrong").is_none());
        assert!(a.verify("nobody", "s3cret").is_none());
        let meta = |r: &str| HeldMeta {
            id: 1,
            sender: "x@y".into(),
            recipient: r.into(),
            reason: "r".into(),
            received_unix: 0,
            size: 1,
        };
        assert!(alice.can_see(&meta("ALICE@example.test")));
        assert!(!alice.can_see(&meta("bob@example.test")));
        let root = a.verify("root", "s3cret").expect("ok");
        assert!(root.can_see(&meta("bob@example.test")));
    }

    #[test]
    fn owned_addresses() {
        let mine = vec!["alice@example.test".to_string(), "a+b@example.test".into()];
        assert!(owns(&mine, "Alice@EXAMPLE.test"));
        assert!(owns(&mine, "alice+news@example.test"));
        assert!(owns(&mine, "A+B@example.test"));
        assert!(!owns(&mine, "a@example.test"));
        assert!(!owns(&mine, "alice@example.test.evil"));
        assert!(!owns(&mine, "bob@example.test"));
        assert!(!owns(&mine, ""));
    }

    #[test]
    fn dummy_hash_is_a_real_argon2id_hash() {
        // Unknown logins must cost a full verification, so the dummy must parse.
        let h = PasswordHash::new(DUMMY_PHC).expect("valid PHC");
        assert_eq!(h.algorithm.as_str(), "argon2id");
    }

    #[test]
    fn strict_parsing() {
        let e = Accounts::parse("[[user]]\nlogin=\"a\"\npassword=\"x\"\nfoo=1\n", "u.toml");
        assert!(e.unwrap_err().to_string().contains("foo"));
        let e = Accounts::parse("[[user]]\nlogin=\"a\"\npassword=\"plain\"\n", "u.toml");
        assert!(e.is_err());
    }
}
