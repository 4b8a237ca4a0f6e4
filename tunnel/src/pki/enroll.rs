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
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use edge_cli::warn_every::WarnKinds;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    admission::{Admission, AdmissionLimits, Limits, Verdict},
    error::Error,
    identity,
    pki::{
        ca::{CaDir, csr_node},
        enroll_limits::{EnrollLimits, FailedGuesses},
        token::TokenStore,
    },
};
pub use tunnel_proto::keepalive::Reason;

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
                let node = self
                    .tokens
                    .check(token, &csr_for)
                    .map_err(|e| (StatusCode::FORBIDDEN, e.to_string()))?;
                // Signed before the token is used up: a CSR the CA refuses leaves the token
                // as it was. Two requests racing with one token: one redeems, the other's
                // certificate is dropped unsent.
                let answer = self.issue(body, &node)?;
                self.tokens
                    .redeem(token, &csr_for)
                    .map_err(|e| (StatusCode::FORBIDDEN, e.to_string()))?;
                tracing::info!(node = %node, via = path, "agent certificate issued");
                return Ok(answer);
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
        let answer = self.issue(body, &node)?;
        tracing::info!(node = %node, via = path, "agent certificate issued");
        Ok(answer)
    }

    /// Signs the CSR in `body` for `node`: the JSON answer.
    fn issue(&self, body: &str, node: &str) -> std::result::Result<String, (StatusCode, String)> {
        let forbidden = |e: Error| (StatusCode::FORBIDDEN, e.to_string());
        let internal = |e: Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        let certificate = self
            .ca
            .current()
            .map_err(internal)?
            .sign_node_csr(body, node, self.lifetime)
            .map_err(forbidden)?;
        let ca_bundle = self.ca.bundle().map_err(internal)?;
        Ok(serde_json::to_string(&Issued {
            certificate,
            ca_bundle,
        })
        .expect("serializes"))
    }
}

/// How the endpoint is served: its limits and what it counts.
#[derive(Clone)]
pub struct Serving {
    pub limits: EnrollLimits,
    /// Connections in flight (all of each is before authentication), total and per source.
    pub admission: AdmissionLimits,
    /// Failed accepts (resource errors pause the loop instead of spinning).
    pub accept_errors: Counter,
    /// Refused requests and connections, by reason.
    pub refused: Family<Reason, Counter>,
}

impl Default for Serving {
    fn default() -> Self {
        Self {
            limits: EnrollLimits::default(),
            admission: Limits::default().enrollment,
            accept_errors: Counter::default(),
            refused: Family::default(),
        }
    }
}

/// The label of a refusal with `status`.
fn reason(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "body_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        _ => "internal",
    }
}

struct Shared {
    enroller: Arc<Enroller>,
    serving: Serving,
    guesses: FailedGuesses,
    warn: Mutex<WarnKinds>,
}

impl Shared {
    fn refused(&self, peer: SocketAddr, reason: &'static str, why: &str) {
        self.serving.refused.get_or_create(&Reason { reason }).inc();
        // Outsiders decide how often this happens: the first of each reason in full, then a
        // count per 10 s. The counter has the exact number.
        let mut w = self.warn.lock().unwrap_or_else(|p| p.into_inner());
        w.warn(
            reason,
            |more| tracing::warn!(%peer, reason, "enrollment refused: {why}{more}"),
        );
    }
}

/// Serves the enrollment endpoint until `shutdown`. `tls` must offer (not require) client
/// certificates: enrollment has none yet, renewal does.
pub async fn serve(
    listener: TcpListener,
    tls: crate::tls::Live<rustls::ServerConfig>,
    enroller: Arc<Enroller>,
    serving: Serving,
    shutdown: CancellationToken,
) {
    let mut listener =
        edge_cli::accept::Acceptor::new(listener, "enrollment", serving.accept_errors.clone());
    let admission = Admission::new(serving.admission);
    let shared = Arc::new(Shared {
        enroller,
        guesses: FailedGuesses::new(
            serving.limits.failures_per_source,
            serving.limits.failure_window,
        ),
        serving,
        warn: Mutex::new(WarnKinds::new(Duration::from_secs(10))),
    });
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            x = listener.accept() => x,
        };
        let (ticket, verdict) = admission.admit(peer.ip());
        if let Some(reason) = verdict.label() {
            let limits = admission.limits();
            let why = match verdict {
                Verdict::PerSourceFull => format!(
                    "{} enrollment connections from {} in flight already: closed at once",
                    limits.per_source,
                    peer.ip()
                ),
                Verdict::TotalFull => format!(
                    "{} enrollment connections in flight, none for {:?} yet: closed this one",
                    limits.total, limits.evict_after
                ),
                _ => format!(
                    "{} enrollment connections in flight: closed the oldest for this one",
                    limits.total
                ),
            };
            shared.refused(peer, reason, &why);
        }
        let Some(ticket) = ticket else {
            drop(tcp);
            continue;
        };
        let (acceptor, shared) = (tokio_rustls::TlsAcceptor::from(tls.get()), shared.clone());
        tokio::spawn(async move {
            // All of an enrollment connection is before authentication: the slot is held
            // to the end, and a newer connection may take it.
            tokio::select! {
                () = serve_one(acceptor, tcp, peer, &shared) => {}
                _ = ticket.evicted.cancelled() => {}
            }
        });
    }
}

/// One connection, one request (no keep-alive): each phase under its deadline. A connection
/// that got an answer is closed so that the answer reaches the client; one cut at a deadline
/// is closed at once.
async fn serve_one(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) {
    let linger = edge_cli::linger::Linger::dup(&tcp).ok();
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = request(acceptor, tcp, peer, shared, answered.clone()).await;
    let answered = match &r {
        Err(("head_too_large", _)) => true,
        _ => answered.load(std::sync::atomic::Ordering::Relaxed),
    };
    if let Err((reason, e)) = r {
        shared.refused(peer, reason, &e);
    }
    if answered && let Some(l) = linger {
        l.close(Duration::from_secs(2), 1 << 20).await;
    }
}

async fn request(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    answered: Arc<std::sync::atomic::AtomicBool>,
) -> std::result::Result<(), (&'static str, String)> {
    let limits = shared.serving.limits.clone();
    let tls = tokio::time::timeout(limits.handshake, acceptor.accept(tcp))
        .await
        .map_err(|_| {
            (
                "handshake_timeout",
                format!("TLS handshake not done within {:?}", limits.handshake),
            )
        })?
        .map_err(|e| ("handshake_failed", format!("TLS handshake: {e}")))?;
    let client_cert: Option<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned();
    let svc_shared = shared.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let (shared, client_cert, answered) =
            (svc_shared.clone(), client_cert.clone(), answered.clone());
        async move {
            let r = answer(&shared, peer, req, client_cert).await;
            answered.store(true, std::sync::atomic::Ordering::Relaxed);
            let (status, text) = match r {
                Ok(json) => (StatusCode::OK, json),
                Err((status, why)) => {
                    shared.refused(peer, reason(status), &why);
                    (status, format!("{why}\n"))
                }
            };
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            *resp.status_mut() = status;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // The head's deadline runs from the end of the handshake: an idle connection and a
        // head sent a byte at a time end alike.
        .header_read_timeout(limits.head)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), svc);
    // The body's deadline is the service's; this bounds the connection as a whole.
    let whole = limits.head + limits.body + Duration::from_secs(5);
    match tokio::time::timeout(whole, conn).await {
        Err(_) => Err(("deadline", format!("connection still open after {whole:?}"))),
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_parse_too_large() => Err((
            "head_too_large",
            format!(
                "request head over {} bytes (answered 431)",
                limits.max_head_bytes
            ),
        )),
        Ok(Err(e)) if e.is_timeout() => Err((
            "head_timeout",
            format!(
                "no complete request head within {:?} of the handshake",
                limits.head
            ),
        )),
        // The client went away or sent garbage: nothing to answer.
        Ok(Err(e)) => Err(("http", format!("HTTP: {e}"))),
    }
}

/// The request's answer: the JSON, or the status and the reason.
async fn answer(
    shared: &Shared,
    peer: SocketAddr,
    req: Request<Incoming>,
    client_cert: Option<CertificateDer<'static>>,
) -> std::result::Result<String, (StatusCode, String)> {
    let limits = &shared.serving.limits;
    let path = req.uri().path().to_owned();
    if req.method() != hyper::Method::POST {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "use POST".to_owned()));
    }
    let guessing = path == "/v1/enroll";
    if guessing && let Some(wait) = shared.guesses.blocked(peer.ip()) {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed enrollments from {} (more than {} in {:?}); try again in {} s",
                peer.ip(),
                limits.failures_per_source,
                limits.failure_window,
                wait.as_secs() + 1
            ),
        ));
    }
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body = Limited::new(req.into_body(), limits.max_body_bytes).collect();
    let body = match tokio::time::timeout(limits.body, body).await {
        Err(_) => {
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not complete within {:?}", limits.body),
            ));
        }
        Ok(Err(e)) => {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body over {} bytes ({e}); a CSR is under 2 KiB",
                    limits.max_body_bytes
                ),
            ));
        }
        Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
    };
    let enroller = shared.enroller.clone();
    // Signing and the token file lock are blocking work.
    let r = tokio::task::spawn_blocking(move || {
        enroller.handle(&path, bearer.as_deref(), client_cert.as_ref(), &body)
    })
    .await
    .unwrap_or_else(|e| Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())));
    if guessing && let Err((StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _)) = &r {
        shared.guesses.failed(peer.ip());
    }
    r
}
