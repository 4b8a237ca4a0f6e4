//! What a process holds, from `/proc`: resident memory, open descriptors and threads, the
//! figures a leak shows in first. Resident memory is given whole and as its anonymous part
//! (heap and stacks, what a leak grows): the rest is pages of the binary and libraries, shared
//! with every process mapping them, and it drifts with what the page cache holds (a process
//! started afresh every cycle drifted by 200 KiB an hour in the soak).
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub rss_anon_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

impl ProcStats {
    /// Zeros once the process is gone.
    pub fn of(pid: u32) -> Self {
        let count = |dir: &str| {
            std::fs::read_dir(format!("/proc/{pid}/{dir}")).map_or(0, |d| d.count() as u64)
        };
        let anon = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("RssAnon:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0);
        Self {
            rss_kib: crate::bench::rss_kib(pid),
            rss_anon_kib: anon,
            fds: count("fd"),
            threads: count("task"),
        }
    }
}

/// A process's credentials, from `/proc/PID/status`: real uid and the capability sets (hex
/// masks as the kernel prints them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_inh: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

impl Credentials {
    pub fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        let caps = |name: &str| {
            u64::from_str_radix(field(name), 16).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        Self {
            uid: field("Uid:")
                .split_whitespace()
                .next()
                .and_then(|u| u.parse().ok())
                .expect("uid"),
            cap_eff: caps("CapEff:"),
            cap_prm: caps("CapPrm:"),
            cap_inh: caps("CapInh:"),
            cap_bnd: caps("CapBnd:"),
            cap_amb: caps("CapAmb:"),
        }
    }
}
