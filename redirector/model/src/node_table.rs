//! The static node table: which addresses belong to which edge node.
//!
//! File format, one node per line, `#` starts a comment:
//!
//! ```text
//! # node-id        addresses (InternalIP, ExternalIP, ...), then the tunnel address
//! edge-a           198.51.100.10  tunnel=203.0.113.10
//! edge-b           198.51.100.10  tunnel=203.0.113.11      # same InternalIP as edge-a
//! edge-v6          2001:db8::10
//! ```
//!
//! Node IDs are Kubernetes node names (DNS subdomains). An address listed by two nodes is
//! *ambiguous*: it is still redirected, and the tunnel refuses it naming both nodes, so it is
//! never routed to the wrong one. `tunnel=<ip>` marks the node's *tunnel address*: an address
//! unique to that node (no other node may list it), which its name resolves to (see
//! [`crate::hosts`]), so a node stays reachable by name even when its InternalIP is shared.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use redirector_common::{Ip6Words, NodeValue, node_flags};

use crate::error::{Error, Result};
pub use crate::names::validate_node_id;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeTable {
    /// node ID -> its addresses (IPv4-mapped IPv6 normalised to IPv4), in file order.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// node ID -> its tunnel address (also one of its `nodes` addresses).
    pub tunnel: BTreeMap<String, IpAddr>,
}

/// What the kernel maps should hold for a node table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelEntries {
    /// IPv4 address in network byte order (as `user_ip4` holds it).
    pub v4: BTreeMap<u32, NodeValue>,
    pub v6: BTreeMap<Ip6Words, NodeValue>,
}

impl NodeTable {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::NodeTableRead {
            file: path.to_owned(),
            source: e,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a node table; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let mut nodes: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        let mut tunnel: BTreeMap<String, (IpAddr, usize)> = BTreeMap::new();
        let err = |line: usize, reason: String| Error::NodeTable {
            file: file.to_owned(),
            line,
            reason,
        };
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let id = fields.next().unwrap_or_default();
            validate_node_id(id).map_err(|r| err(line_no, r))?;
            if nodes.contains_key(id) {
                return Err(err(
                    line_no,
                    format!(
                        "node {id:?} is listed twice; list each node once with all its addresses"
                    ),
                ));
            }
            let mut addrs = Vec::new();
            for f in fields {
                let (is_tunnel, f) = match f.strip_prefix("tunnel=") {
                    Some(rest) => (true, rest),
                    None => (false, f),
                };
                let ip = parse_address(f).map_err(|r| err(line_no, format!("node {id:?}: {r}")))?;
                if is_tunnel && tunnel.insert(id.to_owned(), (ip, line_no)).is_some() {
                    return Err(err(
                        line_no,
                        format!("node {id:?} has two tunnel= addresses; give it one"),
                    ));
                }
                if !addrs.contains(&ip) {
                    addrs.push(ip);
                }
            }
            if addrs.is_empty() {
                return Err(err(
                    line_no,
                    format!("node {id:?} has no address; expected `<node-id> <ip> [<ip>...]`"),
                ));
            }
            nodes.insert(id.to_owned(), addrs);
        }
        // A tunnel address is what the node's name resolves to: shared, it would be refused.
        let tunnel_owner: BTreeMap<IpAddr, &String> =
            tunnel.iter().map(|(id, (ip, _))| (*ip, id)).collect();
        for (other, addrs) in &nodes {
            for ip in addrs {
                if let Some(id) = tunnel_owner.get(ip).filter(|id| **id != other) {
                    return Err(err(
                        tunnel[*id].1,
                        format!(
                            "tunnel address {ip} of node {id:?} is also listed by node {other:?}; a tunnel address must belong to one node only"
                        ),
                    ));
                }
            }
        }
        let tunnel = tunnel.into_iter().map(|(id, (ip, _))| (id, ip)).collect();
        Ok(Self { nodes, tunnel })
    }

    /// The table in the file format [`NodeTable::parse`] reads (nodes sorted by name).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(self.nodes.len() * 48);
        for (id, addrs) in &self.nodes {
            out.push_str(id);
            let tunnel = self.tunnel.get(id);
            for a in addrs.iter().filter(|a| Some(*a) != tunnel) {
                out.push(' ');
                out.push_str(&a.to_string());
            }
            if let Some(t) = tunnel {
                out.push_str(" tunnel=");
                out.push_str(&t.to_string());
            }
            out.push('\n');
        }
        out
    }

    /// Every address with the nodes that list it (more than one = ambiguous).
    pub fn owners(&self) -> BTreeMap<IpAddr, BTreeSet<&str>> {
        let mut owners: BTreeMap<IpAddr, BTreeSet<&str>> = BTreeMap::new();
        for (id, addrs) in &self.nodes {
            for a in addrs {
                owners.entry(*a).or_default().insert(id);
            }
        }
        owners
    }

    /// The node-map contents for this table.
    pub fn kernel_entries(&self) -> KernelEntries {
        let mut out = KernelEntries::default();
        // Owner counts only: this runs on every change of a fleet-sized table.
        let mut owners: std::collections::HashMap<IpAddr, u32> =
            std::collections::HashMap::with_capacity(self.nodes.len() * 2);
        for addrs in self.nodes.values() {
            for a in addrs {
                *owners.entry(*a).or_default() += 1;
            }
        }
        for (ip, owners) in owners {
            let flags = if owners > 1 { node_flags::AMBIGUOUS } else { 0 };
            let value = NodeValue { flags };
            match ip {
                IpAddr::V4(v4) => {
                    out.v4.insert(u32::from_ne_bytes(v4.octets()), value);
                }
                IpAddr::V6(v6) => {
                    out.v6.insert(ip6_words(&v6.octets()), value);
                }
            }
        }
        out
    }
}

/// 16 address bytes as the kernel's four network-order words.
pub fn ip6_words(b: &[u8; 16]) -> Ip6Words {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The inverse of [`ip6_words`].
pub fn words_to_bytes(w: &Ip6Words) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    b
}

/// An address as a node address: parsed, canonical (IPv4-mapped to IPv4), and not one that
/// would capture this host's own traffic.
pub fn parse_address(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))?;
    let ip = ip.to_canonical();
    let reason = if ip.is_unspecified() {
        Some("is the unspecified address")
    } else if ip.is_loopback() {
        Some("is a loopback address; redirecting it would capture this host's own traffic")
    } else if ip.is_multicast() {
        Some("is a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("is the broadcast address")
    } else {
        None
    };
    match reason {
        Some(r) => Err(format!(
            "{ip} {r}; list the node's InternalIP, ExternalIP or tunnel address"
        )),
        None => Ok(ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn parse(text: &str) -> Result<NodeTable> {
        NodeTable::parse(text, Path::new("nodes.txt"))
    }

    #[test]
    fn parses_nodes_comments_and_ambiguity() {
        let t = parse(
            "# header\n\nedge-a 198.51.100.10 203.0.113.10\nedge-b 198.51.100.10 # dup\nedge-c ::ffff:198.51.100.12 2001:db8::12\n",
        )
        .unwrap();
        assert_eq!(t.nodes.len(), 3);
        // IPv4-mapped is normalised to IPv4.
        assert_eq!(
            t.nodes["edge-c"][0],
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 12))
        );
        let k = t.kernel_entries();
        let dup = u32::from_ne_bytes([198, 51, 100, 10]);
        assert_eq!(k.v4[&dup].flags, node_flags::AMBIGUOUS);
        assert_eq!(k.v4[&u32::from_ne_bytes([203, 0, 113, 10])].flags, 0);
        assert_eq!(k.v4.len(), 3);
        assert_eq!(k.v6.len(), 1);
        let owners = t.owners();
        let dup_owners: Vec<_> = owners[&IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10))]
            .iter()
            .copied()
            .collect();
        assert_eq!(dup_owners, ["edge-a", "edge-b"]);
    }

    #[test]
    fn tunnel_addresses_are_node_addresses_too() {
        let t = parse("edge-a 192.0.2.10 tunnel=198.51.100.10\nedge-b 192.0.2.10 tunnel=198.51.100.11\nedge-c 192.0.2.30\n").unwrap();
        assert_eq!(t.tunnel.len(), 2);
        assert_eq!(
            t.tunnel["edge-b"],
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11))
        );
        assert!(t.nodes["edge-b"].contains(&t.tunnel["edge-b"]));
        // Redirected like any other address; the shared InternalIP stays ambiguous.
        let k = t.kernel_entries();
        assert_eq!(k.v4.len(), 4);
        assert_eq!(k.v4[&u32::from_ne_bytes([198, 51, 100, 11])].flags, 0);
        assert_eq!(
            k.v4[&u32::from_ne_bytes([192, 0, 2, 10])].flags,
            node_flags::AMBIGUOUS
        );
    }

    #[test]
    fn render_parses_back_to_the_same_table() {
        let t = parse("edge-b 192.0.2.10 tunnel=198.51.100.11\nedge-a 192.0.2.10 2001:db8::1 tunnel=198.51.100.10\nedge-c 192.0.2.30\n").unwrap();
        assert_eq!(parse(&t.render()).unwrap(), t);
        assert!(
            t.render()
                .starts_with("edge-a 192.0.2.10 2001:db8::1 tunnel=198.51.100.10\n")
        );
    }

    #[test]
    fn bad_lines_name_file_line_and_reason() {
        let cases = [
            ("edge-a\n", 1, "has no address"),
            (
                "ok 198.51.100.1\nedge-b 300.1.2.3\n",
                2,
                "not an IPv4 or IPv6 address",
            ),
            ("Edge_A 198.51.100.1\n", 1, "not a valid node name"),
            ("a 198.51.100.1\na 198.51.100.2\n", 2, "listed twice"),
            ("a 127.0.0.1\n", 1, "loopback"),
            ("a 0.0.0.0\n", 1, "unspecified"),
            ("a 224.0.0.1\n", 1, "multicast"),
            (
                "a 198.51.100.1 tunnel=203.0.113.1 tunnel=203.0.113.2\n",
                1,
                "two tunnel= addresses",
            ),
            (
                "a tunnel=203.0.113.1\nb 198.51.100.2\nc 203.0.113.1\n",
                1,
                "also listed by node \"c\"",
            ),
            ("a tunnel=nope\n", 1, "not an IPv4 or IPv6 address"),
        ];
        for (text, line, reason) in cases {
            let e = parse(text).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("nodes.txt:{line}: ")),
                "{text:?}: {msg}"
            );
            assert!(msg.contains(reason), "{text:?}: {msg}");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_table_parses_or_errs_without_panicking() {
        let text = "# nodes\nedge-a 198.51.100.10 203.0.113.10\nedge-b 2001:db8::12 # v6\n";
        for n in 0..=text.len() {
            if let Ok(t) = parse(&text[..n]) {
                // Whatever parsed is a subset of the whole table.
                let full = parse(text).unwrap();
                assert!(
                    t.nodes.keys().all(|k| full.nodes.contains_key(k)),
                    "prefix {n}: {t:?}"
                );
            }
        }
        assert_eq!(parse(text).unwrap().nodes.len(), 2);
    }

    #[test]
    fn word_conversion_round_trips() {
        let b: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12,
        ];
        assert_eq!(words_to_bytes(&ip6_words(&b)), b);
    }
}
