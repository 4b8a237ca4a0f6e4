//! `tunnel server`: flags -> [`tunnel::run::Settings`] and bound listeners.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio_util::sync::CancellationToken;
use tunnel::{
    admission::{AdmissionLimits, Limits},
    run::{Certificates, Listeners, Settings, run as serve},
};
use tunnel_proto::cli::Common;

use crate::{
    bind,
    orig_source::{self, OrigDstFrom},
};

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
    /// The redirector's pin directory (for --orig-dst map).
    #[arg(long, env = "REDIRECTOR_PIN_DIR", default_value = edge_model::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// How the ingress learns where a redirected connection was going: `sockopt` asks the
    /// kernel (the redirector's getsockopt program answers; no capability needed), `map` reads
    /// the redirector's pinned map (CAP_BPF), `auto` the first that works.
    #[arg(long, env = "TUNNEL_ORIG_DST", value_enum, default_value = "auto")]
    orig_dst: OrigDstFrom,
    /// Seconds to wait at start for the redirector's programs (or maps) before giving up: the
    /// two start together in the pod.
    #[arg(long, env = "TUNNEL_WAIT_FOR_REDIRECTOR", default_value = "30", value_parser = edge_cli::seconds::non_negative)]
    wait_for_redirector: Duration,
    /// Seconds between self-checks of the nodes: a node that carried no stream for this long
    /// gets a health stream its agent answers itself (`tunnel_server_node_reachable`); 0 turns
    /// the checks off (a session still counts until it ends).
    #[arg(long, env = "TUNNEL_NODE_CHECK_INTERVAL", default_value = "300", value_parser = edge_cli::seconds::non_negative)]
    node_check_interval: Duration,
    /// Seconds a node may stay unreachable through this server before a Warning Event
    /// (`EdgeTunnelDown`) is posted on its Node, and a Normal one once it answers again; 0: no
    /// Events. Needs the Kubernetes API (in-cluster service account or KUBECONFIG).
    #[arg(long, env = "TUNNEL_NODE_EVENTS_AFTER", default_value = "0", value_parser = edge_cli::seconds::non_negative)]
    node_events_after: Duration,
    /// Write one JSON line per redirected connection to this file (appended; `-`: stdout):
    /// caller (with `redirector run --record-callers`), destination, node, bytes, duration,
    /// outcome. Off by default; a slow sink drops lines (counted), never connections.
    #[arg(long, env = "TUNNEL_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

/// What outsiders may hold (the agent port and the enrollment endpoint face the internet).
#[derive(clap::Args)]
pub struct LimitArgs {
    /// Seconds an agent or enrollment connection may take for its TLS handshake.
    #[arg(long, env = "TUNNEL_HANDSHAKE_TIMEOUT", default_value = "10", value_parser = edge_cli::seconds::positive)]
    handshake_timeout: Duration,
    /// Agent connections in their TLS handshake at once; past it, the oldest is closed for
    /// the newcomer.
    #[arg(long, env = "TUNNEL_MAX_HANDSHAKES", default_value_t = Limits::default().agents.total)]
    max_handshakes: usize,
    /// Agent connections from one address in their TLS handshake at once; past it, new ones
    /// are closed at once (agents behind one NAT share an address).
    #[arg(long, env = "TUNNEL_MAX_HANDSHAKES_PER_SOURCE", default_value_t = Limits::default().agents.per_source)]
    max_handshakes_per_source: usize,
    /// Enrollment connections at once (the oldest is closed past it).
    #[arg(long, env = "TUNNEL_MAX_ENROLL_CONNECTIONS", default_value_t = Limits::default().enrollment.total)]
    max_enroll_connections: usize,
    /// Enrollment connections from one address at once.
    #[arg(long, env = "TUNNEL_MAX_ENROLL_CONNECTIONS_PER_SOURCE", default_value_t = Limits::default().enrollment.per_source)]
    max_enroll_connections_per_source: usize,
    /// Live sessions of one node identity; a newer one closes the oldest once its streams end.
    #[arg(long, env = "TUNNEL_MAX_SESSIONS_PER_NODE", default_value_t = Limits::default().max_sessions_per_node)]
    max_sessions_per_node: usize,
    /// With every handshake slot taken, the oldest is closed for a newcomer only after this
    /// many seconds in its handshake (younger ones are left to finish; the newcomer retries).
    #[arg(long, env = "TUNNEL_EVICT_HANDSHAKES_AFTER", default_value = "2", value_parser = edge_cli::seconds::non_negative)]
    evict_handshakes_after: Duration,
    /// Redirected connections the ingresses hold at once; past it, new ones are reset.
    #[arg(long, env = "TUNNEL_MAX_INGRESS_CONNECTIONS", default_value_t = Limits::default().max_ingress_connections)]
    max_ingress_connections: usize,
}

impl LimitArgs {
    fn limits(&self) -> Result<Limits, String> {
        for (flag, v) in [
            ("--max-handshakes", self.max_handshakes),
            (
                "--max-handshakes-per-source",
                self.max_handshakes_per_source,
            ),
            ("--max-enroll-connections", self.max_enroll_connections),
            (
                "--max-enroll-connections-per-source",
                self.max_enroll_connections_per_source,
            ),
            ("--max-sessions-per-node", self.max_sessions_per_node),
            ("--max-ingress-connections", self.max_ingress_connections),
        ] {
            if v == 0 {
                return Err(format!("{flag} 0 would refuse everyone: give at least 1"));
            }
        }
        Ok(Limits {
            handshake_timeout: self.handshake_timeout,
            agents: AdmissionLimits {
                total: self.max_handshakes,
                per_source: self.max_handshakes_per_source,
                evict_after: self.evict_handshakes_after,
            },
            enrollment: AdmissionLimits {
                total: self.max_enroll_connections,
                per_source: self.max_enroll_connections_per_source,
                evict_after: self.evict_handshakes_after,
            },
            max_sessions_per_node: self.max_sessions_per_node,
            max_ingress_connections: self.max_ingress_connections,
        })
    }
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
        resume: a.common.resume(),
        cert_lifetime: a.cert_lifetime_hours,
        node_table: a.node_table.clone(),
        node_table_poll: NODE_TABLE_POLL,
        tokens: a.tokens.clone(),
        csr_signer: a.csr_signer.then(|| a.agent_service_account.clone()),
        drain_deadline: DRAIN_DEADLINE,
        limits: a.limits.limits()?,
        node_check_interval: (!a.node_check_interval.is_zero()).then_some(a.node_check_interval),
        // The Events name this replica: its pod (the manifest sets POD_NAME), else its host.
        node_events: (!a.node_events_after.is_zero())
            .then(|| (a.node_events_after, tunnel::server::replica_name())),
        audit_log: a.audit_log.clone(),
    };
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
    let lookup = orig_source::open(
        a.orig_dst,
        &listeners.ingress,
        &a.pin_dir,
        a.wait_for_redirector,
    )
    .await?;
    serve(listeners, settings, lookup, stop)
        .await
        .map_err(|e| e.to_string())
}
