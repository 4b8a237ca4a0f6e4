//! The flags both ends take: TLS files, keepalive, the metrics endpoint.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::keepalive::Keepalive;

/// TLS files and session settings both ends share.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// CA bundle (PEM) the peer's certificate must chain to. Agent with --cert-dir: the CA
    /// that authenticates the enrollment endpoint until the first bundle arrives.
    #[arg(long, env = "TUNNEL_CA")]
    pub ca: Option<PathBuf>,
    /// This end's certificate chain (PEM), managed by the operator (reloaded when it changes).
    #[arg(long, env = "TUNNEL_CERT")]
    pub cert: Option<PathBuf>,
    /// This end's private key (PEM).
    #[arg(long, env = "TUNNEL_KEY")]
    pub key: Option<PathBuf>,
    /// Seconds between keepalive PINGs.
    #[arg(long, env = "TUNNEL_KEEPALIVE_INTERVAL", default_value = "30", value_parser = edge_cli::seconds::positive)]
    pub keepalive_interval: Duration,
    /// Seconds a PING may go unanswered before the session is declared dead.
    #[arg(long, env = "TUNNEL_KEEPALIVE_TIMEOUT", default_value = "10", value_parser = edge_cli::seconds::positive)]
    pub keepalive_timeout: Duration,
    /// Seconds a stream whose session was lost (a WAN outage, an agent reconnect) stays
    /// parked, waiting for the next session to resume on; 0 resets it with its session.
    #[arg(long, env = "TUNNEL_RESUME_WINDOW", default_value = "60", value_parser = edge_cli::seconds::non_negative)]
    pub resume_window: Duration,
    /// MiB one session's streams may keep for resuming (the bytes the other end may not have
    /// received yet); a stream past it is reset if its session is lost.
    #[arg(long, env = "TUNNEL_RESUME_BUFFER_PER_SESSION", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub resume_buffer_per_session: u64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "TUNNEL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Common {
    pub fn keepalive(&self) -> Keepalive {
        Keepalive {
            interval: self.keepalive_interval,
            timeout: self.keepalive_timeout,
        }
    }

    pub fn resume(&self) -> crate::resume::ResumeConfig {
        crate::resume::ResumeConfig {
            window: self.resume_window,
            budget_per_session: self.resume_buffer_per_session << 20,
        }
    }

    /// --ca, --cert and --key, all three, or which is missing.
    pub fn files(&self, instead: &str) -> Result<(PathBuf, PathBuf, PathBuf), String> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok((ca.clone(), cert.clone(), key.clone())),
            _ => Err(format!(
                "give --ca, --cert and --key (operator-managed certificates), or {instead}"
            )),
        }
    }
}
