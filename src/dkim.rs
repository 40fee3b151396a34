//! DKIM signing of our own users' mail (RFC 6376, RFC 8463) with
//! mail-auth, and `postern dkim keygen`.
//!
//! A message is signed at the end of DATA, before it is stored, when it
//! comes from an authenticated user or a trusted network and its header
//! From domain is one of the `[dkim_sign]` domains: the stored bytes are
//! what leaves, so the signature holds for the queue, a release from
//! quarantine and every retry alike.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::PrivateKeyDer;

use crate::config::{Config, Problem};

/// The headers signed when present (RFC 6376 §5.4.1's list, trimmed to
/// what a user's client writes). From is listed twice: the second entry is
/// never found, so `h=` names From once more than the message has, and a
/// From added later breaks the signature ("oversigning"). Listed headers
/// that are absent are signed as empty, so they cannot be added either.
const SIGNED_HEADERS: [&str; 14] = [
    "From",
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
];

struct DomainKey {
    /// Lower case, no trailing dot.
    domain: String,
    /// Built once: a signer signs any number of messages.
    signer: DkimSigner<DkimKey, Done>,
}

impl DomainKey {
    fn new(domain: &str, selector: &str, key: DkimKey) -> DomainKey {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        DomainKey {
            signer: DkimSigner::from_key(key)
                .domain(domain.clone())
                .selector(selector)
                .headers(SIGNED_HEADERS)
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed),
            domain,
        }
    }
}

/// The signing keys of every `[dkim_sign]` domain.
pub struct Signers(Vec<DomainKey>);

/// What signing did to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Signed {
    /// The `DKIM-Signature: ...\r\n` header to prepend, and its domain.
    Header { domain: String, header: String },
    /// No key for the From domain (or no single From): sent unsigned.
    NotOurs,
    /// Signing failed (logged); the message goes unsigned.
    Failed(String),
}

impl Signers {
    /// Loads every configured key; each problem names the key file.
    pub fn load(cfg: &Config) -> Result<Signers, Vec<Problem>> {
        let mut keys = Vec::new();
        let mut problems = Vec::new();
        for d in &cfg.dkim_sign {
            match read_key(&d.key) {
                Ok(key) => keys.push(DomainKey::new(&d.domain, &d.selector, key)),
                Err(e) => {
                    problems.push(Problem::new(&d.key, None, format!("[dkim_sign] key: {e}")))
                }
            }
        }
        if problems.is_empty() {
            Ok(Signers(keys))
        } else {
            Err(problems)
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Which key signs `message`: the one of its header From domain. Cheap
    /// (a header parse), so the caller can skip the signing work when none.
    pub(crate) fn key_for(&self, message: &[u8]) -> Option<usize> {
        let domain = from_domain(message)?;
        self.0.iter().position(|k| k.domain == domain)
    }

    /// Signs `message` with key `key` (from [`Signers::key_for`]).
    pub(crate) fn sign_with(&self, key: usize, message: &[u8]) -> Signed {
        let Some(k) = self.0.get(key) else {
            return Signed::NotOurs;
        };
        match k.signer.sign(message) {
            Ok(s) => Signed::Header {
                domain: k.domain.clone(),
                header: s.to_header(),
            },
            Err(e) => Signed::Failed(e.to_string()),
        }
    }

    /// Signs `message` with the key of its header From domain, if we have one.
    #[cfg(test)]
    fn sign(&self, message: &[u8]) -> Signed {
        self.key_for(message)
            .map_or(Signed::NotOurs, |k| self.sign_with(k, message))
    }
}

/// The domain of the header From, lower case, when there is exactly one
/// From field with exactly one address (RFC 7489 §6.6.1 asks no less).
fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let froms = parsed.header_values("From").count();
    let list = parsed.from()?.as_list()?;
    if froms != 1 || list.len() != 1 {
        return None;
    }
    let address = list.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    Some(domain.trim_end_matches('.').to_ascii_lowercase())
}

/// Reads an RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8) private key from PEM.
fn read_key(path: &Path) -> Result<DkimKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut reader = pem.as_slice();
    let item = rustls_pemfile::read_one(&mut reader)
        .map_err(|e| format!("not PEM: {e}"))?
        .ok_or("no PEM block in the file")?;
    match item {
        rustls_pemfile::Item::Pkcs1Key(der) => {
            RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(der))
                .map(DkimKey::Rsa)
                .map_err(|e| format!("not an RSA key: {e}"))
        }
        rustls_pemfile::Item::Pkcs8Key(der) => {
            match Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der()) {
                Ok(k) => Ok(DkimKey::Ed25519(k)),
                Err(_) => RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(der))
                    .map(DkimKey::Rsa)
                    .map_err(|e| format!("neither an Ed25519 nor an RSA key: {e}")),
            }
        }
        _ => Err("not a private key (want RSA or Ed25519, PEM)".into()),
    }
}

/// `postern dkim keygen --algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rsa,
    Ed25519,
}

/// RSA keys made by keygen: 2048 bits, what RFC 8301 asks of signers and
/// what fits a DNS TXT record comfortably.
const RSA_BITS: usize = 2048;

/// Writes a new key to `out` (mode 0600; never over an existing file) and
/// returns the TXT record's name and its value, split into strings of at
/// most 255 bytes as DNS needs.
pub fn keygen(
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
    out: &Path,
) -> Result<(String, Vec<String>), String> {
    use mail_auth::dkim::generate::DkimKeyPair;
    let (pair, label, k, public) = match algorithm {
        Algorithm::Rsa => {
            let pair = DkimKeyPair::generate_rsa(RSA_BITS).map_err(|e| e.to_string())?;
            let public = spki_rsa(pair.public_key());
            (pair, "RSA PRIVATE KEY", "rsa", public)
        }
        Algorithm::Ed25519 => {
            let pair = DkimKeyPair::generate_ed25519().map_err(|e| e.to_string())?;
            let public = pair.public_key().to_vec();
            (pair, "PRIVATE KEY", "ed25519", public)
        }
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| format!("{}: {e}", out.display()))?
    };
    file.write_all(pem(label, pair.private_key()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(public);
    let record = format!("v=DKIM1; k={k}; p={b64}");
    let strings = record
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    Ok((format!("{selector}._domainkey.{domain}"), strings))
}

/// The default key file of `keygen`: `dkim/DOMAIN.SELECTOR.pem`.
pub fn default_key_path(domain: &str, selector: &str) -> PathBuf {
    PathBuf::from("dkim").join(format!("{domain}.{selector}.pem"))
}

/// PEM armour, 64 columns (RFC 7468).
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo, the form
/// OpenDKIM publishes and every verifier reads (RFC 6376 §3.6.1).
fn spki_rsa(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let bit_string = der(0x03, &bits);
    let mut body = ALG.to_vec();
    body.extend_from_slice(&bit_string);
    der(0x30, &body)
}

/// One DER TLV.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len = n.to_be_bytes();
        let skip = len.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (len.len() - skip) as u8);
        out.extend_from_slice(&len[skip..]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domain_needs_exactly_one_from_address() {
        assert_eq!(
            from_domain(b"From: A <a@Example.TEST>\r\nSubject: x\r\n\r\nbody").as_deref(),
            Some("example.test")
        );
        assert_eq!(from_domain(b"From: a@x.test, b@y.test\r\n\r\n"), None);
        assert_eq!(
            from_domain(b"From: a@x.test\r\nFrom: b@x.test\r\n\r\n"),
            None
        );
        assert_eq!(from_domain(b"Subject: no from\r\n\r\n"), None);
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x04, &[0u8; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn keygen_writes_a_key_that_loads_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, k) in [(Algorithm::Ed25519, "ed25519"), (Algorithm::Rsa, "rsa")] {
            let path = dir.path().join(format!("{k}.pem"));
            let (name, txt) = keygen("example.test", "s1", alg, &path).unwrap();
            assert_eq!(name, "s1._domainkey.example.test");
            assert!(txt.iter().all(|s| s.len() <= 255));
            assert!(txt.concat().starts_with(&format!("v=DKIM1; k={k}; p=")));
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            // Never over an existing key.
            assert!(keygen("example.test", "s1", alg, &path).is_err());
            let signers = Signers(vec![DomainKey::new(
                "example.test",
                "s1",
                read_key(&path).unwrap(),
            )]);
            let msg = b"From: a@example.test\r\nTo: b@else.test\r\nSubject: hi\r\n\r\nbody\r\n";
            match signers.sign(msg) {
                Signed::Header { domain, header } => {
                    assert_eq!(domain, "example.test");
                    assert!(header.starts_with("DKIM-Signature: v=1; a="), "{header}");
                    assert!(header.contains("d=example.test"), "{header}");
                    assert!(header.contains("c=relaxed/relaxed"), "{header}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(
                signers.sign(b"From: a@other.test\r\n\r\nx"),
                Signed::NotOurs
            );
        }
    }
}
