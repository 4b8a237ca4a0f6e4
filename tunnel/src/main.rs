//! `tunnel server` (on every master) and `tunnel agent` (on every edge node).
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::{Parser, Subcommand};
use redirector::{OrigDstTable, node_table::NodeTable};
use rustls_pki_types::ServerName;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnel::{
    agent::{AgentConfig, AgentMetrics},
    keepalive::Keepalive,
    server::{Routes, Server, ServerConfig},
    tls,
};

#[derive(Parser)]
#[command(
    version,
    about = "Reverse tunnel for edge nodes: server on masters, agent on edge nodes"
)]
struct Cli {
    /// Runtime worker threads: 0 = one per CPU; 1 = a single-threaded runtime (lower latency
    /// per connection when the host has few cores to share with other work).
    #[arg(long, global = true, env = "TUNNEL_THREADS", default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Pki {
    /// CA bundle (PEM) that the peer's certificate must chain to.
    #[arg(long, env = "TUNNEL_CA")]
    ca: PathBuf,
    /// This end's certificate chain (PEM).
    #[arg(long, env = "TUNNEL_CERT")]
    cert: PathBuf,
    /// This end's private key (PEM).
    #[arg(long, env = "TUNNEL_KEY")]
    key: PathBuf,
    /// Seconds between keepalive PINGs.
    #[arg(long, env = "TUNNEL_KEEPALIVE_INTERVAL", default_value_t = 10.0)]
    keepalive_interval: f64,
    /// Seconds a PING may go unanswered before the session is declared dead.
    #[arg(long, env = "TUNNEL_KEEPALIVE_TIMEOUT", default_value_t = 10.0)]
    keepalive_timeout: f64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "TUNNEL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

impl Pki {
    fn keepalive(&self) -> Result<Keepalive, String> {
        let ok = |v: f64| v > 0.0 && v.is_finite();
        if !ok(self.keepalive_interval) || !ok(self.keepalive_timeout) {
            return Err(
                "--keepalive-interval and --keepalive-timeout must be positive seconds".into(),
            );
        }
        Ok(Keepalive {
            interval: Duration::from_secs_f64(self.keepalive_interval),
            timeout: Duration::from_secs_f64(self.keepalive_timeout),
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept agent sessions and redirected connections.
    Server {
        #[command(flatten)]
        pki: Pki,
        /// Where agents dial in.
        #[arg(long, env = "TUNNEL_AGENT_LISTEN", default_value = "0.0.0.0:10262")]
        agent_listen: SocketAddr,
        /// Ingress for redirected host clients (the redirector's --host-ingress).
        #[arg(long, env = "TUNNEL_HOST_INGRESS", default_value = redirector::DEFAULT_HOST_INGRESS)]
        host_ingress: SocketAddr,
        /// Ingress for redirected pod clients (the redirector's --pod-ingress).
        #[arg(long, env = "TUNNEL_POD_INGRESS")]
        pod_ingress: Option<SocketAddr>,
        /// Node table: `<node-id> <ip> [<ip>...]` per line (reloaded when it changes).
        #[arg(long, env = "TUNNEL_NODE_TABLE")]
        node_table: PathBuf,
        /// The redirector's pin directory (original destinations are read from its maps).
        #[arg(long, env = "REDIRECTOR_PIN_DIR", default_value = redirector::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Keep a session to every server and serve streams for this node.
    Agent {
        #[command(flatten)]
        pki: Pki,
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
    },
}

/// Each stream holds one socket on each side: lift the soft open-file limit to the hard one.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    raise_nofile();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match cli.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Runtime::new(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    tunnel::listen(addr).map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}

async fn run(cli: Cli) -> Result<(), String> {
    let stop = shutdown_on_signal();
    match cli.cmd {
        Cmd::Server {
            pki,
            agent_listen,
            host_ingress,
            pod_ingress,
            node_table,
            pin_dir,
        } => {
            let ka = pki.keepalive()?;
            let pem =
                tls::PemFiles::load(&pki.ca, &pki.cert, &pki.key).map_err(|e| e.to_string())?;
            let mut cfg = ServerConfig::new(
                tls::server_config(&pem.ca, pem.chain, pem.key).map_err(|e| e.to_string())?,
            );
            cfg.keepalive = ka;
            let table = NodeTable::load(&node_table).map_err(|e| e.to_string())?;
            let server = Server::new(cfg, Routes::from_table(&table));
            let mut registry = prometheus_client::registry::Registry::default();
            server.stats().register(&mut registry);
            let metrics_at = pki
                .metrics_listen
                .unwrap_or_else(|| "127.0.0.1:10267".parse().expect("static"));
            let ml = bind(metrics_at, "metrics").await?;
            tokio::spawn(tunnel::metrics::serve(
                ml,
                Arc::new(registry),
                Arc::new(|| true),
                stop.clone(),
            ));
            let orig = Arc::new(Mutex::new(OrigDstTable::open(&pin_dir).map_err(|e| {
                format!("{e} (start the redirector first, with the same --pin-dir)")
            })?));
            let agents = bind(agent_listen, "agents").await?;
            let mut ingresses = vec![bind(host_ingress, "host ingress").await?];
            if let Some(p) = pod_ingress {
                ingresses.push(bind(p, "pod ingress").await?);
            }
            for l in ingresses {
                let (s, o, t) = (server.clone(), orig.clone(), stop.clone());
                tokio::spawn(async move {
                    s.serve_ingress(
                        l,
                        move |tcp| match o.lock().unwrap().take_for_stream(tcp) {
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
            tokio::spawn(follow_node_table(server.clone(), node_table, stop.clone()));
            tracing::info!(%agent_listen, %host_ingress, ?pod_ingress, metrics = %metrics_at, "tunnel server ready");
            // Sessions outlive the stop signal until in-flight streams drain (bounded): a
            // rolling restart of the masters does not cut a running `kubectl exec`.
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
        Cmd::Agent {
            pki,
            node_id,
            servers,
            server_name,
            ports,
            dial,
        } => {
            let ka = pki.keepalive()?;
            let pem =
                tls::PemFiles::load(&pki.ca, &pki.cert, &pki.key).map_err(|e| e.to_string())?;
            let metrics = Arc::new(AgentMetrics::default());
            let mut registry = prometheus_client::registry::Registry::default();
            metrics.register(&mut registry);
            let metrics_at = pki
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
            let cfg = AgentConfig {
                node_id,
                servers,
                resolver: tunnel::agent::dns_resolver(),
                resolve_interval: Duration::from_secs(30),
                server_name: ServerName::try_from(server_name)
                    .map_err(|e| format!("--server-name: {e}"))?,
                tls: tls::agent_config(&pem.ca, pem.chain, pem.key).map_err(|e| e.to_string())?,
                allowed_ports: ports.into_iter().collect::<BTreeSet<_>>(),
                dial,
                stream_window: 1 << 20,
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_secs(30),
                keepalive: ka,
            };
            tunnel::agent::run(cfg, metrics, stop).await;
            Ok(())
        }
    }
}

/// How long a stopping server waits for in-flight streams.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

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
