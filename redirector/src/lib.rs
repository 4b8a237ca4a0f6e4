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
//! - [`node_table`], [`hosts`]: re-exported from `edge-model` (the node table file, the managed
//!   hosts block); the node table is followed by `edge_model::follow`, as in the tunnel server.
//! - [`nodes`]: Kubernetes Nodes (or a file) -> node table with tunnel addresses from a pool.
//! - [`origdst`]: original-destination lookup for the ingress.
//! - [`run`]: the long-running `redirector run` loop; [`status`], [`explain`], [`uninstall`]
//!   for the CLI.
//! - [`cgroup`], [`bpffs`], [`sys`]: the host facts and raw syscalls underneath.
pub mod bpffs;
pub mod cgroup;
pub mod error;
pub mod explain;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod node_maps;
pub mod nodes;
pub mod origdst;
pub mod probe;
pub mod run;
pub mod self_check;
pub mod status;
pub mod sys;
pub mod uninstall;

// The pure model (no aya, no kube) lives in `edge-model`, which the tunnel server shares.
pub use edge_model::{
    DEFAULT_HOST_INGRESS, DEFAULT_PIN_DIR, DEFAULT_PORTS, OriginalDst, follow, hosts, journal,
    node_table, routes,
};
pub use error::{Error, Result};
pub use origdst::OrigDstTable;
