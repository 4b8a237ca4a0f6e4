//! The agent's side of enrollment: posts a CSR to the servers' enrollment endpoint (a bootstrap
//! token for the first certificate, the current certificate for renewals) and keeps what was
//! issued. The key never leaves the node.
use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tunnel_proto::{
    error::{Error, Result},
    wire::Issued,
};

/// The agent's side: posts a CSR to `server` (host:port) at `path` and returns what was
/// issued. `tls` carries the client certificate for renewal (none for enrollment).
pub async fn request(
    server: &str,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    bearer: Option<&str>,
    csr_pem: &str,
) -> Result<Issued> {
    let tcp = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|e| Error::io(format!("connecting to the enrollment endpoint {server}"), e))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| Error::io(format!("TLS with the enrollment endpoint {server}"), e))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Refused(format!("HTTP with {server}: {e}")))?;
    tokio::spawn(conn);
    let mut req = Request::post(path).header(hyper::header::HOST, server);
    if let Some(t) = bearer {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(csr_pem.to_owned())))
        .map_err(|e| Error::Refused(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| Error::Refused(format!("{path} at {server}: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| Error::Refused(format!("{path} at {server}: reading the answer: {e}")))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    if status != StatusCode::OK {
        return Err(Error::Refused(format!(
            "{path} at {server} refused ({status}): {text}"
        )));
    }
    serde_json::from_str(&text)
        .map_err(|e| Error::Refused(format!("{path} at {server}: unexpected answer: {e}")))
}

/// Where an agent keeps its key, certificate and CA bundle (all mode 0600).
pub struct AgentFiles {
    pub dir: PathBuf,
}

impl AgentFiles {
    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Stores an issued certificate with the key it was made for. The certificate last: a
    /// reader that sees the new certificate also finds its key.
    pub fn store(&self, key_pem: &str, issued: &Issued) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("creating {}", self.dir.display()), e))?;
        tunnel_proto::files::write_private(&self.ca(), &issued.ca_bundle)?;
        tunnel_proto::files::write_private(&self.key(), key_pem)?;
        tunnel_proto::files::write_private(&self.cert(), &issued.certificate)
    }
}
