//! TLS server configuration: the configured certificate, or a self-signed
//! one generated on first start and kept in `data_dir/tls/` so clients that
//! pinned it keep working across restarts.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
}

fn file_err(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// Build the acceptor every TLS listener and STARTTLS shares.
pub(crate) fn acceptor(cfg: &Config) -> Result<TlsAcceptor, TlsError> {
    let (cert, key) = match &cfg.tls {
        Some(t) => (t.cert.clone(), t.key.clone()),
        None => {
            let dir = cfg.server.data_dir.join("tls");
            let cert = dir.join("cert.pem");
            let key = dir.join("key.pem");
            if !cert.exists() || !key.exists() {
                generate(&cfg.server.hostname, &cert, &key)?;
            }
            (cert, key)
        }
    };
    Ok(TlsAcceptor::from(Arc::new(server_config(&cert, &key)?)))
}

/// Load a PEM chain and key into a rustls server config.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let pem = std::fs::read(cert).map_err(|e| file_err(cert, e))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no certificate found in PEM file"));
    }
    let pem = std::fs::read(key).map_err(|e| file_err(key, e))?;
    let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| file_err(key, e))?
        .ok_or_else(|| file_err(key, "no private key found in PEM file"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(config)
}

/// Write a self-signed certificate for `hostname` (and localhost) to disk.
pub(crate) fn generate(hostname: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".into());
    }
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    std::fs::write(cert, ck.cert.pem()).map_err(|e| file_err(cert, e))?;
    write_private(key, ck.key_pair.serialize_pem().as_bytes())?;
    tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(data).map_err(|e| file_err(path, e))
}
