//! What travels on a session besides the relayed bytes: the CONNECT request the server opens
//! a stream with, the agent's answer, and the reasons either end refuses a connection for.
use std::fmt;

/// Header carrying the node ID the server meant, checked by the agent (defence in depth: the
/// server already routes by the certificate's identity).
pub const NODE_HEADER: &str = "x-edge-node";
/// A refused stream's reason for people.
pub const ERROR_HEADER: &str = "x-edge-error";
/// A refused stream's reason for programs: a [`Refusal::label`].
pub const REFUSAL_HEADER: &str = "x-edge-refusal";

/// Why a redirected connection was refused, by the server or by the agent. The label is the
/// `reason` of both ends' `..._refused_total` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    // The server's.
    NotRedirected,
    UnknownNode,
    Ambiguous,
    NoSession,
    StreamOpenFailed,
    AgentRefused,
    IngressFull,
    // The agent's (the server counts each as `agent_refused`, naming this one in its log).
    NotConnect,
    OtherNode,
    PortNotAllowed,
    DialFailed,
    /// A resume named a stream the agent no longer has (its resume window passed, the agent
    /// restarted, or the stream ended meanwhile).
    StreamGone,
}

impl Refusal {
    /// The server's reasons.
    pub const ALL: [Refusal; 7] = [
        Refusal::NotRedirected,
        Refusal::UnknownNode,
        Refusal::Ambiguous,
        Refusal::NoSession,
        Refusal::StreamOpenFailed,
        Refusal::AgentRefused,
        Refusal::IngressFull,
    ];
    /// The agent's reasons.
    pub const AGENT: [Refusal; 5] = [
        Refusal::NotConnect,
        Refusal::OtherNode,
        Refusal::PortNotAllowed,
        Refusal::DialFailed,
        Refusal::StreamGone,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotRedirected => "not_redirected",
            Refusal::UnknownNode => "unknown_node",
            Refusal::Ambiguous => "ambiguous_address",
            Refusal::NoSession => "no_session",
            Refusal::StreamOpenFailed => "stream_open_failed",
            Refusal::AgentRefused => "agent_refused",
            Refusal::IngressFull => "ingress_full",
            Refusal::NotConnect => "not_connect",
            Refusal::OtherNode => "other_node",
            Refusal::PortNotAllowed => "port_not_allowed",
            Refusal::DialFailed => "dial_failed",
            Refusal::StreamGone => "stream_gone",
        }
    }

    pub fn from_label(label: &str) -> Option<Refusal> {
        Refusal::ALL
            .into_iter()
            .chain(Refusal::AGENT)
            .find(|r| r.label() == label)
    }

    /// The HTTP status the agent answers a refused stream with.
    pub fn status(self) -> u16 {
        match self {
            Refusal::NotConnect => 405,
            Refusal::OtherNode => 421,
            Refusal::PortNotAllowed => 403,
            Refusal::DialFailed => 502,
            Refusal::StreamGone => 410,
            _ => 503,
        }
    }

    /// What the refusal means, for the peer's log.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::NotConnect => "only CONNECT is served",
            Refusal::OtherNode => "this agent serves another node",
            Refusal::PortNotAllowed => "port not allow-listed on this node",
            Refusal::DialFailed => "nothing listens on that port on this node",
            Refusal::StreamGone => "the agent no longer has the stream to resume",
            Refusal::NotRedirected => "not redirected",
            Refusal::UnknownNode => "not a known node address",
            Refusal::Ambiguous => "address shared by several nodes",
            Refusal::NoSession => "no agent session",
            Refusal::StreamOpenFailed => "stream could not be opened",
            Refusal::AgentRefused => "the agent refused",
            Refusal::IngressFull => {
                "the ingress holds its most connections (--max-ingress-connections)"
            }
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The stream the server opens for a connection to `port` on `node`. The authority names only
/// the port: the agent dials its own node whatever host a request names.
pub fn connect_request(node: &str, port: u16) -> http::Result<http::Request<()>> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("127.0.0.1:{port}"))
        .header(NODE_HEADER, node)
        .body(())
}

/// The stream that continues a parked one (see [`crate::resume`]): the same node and port,
/// the parked stream's ID, and how much of the agent's bytes the server delivered.
pub fn resume_request(
    node: &str,
    port: u16,
    of: crate::resume::FlowId,
    received: crate::resume::Received,
) -> http::Result<http::Request<()>> {
    let mut req = connect_request(node, port)?;
    let h = req.headers_mut();
    h.insert(crate::resume::RESUME_OF_HEADER, of.value());
    h.insert(crate::resume::RECEIVED_HEADER, received.value());
    Ok(req)
}

/// Marks the server's health stream (the node self-check, and `redirector explain`): the agent
/// answers it itself, without dialling anything.
pub const HEALTH_HEADER: &str = "x-edge-health";

/// On a 200 answer to a health stream that names a port: the agent allows that port. An agent
/// that answers 200 without it predates port checks, so whether it allows the port is unknown.
pub const PORT_ALLOWED_HEADER: &str = "x-edge-port-allowed";

/// A health stream for `node`. Port 0 asks only whether the agent answers (the self-check);
/// another port also asks whether the agent allows it: 200 with [`PORT_ALLOWED_HEADER`] if so,
/// its `port_not_allowed` refusal if not. Port 0 is never allow-listed, so an agent that
/// predates health streams refuses the self-check's, which still shows that it answers.
pub fn health_request(node: &str, port: u16) -> http::Result<http::Request<()>> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("127.0.0.1:{port}"))
        .header(NODE_HEADER, node)
        .header(HEALTH_HEADER, "1")
        .body(())
}

/// The agent's answer to a stream it refuses.
pub fn refusal_response(why: Refusal) -> http::Response<()> {
    http::Response::builder()
        .status(why.status())
        .header(ERROR_HEADER, why.explain())
        .header(REFUSAL_HEADER, why.label())
        .body(())
        .expect("static response")
}

/// What an agent's non-200 answer says: its reason (None from an agent that sends no label)
/// and its text.
pub fn refusal_of<B>(resp: &http::Response<B>) -> (Option<Refusal>, String) {
    let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok());
    (
        header(REFUSAL_HEADER).and_then(Refusal::from_label),
        header(ERROR_HEADER).unwrap_or("").to_owned(),
    )
}

/// The enrollment endpoint's answer: a certificate naming the node, and the CA bundle to
/// trust the servers with.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    pub certificate: String,
    pub ca_bundle: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_round_trips_through_its_label_and_the_agents_answer() {
        for r in Refusal::ALL.into_iter().chain(Refusal::AGENT) {
            assert_eq!(Refusal::from_label(r.label()), Some(r));
        }
        for r in Refusal::AGENT {
            let resp = refusal_response(r);
            assert_eq!(resp.status().as_u16(), r.status());
            assert_eq!(refusal_of(&resp), (Some(r), r.explain().to_owned()));
        }
        assert_eq!(Refusal::from_label("nonsense"), None);
    }

    #[test]
    fn the_connect_request_names_the_node_and_only_the_port() {
        let req = connect_request("edge-a", 10250).unwrap();
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(req.uri().port_u16(), Some(10250));
        assert_eq!(req.headers()[NODE_HEADER], "edge-a");
    }
}
