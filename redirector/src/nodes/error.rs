//! What node sync can fail with, typed so that the CLI names the cause and the loops decide
//! by kind: an API call or a file write may work on the next try; bad input will not.
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A Kubernetes API call; `hint` says what to grant or change when that is known.
    #[error("{what}: {source}{hint}")]
    Api {
        what: String,
        hint: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("no Kubernetes client configuration (in-cluster service account, or KUBECONFIG): {0}")]
    NoClient(#[source] kube::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Text that does not parse, or input the sync refuses (names file:line or the node).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    NodeTable(#[from] edge_model::Error),
    #[error("the Node watch ended")]
    WatchEnded,
    #[error(
        "tunnel address allocation gave up after {0} conflicting writes in a row; another writer keeps changing the allocation store"
    )]
    Contention(u32),
}

impl SyncError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        SyncError::Io {
            what: what.into(),
            source,
        }
    }

    /// Worth retrying as it is: the API server, the disk or another writer may let it through
    /// next time; bad input and missing configuration will not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SyncError::Api { .. }
                | SyncError::Io { .. }
                | SyncError::Contention(_)
                | SyncError::WatchEnded
        )
    }
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;
