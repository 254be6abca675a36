//! TLS for clients (rustls), when the config names a certificate and key.

use crate::config::ConfigError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

pub fn load_tls(cert: &str, key: &str) -> Result<TlsAcceptor, ConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ConfigError::Tls(format!("{cert}: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::Tls(format!("{cert}: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::Tls(format!("{cert}: no certificate found")));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| ConfigError::Tls(format!("{key}: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ConfigError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
