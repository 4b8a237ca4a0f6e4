//! One Node's change without a pass over the fleet: the node's entry goes to the node table's
//! journal, and a new node's tunnel address to the allocation store by a compare-and-swap on
//! the version last seen. Anything this path cannot decide alone (a conflict with another
//! replica, a full pool, an address problem to report, an entry the table's rules refuse)
//! falls back to the full reconciliation, which decides as before.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use edge_model::journal::Entry;

use super::{
    error::Result,
    model::{self, EdgeNode},
    pool::{Allocations, Pool},
    store::AllocationStore,
    sync::{SyncConfig, SyncMetrics, SyncState},
};

/// The allocations as last read or written, and which pool indices they use.
pub struct Cache {
    allocations: Allocations,
    version: String,
    used: BTreeSet<u128>,
    /// No index below this one is free (searches start here).
    hint: u128,
}

impl Cache {
    pub fn new(allocations: &Allocations, version: String, pool: &Pool) -> Self {
        Cache {
            used: allocations
                .values()
                .filter_map(|ip| pool.index(*ip))
                .collect(),
            allocations: allocations.clone(),
            version,
            hint: 0,
        }
    }

    /// The lowest free index from the hint on (as the full plan gives the lowest free one).
    fn free(&mut self, pool: &Pool) -> Option<u128> {
        let mut i = self.hint;
        for u in self.used.range(self.hint..) {
            if *u != i {
                break;
            }
            i += 1;
        }
        self.hint = i;
        (i < pool.size()).then_some(i)
    }
}

/// Applies one node's change (`node`: its entry now, None when it is gone). Ok(true): the
/// journal has it (or nothing changed); Ok(false): the caller must reconcile in full.
pub async fn apply_one<S: AllocationStore + Sync>(
    name: &str,
    node: Option<&EdgeNode>,
    store: &S,
    cfg: &SyncConfig,
    state: &mut SyncState,
    metrics: &SyncMetrics,
) -> Result<bool> {
    let (Some(writer), Some(cache)) = (state.writer.as_mut(), state.cache.as_mut()) else {
        return Ok(false);
    };
    let Some(current) = writer.current() else {
        return Ok(false);
    };
    let entry = match node {
        None => {
            if current.node(name).is_none() {
                return Ok(true);
            }
            if cache.allocations.contains_key(name) {
                // Held for --release-after, released by a full reconciliation.
                state
                    .missing
                    .0
                    .entry(name.to_owned())
                    .or_insert_with(Instant::now);
            }
            Entry::Remove {
                id: name.to_owned(),
            }
        }
        Some(n) => {
            if !n.problems.is_empty() {
                // Reported, once, by the full reconciliation.
                return Ok(false);
            }
            let tunnel = match cache
                .allocations
                .get(name)
                .copied()
                .filter(|ip| cfg.pool.contains(*ip))
            {
                Some(ip) => ip,
                None if cache.allocations.contains_key(name) => return Ok(false),
                None => {
                    let Some(i) = cache.free(&cfg.pool) else {
                        return Ok(false);
                    };
                    let ip = cfg.pool.nth(i);
                    let Some(v) = store
                        .append(&cache.allocations, name, ip, &cache.version)
                        .await?
                    else {
                        tracing::debug!(node = %name, "allocation store changed since last read; reconciling in full");
                        return Ok(false);
                    };
                    cache.version = v;
                    cache.allocations.insert(name.to_owned(), ip);
                    cache.used.insert(i);
                    tracing::info!(node = %name, %ip, "tunnel address assigned");
                    ip
                }
            };
            let one = model::table(
                std::slice::from_ref(n),
                &BTreeMap::from([(name.to_owned(), tunnel)]),
            );
            match one.nodes.into_iter().next() {
                Some((id, addrs)) => Entry::Upsert {
                    id,
                    addrs,
                    tunnel: Some(tunnel),
                },
                None => Entry::Remove {
                    id: name.to_owned(),
                },
            }
        }
    };
    if node.is_some() {
        state.missing.0.remove(name);
    }
    if let Entry::Upsert { id, addrs, tunnel } = &entry
        && current.node(id) == Some((addrs.as_slice(), *tunnel))
    {
        return Ok(true);
    }
    if let Err(e) = writer.change(entry) {
        tracing::debug!("single-node change refused ({e}); reconciling in full");
        return Ok(false);
    }
    if let Some(c) = writer.current() {
        metrics.nodes.set(c.len() as i64);
    }
    metrics.pool_allocated.set(cache.allocations.len() as i64);
    Ok(true)
}
