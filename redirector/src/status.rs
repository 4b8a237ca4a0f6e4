//! `redirector status`: what is attached where, with which maps and counters.
use std::{fmt, net::SocketAddr, path::Path};

use redirector_common::{Ingress, counter, program_names};

use crate::{
    cgroup, error::Result, loader::pinned_link_info, maps::PinnedMaps, node_table::words_to_bytes,
};

#[derive(Debug, serde::Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    /// None: no pinned link.
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    pub attached: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<String>,
    pub programs: Vec<ProgramStatus>,
    pub node_addresses_v4: usize,
    pub node_addresses_v6: usize,
    pub ports: Vec<u16>,
    pub host_ingress4: Option<SocketAddr>,
    pub pod_ingress4: Option<SocketAddr>,
    pub host_ingress6: Option<SocketAddr>,
    pub pod_ingress6: Option<SocketAddr>,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

/// The socket address of an ingress slot, None if unset.
pub fn ingress_addr(i: &Ingress) -> Option<SocketAddr> {
    (i.port != 0).then(|| {
        SocketAddr::new(
            std::net::IpAddr::from(words_to_bytes(&i.ip)).to_canonical(),
            i.port,
        )
    })
}

pub fn status(pin_dir: &Path) -> Result<Status> {
    let maps = PinnedMaps::open(pin_dir)?;
    let mut programs = Vec::new();
    let mut cgroup_id = None;
    for name in program_names::ALL {
        let info = pinned_link_info(pin_dir, name);
        if let Some(i) = info.filter(|i| i.cgroup_id != 0) {
            cgroup_id.get_or_insert(i.cgroup_id);
        }
        programs.push(ProgramStatus {
            name,
            link_id: info.map(|i| i.id),
            program_id: info.map(|i| i.prog_id),
            attached: info.is_some_and(|i| i.cgroup_id != 0),
        });
    }
    let (v4, v6) = maps.node_counts();
    let cfg = maps.config()?;
    let c = maps.counters()?;
    Ok(Status {
        pin_dir: pin_dir.display().to_string(),
        cgroup_id,
        cgroup_path: cgroup_id
            .and_then(cgroup::path_of_cgroup_id)
            .map(|p| p.display().to_string()),
        programs,
        node_addresses_v4: v4,
        node_addresses_v6: v6,
        ports: maps.ports()?.into_iter().collect(),
        host_ingress4: ingress_addr(&cfg.host4),
        pod_ingress4: ingress_addr(&cfg.pod4),
        host_ingress6: ingress_addr(&cfg.host6),
        pod_ingress6: ingress_addr(&cfg.pod6),
        counters: counter::NAMES.iter().copied().zip(c).collect(),
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |a: &Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        writeln!(f, "pin dir:     {}", self.pin_dir)?;
        match (self.cgroup_id, &self.cgroup_path) {
            (Some(id), Some(p)) => writeln!(f, "attached to: {p} (cgroup id {id})")?,
            (Some(id), None) => writeln!(f, "attached to: cgroup id {id}")?,
            _ => writeln!(
                f,
                "attached to: NOTHING (no live link; run `redirector run`)"
            )?,
        }
        writeln!(f, "programs:")?;
        for p in &self.programs {
            match (p.link_id, p.program_id) {
                (Some(l), Some(prog)) => writeln!(
                    f,
                    "  {:<20} link {l:<6} prog {prog:<6} {}",
                    p.name,
                    if p.attached { "attached" } else { "DETACHED" }
                )?,
                _ => writeln!(f, "  {:<20} not installed", p.name)?,
            }
        }
        writeln!(
            f,
            "nodes:       {} IPv4 + {} IPv6 addresses",
            self.node_addresses_v4, self.node_addresses_v6
        )?;
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        writeln!(f, "ports:       {}", ports.join(", "))?;
        writeln!(
            f,
            "ingress:     host {} / pod {} (IPv4); host {} / pod {} (IPv6)",
            opt(&self.host_ingress4),
            opt(&self.pod_ingress4),
            opt(&self.host_ingress6),
            opt(&self.pod_ingress6)
        )?;
        writeln!(f, "counters:")?;
        for (k, v) in &self.counters {
            writeln!(f, "  {k:<22} {v}")?;
        }
        Ok(())
    }
}
