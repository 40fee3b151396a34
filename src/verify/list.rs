//! `[relay] recipients`: the file of addresses that exist (one address or
//! `@domain` catch-all per line, `#` comments), parsed and matched without I/O.

use std::collections::HashSet;
use std::path::Path;

use crate::config::Problem;
use crate::policy::normalize_address;
use crate::store::lists::ListEntry;

/// The recipients a `list` gateway accepts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Recipients {
    addresses: HashSet<String>,
    domains: HashSet<String>,
}

impl Recipients {
    /// Parse the text of `file`; every bad line is a problem with its number.
    pub(crate) fn parse(text: &str, file: &Path) -> Result<Recipients, Vec<Problem>> {
        let mut r = Recipients::default();
        let mut problems = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            // The same entry syntax and normalisation as the allow/block lists.
            match ListEntry::parse(line) {
                Ok(ListEntry::Address(a)) => {
                    r.addresses.insert(a);
                }
                Ok(ListEntry::Domain(d)) => {
                    r.domains.insert(d);
                }
                Err(e) => problems.push(Problem::new(file, Some(i + 1), e)),
            }
        }
        if problems.is_empty() {
            Ok(r)
        } else {
            Err(problems)
        }
    }

    /// Read and parse `file`; an unreadable file is one problem naming it.
    pub(crate) fn load(file: &Path) -> Result<Recipients, Vec<Problem>> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| vec![Problem::new(file, None, format!("cannot read: {e}"))])?;
        Recipients::parse(&text, file)
    }

    /// Is `address` listed, by itself (case and `+tag` aside) or by its domain?
    pub(crate) fn contains(&self, address: &str) -> bool {
        let a = normalize_address(address);
        let domain = a.rsplit_once('@').map_or("", |(_, d)| d);
        let domain = domain.trim_end_matches('.');
        self.addresses.contains(&a) || self.domains.contains(domain)
    }

    /// Entries (addresses and domains), for the log.
    pub(crate) fn len(&self) -> usize {
        self.addresses.len() + self.domains.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_catch_alls_comments_and_tags() {
        let text =
            "# our people\nAlice@Local.Test\n  bob@local.test # the boss\n\n@lists.local.test\n";
        let r = Recipients::parse(text, Path::new("r.txt")).unwrap();
        assert_eq!(r.len(), 3);
        for yes in [
            "alice@local.test",
            "ALICE@local.test",
            "alice+news@local.test",
            "bob@LOCAL.TEST",
            "anyone@lists.local.test",
        ] {
            assert!(r.contains(yes), "{yes}");
        }
        for no in [
            "carol@local.test",
            "alice@other.test",
            "x@sub.lists.local.test",
        ] {
            assert!(!r.contains(no), "{no}");
        }
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let e = Recipients::parse(
            "ok@local.test\nnot an address\n+tag@local.test\n",
            Path::new("r.txt"),
        )
        .unwrap_err();
        let shown: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(shown[0].starts_with("r.txt:2:"), "{shown:?}");
        assert!(shown[1].starts_with("r.txt:3:"), "{shown:?}");
        let missing = Recipients::load(Path::new("/nonexistent/r.txt")).unwrap_err();
        assert!(
            missing[0]
                .to_string()
                .starts_with("/nonexistent/r.txt: cannot read")
        );
    }
}
