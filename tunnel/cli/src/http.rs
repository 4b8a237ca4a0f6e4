//! The small HTTP endpoint every daemon serves: `/metrics` (Prometheus text from a
//! prometheus-client registry), `/healthz` (the process runs) and `/readyz` (it does its job).
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `/metrics` (the daemon's `registry` plus `runtime_tasks_alive` and
/// `process_heap_bytes`), `/healthz` and
/// `/readyz` until `shutdown`. `ready` decides readiness.
pub async fn serve(
    listener: TcpListener,
    mut registry: Registry,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: CancellationToken,
) {
    registry.register_collector(Box::new(crate::runtime_tasks::RuntimeTasks));
    registry.register_collector(Box::new(crate::heap::Heap));
    let registry = Arc::new(registry);
    // Not counted: this endpoint's own registry is already built; the log says it.
    let mut listener =
        crate::accept::Acceptor::new(listener, "metrics endpoint", Default::default());
    loop {
        let (tcp, _peer): (_, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            x = listener.accept() => x,
        };
        let (registry, ready) = (registry.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (registry, ready) = (registry.clone(), ready.clone());
                async move { Ok::<_, Infallible>(respond(req.uri().path(), &registry, &*ready)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
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
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .expect("static response")
}
