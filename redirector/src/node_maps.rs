//! Keeps the kernel's node maps in step with the followed node set. A new table file is
//! applied whole (one batched diff); journal entries on top of the table already applied are
//! applied address by address, one map operation each, so one node's change beside 100,000
//! costs microseconds, not a pass over the fleet.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use edge_model::{follow::Snapshot, routes::Route};
use redirector_common::{NodeValue, node_flags};

use crate::{error::Result, maps::PinnedMaps};

pub struct NodeMaps {
    pub probe_address: Option<Ipv4Addr>,
    pub max_entries: u32,
    pub hosts_file: Option<PathBuf>,
    pub node_table: PathBuf,
    /// Addresses shared by several nodes now (the `redirector_ambiguous_addresses` gauge).
    pub ambiguous: Arc<AtomicU64>,
    /// What the maps hold (None: unknown, so the next apply is a whole one).
    applied: Option<Arc<Snapshot>>,
}

/// How a snapshot reached the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Whole,
    /// Journal entries applied one address at a time.
    Entries(usize),
}

impl NodeMaps {
    pub fn new(
        probe_address: Option<Ipv4Addr>,
        max_entries: u32,
        hosts_file: Option<PathBuf>,
        node_table: PathBuf,
        ambiguous: Arc<AtomicU64>,
    ) -> Self {
        NodeMaps {
            probe_address,
            max_entries,
            hosts_file,
            node_table,
            ambiguous,
            applied: None,
        }
    }

    /// Brings the maps to `snap`. A failure leaves the maps as they were or partly updated;
    /// either way the next apply is a whole one, so nothing stays behind.
    pub fn apply(&mut self, maps: &mut PinnedMaps, snap: &Arc<Snapshot>) -> Result<Applied> {
        let prev = self.applied.take();
        let done = match prev {
            Some(p) if p.same_base(snap) && p.journal_entries() <= snap.journal_entries() => self
                .apply_entries(maps, &p, snap)
                .map(|()| Applied::Entries(snap.journal_entries() - p.journal_entries()))?,
            _ => self.apply_whole(maps, snap).map(|()| Applied::Whole)?,
        };
        self.applied = Some(snap.clone());
        Ok(done)
    }

    fn apply_whole(&mut self, maps: &mut PinnedMaps, snap: &Snapshot) -> Result<()> {
        let table = snap.table();
        let shared = snap.ambiguous();
        for (ip, owners) in &shared {
            tracing::warn!(%ip, nodes = ?owners, "address shared by several nodes: connections to it will be refused by the tunnel; reach these nodes by their unique addresses");
        }
        self.ambiguous.store(shared.len() as u64, Ordering::Relaxed);
        let mut entries = table.kernel_entries();
        if let Some(p) = self.probe_address {
            // A node's address stays the node's: its clients matter more than the probe.
            match entries.v4.entry(u32::from_ne_bytes(p.octets())) {
                std::collections::btree_map::Entry::Occupied(_) => self.warn_probe_taken(snap),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(NodeValue {
                        flags: node_flags::PROBE,
                    });
                }
            }
        }
        let stats = maps.sync_nodes(&entries, self.max_entries)?;
        tracing::info!(nodes = table.nodes.len(), added = stats.added, updated = stats.updated, removed = stats.removed, file = %self.node_table.display(), "node table applied");
        self.update_hosts(snap)?;
        Ok(())
    }

    fn apply_entries(
        &mut self,
        maps: &mut PinnedMaps,
        was: &Snapshot,
        now: &Snapshot,
    ) -> Result<()> {
        let touched: BTreeSet<IpAddr> = now.touched_since(was.journal_entries()).collect();
        let mut tunnel_changed = false;
        for ip in &touched {
            let before = was.route(ip);
            let after = now.route(ip);
            if before == after {
                continue;
            }
            tunnel_changed |= is_tunnel(was, ip, &before) || is_tunnel(now, ip, &after);
            let probe = self.probe_address.map(IpAddr::V4) == Some(*ip);
            match &after {
                None if probe => maps.upsert_node_address(
                    *ip,
                    NodeValue {
                        flags: node_flags::PROBE,
                    },
                    self.max_entries,
                )?,
                None => {
                    maps.remove_node_address(*ip)?;
                }
                Some(Route::Node(_)) => {
                    maps.upsert_node_address(*ip, NodeValue { flags: 0 }, self.max_entries)?
                }
                Some(Route::Ambiguous(owners)) => {
                    tracing::warn!(%ip, nodes = ?owners, "address shared by several nodes: connections to it will be refused by the tunnel; reach these nodes by their unique addresses");
                    maps.upsert_node_address(
                        *ip,
                        NodeValue {
                            flags: node_flags::AMBIGUOUS,
                        },
                        self.max_entries,
                    )?
                }
            }
            if probe && after.is_some() {
                self.warn_probe_taken(now);
            }
            let amb = |r: &Option<Route>| matches!(r, Some(Route::Ambiguous(_))) as i64;
            match amb(&after) - amb(&before) {
                1 => {
                    self.ambiguous.fetch_add(1, Ordering::Relaxed);
                }
                -1 => {
                    self.ambiguous.fetch_sub(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        tracing::debug!(
            entries = now.journal_entries() - was.journal_entries(),
            addresses = touched.len(),
            "node table journal applied"
        );
        if tunnel_changed {
            // A node came, went or got a new tunnel address: the hosts block names it.
            self.update_hosts(now)?;
        }
        Ok(())
    }

    fn warn_probe_taken(&self, snap: &Snapshot) {
        if let Some(p) = self.probe_address {
            let nodes = match snap.route(&IpAddr::V4(p)) {
                Some(Route::Node(n)) => vec![n],
                Some(Route::Ambiguous(v)) => v,
                None => Vec::new(),
            };
            tracing::warn!(probe = %p, ?nodes, "the probe address (--probe-address) is a node's address: it stays the node's, and the ingress probe fails until another probe address is chosen");
        }
    }

    fn update_hosts(&self, snap: &Snapshot) -> Result<()> {
        if let Some(path) = &self.hosts_file {
            let table = snap.table();
            if crate::hosts::update(path, &table)? {
                tracing::info!(file = %path.display(), names = table.tunnel.len(), "hosts file block updated");
            }
        }
        Ok(())
    }
}

/// Whether `ip` is the tunnel address of the node `route` names in `snap`.
fn is_tunnel(snap: &Snapshot, ip: &IpAddr, route: &Option<Route>) -> bool {
    match route {
        Some(Route::Node(n)) => snap.node(n).and_then(|(_, t)| t) == Some(*ip),
        _ => false,
    }
}
