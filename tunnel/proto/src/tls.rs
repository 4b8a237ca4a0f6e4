//! rustls configurations for both ends: mutual TLS, TLS 1.3 and 1.2 with the ring provider,
//! ALPN `h2`.
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use edge_model::follow::FileStamp;

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
    no_resumption(&mut cfg);
    Ok(Arc::new(cfg))
}

/// No session tickets and no session cache: every session and enrollment presents the
/// certificate it holds now (a resumed one would carry the one it was first made with), and a
/// cache of 256 sessions with their client chains was memory that only grew (the soak saw the
/// server's RSS creep while tasks and descriptors stayed flat). Two tickets per handshake were
/// also signing work a reconnecting fleet did for nothing.
fn no_resumption(cfg: &mut ServerConfig) {
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// The enrollment endpoint's config: client certificates are asked for and verified when
/// presented (renewal), but not required (enrollment with a bootstrap token has none yet).
pub fn enrollment_config(
    ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::TlsConfig(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsConfig(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::TlsConfig(format!("server certificate: {e}")))?;
    no_resumption(&mut cfg);
    Ok(Arc::new(cfg))
}

/// A client config that verifies the server against `ca` and presents no certificate (an
/// agent enrolling with a bootstrap token).
pub fn anonymous_client_config(ca: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsConfig(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
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
    /// Certificates and key from PEM text (`what` names the source in errors).
    pub fn from_pem(ca: &str, cert: &str, key: &str, what: &str) -> Result<Self> {
        use rustls_pki_types::pem::PemObject;
        let certs = |pem: &str, which: &str| -> Result<Vec<CertificateDer<'static>>> {
            let v = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::TlsConfig(format!("{what}: {which}: {e}")))?;
            if v.is_empty() {
                return Err(Error::TlsConfig(format!(
                    "{what}: {which} holds no PEM certificate"
                )));
            }
            Ok(v)
        };
        Ok(PemFiles {
            ca: certs(ca, "CA bundle")?,
            chain: certs(cert, "certificate")?,
            key: PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|e| Error::TlsConfig(format!("{what}: private key: {e}")))?,
        })
    }

    /// Certificates from a PEM file (a CA bundle).
    pub fn load_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
        use rustls_pki_types::pem::PemObject;
        let v = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                Error::TlsConfig(format!("reading certificates from {}: {e}", path.display()))
            })?;
        if v.is_empty() {
            return Err(Error::TlsConfig(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        Ok(v)
    }

    pub fn load(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self> {
        use rustls_pki_types::pem::PemObject;
        Ok(PemFiles {
            ca: Self::load_certs(ca)?,
            chain: Self::load_certs(cert)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::TlsConfig(format!(
                    "reading the private key from {}: {e}",
                    key.display()
                ))
            })?,
        })
    }
}

/// A TLS configuration that can be replaced while in use: new connections take the current
/// one, established ones keep theirs, and subscribers hear of every replacement (the agent
/// rotates its sessions onto a renewed certificate).
pub struct Live<T>(Arc<tokio::sync::watch::Sender<Arc<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    pub fn new(config: Arc<T>) -> Self {
        Live(Arc::new(tokio::sync::watch::Sender::new(config)))
    }
    pub fn get(&self) -> Arc<T> {
        self.0.borrow().clone()
    }
    pub fn set(&self, config: Arc<T>) {
        self.0.send_replace(config);
    }
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<T>> {
        self.0.subscribe()
    }
}

impl<T> From<Arc<T>> for Live<T> {
    fn from(c: Arc<T>) -> Self {
        Live::new(c)
    }
}

/// Rebuilds `live` with `build` whenever one of `paths` changes (checked every `interval`)
/// until `stop`. A failed rebuild (a half-written file, a bad certificate) keeps the current
/// configuration and is retried at the next change.
pub async fn follow_files<T>(
    live: Live<T>,
    paths: Vec<std::path::PathBuf>,
    build: impl Fn() -> Result<Arc<T>>,
    interval: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let stamp = |paths: &[std::path::PathBuf]| -> Vec<Option<FileStamp>> {
        paths.iter().map(|p| FileStamp::of(p)).collect()
    };
    let mut last = stamp(&paths);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = stamp(&paths);
        if now == last {
            continue;
        }
        match build() {
            Ok(c) => {
                last = now;
                live.set(c);
                tracing::info!(files = ?paths, "TLS configuration reloaded");
            }
            Err(e) => tracing::error!(
                "TLS files changed but cannot be used, keeping the current configuration: {e}"
            ),
        }
    }
}

/// Rebuilds `live` with `build` every `period` until `stop`: for configurations that issue a
/// certificate at each build (a server's own, from the CA it keeps), so it is renewed long
/// before it expires.
pub async fn rebuild_every<T>(
    live: Live<T>,
    build: impl Fn() -> Result<Arc<T>>,
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        match build() {
            Ok(c) => live.set(c),
            Err(e) => tracing::error!(
                "renewing this server's certificate failed (retrying next period): {e}"
            ),
        }
    }
}
