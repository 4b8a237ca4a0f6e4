//! The whole agent, from settings to shutdown: certificates (files, enrollment, renewal),
//! the metrics endpoint, and sessions to every server replica.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use rustls_pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tunnel_proto::{
    Error, Result,
    keepalive::Keepalive,
    tls::{self, Live},
};

use crate::{
    enroll::AgentFiles,
    metrics::AgentMetrics,
    pki::{AgentPki, Enrollment, renew_forever},
    session::{self, AgentConfig},
};

/// Where the agent's certificate comes from.
pub enum Certificates {
    /// Operator-managed PEM files, reloaded when they change.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// Enrolled into `dir` and renewed at two thirds of its lifetime; `ca` authenticates the
    /// servers until the first CA bundle arrives.
    Enrolled { dir: PathBuf, ca: PathBuf, via: Via },
}

/// How an enrolled certificate is obtained.
pub enum Via {
    /// The servers' enrollment endpoint (`host:port`), with a bootstrap token for the first
    /// certificate.
    Endpoint {
        endpoint: String,
        token: Option<String>,
    },
    /// The Kubernetes CSR API, asking for this lifetime.
    CsrApi { lifetime: Duration },
}

/// How long a stopping agent waits for its streams to reach the newer agent.
const HANDOFF_WITHIN: Duration = Duration::from_secs(10);

pub struct Settings {
    pub node_id: String,
    pub servers: Vec<String>,
    pub server_name: String,
    pub certificates: Certificates,
    pub ports: BTreeSet<u16>,
    pub dial: Vec<IpAddr>,
    pub keepalive: Keepalive,
    pub resume: tunnel_proto::resume::ResumeConfig,
    /// Where a newer agent on this node takes open streams over (`--handoff-socket`).
    pub handoff_socket: Option<PathBuf>,
    pub drain_timeout: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served: the first free port of
    /// `metrics_listen`'s and the `metrics_port_span - 1` after it.
    pub metrics_listen: SocketAddr,
    pub metrics_port_span: u16,
    /// Where the address taken is written, for `tunnel-agent probe`.
    pub metrics_addr_file: Option<PathBuf>,
}

/// The metrics port when none is given.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:10268";

fn pki(s: &Settings, server_name: &ServerName<'static>) -> Result<AgentPki> {
    Ok(match &s.certificates {
        Certificates::Files { ca, cert, key } => AgentPki::Files {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        Certificates::Enrolled { dir, ca, via } => AgentPki::Enrolled {
            files: AgentFiles { dir: dir.clone() },
            bootstrap_ca: ca.clone(),
            via: match via {
                Via::Endpoint { endpoint, token } => Enrollment::Endpoint {
                    endpoint: endpoint.clone(),
                    token: token.clone(),
                    server_name: server_name.clone(),
                },
                #[cfg(feature = "csr-api")]
                Via::CsrApi { lifetime } => Enrollment::CsrApi {
                    api: Box::new(crate::csr_api::InCluster::from_env()?),
                    lifetime: *lifetime,
                },
                #[cfg(not(feature = "csr-api"))]
                Via::CsrApi { .. } => {
                    return Err(Error::Refused(
                        "--csr-api: this tunnel-agent was built without the csr-api feature; enroll with --enroll and --token, or use a build with `--features csr-api` (the agent image has it)".into(),
                    ));
                }
            },
        },
    })
}

/// Runs the agent until `shutdown`; sessions then drain (GOAWAY, bounded by the drain timeout).
pub async fn run(s: Settings, shutdown: CancellationToken) -> Result<()> {
    let server_name = ServerName::try_from(s.server_name.clone())
        .map_err(|e| Error::Refused(format!("--server-name {:?}: {e}", s.server_name)))?;
    let pki = Arc::new(pki(&s, &server_name)?);
    pki.prepare(&s.node_id).await?;
    let live = Live::new(pki.config()?);
    let metrics = Arc::new(AgentMetrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let ml = crate::metrics_port::bind(s.metrics_listen, s.metrics_port_span)?;
    let at = ml
        .local_addr()
        .map_err(|e| Error::io("metrics listener address", e))?;
    if let Some(file) = &s.metrics_addr_file {
        crate::metrics_port::record(file, at)?;
    }
    tracing::info!(%at, "metrics, /healthz and /readyz listening");
    let m = metrics.clone();
    tokio::spawn(edge_cli::http::serve(
        ml,
        registry,
        Arc::new(move || m.ready()),
        shutdown.clone(),
    ));
    if matches!(s.certificates, Certificates::Enrolled { .. }) {
        // The renewal hands the new configuration over itself (its files are written one by
        // one, which a file watcher could catch half done).
        tokio::spawn(renew_forever(
            pki.clone(),
            s.node_id.clone(),
            live.clone(),
            shutdown.clone(),
        ));
    } else {
        // Operator-managed files: a change moves the sessions onto them.
        let p = pki.clone();
        tokio::spawn(tls::follow_files(
            live.clone(),
            pki.watched(),
            move || p.config(),
            Duration::from_secs(2),
            shutdown.clone(),
        ));
    }
    let cfg = AgentConfig {
        node_id: s.node_id,
        servers: s.servers,
        resolver: session::dns_resolver(),
        resolve_interval: Duration::from_secs(30),
        server_name,
        tls: live,
        allowed_ports: s.ports,
        dial: s.dial,
        stream_window: 1 << 20,
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(30),
        keepalive: s.keepalive,
        drain_timeout: s.drain_timeout,
        trimmer: Some(edge_cli::memory::Trimmer::spawn(shutdown.clone())),
        source: None,
        resume: s.resume,
        flows: Default::default(),
        handoff: crate::handoff::Handoff::new(s.handoff_socket),
    };
    let (handoff, flows, node) = (cfg.handoff.clone(), cfg.flows.clone(), cfg.node_id.clone());
    let stop_sessions = CancellationToken::new();
    tokio::spawn(
        handoff
            .clone()
            .listen(Arc::new(cfg.clone()), metrics.clone(), shutdown.clone()),
    );
    let sessions = tokio::spawn(session::run(cfg, metrics, stop_sessions.clone()));
    shutdown.cancelled().await;
    // A newer agent on this node (a rolling upgrade) takes the open streams: found before the
    // sessions close, so that they close for it instead of draining.
    let handing = handoff.find_successor(&node).await;
    stop_sessions.cancel();
    let _ = sessions.await;
    if handing {
        handoff.finish(&flows, HANDOFF_WITHIN).await;
    }
    Ok(())
}
