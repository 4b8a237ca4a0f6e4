//! The pure translation from Node objects to node table entries. No I/O: tested with
//! fixtures (`redirector/tests/fixtures/nodes.json`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Node;

use crate::node_table::{NodeTable, parse_address, validate_node_id};

/// What the redirector needs of one edge node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeNode {
    /// The node's name: its identity everywhere (certificates, sessions, hosts entries).
    pub name: String,
    /// InternalIP and ExternalIP addresses, in the Node's order, usable ones only.
    pub addresses: Vec<IpAddr>,
    /// What was wrong with this node's addresses, each naming the node and the fix. The node
    /// is kept (it stays reachable by name through its tunnel address).
    pub problems: Vec<String>,
}

/// Address types that are IP addresses; Hostname and the DNS types are names, resolved
/// through the tunnel address instead.
const IP_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// One Node -> its entry. `None` for a Node without a valid name (not a valid object).
pub fn edge_node(node: &Node) -> Option<EdgeNode> {
    let name = node.metadata.name.clone()?;
    if let Err(reason) = validate_node_id(&name) {
        // The API server admits only valid names. Anything else (a faulty proxy, a fake API)
        // would garble the node table, the allocation store and the hosts blocks for every
        // node, so it stops here.
        tracing::warn!("Node skipped: {reason}");
        return None;
    }
    let mut addresses = Vec::new();
    let mut problems = Vec::new();
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for a in listed
        .iter()
        .filter(|a| IP_TYPES.contains(&a.type_.as_str()))
    {
        match parse_address(&a.address) {
            Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Ok(_) => {}
            Err(reason) => problems.push(format!(
                "node {name}: {} {:?} skipped: {reason}; fix the node's reported addresses (kubelet --node-ip)",
                a.type_, a.address
            )),
        }
    }
    if addresses.is_empty() {
        problems.push(format!(
            "node {name}: no usable InternalIP or ExternalIP; it is reachable only by name (its tunnel address); check the kubelet's --node-ip"
        ));
    }
    Some(EdgeNode {
        name,
        addresses,
        problems,
    })
}

/// The node table for `nodes` with their tunnel addresses. A node without a tunnel address
/// (pool exhausted) keeps its own addresses; a node with neither is left out (its problem is
/// already reported).
pub fn table(nodes: &[EdgeNode], tunnel: &BTreeMap<String, IpAddr>) -> NodeTable {
    let mut t = NodeTable::default();
    for n in nodes {
        let mut addrs = n.addresses.clone();
        if let Some(ip) = tunnel.get(&n.name) {
            if !addrs.contains(ip) {
                addrs.push(*ip);
            }
            t.tunnel.insert(n.name.clone(), *ip);
        }
        if !addrs.is_empty() {
            t.nodes.insert(n.name.clone(), addrs);
        }
    }
    t
}

/// Addresses listed by more than one node, with those nodes.
pub fn ambiguous(table: &NodeTable) -> BTreeMap<IpAddr, Vec<String>> {
    table
        .owners()
        .into_iter()
        .filter(|(_, o)| o.len() > 1)
        .map(|(ip, o)| (ip, o.into_iter().map(str::to_owned).collect()))
        .collect()
}

/// The names of `nodes`.
pub fn names(nodes: &[EdgeNode]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Vec<Node> {
        serde_json::from_str::<serde_json::Value>(include_str!("../../tests/fixtures/nodes.json"))
            .unwrap()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| serde_json::from_value(v.clone()).unwrap())
            .collect()
    }

    #[test]
    fn fixtures_translate_to_entries_with_problems_named() {
        let nodes: Vec<EdgeNode> = fixture().iter().filter_map(edge_node).collect();
        let by = |n: &str| nodes.iter().find(|e| e.name == n).unwrap();
        assert_eq!(nodes.len(), 5);
        let a = by("edge-shop-17");
        assert_eq!(
            a.addresses,
            [
                "192.168.1.10".parse::<IpAddr>().unwrap(),
                "198.51.100.17".parse().unwrap()
            ]
        );
        assert!(a.problems.is_empty());
        // Hostname is a name, not an address; IPv4-mapped IPv6 is normalised.
        let v6 = by("edge-lab-v6");
        assert_eq!(
            v6.addresses,
            [
                "fd00:10::5".parse::<IpAddr>().unwrap(),
                "203.0.113.5".parse().unwrap()
            ]
        );
        let garbled = by("edge-garbled");
        assert_eq!(garbled.addresses, ["10.20.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(garbled.problems.len(), 2, "{:?}", garbled.problems);
        assert!(
            garbled.problems[0].contains("node edge-garbled: InternalIP \"10.20.0.300\" skipped")
        );
        assert!(garbled.problems[1].contains("loopback"));
        let none = by("edge-no-address");
        assert!(none.addresses.is_empty());
        assert!(none.problems[0].contains("reachable only by name"));
    }

    #[test]
    fn table_adds_tunnel_addresses_and_flags_shared_ones() {
        let nodes: Vec<EdgeNode> = fixture().iter().filter_map(edge_node).collect();
        let mut tunnel = BTreeMap::new();
        for (i, n) in names(&nodes).iter().enumerate() {
            if n != "edge-garbled" {
                tunnel.insert(n.clone(), IpAddr::from([100, 64, 0, i as u8 + 1]));
            }
        }
        let t = table(&nodes, &tunnel);
        // edge-no-address is in, by its tunnel address only.
        assert_eq!(t.nodes["edge-no-address"], [tunnel["edge-no-address"]]);
        // edge-garbled has no tunnel address (say, the pool ran out) but keeps its own.
        assert!(!t.tunnel.contains_key("edge-garbled"));
        assert_eq!(t.nodes["edge-garbled"].len(), 1);
        let amb = ambiguous(&t);
        assert_eq!(amb.len(), 1);
        assert_eq!(
            amb[&"192.168.1.10".parse::<IpAddr>().unwrap()],
            ["edge-shop-17", "edge-shop-18"]
        );
        // And the rendered file parses back to the same table.
        let back = NodeTable::parse(&t.render(), std::path::Path::new("x")).unwrap();
        assert_eq!(back.tunnel, t.tunnel);
        assert_eq!(back.owners().len(), t.owners().len());
    }
}
