//! `tunnel server`: flags -> [`tunnel::run::Settings`] and bound listeners.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use redirector::OrigDstTable;
use tokio_util::sync::CancellationToken;
use tunnel::run::{Certificates, Listeners, Settings, run as serve};
use tunnel_proto::cli::Common;

use crate::bind;

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
    #[arg(long, env = "TUNNEL_CERT_LIFETIME_HOURS", default_value = "24", value_parser = edge_cli::seconds::positive_hours)]
    cert_lifetime_hours: Duration,
    /// Where agents dial in.
    #[arg(long, env = "TUNNEL_AGENT_LISTEN", default_value = "0.0.0.0:10262")]
    agent_listen: SocketAddr,
    /// Ingress for redirected host clients (the redirector's --host-ingress).
    #[arg(long, env = "TUNNEL_HOST_INGRESS", default_value = edge_model::DEFAULT_HOST_INGRESS)]
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
    /// Node table: `<node-id> <ip> [<ip>...]` per line (reloaded when it changes, at once on
    /// SIGHUP, and checked again before a redirected address is refused as unknown).
    #[arg(long, env = "TUNNEL_NODE_TABLE")]
    node_table: PathBuf,
    /// The redirector's pin directory (original destinations are read from its maps).
    #[arg(long, env = "REDIRECTOR_PIN_DIR", default_value = edge_model::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

/// How long a stopping server waits for in-flight streams.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How often the node table file is checked for changes.
const NODE_TABLE_POLL: Duration = Duration::from_secs(1);

pub async fn run(a: ServerArgs, stop: CancellationToken) -> Result<(), String> {
    let certificates = match &a.ca_dir {
        Some(dir) => Certificates::CaDir {
            dir: dir.clone(),
            secret: a.ca_secret.clone(),
            server_names: a.server_names.clone(),
        },
        None => {
            let (ca, cert, key) = a.common.files("--ca-dir (a CA this server keeps)")?;
            Certificates::Files { ca, cert, key }
        }
    };
    if a.enroll_listen.is_some() && a.ca_dir.is_none() {
        return Err("--enroll-listen needs --ca-dir: the server signs with the CA it keeps".into());
    }
    let settings = Settings {
        certificates,
        keepalive: a.common.keepalive(),
        cert_lifetime: a.cert_lifetime_hours,
        node_table: a.node_table.clone(),
        node_table_poll: NODE_TABLE_POLL,
        tokens: a.tokens.clone(),
        csr_signer: a.csr_signer.then(|| a.agent_service_account.clone()),
        drain_deadline: DRAIN_DEADLINE,
    };
    let orig = Arc::new(
        OrigDstTable::open(&a.pin_dir)
            .map_err(|e| format!("{e} (start the redirector first, with the same --pin-dir)"))?,
    );
    let metrics_at = a
        .common
        .metrics_listen
        .unwrap_or_else(|| "127.0.0.1:10267".parse().expect("static"));
    let mut ingress = vec![bind(a.host_ingress, "host ingress").await?];
    for (at, what) in [
        (a.pod_ingress, "pod ingress"),
        (a.host_ingress6, "IPv6 host ingress"),
        (a.pod_ingress6, "IPv6 pod ingress"),
    ] {
        if let Some(at) = at {
            ingress.push(bind(at, what).await?);
        }
    }
    let listeners = Listeners {
        agents: bind(a.agent_listen, "agents").await?,
        ingress,
        metrics: Some(bind(metrics_at, "metrics").await?),
        enroll: match a.enroll_listen {
            Some(at) => Some(bind(at, "enrollment").await?),
            None => None,
        },
    };
    tracing::info!(agent_listen = %a.agent_listen, host_ingress = %a.host_ingress, pod_ingress = ?a.pod_ingress, host_ingress6 = ?a.host_ingress6, pod_ingress6 = ?a.pod_ingress6, metrics = %metrics_at, enroll = ?a.enroll_listen, "listening");
    let lookup = move |peer, local| match orig.take(peer, local) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("original destination lookup failed: {e}");
            None
        }
    };
    serve(listeners, settings, Arc::new(lookup), stop)
        .await
        .map_err(|e| e.to_string())
}
