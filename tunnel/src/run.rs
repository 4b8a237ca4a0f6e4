//! The whole tunnel server, from settings and bound listeners to a drained stop: PKI (operator
//! files, a CA directory, or a CA Secret mirrored into one), live TLS reloads, the node-table
//! follower, agent sessions, the ingresses, the enrollment endpoint and the CSR signer.
use std::{net::SocketAddr, os::fd::BorrowedFd, path::PathBuf, sync::Arc, time::Duration};

use edge_model::{OriginalDst, follow::Follower};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    keepalive::Keepalive,
    pki::{
        ca::CaDir,
        csr_api,
        enroll::{self, Enroller},
        material::ServerPki,
        secret::SecretCa,
        token::TokenStore,
    },
    server::{Server, ServerConfig},
    tls::{self, Live},
};

/// Where the server's certificate comes from.
pub enum Certificates {
    /// Operator-managed PEM files, reloaded when they change.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// A CA kept in `dir` (created on first start), optionally mirrored from the Kubernetes
    /// Secret `secret` (`namespace/name`); the server's own certificate is issued from it for
    /// `server_names`.
    CaDir {
        dir: PathBuf,
        secret: Option<String>,
        server_names: Vec<String>,
    },
}

pub struct Settings {
    pub certificates: Certificates,
    pub keepalive: Keepalive,
    pub resume: tunnel_proto::resume::ResumeConfig,
    /// Lifetime of issued certificates (agents renew at two thirds).
    pub cert_lifetime: Duration,
    /// The node table file: followed here, as the redirector follows it.
    pub node_table: PathBuf,
    /// How often the node table is checked for changes (SIGHUP and misses check at once).
    pub node_table_poll: Duration,
    /// With a CA directory: the bootstrap token store (default `<dir>/tokens`).
    pub tokens: Option<PathBuf>,
    /// With a CA directory: sign agents' Kubernetes CSRs requested by this service account
    /// (`namespace/name`).
    pub csr_signer: Option<String>,
    /// How long a stopping server waits for in-flight streams.
    pub drain_deadline: Duration,
    pub limits: crate::admission::Limits,
    /// The node self-check's interval (None: off); see [`Server::check_nodes`].
    pub node_check_interval: Option<Duration>,
    /// Post a Kubernetes Event on a Node unreachable this long, naming `instance` (this
    /// replica); None: no Events.
    pub node_events: Option<(Duration, String)>,
    /// The per-stream audit trail's file (`-`: stdout); None: off. See [`crate::audit`].
    pub audit_log: Option<PathBuf>,
}

/// Everything the server listens on, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub agents: TcpListener,
    /// Every ingress (host, pod, IPv6): the redirector's targets.
    pub ingress: Vec<TcpListener>,
    pub metrics: Option<TcpListener>,
    /// The enrollment endpoint (needs a CA directory).
    pub enroll: Option<TcpListener>,
}

/// The original destination of an accepted connection, from its socket and its two ends
/// (client, ingress): the redirector's getsockopt program or map, or a test's stand-in.
pub type OrigDstLookup =
    Arc<dyn Fn(BorrowedFd<'_>, SocketAddr, SocketAddr) -> Option<OriginalDst> + Send + Sync>;

/// How often certificate files are checked for changes.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// How often the CA Secret is mirrored again.
const SECRET_RESYNC: Duration = Duration::from_secs(30);

/// Serves until `shutdown`, then stops taking connections and drains open streams (bounded by
/// the drain deadline) before closing the agent sessions.
pub async fn run(
    listeners: Listeners,
    s: Settings,
    orig_dst: OrigDstLookup,
    shutdown: CancellationToken,
) -> Result<()> {
    let pki = Arc::new(pki(&s, &shutdown).await?);
    let mut cfg = ServerConfig::new(pki.agents_config()?);
    cfg.keepalive = s.keepalive;
    cfg.resume = s.resume;
    cfg.limits = s.limits;
    cfg.trimmer = Some(edge_cli::memory::Trimmer::spawn(shutdown.clone()));
    if let Some(path) = &s.audit_log {
        let audit = crate::audit::Audit::open(path, crate::server::replica_name()).map_err(|e| {
            Error::Config(format!(
                "opening the audit log {} (--audit-log): {e}; give a writable file, or - for stdout",
                path.display()
            ))
        })?;
        tracing::info!(file = %path.display(), "writing an audit line per redirected connection");
        cfg.audit = Some(audit);
    }
    let agents_tls = cfg.tls.clone();
    let cfg_audit = cfg.audit.clone();
    let nodes = Follower::open(&s.node_table).map_err(Error::NodeTable)?;
    tokio::spawn(nodes.clone().run(s.node_table_poll, shutdown.clone()));
    let server = Server::following(cfg, nodes);
    let mut registry = prometheus_client::registry::Registry::default();
    server.stats().register(&mut registry);
    if let Some(a) = &cfg_audit {
        registry.register(
            "tunnel_server_audit_lines",
            "Audit lines written (--audit-log)",
            a.written.clone(),
        );
        registry.register(
            "tunnel_server_audit_dropped",
            "Audit lines dropped because the sink was slower than the connections, or failed",
            a.dropped.clone(),
        );
    }
    let reach = server.clone();
    registry.register_collector(Box::new(crate::reach::ReachCollector(move || {
        reach.reachability()
    })));
    if let Some(every) = s.node_check_interval {
        let (srv, t) = (server.clone(), shutdown.clone());
        tokio::spawn(async move { srv.check_nodes(every, t).await });
    }
    if let Some((after, instance)) = &s.node_events {
        let client = kube_client("--node-events-after").await?;
        tokio::spawn(crate::node_events::run(
            server.clone(),
            client,
            *after,
            instance.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(ml) = listeners.metrics {
        tokio::spawn(edge_cli::http::serve_with_debug(
            ml,
            registry,
            Arc::new(|| true),
            Some(crate::server::explain_handler(server.clone())),
            shutdown.clone(),
        ));
    }
    for l in listeners.ingress {
        let (srv, o, t) = (server.clone(), orig_dst.clone(), shutdown.clone());
        tokio::spawn(async move { srv.serve_ingress(l, move |s, p, l| o(s, p, l), t).await });
    }
    keep_current(agents_tls, &pki, ServerPki::agents_config, &shutdown);
    if let Some(l) = listeners.enroll {
        let serving = enroll::Serving {
            accept_errors: server.accept_errors("enrollment"),
            refused: server.stats().enroll_refused.clone(),
            admission: s.limits.enrollment,
            limits: crate::pki::enroll_limits::EnrollLimits {
                handshake: s.limits.handshake_timeout,
                ..Default::default()
            },
        };
        start_enrollment(&s, &pki, l, serving, &shutdown)?;
    }
    if let Some(sa) = &s.csr_signer {
        start_csr_signer(&s, sa, &shutdown).await?;
    }
    // Sessions outlive the stop signal until in-flight streams drain (bounded): a rolling
    // restart of the masters does not cut a running `kubectl exec`.
    let sessions = CancellationToken::new();
    let agents_task = {
        let (srv, t, l) = (server.clone(), sessions.clone(), listeners.agents);
        tokio::spawn(async move { srv.serve_agents(l, t).await })
    };
    tracing::info!("tunnel server ready");
    shutdown.cancelled().await;
    server.drain(s.drain_deadline).await;
    sessions.cancel();
    let _ = agents_task.await;
    Ok(())
}

/// With a CA Secret: makes sure it exists, mirrors it into `dir`, and keeps mirroring.
async fn mirror_secret(spec: &str, dir: &std::path::Path, stop: &CancellationToken) -> Result<()> {
    let secret = secret_ca("--ca-secret", spec).await?;
    if secret.ensure().await? {
        tracing::info!(secret = %spec, "created the tunnel CA");
    }
    secret.pull(dir).await?;
    // Agents' pods mount the public bundle (certificates only) from a ConfigMap.
    let publish = async |secret: &SecretCa, dir: &std::path::Path| match CaDir::new(dir).bundle() {
        Ok(b) => secret.publish_bundle(&b).await,
        Err(e) => Err(e),
    };
    if let Err(e) = publish(&secret, dir).await {
        tracing::warn!("{e}");
    }
    let (dir, stop) = (dir.to_owned(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SECRET_RESYNC) => {}
            }
            match secret.pull(&dir).await {
                Ok(true) => {
                    tracing::info!("tunnel CA changed in its Secret; reloading");
                    if let Err(e) = publish(&secret, &dir).await {
                        tracing::warn!("{e}");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("mirroring the CA Secret (keeping the last copy): {e}"),
            }
        }
    });
    Ok(())
}

async fn pki(s: &Settings, stop: &CancellationToken) -> Result<ServerPki> {
    match &s.certificates {
        Certificates::Files { ca, cert, key } => Ok(ServerPki::Files {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        Certificates::CaDir {
            dir,
            secret,
            server_names,
        } => {
            if let Some(spec) = secret {
                mirror_secret(spec, dir, stop).await?;
            }
            let ca = CaDir::new(dir);
            if ca.ensure()? {
                tracing::info!(dir = %dir.display(), "created the tunnel CA");
            }
            Ok(ServerPki::CaDir {
                ca,
                names: server_names.clone(),
                lifetime: s.cert_lifetime,
            })
        }
    }
}

/// Keeps `live` current: rebuilt when the certificate or CA files change (no restart; new
/// sessions use it), and, when the server issues its own certificate, reissued at a third of
/// its lifetime so it never expires under a running server.
fn keep_current(
    live: Live<rustls::ServerConfig>,
    pki: &Arc<ServerPki>,
    build: fn(&ServerPki) -> Result<Arc<rustls::ServerConfig>>,
    stop: &CancellationToken,
) {
    let p = pki.clone();
    tokio::spawn(tls::follow_files(
        live.clone(),
        pki.watched(),
        move || build(&p),
        TLS_RELOAD_INTERVAL,
        stop.clone(),
    ));
    if let Some(period) = pki.reissue_period() {
        let p = pki.clone();
        tokio::spawn(tls::rebuild_every(
            live,
            move || build(&p),
            period,
            stop.clone(),
        ));
    }
}

fn ca_dir<'a>(s: &'a Settings, what: &str) -> Result<&'a PathBuf> {
    match &s.certificates {
        Certificates::CaDir { dir, .. } => Ok(dir),
        Certificates::Files { .. } => Err(Error::Config(format!(
            "{what} needs --ca-dir: the server signs with the CA it keeps"
        ))),
    }
}

fn start_enrollment(
    s: &Settings,
    pki: &Arc<ServerPki>,
    listener: TcpListener,
    serving: enroll::Serving,
    stop: &CancellationToken,
) -> Result<()> {
    let dir = ca_dir(s, "--enroll-listen")?;
    let tokens = s.tokens.clone().unwrap_or_else(|| dir.join("tokens"));
    let enroller = Arc::new(Enroller {
        ca: CaDir::new(dir),
        tokens: TokenStore::new(&tokens),
        lifetime: s.cert_lifetime,
    });
    let live = Live::new(pki.enrollment_config()?);
    keep_current(live.clone(), pki, ServerPki::enrollment_config, stop);
    tokio::spawn(enroll::serve(
        listener,
        live,
        enroller,
        serving,
        stop.clone(),
    ));
    Ok(())
}

async fn start_csr_signer(s: &Settings, sa: &str, stop: &CancellationToken) -> Result<()> {
    let dir = ca_dir(s, "--csr-signer")?;
    let (ns, name) = sa.split_once('/').ok_or_else(|| {
        Error::Config(format!(
            "--agent-service-account {sa:?}: expected namespace/name"
        ))
    })?;
    let client = kube_client("--csr-signer").await?;
    let policy = csr_api::Policy {
        agent_user: format!("system:serviceaccount:{ns}:{name}"),
        lifetime: s.cert_lifetime,
    };
    tokio::spawn(csr_api::run_signer(
        client,
        CaDir::new(dir),
        policy,
        stop.clone(),
    ));
    Ok(())
}

/// A client from the in-cluster service account or KUBECONFIG; `flag` names who needs it.
pub async fn kube_client(flag: &str) -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|e| {
            Error::api(
                format!(
                    "{flag}: no Kubernetes client configuration (in-cluster service account or KUBECONFIG)"
                ),
                e,
            )
        })
}

/// The CA Secret named by `flag`'s value `namespace/name`.
pub async fn secret_ca(flag: &str, spec: &str) -> Result<SecretCa> {
    let (ns, name) = spec
        .split_once('/')
        .ok_or_else(|| Error::Config(format!("{flag} {spec:?}: expected namespace/name")))?;
    Ok(SecretCa::new(kube_client(flag).await?, ns, name))
}
