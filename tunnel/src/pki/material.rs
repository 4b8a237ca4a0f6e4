//! Where each end's TLS material comes from, and how it is kept current: operator-managed PEM
//! files (reloaded when they change), or managed here, a CA directory on the server side and an
//! enrolled, self-renewing certificate on the agent side.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    identity,
    pki::{
        ca::{BACKDATE, CaDir, node_csr},
        csr_api,
        enroll::{AgentFiles, Issued, request},
    },
    tls::{self, Live, PemFiles},
};

/// The server's TLS material.
pub enum ServerPki {
    /// Operator-managed files.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// A CA kept in `dir` (created on first start); the server's own certificate is issued
    /// from it for `names` at every (re)load.
    CaDir {
        ca: CaDir,
        names: Vec<String>,
        lifetime: Duration,
    },
}

impl ServerPki {
    pub fn material(&self) -> Result<PemFiles> {
        match self {
            ServerPki::Files { ca, cert, key } => PemFiles::load(ca, cert, key),
            ServerPki::CaDir {
                ca,
                names,
                lifetime,
            } => {
                let (cert, key) = ca.for_server()?.issue_server(names, *lifetime)?;
                PemFiles::from_pem(&ca.bundle()?, &cert, &key, &ca.dir.display().to_string())
            }
        }
    }

    /// How often the server's own certificate must be issued anew (None: operator-managed).
    pub fn reissue_period(&self) -> Option<Duration> {
        match self {
            ServerPki::Files { .. } => None,
            ServerPki::CaDir { lifetime, .. } => Some(*lifetime / 3),
        }
    }

    /// The files whose change means a reload.
    pub fn watched(&self) -> Vec<PathBuf> {
        match self {
            ServerPki::Files { ca, cert, key } => vec![ca.clone(), cert.clone(), key.clone()],
            ServerPki::CaDir { ca, .. } => ["ca.crt", "ca-previous.crt"]
                .iter()
                .map(|f| ca.dir.join(f))
                .collect(),
        }
    }

    /// The agent-session config.
    pub fn agents_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let m = self.material()?;
        tls::server_config(&m.ca, m.chain, m.key)
    }

    /// The enrollment endpoint's config (client certificates optional).
    pub fn enrollment_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let m = self.material()?;
        tls::enrollment_config(&m.ca, m.chain, m.key)
    }
}

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
    /// The Kubernetes CSR API, as the agent pod's service account ([`csr_api`]).
    CsrApi {
        client: kube::Client,
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
            Enrollment::CsrApi { client, lifetime } => {
                let certificate = csr_api::request(
                    client.clone(),
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
    pub async fn prepare(&self, node: &str) -> Result<()> {
        let AgentPki::Enrolled {
            files,
            bootstrap_ca,
            via,
        } = self
        else {
            return Ok(());
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
