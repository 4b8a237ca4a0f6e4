//! The small HTTP endpoint every daemon serves: `/metrics` (Prometheus text from a
//! prometheus-client registry), `/healthz` (the process runs) and `/readyz` (it does its job),
//! and a daemon's own `/debug/...` answers for local callers.
use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A daemon's answer to `/debug/<rest>?<query>`, given `rest` and `query`: status and JSON
/// body, or None for a path it does not know.
pub type Debug = Arc<
    dyn Fn(String, String) -> Pin<Box<dyn Future<Output = Option<(u16, String)>> + Send>>
        + Send
        + Sync,
>;

/// Serves `/metrics` (the daemon's `registry` plus `runtime_tasks_alive` and
/// `process_heap_bytes`), `/healthz` and
/// `/readyz` until `shutdown`. `ready` decides readiness.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: CancellationToken,
) {
    serve_with_debug(listener, registry, ready, None, shutdown).await
}

/// [`serve`], with `debug` answering `/debug/...` to callers on loopback only: the metrics
/// port may listen on every address (for scraping), and what `debug` tells (peers' addresses)
/// and does (it may ask agents) is for an operator on the host.
pub async fn serve_with_debug(
    listener: TcpListener,
    mut registry: Registry,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    debug: Option<Debug>,
    shutdown: CancellationToken,
) {
    registry.register_collector(Box::new(crate::runtime_tasks::RuntimeTasks));
    registry.register_collector(Box::new(crate::heap::Heap));
    let registry = Arc::new(registry);
    // Not counted: this endpoint's own registry is already built; the log says it.
    let mut listener =
        crate::accept::Acceptor::new(listener, "metrics endpoint", Default::default());
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            x = listener.accept() => x,
        };
        let (registry, ready, debug) = (registry.clone(), ready.clone(), debug.clone());
        let local = peer.ip().to_canonical().is_loopback();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (registry, ready, debug) = (registry.clone(), ready.clone(), debug.clone());
                async move {
                    let path = req.uri().path();
                    if let Some(rest) = path.strip_prefix("/debug/") {
                        let query = req.uri().query().unwrap_or("").to_owned();
                        return Ok::<_, Infallible>(debug_answer(debug, local, rest, query).await);
                    }
                    Ok(respond(path, &registry, &*ready))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn debug_answer(
    debug: Option<Debug>,
    local: bool,
    rest: &str,
    query: String,
) -> Response<Full<bytes::Bytes>> {
    let (status, body) = match (debug, local) {
        (Some(_), false) => (
            403,
            "{\"error\": \"/debug/ answers callers on this host only (loopback): run the command on the host\"}\n".to_owned(),
        ),
        (Some(d), true) => d(rest.to_owned(), query).await.unwrap_or((
            404,
            format!("{{\"error\": \"no /debug/{rest} here\"}}\n"),
        )),
        (None, _) => (404, "{\"error\": \"this daemon has no /debug/ answers\"}\n".into()),
    };
    reply(status, "application/json", body)
}

fn reply(status: u16, ctype: &'static str, body: String) -> Response<Full<bytes::Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .expect("static response")
}

fn respond(
    path: &str,
    registry: &Registry,
    ready: &(dyn Fn() -> bool + Send + Sync),
) -> Response<Full<bytes::Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut s = String::new();
            match prometheus_client::encoding::text::encode(&mut s, registry) {
                Ok(()) => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    s,
                ),
                Err(e) => (500, "text/plain", format!("encoding metrics: {e}\n")),
            }
        }
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" if ready() => (200, "text/plain", "ready\n".into()),
        "/readyz" => (503, "text/plain", "not ready\n".into()),
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
    };
    reply(status, ctype, body)
}
