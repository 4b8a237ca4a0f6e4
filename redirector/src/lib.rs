//! User space of the eBPF ingress redirector.
//!
//! Data path: a process in the attached cgroup calls `connect(edge-node-ip, 10250)`; the
//! kernel programs (`redirector-ebpf`) rewrite it to the tunnel ingress and remember the
//! original destination; the ingress accepts and calls [`OrigDstTable::take_for_stream`] to
//! learn which node and port the client meant.
//!
//! Layout:
//! - [`loader`]: load, attach, pin, adopt pins on restart (`BPF_LINK_UPDATE`, no gap).
//! - [`maps`]: typed access to the pinned maps (nodes, ports, config, counters).
//! - [`node_table`]: the static node table file (node ID -> addresses, tunnel address).
//! - [`hosts`]: the managed hosts-file block (node name -> tunnel address).
//! - [`nodes`]: Kubernetes Nodes (or a file) -> node table with tunnel addresses from a pool.
//! - [`origdst`]: original-destination lookup for the ingress.
//! - [`run`]: the long-running `redirector run` loop; [`status`], [`uninstall`] for the CLI.
//! - [`cgroup`], [`bpffs`], [`sys`]: the host facts and raw syscalls underneath.
pub mod bpffs;
pub mod cgroup;
pub mod error;
pub mod hosts;
pub mod http;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod node_table;
pub mod nodes;
pub mod origdst;
pub mod run;
pub mod status;
pub mod sys;
pub mod uninstall;

pub use error::{Error, Result};
pub use origdst::{OrigDstTable, OriginalDst};

/// Where the pins live unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/edge-redirector";
/// The loopback ingress host clients are sent to unless `--host-ingress` says otherwise.
pub const DEFAULT_HOST_INGRESS: &str = "127.0.0.1:10266";
/// kubelet (10250), read-only kubelet (10255), KubeEdge edgecore stream (10350).
pub const DEFAULT_PORTS: &str = "10250,10255,10350";
