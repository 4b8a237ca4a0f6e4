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
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    pub fn h2(what: impl Into<String>, source: h2::Error) -> Self {
        Error::H2 {
            what: what.into(),
            source,
        }
    }
}
