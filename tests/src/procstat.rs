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
