//! Node identity: from Kubernetes Node objects (or a file of nodes) to the node table the
//! redirector and the tunnel follow, with a unique tunnel address per node.
//!
//! - [`model`]: the pure translation, Node -> [`model::EdgeNode`] -> [`NodeTable`].
//! - [`pool`]: tunnel addresses from a CIDR; the pure allocation plan.
//! - [`store`]: where allocations persist, with compare-and-swap: [`store::FileStore`]
//!   (embedded mode, a local file under a lock) and [`store::KubeStore`] (one ConfigMap,
//!   swapped by resourceVersion), so several replicas never hand out one address twice.
//! - [`sync`]: `redirector sync-nodes`, the loop that keeps the node table file in step.
//! - [`incremental`]: one Node's change as one journal entry, without a pass over the fleet.
//! - [`error`]: what it fails with, typed ([`error::SyncError`]).
//!
//! [`NodeTable`]: crate::node_table::NodeTable
pub mod error;
pub mod events;
pub mod file_store;
pub mod incremental;
pub mod kube_store;
pub mod model;
pub mod pool;
pub mod store;
pub mod sync;
