//! HTTP/2 PING keepalive, run on both ends of a session: a peer that stops answering (a frozen
//! process, a dropped NAT mapping, a pulled cable) is declared dead within
//! `interval + timeout`, even when no stream is open, and its session is torn down so the
//! agent reconnects and the server stops routing to it.
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        // 10 s + 10 s: finds a dead peer in at most 20 s; one small frame each way per 10 s.
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Pings until the peer fails to answer; returns why. `rtt_us` holds the last round trip.
pub async fn run(mut pp: h2::PingPong, ka: Keepalive, rtt_us: &Gauge) -> String {
    loop {
        tokio::time::sleep(ka.interval).await;
        let start = Instant::now();
        match tokio::time::timeout(ka.timeout, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {
                rtt_us.set(start.elapsed().as_micros() as i64);
            }
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => {
                return format!(
                    "peer did not answer a keepalive PING within {:?}",
                    ka.timeout
                );
            }
        }
    }
}
