//! The model the master side shares, and nothing else: no aya, no kube.
//!
//! - [`node_table`]: the node table file (node ID -> addresses, tunnel address), and what the
//!   kernel's node maps hold for it.
//! - [`routes`]: address -> node (or the nodes that share it), computed once per table.
//! - [`journal`]: single-node changes appended beside the table file, and its one writer.
//! - [`snapshot`]: one version of the node set: the table file plus journal entries.
//! - [`follow`]: the one follower of the table and its journal (inotify, poll, SIGHUP,
//!   on-demand refresh); it hands the same snapshots to the redirector (kernel maps) and the
//!   tunnel server (routes).
//! - [`names`]: Kubernetes node-name rules.
//! - [`hosts`]: the managed hosts block and the CoreDNS hosts file (name -> tunnel address).
//! - [`orig_dst`]: the original destination of a redirected connection.
//! - [`lock`]: the lock beside a file several processes rewrite.
//! - [`allocations`]: tunnel address allocations as text.
pub mod allocations;
mod dir_watch;
pub mod error;
pub mod follow;
pub mod hosts;
pub mod journal;
pub mod lock;
pub mod names;
pub mod node_table;
pub mod orig_dst;
pub mod routes;
pub mod snapshot;

pub use error::{Error, Result};
pub use orig_dst::OriginalDst;

/// Where the redirector pins its programs and maps unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/edge-redirector";
/// The loopback ingress host clients are sent to unless `--host-ingress` says otherwise.
pub const DEFAULT_HOST_INGRESS: &str = "127.0.0.1:10266";
/// kubelet (10250), read-only kubelet (10255), KubeEdge edgecore stream (10350).
pub const DEFAULT_PORTS: &str = "10250,10255,10350";
