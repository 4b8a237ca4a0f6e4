//! The redirector's self-check: are its programs still attached where it put them?
//!
//! A pinned link outlives the process that made it, which is what lets a restart keep
//! redirecting; it also means nothing notices when someone detaches one (`bpftool link
//! detach`, a cleanup script removing the pins, a cgroup that is recreated). Redirection then
//! stops silently for that hook while every status looks healthy (cilium #48420 is this
//! failure). So `redirector run` checks each link every `--self-check-interval`, exports what it
//! finds, and attaches a missing program again the way a start does.
//!
//! Whether redirected connections also arrive is the ingress probe's part ([`crate::probe`]).
//!
//! Metrics (read from the pins at scrape time, so a scrape never shows a stale answer):
//! `redirector_program_attached{program}`, `redirector_path_ok` (every program attached at the
//! expected cgroup), and `redirector_program_repairs_total`.
use std::path::PathBuf;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};
use redirector_common::program_names;

use crate::loader::pinned_link_info;

/// Each program and whether its pinned link is attached to `cgroup_id`.
pub fn attached(pin_dir: &std::path::Path, cgroup_id: u64) -> Vec<(&'static str, bool)> {
    program_names::ALL
        .iter()
        .map(|name| {
            let info = pinned_link_info(pin_dir, name);
            (*name, info.is_some_and(|i| i.cgroup_id == cgroup_id))
        })
        .collect()
}

/// The programs that are not attached where they should be.
pub fn detached(pin_dir: &std::path::Path, cgroup_id: u64) -> Vec<&'static str> {
    attached(pin_dir, cgroup_id)
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect()
}

/// The attachment gauges, read from the pins at every scrape.
#[derive(Debug)]
pub struct AttachCollector {
    pub pin_dir: PathBuf,
    pub cgroup_id: u64,
}

impl Collector for AttachCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = attached(&self.pin_dir, self.cgroup_id);
        let mut family = encoder.encode_descriptor(
            "redirector_program_attached",
            "1 when the program's pinned link is attached to the cgroup the redirector attached it to",
            None,
            MetricType::Gauge,
        )?;
        for (name, ok) in &now {
            ConstGauge::new(i64::from(*ok)).encode(family.encode_family(&[("program", *name)])?)?;
        }
        let all = now.iter().all(|(_, ok)| *ok);
        ConstGauge::new(i64::from(all)).encode(encoder.encode_descriptor(
            "redirector_path_ok",
            "1 when every redirector program is attached where expected",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}
