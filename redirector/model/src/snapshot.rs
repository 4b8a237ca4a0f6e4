//! One version of the node set as its followers see it: the table file (the *base*, loaded
//! and indexed once) plus the journal entries applied on top of it (the *delta*). A journal
//! entry costs a copy of the delta, never of the base, so one node's change beside 100,000
//! takes microseconds; the writer keeps the delta short by rewriting the table now and then.
use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    journal::Entry,
    node_table::NodeTable,
    routes::{Route, Routes},
};

/// The table file as loaded: the table, its routes, and the generation its header names.
#[derive(Debug)]
pub struct Base {
    pub table: NodeTable,
    pub routes: Routes,
    /// `None` for a table without a `# generation` header (written by hand): no journal
    /// applies to it.
    pub generation: Option<u64>,
}

/// A node as the delta holds it: its addresses (tunnel address included) and tunnel address.
type NodeEntry = (Vec<IpAddr>, Option<IpAddr>);

#[derive(Debug, Clone, Default)]
struct Delta {
    /// Node -> its entry now (`None`: removed), for nodes the journal changed.
    nodes: HashMap<String, Option<NodeEntry>>,
    /// Address -> its route now (`None`: no route), for addresses the journal touched.
    routes: HashMap<IpAddr, Option<Route>>,
    /// Nodes now, minus the base's count.
    count: isize,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    base: Arc<Base>,
    delta: Delta,
    /// The addresses each applied journal entry touched, in order: what a follower that
    /// applied the first `k` entries must look at again to catch up.
    touched: Vec<Arc<[IpAddr]>>,
}

impl Snapshot {
    pub fn new(table: NodeTable, generation: Option<u64>) -> Self {
        let routes = Routes::from_table(&table);
        Snapshot {
            base: Arc::new(Base {
                table,
                routes,
                generation,
            }),
            delta: Delta::default(),
            touched: Vec::new(),
        }
    }

    pub fn generation(&self) -> Option<u64> {
        self.base.generation
    }

    /// Journal entries applied on top of the table file.
    pub fn journal_entries(&self) -> usize {
        self.touched.len()
    }

    /// Whether both are the same table file with journal entries on top (so the later one is
    /// the earlier one plus entries, and [`Snapshot::touched_since`] tells the difference).
    pub fn same_base(&self, other: &Snapshot) -> bool {
        Arc::ptr_eq(&self.base, &other.base)
    }

    /// Every address the journal entries after the first `applied` touched (may repeat).
    pub fn touched_since(&self, applied: usize) -> impl Iterator<Item = IpAddr> + '_ {
        self.touched
            .get(applied..)
            .unwrap_or_default()
            .iter()
            .flat_map(|a| a.iter().copied())
    }

    pub fn route(&self, ip: &IpAddr) -> Option<Route> {
        let ip = ip.to_canonical();
        match self.delta.routes.get(&ip) {
            Some(r) => r.clone(),
            None => self.base.routes.get(&ip).cloned(),
        }
    }

    /// A node's addresses (its tunnel address among them) and its tunnel address.
    pub fn node(&self, id: &str) -> Option<(&[IpAddr], Option<IpAddr>)> {
        match self.delta.nodes.get(id) {
            Some(Some((addrs, tunnel))) => Some((addrs.as_slice(), *tunnel)),
            Some(None) => None,
            None => self
                .base
                .table
                .nodes
                .get(id)
                .map(|a| (a.as_slice(), self.base.table.tunnel.get(id).copied())),
        }
    }

    pub fn len(&self) -> usize {
        (self.base.table.nodes.len() as isize + self.delta.count).max(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every node's name, sorted.
    pub fn node_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .base
            .table
            .nodes
            .keys()
            .filter(|n| !self.delta.nodes.contains_key(*n))
            .cloned()
            .chain(
                self.delta
                    .nodes
                    .iter()
                    .filter(|(_, e)| e.is_some())
                    .map(|(n, _)| n.clone()),
            )
            .collect();
        names.sort_unstable();
        names
    }

    /// Addresses shared by several nodes, with those nodes (sorted by name).
    pub fn ambiguous(&self) -> Vec<(IpAddr, Vec<Arc<str>>)> {
        let from_base = self
            .base
            .routes
            .ambiguous()
            .filter(|(ip, _)| !self.delta.routes.contains_key(*ip))
            .map(|(ip, n)| (*ip, n.to_vec()));
        let from_delta = self.delta.routes.iter().filter_map(|(ip, r)| match r {
            Some(Route::Ambiguous(n)) => Some((*ip, n.clone())),
            _ => None,
        });
        from_base.chain(from_delta).collect()
    }

    /// The whole table: borrowed when no journal entry applies, built otherwise (a copy of
    /// the fleet: for the consumers that need every node, such as hosts files).
    pub fn table(&self) -> Cow<'_, NodeTable> {
        if self.delta.nodes.is_empty() {
            return Cow::Borrowed(&self.base.table);
        }
        let mut t = self.base.table.clone();
        for (id, e) in &self.delta.nodes {
            match e {
                Some((addrs, tunnel)) => {
                    t.nodes.insert(id.clone(), addrs.clone());
                    match tunnel {
                        Some(ip) => t.tunnel.insert(id.clone(), *ip),
                        None => t.tunnel.remove(id),
                    };
                }
                None => {
                    t.nodes.remove(id);
                    t.tunnel.remove(id);
                }
            }
        }
        Cow::Owned(t)
    }

    /// This snapshot with `entry` applied, or why it cannot be (the table it would make is
    /// one [`NodeTable::parse`] refuses: a tunnel address another node lists).
    pub fn with(&self, entry: &Entry) -> Result<Snapshot, String> {
        let mut next = self.clone();
        next.push(entry)?;
        Ok(next)
    }

    /// Applies `entry` in place (a batch of entries costs one copy of the delta, not one
    /// each); a refused entry changes nothing.
    pub fn push(&mut self, entry: &Entry) -> Result<(), String> {
        let touched = self.apply(entry)?;
        self.touched.push(touched.into());
        Ok(())
    }

    /// Checks before it changes anything, so a refusal leaves `self` as it was.
    fn apply(&mut self, entry: &Entry) -> Result<Vec<IpAddr>, String> {
        let (id, new) = match entry {
            Entry::Upsert { id, addrs, tunnel } => (id, Some((addrs.clone(), *tunnel))),
            Entry::Remove { id } => (id, None),
        };
        let old: Option<NodeEntry> = self.node(id).map(|(a, t)| (a.to_vec(), t));
        if let Some((addrs, tunnel)) = &new {
            self.check(id, addrs, *tunnel)?;
        }
        let old_addrs: &[IpAddr] = old.as_ref().map(|(a, _)| a.as_slice()).unwrap_or_default();
        let new_addrs: &[IpAddr] = new.as_ref().map(|(a, _)| a.as_slice()).unwrap_or_default();
        let name: Arc<str> = Arc::from(id.as_str());
        let mut touched = Vec::new();
        for ip in old_addrs.iter().filter(|a| !new_addrs.contains(a)) {
            let mut owners = self.owners(ip);
            owners.retain(|n| **n != **id);
            self.delta.routes.insert(*ip, route_of(owners));
            touched.push(*ip);
        }
        for ip in new_addrs.iter().filter(|a| !old_addrs.contains(a)) {
            let mut owners = self.owners(ip);
            if let Err(at) = owners.binary_search(&name) {
                owners.insert(at, name.clone());
            }
            self.delta.routes.insert(*ip, route_of(owners));
            touched.push(*ip);
        }
        self.delta.count += new.is_some() as isize - old.is_some() as isize;
        if new.is_none() && !self.base.table.nodes.contains_key(id.as_str()) {
            // Added and removed since the table file: nothing of it is left to remember.
            self.delta.nodes.remove(id.as_str());
        } else {
            self.delta.nodes.insert(id.clone(), new);
        }
        Ok(touched)
    }

    /// The nodes that list `ip` now, sorted by name.
    fn owners(&self, ip: &IpAddr) -> Vec<Arc<str>> {
        match self.route(ip) {
            None => Vec::new(),
            Some(Route::Node(n)) => vec![n],
            Some(Route::Ambiguous(v)) => v,
        }
    }

    /// The rule [`NodeTable::parse`] enforces: a tunnel address belongs to one node only.
    fn check(&self, id: &str, addrs: &[IpAddr], tunnel: Option<IpAddr>) -> Result<(), String> {
        if let Some(t) = tunnel
            && let Some(other) = self.owners(&t).into_iter().find(|n| **n != *id)
        {
            return Err(format!(
                "tunnel address {t} of node {id:?} is also listed by node {other:?}; a tunnel address must belong to one node only"
            ));
        }
        let mut seen = HashSet::new();
        for ip in addrs
            .iter()
            .filter(|a| Some(**a) != tunnel && seen.insert(**a))
        {
            for other in self.owners(ip).into_iter().filter(|n| **n != *id) {
                if self.node(&other).and_then(|(_, t)| t) == Some(*ip) {
                    return Err(format!(
                        "address {ip} of node {id:?} is the tunnel address of node {other:?}; a tunnel address must belong to one node only"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn route_of(mut owners: Vec<Arc<str>>) -> Option<Route> {
    match owners.len() {
        0 => None,
        1 => owners.pop().map(Route::Node),
        _ => Some(Route::Ambiguous(owners)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Random changes applied one at a time give the routes a fresh parse of the resulting
    /// table gives, address by address (shared addresses included), and the same table.
    #[test]
    fn entries_applied_one_by_one_route_as_the_whole_table_would() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let addr = |i: u64| IpAddr::from([192, 0, 2, i as u8]);
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!("edge-{i} {} tunnel=100.64.0.{i}\n", addr(i % 30)));
        }
        let start = NodeTable::parse(&text, Path::new("t")).unwrap();
        let mut snap = Snapshot::new(start, Some(1));
        let mut refused = 0;
        for step in 0..2_000 {
            let id = format!("edge-{}", next(60));
            let entry = if next(4) == 0 {
                Entry::Remove { id }
            } else {
                let tunnel = (next(3) > 0).then(|| IpAddr::from([100, 64, 1, next(250) as u8]));
                let mut addrs: Vec<IpAddr> = (0..=next(2))
                    .map(|_| match next(6) {
                        // Sometimes another node's tunnel address: refused.
                        0 => IpAddr::from([100, 64, 1, next(250) as u8]),
                        _ => addr(next(30)),
                    })
                    .collect();
                let mut seen = HashSet::new();
                addrs.retain(|a| seen.insert(*a));
                // As the table format holds them: the tunnel address last.
                if let Some(t) = tunnel {
                    addrs.retain(|a| *a != t);
                    addrs.push(t);
                }
                Entry::Upsert { id, addrs, tunnel }
            };
            let whole = snap.table().into_owned();
            match snap.with(&entry) {
                Ok(s) => snap = s,
                Err(reason) => {
                    // Refused exactly when the table it would make is refused.
                    let mut t = whole.clone();
                    if let Entry::Upsert { id, addrs, tunnel } = &entry {
                        t.nodes.insert(id.clone(), addrs.clone());
                        match tunnel {
                            Some(ip) => t.tunnel.insert(id.clone(), *ip),
                            None => t.tunnel.remove(id),
                        };
                    }
                    assert!(
                        NodeTable::parse(&t.render(), Path::new("t")).is_err(),
                        "step {step}: {entry:?} refused ({reason}) but the table parses"
                    );
                    refused += 1;
                    continue;
                }
            }
            let table = snap.table().into_owned();
            let reparsed = NodeTable::parse(&table.render(), Path::new("t"))
                .unwrap_or_else(|e| panic!("step {step}: {entry:?} made a bad table: {e}"));
            assert_eq!(reparsed, table, "step {step}");
            let fresh = Routes::from_table(&table);
            for i in 0..=255u8 {
                for ip in [
                    IpAddr::from([192, 0, 2, i]),
                    IpAddr::from([100, 64, 1, i]),
                    IpAddr::from([100, 64, 0, i]),
                ] {
                    assert_eq!(
                        snap.route(&ip),
                        fresh.get(&ip).cloned(),
                        "step {step}: {ip}"
                    );
                }
            }
            assert_eq!(snap.len(), table.nodes.len());
            assert_eq!(
                snap.node_names(),
                table.nodes.keys().cloned().collect::<Vec<_>>()
            );
            assert_eq!(snap.ambiguous().len(), fresh.ambiguous().count());
        }
        assert!(
            snap.journal_entries() > 1_000,
            "{} applied",
            snap.journal_entries()
        );
        assert!(
            refused > 50,
            "only {refused} refused: the refusal rules went untested"
        );
    }
}
