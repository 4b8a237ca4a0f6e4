//! Tunnel errors: each names what failed and for which node, port or peer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("identity: {0}")]
    Identity(String),
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("HTTP/2 {what}: {source}")]
    H2 { what: String, source: h2::Error },
    #[error("{0}")]
    Refused(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    NodeTable(#[from] edge_model::Error),
    /// A Kubernetes API call (the source is a `kube::Error`: `downcast_ref` to branch on it;
    /// boxed so that this crate, which the agent links, has no kube).
    #[error("{what}: {source}")]
    Api {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    pub fn api(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Api {
            what: what.into(),
            source: Box::new(source),
        }
    }
    pub fn h2(what: impl Into<String>, source: h2::Error) -> Self {
        Error::H2 {
            what: what.into(),
            source,
        }
    }
}
