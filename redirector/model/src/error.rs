//! Model errors: each names the file and line, or what was being done.
use std::{io, path::PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}:{line}: {reason}")]
    NodeTable {
        file: PathBuf,
        line: usize,
        reason: String,
    },

    #[error("cannot read node table {file}: {source}")]
    NodeTableRead { file: PathBuf, source: io::Error },

    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
