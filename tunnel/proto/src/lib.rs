//! The tunnel protocol, shared by the server (masters) and the agent (edge nodes).
//!
//! Roles are reversed: the agent dials out (edge nodes are behind NAT) and is the HTTP/2
//! *server*; the tunnel server is the HTTP/2 *client* and opens one `CONNECT 127.0.0.1:<port>`
//! stream per redirected connection, naming the node in [`wire::NODE_HEADER`]. The agent
//! answers 200 (then relays) or a status with a [`wire::Refusal`].
//!
//! - [`wire`]: requests, headers, refusal reasons, the enrollment answer.
//! - [`relay`]: TCP <-> stream with half-close, abort and per-stream flow control.
//! - [`keepalive`]: PING, dead-peer detection, stream windows that follow the RTT.
//! - [`heard`], [`silence`]: when each session last heard its peer, one clock over them all.
//! - [`tls`]: rustls configurations, PEM loading, live reload.
//! - [`identity`]: the node identity in certificates and CSRs.
//! - [`files`]: private files (keys, certificates).
//! - [`cli`]: the TLS and session flags both binaries take.
pub mod cli;
pub mod error;
pub mod files;
pub mod heard;
pub mod identity;
pub mod keepalive;
pub mod relay;
pub mod resume;
pub mod silence;
pub mod tls;
pub mod wire;

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
