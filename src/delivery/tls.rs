//! TLS towards the next hop: the rustls client configurations STARTTLS and
//! the MTA-STS policy fetch use, and how a session's TLS is recorded.
//!
//! Two verifiers, built once at start:
//! - **opportunistic** (`may`, `encrypt`, MTA-STS `testing`): any
//!   certificate is taken (RFC 7435: encryption against passive listeners
//!   beats plain text), but the handshake signature is still checked, and
//!   after the handshake the chain is checked anyway so the record says
//!   whether it *would* have verified;
//! - **strict** (`verify`, MTA-STS `enforce`, HTTPS): the chain must lead to
//!   a system root (Debian's `/etc/ssl/certs`, read by rustls-native-certs)
//!   or a PEM in `[outbound_tls] ca`, and name the host.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};
use rustls::{Error as TlsErr, SignatureScheme};
use tokio_rustls::TlsConnector;

/// Why the outbound TLS set-up failed at start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsSetupError {
    #[error("[outbound_tls] ca: {path}: {why}")]
    Ca { path: String, why: String },
    #[error("outbound TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The client side of every TLS session Postern opens.
pub(crate) struct OutboundTls {
    opportunistic: Arc<ClientConfig>,
    strict: Arc<ClientConfig>,
    https: Arc<ClientConfig>,
    /// The chain check itself, for the after-the-handshake verdict.
    check: Arc<Checker>,
    /// Trust anchors loaded (system roots plus `ca`).
    pub(crate) anchors: usize,
}

impl OutboundTls {
    /// Loads the system roots and the PEM file `ca` (empty path: none).
    pub(crate) fn new(ca: &Path) -> Result<OutboundTls, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "reading a system trust anchor");
        }
        let (_, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::debug!(ignored, "system trust anchors rustls cannot use");
        }
        if !ca.as_os_str().is_empty() {
            let bad = |why: String| TlsSetupError::Ca {
                path: ca.display().to_string(),
                why,
            };
            let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
            let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no certificate in the PEM file".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        let anchors = roots.len();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = if roots.is_empty() {
            tracing::warn!(
                "no trust anchors (no system roots, no [outbound_tls] ca): verify and MTA-STS enforce will defer"
            );
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsErr::General(e.to_string()))?,
            )
        };
        let check = Arc::new(Checker {
            strict: Some(inner),
            algs: provider.signature_verification_algorithms,
        });
        let any = Arc::new(Checker {
            strict: None,
            algs: provider.signature_verification_algorithms,
        });
        let build = |v: Arc<dyn ServerCertVerifier>, provider: &Arc<CryptoProvider>| {
            ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(v)
                        .with_no_client_auth()
                })
        };
        let opportunistic = Arc::new(build(any, &provider)?);
        let strict = Arc::new(build(check.clone(), &provider)?);
        let mut https = build(check.clone(), &provider)?;
        https.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(OutboundTls {
            opportunistic,
            strict,
            https: Arc::new(https),
            check,
            anchors,
        })
    }

    /// The connector for STARTTLS: `verify` refuses a certificate that is
    /// not valid for the server name.
    pub(crate) fn connector(&self, verify: bool) -> TlsConnector {
        TlsConnector::from(if verify {
            self.strict.clone()
        } else {
            self.opportunistic.clone()
        })
    }

    /// The connector for the MTA-STS policy fetch (always verified).
    pub(crate) fn https(&self) -> TlsConnector {
        TlsConnector::from(self.https.clone())
    }

    /// After a handshake: would the peer's chain have verified for `name`?
    pub(crate) fn verdict(&self, conn: &ClientConnection, name: &ServerName<'_>) -> Verdict {
        let Some(chain) = conn.peer_certificates().filter(|c| !c.is_empty()) else {
            return Verdict::NotVerified("no certificate".into());
        };
        match self
            .check
            .verify_server_cert(&chain[0], &chain[1..], name, &[], UnixTime::now())
        {
            Ok(_) => Verdict::Verified,
            Err(e) => Verdict::NotVerified(e.to_string()),
        }
    }
}

/// The certificate check of one connector. Both kinds check the handshake
/// signature (the peer must hold the key of the certificate it sent).
#[derive(Debug)]
struct Checker {
    /// `None`: any certificate (opportunistic TLS, RFC 7435). `Some(None)`:
    /// no trust anchors at all, so nothing verifies. `Some(Some(v))`: WebPKI.
    strict: Option<Option<Arc<WebPkiServerVerifier>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Checker {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsErr> {
        match &self.strict {
            None => Ok(ServerCertVerified::assertion()),
            Some(Some(v)) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            Some(None) => Err(TlsErr::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsErr> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsErr> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Whether a session's certificate chain verified for the host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Verified,
    NotVerified(String),
}

/// The TLS a delivery session used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsInfo {
    /// "TLSv1.3", "TLSv1.2".
    pub(crate) version: String,
    /// The rustls name of the suite, e.g. "TLS13_AES_256_GCM_SHA384".
    pub(crate) suite: String,
    pub(crate) verdict: Verdict,
}

impl TlsInfo {
    pub(crate) fn of(conn: &ClientConnection, verdict: Verdict) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => "TLS".to_string(),
        };
        let suite = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        TlsInfo {
            version,
            suite,
            verdict,
        }
    }
}

impl fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.version, self.suite)?;
        match &self.verdict {
            Verdict::Verified => write!(f, ", certificate verified"),
            Verdict::NotVerified(why) => write!(f, ", certificate not verified ({why})"),
        }
    }
}

/// How the session that answered for a recipient was carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Channel {
    /// No SMTP/LMTP session answered (Maildir, no connection, DNS).
    #[default]
    NoSession,
    Plain,
    Tls(TlsInfo),
}

impl Channel {
    /// The queue record's `tls` field.
    pub(crate) fn record(&self) -> Option<String> {
        match self {
            Channel::NoSession => None,
            Channel::Plain => Some("none".into()),
            Channel::Tls(t) => Some(t.to_string()),
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Channel::Tls(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_as_one_readable_line() {
        let t = TlsInfo {
            version: "TLSv1.3".into(),
            suite: "TLS13_AES_256_GCM_SHA384".into(),
            verdict: Verdict::Verified,
        };
        assert_eq!(
            Channel::Tls(t.clone()).record().as_deref(),
            Some("TLSv1.3 TLS13_AES_256_GCM_SHA384, certificate verified")
        );
        let u = TlsInfo {
            verdict: Verdict::NotVerified("invalid peer certificate: UnknownIssuer".into()),
            ..t
        };
        assert!(
            u.to_string()
                .ends_with("not verified (invalid peer certificate: UnknownIssuer)")
        );
        assert_eq!(Channel::Plain.record().as_deref(), Some("none"));
        assert_eq!(Channel::NoSession.record(), None);
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let e = OutboundTls::new(Path::new("/nonexistent/ca.pem"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("[outbound_tls] ca: /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
