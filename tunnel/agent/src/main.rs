//! `tunnel-agent`: on every edge node, a session to every tunnel server replica, with
//! operator-managed certificate files or a certificate enrolled with a bootstrap token (or the
//! Kubernetes CSR API) and renewed before it expires. This file only parses flags.
use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use edge_cli::logging::LogFormat;
use tunnel_agent::run::{Certificates, DEFAULT_METRICS_LISTEN, Settings, Via, run};
use tunnel_proto::cli::Common;

#[derive(Parser)]
#[command(
    version,
    about = "Edge agent of the reverse tunnel: dials every server replica and serves this node's allow-listed ports"
)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Log format.
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Runtime worker threads: 1 (default) = a single-threaded runtime, which costs the fewest
    /// wake-ups per connection (one node's streams; 1 thread relays about 600 MB/s); 0 = one
    /// per CPU.
    #[arg(long, env = "TUNNEL_THREADS", default_value_t = 1)]
    threads: usize,
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
    /// instead of --enroll. Needs a build with the csr-api feature (the agent image has it).
    #[arg(long, env = "TUNNEL_CSR_API", conflicts_with = "enroll")]
    csr_api: bool,
    /// With --csr-api: the certificate lifetime asked for, in hours.
    #[arg(long, env = "TUNNEL_CERT_LIFETIME_HOURS", default_value = "24", value_parser = edge_cli::seconds::positive_hours)]
    cert_lifetime_hours: Duration,
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
    #[arg(long, env = "TUNNEL_PORTS", value_delimiter = ',', default_value = edge_model::DEFAULT_PORTS)]
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
    #[arg(long, env = "TUNNEL_DRAIN_TIMEOUT", default_value = "300", value_parser = edge_cli::seconds::positive)]
    drain_timeout: Duration,
    /// Unix socket where a newer agent on this node takes over open streams when this one
    /// stops (a rolling upgrade): a path both pods mount, or `@NAME` for names in the abstract
    /// namespace of the host network (no volume). Unset: open streams drain.
    #[arg(long, env = "TUNNEL_HANDOFF_SOCKET")]
    handoff_socket: Option<PathBuf>,
    /// How many ports from --metrics-listen's on the agent may take, the first free one: a
    /// second agent on the node (the new pod of a rolling upgrade, beside the old) takes the
    /// next instead of failing.
    #[arg(long, env = "TUNNEL_METRICS_PORT_SPAN", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    metrics_port_span: u16,
    /// Write the metrics endpoint's address here, for `tunnel-agent probe` (in the pod's own
    /// volume, so each pod's probes reach its own agent).
    #[arg(long, env = "TUNNEL_METRICS_ADDR_FILE")]
    metrics_addr_file: Option<PathBuf>,
}

/// `tunnel-agent probe`: a pod's liveness or readiness check, by exec, against its own agent.
#[derive(Parser)]
#[command(
    name = "tunnel-agent probe",
    about = "Checks this pod's agent: GET /readyz (or --path) from the address it recorded; exit 0 when it answers 200"
)]
struct ProbeArgs {
    /// The file the agent's --metrics-addr-file names.
    #[arg(long, env = "TUNNEL_METRICS_ADDR_FILE")]
    metrics_addr_file: PathBuf,
    /// `/readyz` (a session to every server replica) or `/healthz` (the process answers).
    #[arg(long, default_value = "/readyz")]
    path: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value = "2", value_parser = edge_cli::seconds::positive)]
    timeout: Duration,
}

fn probe() -> ExitCode {
    let args = std::env::args_os().skip(2);
    let a = ProbeArgs::parse_from(std::iter::once("tunnel-agent probe".into()).chain(args));
    match tunnel_agent::metrics_port::probe(&a.metrics_addr_file, &a.path, a.timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn settings(a: Args) -> Result<Settings, String> {
    let certificates = match a.cert_dir {
        Some(dir) => Certificates::Enrolled {
            dir,
            ca: a
                .common
                .ca
                .clone()
                .ok_or("--cert-dir needs --ca: the CA bundle that authenticates the servers")?,
            via: if a.csr_api {
                Via::CsrApi {
                    lifetime: a.cert_lifetime_hours,
                }
            } else {
                Via::Endpoint {
                    endpoint: a.enroll.ok_or(
                        "--cert-dir needs --enroll <host:port> (the servers' --enroll-listen) or --csr-api",
                    )?,
                    token: a.token,
                }
            },
        },
        None => {
            let (ca, cert, key) = a
                .common
                .files("--cert-dir with --enroll and --token (enrollment)")?;
            Certificates::Files { ca, cert, key }
        }
    };
    Ok(Settings {
        node_id: a.node_id,
        servers: a.servers,
        server_name: a.server_name,
        certificates,
        ports: a.ports.into_iter().collect(),
        dial: a.dial,
        keepalive: a.common.keepalive(),
        resume: a.common.resume(),
        drain_timeout: a.drain_timeout,
        handoff_socket: a.handoff_socket.clone(),
        metrics_listen: a
            .common
            .metrics_listen
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.parse().expect("static")),
        metrics_port_span: a.metrics_port_span,
        metrics_addr_file: a.metrics_addr_file,
    })
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "probe") {
        return probe();
    }
    // Before any thread: flat memory after bursts (see edge_cli::memory).
    edge_cli::memory::without_thread_cache();
    edge_cli::process::raise_nofile();
    let args = Args::parse();
    edge_cli::logging::init(args.log_format);
    let rt = match edge_cli::process::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = settings(args).and_then(|s| {
        rt.block_on(async { run(s, edge_cli::process::shutdown_on_signal()).await })
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
