//! Where the agent's TLS material comes from, and how it is kept current: operator-managed PEM
//! files (reloaded when they change), or a certificate enrolled with a bootstrap token (or the
//! Kubernetes CSR API, with the `csr-api` feature) and renewed before it expires.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio_util::sync::CancellationToken;
use tunnel_proto::{
    error::{Error, Result},
    identity::{self, BACKDATE, node_csr},
    tls::{self, Live, PemFiles},
    wire::Issued,
};

use crate::enroll::{AgentFiles, request};

/// The agent's TLS material.
pub enum AgentPki {
    /// Operator-managed files.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// Enrolled and renewed through `via`; kept in `files`.
    Enrolled {
        files: AgentFiles,
        /// The CA bundle that authenticates the servers before the agent has one of its own.
        bootstrap_ca: PathBuf,
        via: Enrollment,
    },
}

/// How an agent gets its certificates.
pub enum Enrollment {
    /// The servers' enrollment endpoint (`host:port`): a bootstrap token for the first
    /// certificate, the current certificate for renewals.
    Endpoint {
        endpoint: String,
        token: Option<String>,
        server_name: ServerName<'static>,
    },
    /// The Kubernetes CSR API, as the agent pod's service account ([`crate::csr_api`]).
    #[cfg(feature = "csr-api")]
    CsrApi {
        api: Box<dyn crate::csr_api::Transport>,
        lifetime: Duration,
    },
}

impl Enrollment {
    /// A certificate for a new key: `current` is the agent's live config (None when it has no
    /// certificate yet).
    async fn issue(
        &self,
        node: &str,
        bootstrap_ca: &std::path::Path,
        current: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<(String, Issued)> {
        let (csr, key) = node_csr(node)?;
        let issued = match self {
            Enrollment::Endpoint {
                endpoint,
                token,
                server_name,
            } => match current {
                Some(tls) => {
                    request(endpoint, server_name.clone(), tls, "/v1/renew", None, &csr).await?
                }
                None => {
                    let token = token.as_deref().ok_or_else(|| {
                        Error::Identity(format!(
                            "no usable certificate and no bootstrap token: create one on a master with `tunnel token create --node {node}` and pass it with --token"
                        ))
                    })?;
                    let ca = PemFiles::load_certs(bootstrap_ca)?;
                    let anon = tls::anonymous_client_config(&ca)?;
                    request(
                        endpoint,
                        server_name.clone(),
                        anon,
                        "/v1/enroll",
                        Some(token),
                        &csr,
                    )
                    .await?
                }
            },
            #[cfg(feature = "csr-api")]
            Enrollment::CsrApi { api, lifetime } => {
                let certificate = crate::csr_api::request(
                    api.as_ref(),
                    node,
                    &csr,
                    *lifetime,
                    Duration::from_secs(300),
                )
                .await?;
                let ca_bundle = std::fs::read_to_string(bootstrap_ca)
                    .map_err(|e| Error::io(format!("reading {}", bootstrap_ca.display()), e))?;
                Issued {
                    certificate,
                    ca_bundle,
                }
            }
        };
        Ok((key, issued))
    }
}

/// Validity of a PEM certificate: (not before, not after).
pub fn validity(cert_pem: &str) -> Result<(SystemTime, SystemTime)> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Error::TlsConfig(format!("certificate: {e}")))?;
    let (_, c) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::TlsConfig(format!("certificate: {e}")))?;
    let t = |x: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(x.timestamp().max(0) as u64)
    };
    Ok((t(c.validity().not_before), t(c.validity().not_after)))
}

impl AgentPki {
    fn paths(&self) -> (PathBuf, PathBuf, PathBuf) {
        match self {
            AgentPki::Files { ca, cert, key } => (ca.clone(), cert.clone(), key.clone()),
            AgentPki::Enrolled { files, .. } => (files.ca(), files.cert(), files.key()),
        }
    }

    pub fn watched(&self) -> Vec<PathBuf> {
        let (ca, cert, key) = self.paths();
        vec![ca, cert, key]
    }

    pub fn config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let (ca, cert, key) = self.paths();
        let m = PemFiles::load(&ca, &cert, &key)?;
        tls::agent_config(&m.ca, m.chain, m.key)
    }

    /// Makes sure a usable certificate for `node` is in place: enrolls with the bootstrap
    /// token when there is none, it expired, or it names another node.
    ///
    /// Operator-managed files must name `node`: the servers key the session by the
    /// certificate, so an agent started with another --node-id would silently serve the
    /// certificate's node.
    pub async fn prepare(&self, node: &str) -> Result<()> {
        let (files, bootstrap_ca, via) = match self {
            AgentPki::Enrolled {
                files,
                bootstrap_ca,
                via,
            } => (files, bootstrap_ca, via),
            AgentPki::Files { cert, .. } => {
                let chain = PemFiles::load_certs(cert)?;
                let first = chain.first().ok_or_else(|| {
                    Error::Identity(format!("{} holds no certificate", cert.display()))
                })?;
                let named = identity::node_id_from_cert(first)?;
                if named != node {
                    return Err(Error::Identity(format!(
                        "--node-id is {node:?} but the certificate {} names node {named:?}; the servers key sessions by the certificate: start the agent with --node-id {named}, or give it {node}'s certificate",
                        cert.display()
                    )));
                }
                return Ok(());
            }
        };
        let usable = std::fs::read_to_string(files.cert()).ok().and_then(|pem| {
            let (_, not_after) = validity(&pem).ok()?;
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
            let named = identity::node_id_from_cert(&der).ok()?;
            (not_after > SystemTime::now() && named == node).then_some(())
        });
        if usable.is_some() {
            return Ok(());
        }
        let (key, issued) = via
            .issue(node, bootstrap_ca, None)
            .await
            .map_err(|e| Error::Identity(format!("enrolling into {}: {e}", files.dir.display())))?;
        files.store(&key, &issued)?;
        tracing::info!(node, dir = %files.dir.display(), "enrolled: certificate issued");
        Ok(())
    }
}

/// Renews the enrolled certificate at two thirds of its lifetime, authenticated by the current
/// one, and puts the new one in `live` (the agent then moves its sessions onto it). Retries a
/// failed renewal with backoff while the current certificate is still valid.
pub async fn renew_forever(
    pki: Arc<AgentPki>,
    node: String,
    live: Live<rustls::ClientConfig>,
    stop: CancellationToken,
) {
    let AgentPki::Enrolled {
        files,
        bootstrap_ca,
        via,
    } = &*pki
    else {
        return;
    };
    let mut failures = 0u32;
    loop {
        let wait = match std::fs::read_to_string(files.cert())
            .map_err(|e| Error::io("reading the agent certificate", e))
            .and_then(|pem| validity(&pem))
        {
            Ok((from, until)) => {
                // Two thirds of the lifetime from issuance (not from the backdated start).
                let issued = from + BACKDATE;
                let life = until.duration_since(issued).unwrap_or_default();
                let due = issued + life * 2 / 3;
                let retry = Duration::from_secs(1 << failures.min(6)).min(life / 10);
                if failures > 0 {
                    retry
                } else {
                    due.duration_since(SystemTime::now()).unwrap_or_default()
                }
            }
            Err(e) => {
                tracing::error!("cannot read the certificate to renew: {e}");
                Duration::from_secs(30)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let renewed = async {
            let (key, issued) = via.issue(&node, bootstrap_ca, Some(live.get())).await?;
            files.store(&key, &issued)?;
            let m = PemFiles::from_pem(&issued.ca_bundle, &issued.certificate, &key, "renewed")?;
            live.set(tls::agent_config(&m.ca, m.chain, m.key)?);
            Ok::<_, Error>(())
        };
        match renewed.await {
            Ok(()) => {
                failures = 0;
                tracing::info!(node = %node, "certificate renewed; moving sessions onto it");
            }
            Err(e) => {
                failures += 1;
                tracing::error!(node = %node, "certificate renewal failed (retrying): {e}");
            }
        }
    }
}
