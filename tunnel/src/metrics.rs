//! The server's Prometheus metrics (prometheus-client); served by [`edge_cli::http::serve`]
//! with `/healthz` and `/readyz`.
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use tunnel_proto::keepalive::{Direction, Reason};

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct AdmissionLabel {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CheckLabel {
    pub result: &'static str,
}

/// Server-side metrics. Cloning shares the underlying values.
#[derive(Clone, Default)]
pub struct ServerMetrics {
    pub sessions: Gauge,
    /// Agent connections in their TLS handshake now (bounded by `--max-handshakes`).
    pub handshakes_in_flight: Gauge,
    pub sessions_accepted: Counter,
    pub sessions_rejected: Counter,
    pub sessions_dead: Counter,
    /// A node's newer session took its new streams while an older one was still up.
    pub session_takeovers: Counter,
    /// Failed accepts per listener (resource errors pause the loop instead of spinning).
    pub accept_errors: Family<ListenerLabel, Counter>,
    /// Connections closed before authentication (and sessions closed over the per-node
    /// bound), per listener and reason.
    pub admission: Family<AdmissionLabel, Counter>,
    pub streams_open: Gauge,
    pub streams_total: Counter,
    pub streams_reset: Counter,
    pub bytes: Family<Direction, Counter>,
    pub refused: Family<Reason, Counter>,
    /// Enrollment requests and connections refused, by reason.
    pub enroll_refused: Family<Reason, Counter>,
    /// Last keepalive round trip of any session, microseconds.
    pub keepalive_rtt_us: Gauge,
    /// Health streams of the node self-check, by result (ok, failed).
    pub node_checks: Family<CheckLabel, Counter>,
    /// The redirector's ingress probes answered (connections to its probe address).
    pub ingress_probes: Counter,
    /// Streams parked across a lost session, resumed, or reset instead.
    pub resume: tunnel_proto::resume::ResumeMetrics,
}

/// Reasons an agent connection is closed before authentication (the `admission` family).
pub const ADMISSION_REASONS: [&str; 5] = [
    "per_source_full",
    "total_full",
    "evicted_oldest",
    "handshake_timeout",
    "sessions_per_node",
];

impl ServerMetrics {
    /// Every known label set at 0, so a family is in the first scrape, before its first event:
    /// rates and dashboards then show 0 instead of no data.
    fn zeroes(&self) {
        for why in tunnel_proto::wire::Refusal::ALL {
            let _ = self.refused.get_or_create(&Reason {
                reason: why.label(),
            });
        }
        for direction in ["to_node", "from_node"] {
            let _ = self.bytes.get_or_create(&Direction { direction });
        }
        for result in ["ok", "failed"] {
            let _ = self.node_checks.get_or_create(&CheckLabel { result });
        }
        for reason in ADMISSION_REASONS {
            let _ = self.admission.get_or_create(&AdmissionLabel {
                listener: "agents",
                reason,
            });
        }
    }

    pub fn register(&self, r: &mut Registry) {
        self.zeroes();
        self.resume.register("tunnel_server", r);
        r.register(
            "tunnel_server_sessions",
            "Agent sessions currently up",
            self.sessions.clone(),
        );
        r.register(
            "tunnel_server_ingress_probes",
            "Connections to the redirector's probe address, answered by this ingress itself",
            self.ingress_probes.clone(),
        );
        r.register(
            "tunnel_server_handshakes_in_flight",
            "Agent connections in their TLS handshake now (at most --max-handshakes)",
            self.handshakes_in_flight.clone(),
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
            "tunnel_server_accept_errors",
            "Failed accepts by listener (out of descriptors or memory pauses the loop instead of spinning)",
            self.accept_errors.clone(),
        );
        r.register(
            "tunnel_server_session_takeovers",
            "Sessions that took a node's new streams while an older session of it was up (agent upgrades, rotations, or a second holder of its certificate)",
            self.session_takeovers.clone(),
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
            "tunnel_server_admission_refused",
            "Connections closed before authentication, per listener and reason (per_source_full: closed at once; evicted_oldest: the oldest handshake closed for a newer one; handshake_timeout), and older sessions closed over --max-sessions-per-node (sessions_per_node)",
            self.admission.clone(),
        );
        r.register(
            "tunnel_server_enroll_refused",
            "Enrollment requests and connections refused, by reason (bad_request, unauthorized, forbidden, rate_limited, body_too_large, head_too_large, head_timeout, body_timeout, handshake_timeout, handshake_failed, ...)",
            self.enroll_refused.clone(),
        );
        r.register(
            "tunnel_server_node_checks",
            "Health streams sent to nodes that carried no stream for --node-check-interval, by result (ok, failed: no answer)",
            self.node_checks.clone(),
        );
        r.register(
            "tunnel_server_keepalive_rtt_microseconds",
            "Last keepalive round trip",
            self.keepalive_rtt_us.clone(),
        );
    }
}

pub use edge_cli::http::serve;
