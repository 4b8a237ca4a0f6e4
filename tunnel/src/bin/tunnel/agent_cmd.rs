//! `tunnel agent`: sessions to every server replica, with operator-managed certificate files
//! or a certificate enrolled with a bootstrap token and renewed before it expires.
use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use rustls_pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tunnel::{
    agent::{AgentConfig, AgentMetrics},
    pki::{
        enroll::AgentFiles,
        material::{AgentPki, Enrollment, renew_forever},
    },
    tls::{self, Live},
};

use crate::{Common, bind};

#[derive(clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    common: Common,
    /// Keep an enrolled certificate here (key, certificate, CA bundle; mode 0600), renewed at
    /// two thirds of its lifetime; instead of --cert/--key.
    #[arg(long, env = "TUNNEL_CERT_DIR")]
    cert_dir: Option<PathBuf>,
    /// With --cert-dir: the servers' enrollment endpoint, `host:port`.
    #[arg(long, env = "TUNNEL_ENROLL")]
    enroll: Option<String>,
    /// With --cert-dir: a bootstrap token (`tunnel token create`), needed only while there is
    /// no usable certificate in --cert-dir.
    #[arg(long, env = "TUNNEL_TOKEN")]
    token: Option<String>,
    /// With --cert-dir: get certificates through the Kubernetes CSR API as this pod's service
    /// account (signer edge-redirector.io/tunnel-agent; a server runs with --csr-signer),
    /// instead of --enroll.
    #[arg(long, env = "TUNNEL_CSR_API", conflicts_with = "enroll")]
    csr_api: bool,
    /// With --csr-api: the certificate lifetime asked for, in hours.
    #[arg(long, env = "TUNNEL_CERT_LIFETIME_HOURS", default_value_t = 24.0)]
    cert_lifetime_hours: f64,
    /// This node's name (must match the certificate's node identity).
    #[arg(long, env = "TUNNEL_NODE_ID")]
    node_id: String,
    /// Server replicas, `host:port`, comma separated.
    #[arg(long, env = "TUNNEL_SERVERS", value_delimiter = ',', required = true)]
    servers: Vec<String>,
    /// Name in the servers' certificate.
    #[arg(long, env = "TUNNEL_SERVER_NAME")]
    server_name: String,
    /// Ports streams may ask for, comma separated.
    #[arg(long, env = "TUNNEL_PORTS", value_delimiter = ',', default_value = redirector::DEFAULT_PORTS)]
    ports: Vec<u16>,
    /// Local addresses to dial, in order, comma separated (node IP, then localhost).
    #[arg(
        long,
        env = "TUNNEL_DIAL",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    dial: Vec<IpAddr>,
    /// Seconds a draining session (certificate rotation, shutdown) keeps its open streams.
    #[arg(long, env = "TUNNEL_DRAIN_TIMEOUT", default_value_t = 300.0)]
    drain_timeout: f64,
}

async fn pki(a: &AgentArgs, server_name: &ServerName<'static>) -> Result<AgentPki, String> {
    match &a.cert_dir {
        Some(dir) => {
            let via = if a.csr_api {
                let hours = a.cert_lifetime_hours;
                if !(hours > 0.0 && hours.is_finite()) {
                    return Err("--cert-lifetime-hours must be a positive number".into());
                }
                Enrollment::CsrApi {
                    client: kube::Client::try_default().await.map_err(|e| {
                        format!("--csr-api: no Kubernetes client configuration (the pod's service account): {e}")
                    })?,
                    lifetime: Duration::from_secs_f64(hours * 3600.0),
                }
            } else {
                Enrollment::Endpoint {
                    endpoint: a.enroll.clone().ok_or(
                        "--cert-dir needs --enroll <host:port> (the servers' --enroll-listen) or --csr-api",
                    )?,
                    token: a.token.clone(),
                    server_name: server_name.clone(),
                }
            };
            Ok(AgentPki::Enrolled {
                files: AgentFiles { dir: dir.clone() },
                bootstrap_ca: a
                    .common
                    .ca
                    .clone()
                    .ok_or("--cert-dir needs --ca: the CA bundle that authenticates the servers")?,
                via,
            })
        }
        None => {
            let (ca, cert, key) = a
                .common
                .files("--cert-dir with --enroll and --token (enrollment)")?;
            Ok(AgentPki::Files { ca, cert, key })
        }
    }
}

pub async fn run(a: AgentArgs, stop: CancellationToken) -> Result<(), String> {
    let ka = a.common.keepalive()?;
    if !(a.drain_timeout > 0.0 && a.drain_timeout.is_finite()) {
        return Err("--drain-timeout must be positive seconds".into());
    }
    let server_name =
        ServerName::try_from(a.server_name.clone()).map_err(|e| format!("--server-name: {e}"))?;
    let pki = Arc::new(pki(&a, &server_name).await?);
    pki.prepare(&a.node_id).await.map_err(|e| e.to_string())?;
    let live = Live::new(pki.config().map_err(|e| e.to_string())?);
    let metrics = Arc::new(AgentMetrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let metrics_at = a
        .common
        .metrics_listen
        .unwrap_or_else(|| "127.0.0.1:10268".parse().expect("static"));
    let ml = bind(metrics_at, "metrics").await?;
    let m = metrics.clone();
    // Ready once at least one server session is up.
    tokio::spawn(tunnel::metrics::serve(
        ml,
        Arc::new(registry),
        Arc::new(move || m.sessions.get() > 0),
        stop.clone(),
    ));
    if a.cert_dir.is_some() {
        // The renewal hands the new configuration over itself (its files are written one by
        // one, which a file watcher could catch half done).
        tokio::spawn(renew_forever(
            pki.clone(),
            a.node_id.clone(),
            live.clone(),
            stop.clone(),
        ));
    } else {
        // Operator-managed files: a change moves the sessions onto them.
        let p = pki.clone();
        tokio::spawn(tls::follow_files(
            live.clone(),
            pki.watched(),
            move || p.config(),
            Duration::from_secs(2),
            stop.clone(),
        ));
    }
    let cfg = AgentConfig {
        node_id: a.node_id,
        servers: a.servers,
        resolver: tunnel::agent::dns_resolver(),
        resolve_interval: Duration::from_secs(30),
        server_name,
        tls: live,
        allowed_ports: a.ports.into_iter().collect::<BTreeSet<_>>(),
        dial: a.dial,
        stream_window: 1 << 20,
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(30),
        keepalive: ka,
        drain_timeout: Duration::from_secs_f64(a.drain_timeout),
    };
    tunnel::agent::run(cfg, metrics, stop).await;
    Ok(())
}
