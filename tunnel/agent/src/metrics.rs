//! The agent's Prometheus metrics, served with `/healthz` and `/readyz`.
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
pub use tunnel_proto::keepalive::{Direction, Reason};

/// Agent-side metrics.
#[derive(Clone, Default)]
pub struct AgentMetrics {
    pub sessions: Gauge,
    /// Server replicas known (one session to each is kept): the agent is ready when it holds
    /// a session to every one.
    pub replicas: Gauge,
    pub sessions_established: Counter,
    /// Sessions sent GOAWAY to drain (certificate rotation, shutdown).
    pub sessions_drained: Counter,
    pub streams_open: Gauge,
    pub streams_total: Counter,
    pub bytes: Family<Direction, Counter>,
    pub refused: Family<Reason, Counter>,
    pub keepalive_rtt_us: Gauge,
    pub resume: tunnel_proto::resume::ResumeMetrics,
    /// Streams handed to a newer agent on this node when this one stopped, and taken over
    /// from an older one.
    pub streams_handed_over: Counter,
    pub streams_adopted: Counter,
}

impl AgentMetrics {
    /// Ready: a session to every known replica. A new agent beside an old one (a rolling
    /// upgrade with a surge pod) must not let the old one go while some replica would be left
    /// without a session of this node.
    pub fn ready(&self) -> bool {
        let replicas = self.replicas.get();
        replicas > 0 && self.sessions.get() >= replicas
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tunnel_agent_sessions",
            "Server sessions currently up",
            self.sessions.clone(),
        );
        r.register(
            "tunnel_agent_server_replicas",
            "Server replicas known, one session to each wanted",
            self.replicas.clone(),
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
        self.resume.register("tunnel_agent", r);
        r.register(
            "tunnel_agent_streams_handed_over",
            "Open streams handed to a newer agent on this node when this one stopped",
            self.streams_handed_over.clone(),
        );
        r.register(
            "tunnel_agent_streams_adopted",
            "Open streams taken over from an older agent on this node",
            self.streams_adopted.clone(),
        );
    }
}
