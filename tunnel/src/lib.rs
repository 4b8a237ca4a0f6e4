//! The tunnel: a server on every master, an agent on every edge node.
//!
//! Data path: a redirected connection arrives at the server's ingress; its original
//! destination (from the redirector) maps to a node ID through the node table; the server opens
//! one HTTP/2 CONNECT stream on that node's session; the agent dials its own node on the
//! allow-listed port and relays. Roles are reversed: the agent dials out (edge nodes are behind
//! NAT) and is the HTTP/2 *server*; the tunnel server is the HTTP/2 *client* opening streams.
//!
//! Identity: the node ID is the `urn:edge-redirector:node:<name>` URI SAN of the agent's client
//! certificate, verified against the cluster CA ([`identity`]); sessions are keyed by it, never
//! by IP.
//!
//! Modules: [`server`] (agent sessions, ingress, routing), [`agent`] (sessions to every
//! replica, the allow-listed local dial), [`relay`] (TCP <-> stream with half-close, abort and
//! per-stream flow control), [`keepalive`] (PING), [`metrics`] (Prometheus, health), [`tls`],
//! [`identity`].
pub mod agent;
pub mod error;
pub mod identity;
pub mod keepalive;
pub mod metrics;
pub mod pki;
pub mod relay;
pub mod server;
pub mod tls;

pub use error::{Error, Result};

/// A listener with a deep accept queue (4096). A burst of connections (a scrape of many nodes,
/// 1,000 streams opened at once) otherwise overflows the default 1024, and the kernel's SYN-flood
/// handling answers with cookies and resets.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}
