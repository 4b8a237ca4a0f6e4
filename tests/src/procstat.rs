//! What a process holds, from `/proc`: resident memory, open descriptors and threads, the
//! figures a leak shows in first.
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

impl ProcStats {
    /// Zeros once the process is gone.
    pub fn of(pid: u32) -> Self {
        let count = |dir: &str| {
            std::fs::read_dir(format!("/proc/{pid}/{dir}")).map_or(0, |d| d.count() as u64)
        };
        Self {
            rss_kib: crate::bench::rss_kib(pid),
            fds: count("fd"),
            threads: count("task"),
        }
    }
}
