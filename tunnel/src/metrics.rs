//! Prometheus metrics for both ends (prometheus-client); served by [`redirector::http::serve`]
//! with `/healthz` and `/readyz`.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `to_node` (client -> edge service) or `from_node`.
    pub direction: &'static str,
}

/// Server-side metrics. Cloning shares the underlying values.
#[derive(Clone, Default)]
pub struct ServerMetrics {
    pub sessions: Gauge,
    pub sessions_accepted: Counter,
    pub sessions_rejected: Counter,
    pub sessions_dead: Counter,
    pub streams_open: Gauge,
    pub streams_total: Counter,
    pub streams_reset: Counter,
    pub bytes: Family<Direction, Counter>,
    pub refused: Family<Reason, Counter>,
    /// Last keepalive round trip of any session, microseconds.
    pub keepalive_rtt_us: Gauge,
}

impl ServerMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tunnel_server_sessions",
            "Agent sessions currently up",
            self.sessions.clone(),
        );
        r.register(
            "tunnel_server_sessions_accepted",
            "Agent sessions accepted",
            self.sessions_accepted.clone(),
        );
        r.register(
            "tunnel_server_sessions_rejected",
            "Agent sessions refused (TLS, identity) or failed",
            self.sessions_rejected.clone(),
        );
        r.register(
            "tunnel_server_sessions_dead",
            "Agent sessions torn down by keepalive",
            self.sessions_dead.clone(),
        );
        r.register(
            "tunnel_server_streams_open",
            "Redirected connections being handled (opening a stream or relaying)",
            self.streams_open.clone(),
        );
        r.register(
            "tunnel_server_streams",
            "Streams opened",
            self.streams_total.clone(),
        );
        r.register(
            "tunnel_server_streams_reset",
            "Streams that ended in an abort",
            self.streams_reset.clone(),
        );
        r.register("tunnel_server_bytes", "Bytes relayed", self.bytes.clone());
        r.register(
            "tunnel_server_refused",
            "Redirected connections refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "tunnel_server_keepalive_rtt_microseconds",
            "Last keepalive round trip",
            self.keepalive_rtt_us.clone(),
        );
    }
}

/// Agent-side metrics.
#[derive(Clone, Default)]
pub struct AgentMetrics {
    pub sessions: Gauge,
    pub sessions_established: Counter,
    /// Sessions sent GOAWAY to drain (certificate rotation, shutdown).
    pub sessions_drained: Counter,
    pub streams_open: Gauge,
    pub streams_total: Counter,
    pub bytes: Family<Direction, Counter>,
    pub refused: Family<Reason, Counter>,
    pub keepalive_rtt_us: Gauge,
}

impl AgentMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tunnel_agent_sessions",
            "Server sessions currently up",
            self.sessions.clone(),
        );
        r.register(
            "tunnel_agent_sessions_established",
            "Server sessions established",
            self.sessions_established.clone(),
        );
        r.register(
            "tunnel_agent_sessions_drained",
            "Server sessions drained with GOAWAY (certificate rotation, shutdown)",
            self.sessions_drained.clone(),
        );
        r.register(
            "tunnel_agent_streams_open",
            "Streams currently relaying",
            self.streams_open.clone(),
        );
        r.register(
            "tunnel_agent_streams",
            "Streams served",
            self.streams_total.clone(),
        );
        r.register("tunnel_agent_bytes", "Bytes relayed", self.bytes.clone());
        r.register(
            "tunnel_agent_refused",
            "Streams refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "tunnel_agent_keepalive_rtt_microseconds",
            "Last keepalive round trip",
            self.keepalive_rtt_us.clone(),
        );
    }
}

pub use redirector::http::serve;
