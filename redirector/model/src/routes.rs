//! Where connections to an address go, computed once per node table and shared by everyone who
//! needs it (the redirector's ambiguity warnings and counts, the tunnel server's routing).
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::node_table::NodeTable;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The node's name, shared by all its addresses (one allocation per node, not per address).
    Node(Arc<str>),
    /// Several nodes list this address: refused, naming them, never guessed.
    Ambiguous(Vec<Arc<str>>),
}

/// Address -> route.
#[derive(Debug, Clone, Default)]
pub struct Routes(HashMap<IpAddr, Route>);

impl Routes {
    pub fn from_table(table: &NodeTable) -> Self {
        let mut routes: HashMap<IpAddr, Route> = HashMap::with_capacity(table.nodes.len() * 2);
        for (id, addrs) in &table.nodes {
            let id: Arc<str> = Arc::from(id.as_str());
            for ip in addrs {
                match routes.get_mut(ip) {
                    None => {
                        routes.insert(*ip, Route::Node(id.clone()));
                    }
                    Some(Route::Node(first)) => {
                        let first = first.clone();
                        routes.insert(*ip, Route::Ambiguous(vec![first, id.clone()]));
                    }
                    Some(Route::Ambiguous(v)) => v.push(id.clone()),
                }
            }
        }
        Routes(routes)
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&Route> {
        self.0.get(&ip.to_canonical())
    }

    /// Addresses shared by several nodes, with those nodes (in table order: sorted by name).
    pub fn ambiguous(&self) -> impl Iterator<Item = (&IpAddr, &[Arc<str>])> {
        self.0.iter().filter_map(|(ip, r)| match r {
            Route::Ambiguous(nodes) => Some((ip, nodes.as_slice())),
            Route::Node(_) => None,
        })
    }

    /// Every node named by a route, once each.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<str>> {
        let mut seen = std::collections::BTreeSet::new();
        self.0
            .values()
            .flat_map(|r| match r {
                Route::Node(n) => std::slice::from_ref(n),
                Route::Ambiguous(v) => v.as_slice(),
            })
            .filter(move |n| seen.insert(Arc::clone(n)))
    }

    /// How many addresses are routed (each node address once).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn shared_addresses_name_every_owner_and_unique_ones_their_node() {
        let t = NodeTable::parse(
            "edge-a 192.0.2.10 tunnel=198.51.100.10\nedge-b 192.0.2.10 tunnel=198.51.100.11\nedge-c 192.0.2.10\n",
            Path::new("t"),
        )
        .unwrap();
        let r = Routes::from_table(&t);
        assert_eq!(r.len(), 3);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            r.get(&ip("198.51.100.11")),
            Some(&Route::Node(Arc::from("edge-b")))
        );
        // IPv4-mapped lookups find the IPv4 entry.
        assert_eq!(
            r.get(&ip("::ffff:198.51.100.10")),
            Some(&Route::Node(Arc::from("edge-a")))
        );
        let amb: Vec<_> = r.ambiguous().collect();
        assert_eq!(amb.len(), 1);
        let names: Vec<&str> = amb[0].1.iter().map(|n| &**n).collect();
        assert_eq!(names, ["edge-a", "edge-b", "edge-c"]);
    }
}
