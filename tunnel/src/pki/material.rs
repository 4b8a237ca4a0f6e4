//! Where the server's TLS material comes from: operator-managed PEM files (reloaded when they
//! change), or a CA directory it keeps and issues its own certificate from.
use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    error::Result,
    pki::ca::CaDir,
    tls::{self, PemFiles},
};

/// The server's TLS material.
pub enum ServerPki {
    /// Operator-managed files.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// A CA kept in `dir` (created on first start); the server's own certificate is issued
    /// from it for `names` at every (re)load.
    CaDir {
        ca: CaDir,
        names: Vec<String>,
        lifetime: Duration,
    },
}

impl ServerPki {
    pub fn material(&self) -> Result<PemFiles> {
        match self {
            ServerPki::Files { ca, cert, key } => PemFiles::load(ca, cert, key),
            ServerPki::CaDir {
                ca,
                names,
                lifetime,
            } => {
                let (cert, key) = ca.for_server()?.issue_server(names, *lifetime)?;
                PemFiles::from_pem(&ca.bundle()?, &cert, &key, &ca.dir.display().to_string())
            }
        }
    }

    /// How often the server's own certificate must be issued anew (None: operator-managed).
    pub fn reissue_period(&self) -> Option<Duration> {
        match self {
            ServerPki::Files { .. } => None,
            ServerPki::CaDir { lifetime, .. } => Some(*lifetime / 3),
        }
    }

    /// The files whose change means a reload.
    pub fn watched(&self) -> Vec<PathBuf> {
        match self {
            ServerPki::Files { ca, cert, key } => vec![ca.clone(), cert.clone(), key.clone()],
            ServerPki::CaDir { ca, .. } => ["ca.crt", "ca-previous.crt"]
                .iter()
                .map(|f| ca.dir.join(f))
                .collect(),
        }
    }

    /// The agent-session config.
    pub fn agents_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let m = self.material()?;
        tls::server_config(&m.ca, m.chain, m.key)
    }

    /// The enrollment endpoint's config (client certificates optional).
    pub fn enrollment_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let m = self.material()?;
        tls::enrollment_config(&m.ca, m.chain, m.key)
    }
}
