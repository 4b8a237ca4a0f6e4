//! `tunnel server`: agent sessions, the ingress for redirected connections, and (with
//! `--ca-dir`) the cluster's tunnel CA and the enrollment endpoint.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use redirector::{OrigDstTable, node_table::NodeTable};
use tokio_util::sync::CancellationToken;
use tunnel::{
    pki::{
        ca::CaDir,
        csr_api,
        enroll::{self, Enroller},
        material::ServerPki,
        secret::SecretCa,
        token::TokenStore,
    },
    server::{Routes, Server, ServerConfig},
    tls::{self, Live},
};

use crate::{Common, bind};

#[derive(clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    common: Common,
    /// Keep the tunnel CA in this directory (created on first start, files mode 0600) and
    /// issue this server's certificate from it, instead of --ca/--cert/--key.
    #[arg(long, env = "TUNNEL_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Keep the tunnel CA in this Kubernetes Secret, `namespace/name` (created by the first
    /// server to start), mirrored into --ca-dir (a private directory, e.g. an emptyDir) and
    /// followed there, so a rotation reaches every master without a restart.
    #[arg(long, env = "TUNNEL_CA_SECRET", requires = "ca_dir")]
    ca_secret: Option<String>,
    /// With --ca-dir: every name and address agents dial, comma separated (the server
    /// certificate's SANs).
    #[arg(long, env = "TUNNEL_SERVER_NAMES", value_delimiter = ',')]
    server_names: Vec<String>,
    /// With --ca-dir: where agents enroll and renew (HTTPS).
    #[arg(long, env = "TUNNEL_ENROLL_LISTEN")]
    enroll_listen: Option<SocketAddr>,
    /// With --enroll-listen: the bootstrap token store [default: <ca-dir>/tokens].
    #[arg(long, env = "TUNNEL_TOKENS")]
    tokens: Option<PathBuf>,
    /// With --ca-dir: approve and sign agents' Kubernetes CSRs (signer
    /// edge-redirector.io/tunnel-agent) whose requester runs on the node the CSR names.
    #[arg(long, env = "TUNNEL_CSR_SIGNER", requires = "ca_dir")]
    csr_signer: bool,
    /// The agents' service account, `namespace/name`: the only requester --csr-signer accepts.
    #[arg(
        long,
        env = "TUNNEL_AGENT_SERVICE_ACCOUNT",
        default_value = "edge-redirector/edge-redirector-agent"
    )]
    agent_service_account: String,
    /// Lifetime of issued certificates, in hours (agents renew at two thirds).
    #[arg(long, env = "TUNNEL_CERT_LIFETIME_HOURS", default_value_t = 24.0)]
    cert_lifetime_hours: f64,
    /// Where agents dial in.
    #[arg(long, env = "TUNNEL_AGENT_LISTEN", default_value = "0.0.0.0:10262")]
    agent_listen: SocketAddr,
    /// Ingress for redirected host clients (the redirector's --host-ingress).
    #[arg(long, env = "TUNNEL_HOST_INGRESS", default_value = redirector::DEFAULT_HOST_INGRESS)]
    host_ingress: SocketAddr,
    /// Ingress for redirected pod clients (the redirector's --pod-ingress).
    #[arg(long, env = "TUNNEL_POD_INGRESS")]
    pod_ingress: Option<SocketAddr>,
    /// Ingress for host clients dialling IPv6 node addresses (the redirector's
    /// --host-ingress6, e.g. [::1]:10266).
    #[arg(long, env = "TUNNEL_HOST_INGRESS6")]
    host_ingress6: Option<SocketAddr>,
    /// Ingress for pod clients dialling IPv6 node addresses (the redirector's --pod-ingress6).
    #[arg(long, env = "TUNNEL_POD_INGRESS6")]
    pod_ingress6: Option<SocketAddr>,
    /// Node table: `<node-id> <ip> [<ip>...]` per line (reloaded when it changes).
    #[arg(long, env = "TUNNEL_NODE_TABLE")]
    node_table: PathBuf,
    /// The redirector's pin directory (original destinations are read from its maps).
    #[arg(long, env = "REDIRECTOR_PIN_DIR", default_value = redirector::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

/// How long a stopping server waits for in-flight streams.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How often certificate files are checked for changes.
const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

fn lifetime(hours: f64) -> Result<Duration, String> {
    if hours > 0.0 && hours.is_finite() {
        Ok(Duration::from_secs_f64(hours * 3600.0))
    } else {
        Err("--cert-lifetime-hours must be a positive number".into())
    }
}

/// How often the CA Secret is mirrored again.
const SECRET_RESYNC: Duration = Duration::from_secs(30);

/// With --ca-secret: makes sure the Secret exists, mirrors it into `dir`, and keeps mirroring.
async fn mirror_secret(
    spec: &str,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> Result<(), String> {
    let secret = crate::secret_ca("--ca-secret", spec).await?;
    if secret.ensure().await.map_err(|e| e.to_string())? {
        tracing::info!(secret = %spec, "created the tunnel CA");
    }
    secret.pull(dir).await.map_err(|e| e.to_string())?;
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

async fn pki(a: &ServerArgs, stop: &CancellationToken) -> Result<ServerPki, String> {
    if let (Some(spec), Some(dir)) = (&a.ca_secret, &a.ca_dir) {
        mirror_secret(spec, dir, stop).await?;
    }
    match &a.ca_dir {
        Some(dir) => {
            let ca = CaDir::new(dir);
            if ca.ensure().map_err(|e| e.to_string())? {
                tracing::info!(dir = %dir.display(), "created the tunnel CA");
            }
            Ok(ServerPki::CaDir {
                ca,
                names: a.server_names.clone(),
                lifetime: lifetime(a.cert_lifetime_hours)?,
            })
        }
        None => {
            let (ca, cert, key) = a.common.files("--ca-dir (a CA this server keeps)")?;
            Ok(ServerPki::Files { ca, cert, key })
        }
    }
}

pub async fn run(a: ServerArgs, stop: CancellationToken) -> Result<(), String> {
    let pki = Arc::new(pki(&a, &stop).await?);
    let mut cfg = ServerConfig::new(pki.agents_config().map_err(|e| e.to_string())?);
    cfg.keepalive = a.common.keepalive()?;
    let agents_tls = cfg.tls.clone();
    let table = NodeTable::load(&a.node_table).map_err(|e| e.to_string())?;
    let server = Server::new(cfg, Routes::from_table(&table));
    let mut registry = prometheus_client::registry::Registry::default();
    server.stats().register(&mut registry);
    let metrics_at = a
        .common
        .metrics_listen
        .unwrap_or_else(|| "127.0.0.1:10267".parse().expect("static"));
    let ml = bind(metrics_at, "metrics").await?;
    tokio::spawn(tunnel::metrics::serve(
        ml,
        Arc::new(registry),
        Arc::new(|| true),
        stop.clone(),
    ));
    let orig = Arc::new(Mutex::new(OrigDstTable::open(&a.pin_dir).map_err(|e| {
        format!("{e} (start the redirector first, with the same --pin-dir)")
    })?));
    let agents = bind(a.agent_listen, "agents").await?;
    let mut ingresses = vec![bind(a.host_ingress, "host ingress").await?];
    for (at, what) in [
        (a.pod_ingress, "pod ingress"),
        (a.host_ingress6, "IPv6 host ingress"),
        (a.pod_ingress6, "IPv6 pod ingress"),
    ] {
        if let Some(at) = at {
            ingresses.push(bind(at, what).await?);
        }
    }
    for l in ingresses {
        let (s, o, t) = (server.clone(), orig.clone(), stop.clone());
        tokio::spawn(async move {
            s.serve_ingress(
                l,
                move |peer, local| match o.lock().unwrap().take(peer, local) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!("original destination lookup failed: {e}");
                        None
                    }
                },
                t,
            )
            .await
        });
    }
    tokio::spawn(follow_node_table(
        server.clone(),
        a.node_table.clone(),
        stop.clone(),
    ));
    keep_current(agents_tls, &pki, ServerPki::agents_config, &stop);
    if let Some(at) = a.enroll_listen {
        start_enrollment(&a, &pki, at, &stop).await?;
    }
    if a.csr_signer {
        start_csr_signer(&a, &stop).await?;
    }
    tracing::info!(agent_listen = %a.agent_listen, host_ingress = %a.host_ingress, pod_ingress = ?a.pod_ingress, host_ingress6 = ?a.host_ingress6, pod_ingress6 = ?a.pod_ingress6, metrics = %metrics_at, enroll = ?a.enroll_listen, "tunnel server ready");
    // Sessions outlive the stop signal until in-flight streams drain (bounded): a rolling
    // restart of the masters does not cut a running `kubectl exec`.
    let sessions = CancellationToken::new();
    let agents_task = {
        let (s, t) = (server.clone(), sessions.clone());
        tokio::spawn(async move { s.serve_agents(agents, t).await })
    };
    stop.cancelled().await;
    drain(&server, DRAIN_DEADLINE).await;
    sessions.cancel();
    let _ = agents_task.await;
    Ok(())
}

/// Keeps `live` current: rebuilt when the certificate or CA files change (no restart; new
/// sessions use it), and, when the server issues its own certificate, reissued at a third of
/// its lifetime so it never expires under a running server.
fn keep_current(
    live: Live<rustls::ServerConfig>,
    pki: &Arc<ServerPki>,
    build: fn(&ServerPki) -> tunnel::Result<Arc<rustls::ServerConfig>>,
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

async fn start_enrollment(
    a: &ServerArgs,
    pki: &Arc<ServerPki>,
    at: SocketAddr,
    stop: &CancellationToken,
) -> Result<(), String> {
    let Some(dir) = &a.ca_dir else {
        return Err("--enroll-listen needs --ca-dir: the server signs with the CA it keeps".into());
    };
    let tokens = a.tokens.clone().unwrap_or_else(|| dir.join("tokens"));
    let enroller = Arc::new(Enroller {
        ca: CaDir::new(dir),
        tokens: TokenStore::new(&tokens),
        lifetime: lifetime(a.cert_lifetime_hours)?,
    });
    let live = Live::new(pki.enrollment_config().map_err(|e| e.to_string())?);
    keep_current(live.clone(), pki, ServerPki::enrollment_config, stop);
    let listener = bind(at, "enrollment").await?;
    tokio::spawn(enroll::serve(listener, live, enroller, stop.clone()));
    Ok(())
}

async fn start_csr_signer(a: &ServerArgs, stop: &CancellationToken) -> Result<(), String> {
    let dir = a.ca_dir.clone().ok_or("--csr-signer needs --ca-dir")?;
    let (ns, sa) = a.agent_service_account.split_once('/').ok_or_else(|| {
        format!(
            "--agent-service-account {:?}: expected namespace/name",
            a.agent_service_account
        )
    })?;
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("--csr-signer: no Kubernetes client configuration (in-cluster service account or KUBECONFIG): {e}")
    })?;
    let policy = csr_api::Policy {
        agent_user: format!("system:serviceaccount:{ns}:{sa}"),
        lifetime: lifetime(a.cert_lifetime_hours)?,
    };
    tokio::spawn(csr_api::run_signer(
        client,
        CaDir::new(&dir),
        policy,
        stop.clone(),
    ));
    Ok(())
}

/// Waits until no stream is open, or `deadline`; new connections are already refused.
async fn drain(server: &Server, deadline: Duration) {
    let open = || server.stats().streams_open.get();
    tracing::info!(
        streams = open(),
        "stopping: no new connections; draining open streams"
    );
    let until = tokio::time::Instant::now() + deadline;
    while open() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if open() > 0 {
        tracing::warn!(
            streams = open(),
            "drain deadline passed; closing the remaining streams"
        );
    }
}

/// Re-reads the node table when it changes; a bad edit keeps the previous routes.
async fn follow_node_table(server: Server, path: PathBuf, stop: CancellationToken) {
    let mut last = NodeTable::modified(&path);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = NodeTable::modified(&path);
        if now != last {
            last = now;
            match NodeTable::load(&path) {
                Ok(t) => {
                    server.set_routes(Routes::from_table(&t));
                    tracing::info!(nodes = t.nodes.len(), "node table reloaded");
                }
                Err(e) => {
                    tracing::error!("node table not applied, keeping the previous routes: {e}")
                }
            }
        }
    }
}
