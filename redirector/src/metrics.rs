//! The redirector's Prometheus metrics, read from the pinned maps at scrape time: the kernel
//! counters (summed over CPUs), node addresses per family, ports, ambiguous addresses.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use redirector_common::counter;

use crate::maps::PinnedMaps;

/// Registered once; every scrape reads the kernel's current values.
#[derive(Debug)]
pub struct MapsCollector {
    maps: Mutex<PinnedMaps>,
    /// Addresses listed by more than one node in the last applied table.
    pub ambiguous: Arc<AtomicU64>,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedMaps")
    }
}

const HELP: [&str; counter::LEN as usize] = [
    "connect() calls to an edge node port rewritten to the tunnel ingress",
    "TCP connect() calls left alone (not a node address or port)",
    "edge destinations with no ingress configured for their family or namespace",
    "redirects refused (EPERM) because the original destination could not be recorded",
    "redirected connections established without a recorded original destination",
    "original destinations published for the ingress",
    "getpeername() calls answered with the dialled address",
];

impl MapsCollector {
    pub fn new(maps: PinnedMaps, ambiguous: Arc<AtomicU64>) -> Self {
        Self {
            maps: Mutex::new(maps),
            ambiguous,
        }
    }
}

impl Collector for MapsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        // A read error leaves the family out of this scrape rather than failing it.
        if let Ok(values) = maps.counters() {
            for (i, v) in values.iter().enumerate() {
                let name = format!("redirector_{}", counter::NAMES[i]);
                let c = ConstCounter::new(*v);
                c.encode(encoder.encode_descriptor(&name, HELP[i], None, c.metric_type())?)?;
            }
        }
        let (v4, v6) = maps.node_counts();
        let gauges = [
            (
                "redirector_node_addresses_ipv4",
                "IPv4 edge node addresses in the kernel map",
                v4 as i64,
            ),
            (
                "redirector_node_addresses_ipv6",
                "IPv6 edge node addresses in the kernel map",
                v6 as i64,
            ),
            (
                "redirector_ports",
                "Redirected destination ports",
                maps.ports().map(|p| p.len() as i64).unwrap_or(-1),
            ),
            (
                "redirector_ambiguous_addresses",
                "Addresses listed by more than one node (refused by the tunnel)",
                self.ambiguous.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}
