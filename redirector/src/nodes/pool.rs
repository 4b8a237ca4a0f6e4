//! Tunnel addresses from a configured CIDR: the pure allocation plan. Persistence and
//! compare-and-swap are the store's ([`super::store`]).
use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;

/// Node name -> its tunnel address.
pub use edge_model::allocations::Allocations;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    net: IpNet,
}

impl Pool {
    /// Parses `--pool`, e.g. `100.64.0.0/16` or `fd00:64::/112`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let net: IpNet = s.parse().map_err(|_| {
            format!("--pool {s:?} is not a CIDR; expected e.g. 100.64.0.0/16 or fd00:64::/112")
        })?;
        let pool = Self { net: net.trunc() };
        if pool.size() == 0 {
            return Err(format!(
                "--pool {s} has no usable address; give a larger range"
            ));
        }
        Ok(pool)
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.net, IpNet::V4(_))
    }

    /// Usable addresses: an IPv4 pool larger than /31 skips its network and broadcast
    /// addresses; an IPv6 pool skips the subnet-router anycast address (its first).
    pub fn size(&self) -> u128 {
        let host_bits = u32::from(self.net.max_prefix_len() - self.net.prefix_len());
        let all = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        match self.net {
            IpNet::V4(_) if host_bits >= 2 => all - 2,
            IpNet::V4(_) => all,
            IpNet::V6(_) if host_bits >= 1 => all - 1,
            IpNet::V6(_) => all,
        }
    }

    fn first_usable(&self) -> u128 {
        let host_bits = self.net.max_prefix_len() - self.net.prefix_len();
        match self.net {
            IpNet::V4(_) if host_bits >= 2 => 1,
            IpNet::V6(_) if host_bits >= 1 => 1,
            _ => 0,
        }
    }

    fn base(&self) -> u128 {
        match self.net.network() {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    /// The `i`th usable address (i < size).
    pub(crate) fn nth(&self, i: u128) -> IpAddr {
        let v = self.base() + self.first_usable() + i;
        match self.net {
            IpNet::V4(_) => IpAddr::from((v as u32).to_be_bytes()),
            IpNet::V6(_) => IpAddr::from(v.to_be_bytes()),
        }
    }

    pub(crate) fn index(&self, ip: IpAddr) -> Option<u128> {
        if !self.net.contains(&ip) {
            return None;
        }
        let v = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let i = (v - self.base()).checked_sub(self.first_usable())?;
        (i < self.size()).then_some(i)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.index(ip).is_some()
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.net.fmt(f)
    }
}

/// The allocations after one reconciliation, and what changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub allocations: Allocations,
    /// Nodes that got a new address.
    pub assigned: Vec<(String, IpAddr)>,
    /// Nodes gone: their addresses are free again.
    pub released: Vec<(String, IpAddr)>,
    /// Stored addresses no longer in the pool (the pool was changed): reassigned.
    pub outside: Vec<(String, IpAddr)>,
    /// Nodes left without an address: the pool is full.
    pub exhausted: Vec<String>,
}

/// Keeps every current node's address, frees the addresses of nodes gone, and gives each new
/// node the lowest free address. `hold` names allocated nodes to keep although not wanted:
/// nodes only recently missing from this allocator's view, which may be nodes another replica
/// has seen and this one not yet (releasing those would move a live node's address).
/// Deterministic: the same inputs give the same plan.
pub fn plan(
    current: &Allocations,
    wanted: &BTreeSet<String>,
    hold: &dyn Fn(&str) -> bool,
    pool: &Pool,
) -> Plan {
    let mut p = Plan::default();
    let mut used: BTreeSet<u128> = BTreeSet::new();
    for (name, ip) in current {
        if !wanted.contains(name) && !hold(name) {
            p.released.push((name.clone(), *ip));
            continue;
        }
        match pool.index(*ip) {
            // A duplicate in the store (never written by us) loses its address too.
            Some(i) if used.insert(i) => {
                p.allocations.insert(name.clone(), *ip);
            }
            _ => p.outside.push((name.clone(), *ip)),
        }
    }
    let mut cursor = 0u128;
    let new: Vec<&String> = wanted
        .iter()
        .filter(|n| !p.allocations.contains_key(*n))
        .collect();
    for name in new {
        while cursor < pool.size() && used.contains(&cursor) {
            cursor += 1;
        }
        if cursor >= pool.size() {
            p.exhausted.push(name.clone());
            continue;
        }
        used.insert(cursor);
        let ip = pool.nth(cursor);
        p.allocations.insert(name.clone(), ip);
        p.assigned.push((name.clone(), ip));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sizes_and_bounds() {
        let p = Pool::parse("100.64.0.0/30").unwrap();
        assert_eq!(p.size(), 2);
        assert_eq!(p.nth(0), IpAddr::from([100, 64, 0, 1]));
        assert!(!p.contains(IpAddr::from([100, 64, 0, 0])));
        assert!(!p.contains(IpAddr::from([100, 64, 0, 3])));
        assert_eq!(Pool::parse("100.64.0.7/32").unwrap().size(), 1);
        assert_eq!(Pool::parse("fd00::/120").unwrap().size(), 255);
        assert_eq!(
            Pool::parse("100.64.0.9/24").unwrap().to_string(),
            "100.64.0.0/24"
        );
        assert!(
            Pool::parse("100.64.0.0")
                .unwrap_err()
                .contains("not a CIDR")
        );
    }

    #[test]
    fn keeps_releases_assigns_lowest_free_and_reports_exhaustion() {
        let pool = Pool::parse("100.64.0.0/29").unwrap(); // 6 usable
        let p1 = plan(
            &Allocations::new(),
            &names(&["a", "b", "c"]),
            &|_| false,
            &pool,
        );
        assert_eq!(p1.allocations["a"], IpAddr::from([100, 64, 0, 1]));
        assert_eq!(p1.allocations["c"], IpAddr::from([100, 64, 0, 3]));
        // b leaves, d and e arrive: a and c keep theirs, d gets b's old address.
        let p2 = plan(
            &p1.allocations,
            &names(&["a", "c", "d", "e"]),
            &|_| false,
            &pool,
        );
        assert_eq!(
            p2.released,
            [("b".to_string(), IpAddr::from([100, 64, 0, 2]))]
        );
        assert_eq!(p2.allocations["a"], p1.allocations["a"]);
        assert_eq!(p2.allocations["d"], IpAddr::from([100, 64, 0, 2]));
        assert_eq!(p2.allocations["e"], IpAddr::from([100, 64, 0, 4]));
        // Full: 8 nodes for 6 addresses; the two last get none, the others are untouched.
        let many = names(&["a", "c", "d", "e", "f", "g", "h", "i"]);
        let p3 = plan(&p2.allocations, &many, &|_| false, &pool);
        assert_eq!(p3.allocations.len(), 6);
        assert_eq!(p3.exhausted, ["h", "i"]);
        for (n, ip) in &p2.allocations {
            assert_eq!(p3.allocations[n], *ip);
        }
        // A held node keeps its address although not wanted.
        let held = plan(&p2.allocations, &names(&["a"]), &|n| n == "c", &pool);
        assert_eq!(held.allocations.len(), 2);
        assert_eq!(held.allocations["c"], p2.allocations["c"]);
        // Same inputs, same plan.
        assert_eq!(plan(&p2.allocations, &many, &|_| false, &pool), p3);
    }

    #[test]
    fn addresses_outside_a_changed_pool_or_its_family_are_reassigned() {
        let mut current = Allocations::new();
        current.insert("a".into(), IpAddr::from([10, 0, 0, 5]));
        current.insert("b".into(), "fd00::5".parse().unwrap());
        current.insert("c".into(), IpAddr::from([100, 64, 0, 9]));
        let pool = Pool::parse("100.64.0.0/24").unwrap();
        let p = plan(&current, &names(&["a", "b", "c"]), &|_| false, &pool);
        assert_eq!(p.outside.len(), 2);
        assert_eq!(p.allocations["c"], IpAddr::from([100, 64, 0, 9]));
        assert!(p.allocations.values().all(|ip| pool.contains(*ip)));
        let distinct: BTreeSet<_> = p.allocations.values().collect();
        assert_eq!(distinct.len(), 3);
    }
}
