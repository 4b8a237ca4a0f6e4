//! rustls configurations for both ends: mutual TLS, TLS 1.3 and 1.2 with the ring provider,
//! ALPN `h2`.
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for c in ca {
        store
            .add(c.clone())
            .map_err(|e| Error::TlsConfig(format!("bad CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// The server's config: it requires a client certificate chaining to `ca` (the cluster CA,
/// or several during a CA rotation).
pub fn server_config(
    ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| Error::TlsConfig(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsConfig(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::TlsConfig(format!("server certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The agent's config: it verifies the server against `ca` and presents its node certificate.
pub fn agent_config(
    ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsConfig(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| Error::TlsConfig(format!("agent certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Certificates and key read from PEM files (the chain file may hold intermediates).
pub struct PemFiles {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl PemFiles {
    pub fn load(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self> {
        use rustls_pki_types::pem::PemObject;
        let certs = |p: &std::path::Path| -> Result<Vec<CertificateDer<'static>>> {
            let v = CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::TlsConfig(format!("reading certificates from {}: {e}", p.display()))
                })?;
            if v.is_empty() {
                return Err(Error::TlsConfig(format!(
                    "{} holds no PEM certificate",
                    p.display()
                )));
            }
            Ok(v)
        };
        Ok(PemFiles {
            ca: certs(ca)?,
            chain: certs(cert)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::TlsConfig(format!(
                    "reading the private key from {}: {e}",
                    key.display()
                ))
            })?,
        })
    }
}
