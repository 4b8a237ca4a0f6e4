//! Typed access to the redirector's pinned maps. Every user of the maps (the `run` loop, the
//! CLI's `status` and `ports`, the ingress's original-destination lookup) opens them from
//! their pins, so a restarted or second process sees exactly what the kernel uses.
use std::{collections::BTreeSet, os::fd::AsFd, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use redirector_common::{Config, Ip6Words, NodeValue, PortValue, capacity, counter, map_names};

use crate::{
    error::{Error, Result},
    node_table::KernelEntries,
};

pub struct PinnedMaps {
    nodes4: HashMap<MapData, u32, NodeValue>,
    nodes6: HashMap<MapData, Ip6Words, NodeValue>,
    /// Second handles on the node maps for batch writes (aya has no batch API).
    nodes4_raw: MapData,
    nodes6_raw: MapData,
    ports: HashMap<MapData, u16, PortValue>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
}

/// Result of bringing the node maps in line with a node table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

pub(crate) fn open_map(pin_dir: &Path, name: &str) -> Result<MapData> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(Error::NotInstalled {
            pin_dir: pin_dir.to_owned(),
        });
    }
    MapData::from_pin(&path)
        .map_err(|e| Error::ebpf(format!("opening pinned map {}", path.display()), e))
}

fn typed<T: TryFrom<Map, Error = MapError>>(name: &str, map: Map) -> Result<T> {
    T::try_from(map).map_err(|e| Error::ebpf(format!("map {name} has an unexpected type or layout (pins from another version? run `redirector uninstall`)"), e))
}

/// The kernel-internal "operation not supported" some BPF commands return (not in libc).
pub(crate) const ENOTSUPP: i32 = 524;

/// True when a map update failed because the map is full (hash maps return E2BIG).
fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let m = |n| open_map(pin_dir, n);
        Ok(Self {
            nodes4: typed(map_names::NODES4, Map::HashMap(m(map_names::NODES4)?))?,
            nodes6: typed(map_names::NODES6, Map::HashMap(m(map_names::NODES6)?))?,
            nodes4_raw: m(map_names::NODES4)?,
            nodes6_raw: m(map_names::NODES6)?,
            ports: typed(map_names::PORTS, Map::HashMap(m(map_names::PORTS)?))?,
            config: typed(map_names::CONFIG, Map::Array(m(map_names::CONFIG)?))?,
            counters: typed(
                map_names::COUNTERS,
                Map::PerCpuArray(m(map_names::COUNTERS)?),
            )?,
        })
    }

    pub fn config(&self) -> Result<Config> {
        self.config
            .get(&0, 0)
            .map_err(|e| Error::ebpf("reading CONFIG", e))
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        self.config
            .set(0, cfg, 0)
            .map_err(|e| Error::ebpf("writing CONFIG", e))
    }

    pub fn ports(&self) -> Result<BTreeSet<u16>> {
        self.ports
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| Error::ebpf("reading PORTS", e))
    }

    pub fn add_port(&mut self, port: u16) -> Result<()> {
        if port == 0 {
            return Err(Error::Config("port 0 cannot be redirected".into()));
        }
        self.ports
            .insert(&port, &PortValue::default(), 0)
            .map_err(|e| {
                if is_full(&e) {
                    Error::MapFull {
                        map: map_names::PORTS,
                        capacity: capacity::PORTS,
                        what: format!("port {port}"),
                        flag: "(fixed capacity)",
                    }
                } else {
                    Error::ebpf(format!("adding port {port}"), e)
                }
            })
    }

    /// Removes a port; Ok(false) if it was not redirected.
    pub fn remove_port(&mut self, port: u16) -> Result<bool> {
        match self.ports.remove(&port) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(Error::ebpf(format!("removing port {port}"), e)),
        }
    }

    /// Makes the redirected port set exactly `ports`.
    pub fn set_ports(&mut self, ports: &BTreeSet<u16>) -> Result<()> {
        let current = self.ports()?;
        for p in ports.difference(&current) {
            self.add_port(*p)?;
        }
        for p in current.difference(ports) {
            self.remove_port(*p)?;
        }
        Ok(())
    }

    /// Brings NODES4/NODES6 in line with `want`: only differences are written, so a change of
    /// one node is one or two map operations whatever the table size, and the maps are never
    /// empty in between (no connection escapes during a reload).
    pub fn sync_nodes(&mut self, want: &KernelEntries, max_entries: u32) -> Result<SyncStats> {
        let mut stats = SyncStats::default();
        sync_one(
            &mut self.nodes4,
            &self.nodes4_raw,
            &want.v4,
            map_names::NODES4,
            max_entries,
            &mut stats,
            |k| std::net::Ipv4Addr::from(k.to_ne_bytes()).to_string(),
        )?;
        sync_one(
            &mut self.nodes6,
            &self.nodes6_raw,
            &want.v6,
            map_names::NODES6,
            max_entries,
            &mut stats,
            |k| std::net::Ipv6Addr::from(crate::node_table::words_to_bytes(k)).to_string(),
        )?;
        Ok(stats)
    }

    /// Adds or updates one node address: one map operation, whatever the table size. This is
    /// what a watcher event for a single node costs.
    pub fn upsert_node_address(
        &mut self,
        ip: std::net::IpAddr,
        value: NodeValue,
        max_entries: u32,
    ) -> Result<()> {
        let full = |e: &MapError, name| {
            is_full(e).then(|| Error::MapFull {
                map: name,
                capacity: max_entries,
                what: format!("node address {ip}"),
                flag: "--max-node-addresses",
            })
        };
        match ip.to_canonical() {
            std::net::IpAddr::V4(v4) => self
                .nodes4
                .insert(&u32::from_ne_bytes(v4.octets()), &value, 0)
                .map_err(|e| {
                    full(&e, map_names::NODES4)
                        .unwrap_or_else(|| Error::ebpf(format!("adding {ip}"), e))
                }),
            std::net::IpAddr::V6(v6) => self
                .nodes6
                .insert(&crate::node_table::ip6_words(&v6.octets()), &value, 0)
                .map_err(|e| {
                    full(&e, map_names::NODES6)
                        .unwrap_or_else(|| Error::ebpf(format!("adding {ip}"), e))
                }),
        }
    }

    /// Removes one node address; Ok(false) if it was not there.
    pub fn remove_node_address(&mut self, ip: std::net::IpAddr) -> Result<bool> {
        let r = match ip.to_canonical() {
            std::net::IpAddr::V4(v4) => self.nodes4.remove(&u32::from_ne_bytes(v4.octets())),
            std::net::IpAddr::V6(v6) => self
                .nodes6
                .remove(&crate::node_table::ip6_words(&v6.octets())),
        };
        match r {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(Error::ebpf(format!("removing {ip}"), e)),
        }
    }

    /// The kernel's entry for one node address (None: not an edge node address there).
    pub fn node_value(&self, ip: std::net::IpAddr) -> Result<Option<NodeValue>> {
        let r = match ip.to_canonical() {
            std::net::IpAddr::V4(v4) => self.nodes4.get(&u32::from_ne_bytes(v4.octets()), 0),
            std::net::IpAddr::V6(v6) => self
                .nodes6
                .get(&crate::node_table::ip6_words(&v6.octets()), 0),
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(Error::ebpf(format!("looking up {ip}"), e)),
        }
    }

    /// (IPv4, IPv6) node addresses in the kernel maps.
    pub fn node_counts(&self) -> (usize, usize) {
        (
            self.nodes4.keys().filter(Result::is_ok).count(),
            self.nodes6.keys().filter(Result::is_ok).count(),
        )
    }

    /// Counter totals over all CPUs, indexed by [`redirector_common::counter`].
    pub fn counters(&self) -> Result<[u64; counter::LEN as usize]> {
        let mut out = [0u64; counter::LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(|e| Error::ebpf("reading COUNTERS", e))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}

/// A batch operation this kernel does not have (before 5.6).
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(ENOTSUPP) | Some(libc::EOPNOTSUPP)
    )
}

fn sync_one<K: aya::Pod + Ord + Copy + Default>(
    map: &mut HashMap<MapData, K, NodeValue>,
    raw: &MapData,
    want: &std::collections::BTreeMap<K, NodeValue>,
    name: &'static str,
    max_entries: u32,
    stats: &mut SyncStats,
    show: impl Fn(&K) -> String,
) -> Result<()> {
    // Batched where the kernel can (5.6+): a 100,000-entry map is read in a few syscalls.
    let current: std::collections::BTreeMap<K, NodeValue> =
        match crate::sys::map_lookup_all::<K, NodeValue>(raw.fd().as_fd()) {
            Ok(v) => v.into_iter().collect(),
            Err(e) if unsupported(&e) => map
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|e| Error::ebpf(format!("reading {name}"), e))?,
            Err(e) => return Err(Error::io(format!("reading {name}"), e)),
        };
    // Removals first, so a table that shrinks and grows in one step fits the map.
    let gone: Vec<K> = current
        .keys()
        .filter(|k| !want.contains_key(k))
        .copied()
        .collect();
    let (deleted, r) = if gone.is_empty() {
        (0, Ok(()))
    } else {
        crate::sys::map_delete_batch(raw.fd().as_fd(), &gone)
    };
    match r {
        Ok(()) => stats.removed += gone.len(),
        // Unsupported, or a key gone meanwhile (ENOENT stops the batch): one by one.
        Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::ENOENT) => {
            stats.removed += deleted;
            for k in &gone[deleted..] {
                match map.remove(k) {
                    Ok(()) | Err(MapError::KeyNotFound) => stats.removed += 1,
                    Err(MapError::SyscallError(s))
                        if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
                    {
                        stats.removed += 1
                    }
                    Err(e) => {
                        return Err(Error::ebpf(format!("removing {} from {name}", show(k)), e));
                    }
                }
            }
        }
        Err(e) => return Err(Error::io(format!("removing entries from {name}"), e)),
    }
    let (keys, values): (Vec<K>, Vec<NodeValue>) = want
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .unzip();
    let full = |k: &K| Error::MapFull {
        map: name,
        capacity: max_entries,
        what: format!("node address {}", show(k)),
        flag: "--max-node-addresses",
    };
    // One syscall for the whole change; fall back to single updates where batching is
    // unsupported (kernels before 5.6).
    if keys.is_empty() {
        return Ok(());
    }
    let (done, r) = crate::sys::map_update_batch(raw.fd().as_fd(), &keys, &values);
    match r {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
            return Err(full(&keys[done.min(keys.len() - 1)]));
        }
        Err(e) if unsupported(&e) => {
            for (k, v) in keys.iter().zip(&values).skip(done) {
                map.insert(k, v, 0).map_err(|e| {
                    if is_full(&e) {
                        full(k)
                    } else {
                        Error::ebpf(format!("adding {} to {name}", show(k)), e)
                    }
                })?;
            }
        }
        Err(e) => {
            return Err(Error::io(
                format!("writing {} entries to {name}", keys.len()),
                e,
            ));
        }
    }
    for k in &keys {
        if current.contains_key(k) {
            stats.updated += 1
        } else {
            stats.added += 1
        }
    }
    Ok(())
}
