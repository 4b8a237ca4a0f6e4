//! The enrollment endpoint (HTTPS, on the tunnel server) and its client (in the agent).
//!
//! - `POST /v1/enroll`, `Authorization: Bearer <bootstrap token>`, body: a CSR (PEM). The
//!   token must be unused, unexpired and for the node the CSR names.
//! - `POST /v1/renew`, authenticated by the agent's current client certificate (verified
//!   against the trusted CAs), body: a CSR for the same node.
//!
//! Both answer JSON `{"certificate": PEM, "ca_bundle": PEM}`: the bundle carries every trusted
//! CA, so agents learn a new CA during a rotation's overlap by renewing. Refusals answer 4xx with
//! the reason in the body, and are logged with it.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    identity,
    pki::{
        ca::{CaDir, csr_node},
        token::TokenStore,
    },
};

/// Largest request body accepted (a CSR is well under 2 KiB).
const MAX_BODY: usize = 16 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Issued {
    pub certificate: String,
    pub ca_bundle: String,
}

/// What the endpoint signs with and checks against.
pub struct Enroller {
    pub ca: CaDir,
    pub tokens: TokenStore,
    /// Lifetime of the agent certificates it issues.
    pub lifetime: Duration,
}

impl Enroller {
    /// One request: the path, the bearer token if any, the verified client certificate if
    /// any, the body. `Ok` is the JSON answer; `Err` the status and the reason.
    pub fn handle(
        &self,
        path: &str,
        bearer: Option<&str>,
        client_cert: Option<&CertificateDer<'_>>,
        body: &str,
    ) -> std::result::Result<String, (StatusCode, String)> {
        let bad = |e: Error| (StatusCode::BAD_REQUEST, e.to_string());
        let node = match path {
            "/v1/enroll" => {
                let token = bearer.ok_or((
                    StatusCode::UNAUTHORIZED,
                    "no bootstrap token: send `Authorization: Bearer <token>`".to_owned(),
                ))?;
                let csr_for = csr_node(body).map_err(bad)?;
                self.tokens
                    .redeem(token, &csr_for)
                    .map_err(|e| (StatusCode::FORBIDDEN, e.to_string()))?
            }
            "/v1/renew" => {
                let cert = client_cert.ok_or((
                    StatusCode::UNAUTHORIZED,
                    "renewal needs the agent's current client certificate".to_owned(),
                ))?;
                identity::node_id_from_cert(cert)
                    .map_err(|e| (StatusCode::FORBIDDEN, e.to_string()))?
            }
            other => {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("no {other}; use /v1/enroll or /v1/renew"),
                ));
            }
        };
        let forbidden = |e: Error| (StatusCode::FORBIDDEN, e.to_string());
        let internal = |e: Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        let certificate = self
            .ca
            .current()
            .map_err(internal)?
            .sign_node_csr(body, &node, self.lifetime)
            .map_err(forbidden)?;
        let ca_bundle = self.ca.bundle().map_err(internal)?;
        tracing::info!(node = %node, via = path, "agent certificate issued");
        Ok(serde_json::to_string(&Issued {
            certificate,
            ca_bundle,
        })
        .expect("serializes"))
    }
}

/// Serves the enrollment endpoint until `shutdown`. `tls` must offer (not require) client
/// certificates: enrollment has none yet, renewal does.
pub async fn serve(
    listener: TcpListener,
    tls: crate::tls::Live<rustls::ServerConfig>,
    enroller: Arc<Enroller>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { tracing::warn!("enrollment accept: {e}"); continue; }
            },
        };
        let (acceptor, enroller) = (tokio_rustls::TlsAcceptor::from(tls.get()), enroller.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_one(acceptor, tcp, peer, enroller).await {
                tracing::warn!(%peer, "enrollment connection: {e}");
            }
        });
    }
}

async fn serve_one(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    enroller: Arc<Enroller>,
) -> Result<()> {
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .map_err(|_| Error::Refused("TLS handshake timed out".into()))?
        .map_err(|e| Error::io("TLS handshake", e))?;
    let client_cert: Option<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned();
    let svc = service_fn(move |req: Request<Incoming>| {
        let (enroller, client_cert) = (enroller.clone(), client_cert.clone());
        async move {
            let path = req.uri().path().to_owned();
            let bearer = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned);
            let answer = if req.method() != hyper::Method::POST {
                Err((StatusCode::METHOD_NOT_ALLOWED, "use POST".to_owned()))
            } else {
                match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => {
                        let body = String::from_utf8_lossy(&b.to_bytes()).into_owned();
                        // Signing and the token file lock are blocking work.
                        tokio::task::spawn_blocking(move || {
                            enroller.handle(&path, bearer.as_deref(), client_cert.as_ref(), &body)
                        })
                        .await
                        .unwrap_or_else(|e| Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())))
                    }
                    Err(e) => Err((StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}"))),
                }
            };
            let (status, text) = match answer {
                Ok(json) => (StatusCode::OK, json),
                Err((status, why)) => {
                    tracing::warn!(%peer, %status, "enrollment refused: {why}");
                    (status, why)
                }
            };
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            *resp.status_mut() = status;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(tls), svc)
        .await
        .map_err(|e| Error::Refused(format!("HTTP: {e}")))
}

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
        crate::pki::ca::write_private(&self.ca(), &issued.ca_bundle)?;
        crate::pki::ca::write_private(&self.key(), key_pem)?;
        crate::pki::ca::write_private(&self.cert(), &issued.certificate)
    }
}
