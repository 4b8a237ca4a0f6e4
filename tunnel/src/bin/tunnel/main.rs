//! `tunnel server` (on every master) and the PKI commands (`tunnel token create`,
//! `tunnel ca ...`). The edge agent is its own binary, `tunnel-agent`. This file only parses
//! flags.
mod orig_source;
mod pki_cmd;
mod server_cmd;

use std::{net::SocketAddr, process::ExitCode};

use clap::{Parser, Subcommand};
use edge_cli::logging::LogFormat;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    version,
    about = "Reverse tunnel for edge nodes, master side: the server, its CA and bootstrap tokens"
)]
struct Cli {
    /// Runtime worker threads: 0 (default) = one per CPU (many sessions and ingress
    /// connections); 1 = a single-threaded runtime, which costs the fewest wake-ups per
    /// connection.
    #[arg(long, global = true, env = "TUNNEL_THREADS", default_value_t = 0)]
    threads: usize,
    /// Log format.
    #[arg(long, global = true, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept agent sessions and redirected connections.
    Server(Box<server_cmd::ServerArgs>),
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
    /// Moved: the edge agent is its own binary, `tunnel-agent`, with the same flags.
    #[command(hide = true, disable_help_flag = true)]
    Agent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Before any thread: flat memory after bursts (see edge_cli::memory).
    edge_cli::memory::without_thread_cache();
    edge_cli::process::raise_nofile();
    let cli = Cli::parse();
    edge_cli::logging::init(cli.log_format);
    if let Cmd::Agent { .. } = cli.cmd {
        eprintln!(
            "error: the edge agent is its own binary now: run `tunnel-agent` with the same flags (its image is edge-redirector-agent)"
        );
        return ExitCode::FAILURE;
    }
    let rt = match edge_cli::process::runtime(cli.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Server(a) => server_cmd::run(*a, edge_cli::process::shutdown_on_signal()).await,
            Cmd::Token { cmd } => pki_cmd::token(cmd),
            Cmd::Ca { cmd } => pki_cmd::ca(cmd).await,
            Cmd::Agent { .. } => unreachable!("handled above"),
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

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    tunnel::listen(addr).map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}
