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
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
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

pub use tunnel_proto::wire::Issued;

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
///
/// `accept_errors` counts failed accepts (resource errors pause the loop instead of spinning).
pub async fn serve(
    listener: TcpListener,
    tls: crate::tls::Live<rustls::ServerConfig>,
    enroller: Arc<Enroller>,
    accept_errors: prometheus_client::metrics::counter::Counter,
    shutdown: CancellationToken,
) {
    let mut listener = edge_cli::accept::Acceptor::new(listener, "enrollment", accept_errors);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            x = listener.accept() => x,
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
