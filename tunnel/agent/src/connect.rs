//! Which streams the agent serves: a CONNECT, for this node, to an allow-listed port. The
//! server is authenticated, but what it asks for is still checked here: a server that routes
//! wrongly (or an old one, after the node was renamed) must not reach another port or node.
use std::collections::BTreeSet;

use tunnel_proto::wire::{HEALTH_HEADER, NODE_HEADER, Refusal};

/// The port to dial for `req`, or why the stream is refused.
pub fn admit<B>(
    req: &http::Request<B>,
    node_id: &str,
    allowed_ports: &BTreeSet<u16>,
) -> Result<u16, Refusal> {
    if req.method() != http::Method::CONNECT {
        return Err(Refusal::NotConnect);
    }
    // A header that is not text cannot name this node.
    if let Some(n) = req.headers().get(NODE_HEADER)
        && n.to_str().ok() != Some(node_id)
    {
        return Err(Refusal::OtherNode);
    }
    req.uri()
        .port_u16()
        .filter(|p| allowed_ports.contains(p))
        .ok_or(Refusal::PortNotAllowed)
}

/// Whether `req` is the server's health stream for this node (answered without a dial).
pub fn is_health<B>(req: &http::Request<B>, node_id: &str) -> bool {
    req.method() == http::Method::CONNECT
        && req.headers().contains_key(HEALTH_HEADER)
        && req
            .headers()
            .get(NODE_HEADER)
            .is_some_and(|n| n.to_str().ok() == Some(node_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, node: Option<&[u8]>) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri(uri);
        if let Some(n) = node {
            b = b.header(NODE_HEADER, http::HeaderValue::from_bytes(n).unwrap());
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_a_connect_for_this_node_to_an_allowed_port_is_admitted() {
        let ports: BTreeSet<u16> = [10250].into();
        let ok = |r: &http::Request<()>| admit(r, "edge-a", &ports);
        assert_eq!(
            ok(&req("CONNECT", "127.0.0.1:10250", Some(b"edge-a"))),
            Ok(10250)
        );
        assert_eq!(ok(&req("CONNECT", "127.0.0.1:10250", None)), Ok(10250));
        assert_eq!(
            ok(&req("GET", "http://x:10250/", None)),
            Err(Refusal::NotConnect)
        );
        assert_eq!(
            ok(&req("CONNECT", "127.0.0.1:10250", Some(b"edge-b"))),
            Err(Refusal::OtherNode)
        );
        assert_eq!(
            ok(&req("CONNECT", "127.0.0.1:10250", Some(b"edge-\xff"))),
            Err(Refusal::OtherNode),
            "a header that is not text names no node"
        );
        assert_eq!(
            ok(&req("CONNECT", "127.0.0.1:22", None)),
            Err(Refusal::PortNotAllowed)
        );
    }

    #[test]
    fn the_health_stream_is_recognised_only_for_this_node() {
        let health = tunnel_proto::wire::health_request("edge-a", 0).unwrap();
        assert!(is_health(&health, "edge-a"));
        assert!(!is_health(&health, "edge-b"));
        let plain = tunnel_proto::wire::connect_request("edge-a", 10250).unwrap();
        assert!(!is_health(&plain, "edge-a"));
        // Without the health header, port 0 is refused like any port not allow-listed.
        assert_eq!(
            admit(&health, "edge-a", &[10250].into()),
            Err(Refusal::PortNotAllowed)
        );
    }
}
