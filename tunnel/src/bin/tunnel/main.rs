//! `tunnel server` (on every master), `tunnel agent` (on every edge node), and the PKI
//! commands (`tunnel token create`, `tunnel ca ...`).
mod agent_cmd;
mod pki_cmd;
mod server_cmd;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnel::keepalive::Keepalive;

#[derive(Parser)]
#[command(
    version,
    about = "Reverse tunnel for edge nodes: server on masters, agent on edge nodes"
)]
struct Cli {
    /// Runtime worker threads: 0 = one per CPU; 1 = a single-threaded runtime, which costs the
    /// fewest wake-ups per connection (no hand-offs between threads). Default: one per CPU
    /// for the server (many sessions and ingress connections), 1 for the agent (one node's
    /// streams; 1 thread relays about 600 MB/s).
    #[arg(long, global = true, env = "TUNNEL_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// TLS files and session settings both ends share.
#[derive(clap::Args)]
struct Common {
    /// CA bundle (PEM) the peer's certificate must chain to. Agent with --cert-dir: the CA
    /// that authenticates the enrollment endpoint until the first bundle arrives.
    #[arg(long, env = "TUNNEL_CA")]
    ca: Option<PathBuf>,
    /// This end's certificate chain (PEM), managed by the operator (reloaded when it changes).
    #[arg(long, env = "TUNNEL_CERT")]
    cert: Option<PathBuf>,
    /// This end's private key (PEM).
    #[arg(long, env = "TUNNEL_KEY")]
    key: Option<PathBuf>,
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

impl Common {
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

    /// --ca, --cert and --key, all three, or which is missing.
    fn files(&self, instead: &str) -> Result<(PathBuf, PathBuf, PathBuf), String> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok((ca.clone(), cert.clone(), key.clone())),
            _ => Err(format!(
                "give --ca, --cert and --key (operator-managed certificates), or {instead}"
            )),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept agent sessions and redirected connections.
    Server(Box<server_cmd::ServerArgs>),
    /// Keep a session to every server and serve streams for this node.
    Agent(Box<agent_cmd::AgentArgs>),
    /// Bootstrap tokens for agent enrollment.
    Token {
        #[command(subcommand)]
        cmd: pki_cmd::TokenCmd,
    },
    /// The tunnel CA kept by `server --ca-dir` or `--ca-secret`.
    Ca {
        #[command(subcommand)]
        cmd: pki_cmd::CaCmd,
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
    let threads = cli.threads.unwrap_or(match cli.cmd {
        Cmd::Agent(_) => 1,
        _ => 0,
    });
    let rt = match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
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
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Server(a) => server_cmd::run(*a, shutdown_on_signal()).await,
            Cmd::Agent(a) => agent_cmd::run(*a, shutdown_on_signal()).await,
            Cmd::Token { cmd } => pki_cmd::token(cmd),
            Cmd::Ca { cmd } => pki_cmd::ca(cmd).await,
        }
    });
    match result {
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

/// The CA Secret named by `flag`'s value `namespace/name`, with a client from the in-cluster
/// service account or KUBECONFIG.
async fn secret_ca(flag: &str, spec: &str) -> Result<tunnel::pki::secret::SecretCa, String> {
    let (ns, name) = spec
        .split_once('/')
        .ok_or_else(|| format!("{flag} {spec:?}: expected namespace/name"))?;
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("{flag}: no Kubernetes client configuration (in-cluster service account or KUBECONFIG): {e}")
    })?;
    Ok(tunnel::pki::secret::SecretCa::new(client, ns, name))
}
