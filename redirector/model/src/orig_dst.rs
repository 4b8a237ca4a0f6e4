//! What the kernel remembered of a redirected connection.
use std::net::SocketAddr;

/// The destination a redirected client dialled, as connect4/6 recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalDst {
    /// Node address and port (IPv4 for IPv4 and IPv4-mapped destinations).
    pub addr: SocketAddr,
    /// The client was in another network namespace (a pod) and came through the pod ingress.
    pub from_pod: bool,
    /// The kernel's verdict: the address belongs to more than one node. The ingress refuses
    /// it, naming them; it never decides ambiguity a second time from its own copy.
    pub ambiguous: bool,
    /// A connection to the redirector's ingress probe address: the ingress answers it itself
    /// with [`PROBE_REPLY`] and a newline.
    pub probe: bool,
}

/// The first word of the ingress's answer to a probe connection (then the replica's name).
pub const PROBE_REPLY: &str = "edge-redirector-ingress-probe";
