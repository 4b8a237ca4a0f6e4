//! The tunnel benchmark's floor: the least a reverse tunnel of this shape can do. The edge side
//! keeps plain TCP connections dialled out to the master side ahead of time (no TLS, no
//! multiplexing, no identity, no flow control); a visitor takes one, the edge side dials the
//! service when the first bytes arrive, and both sides copy. Every hop a real tunnel has is
//! here (visitor -> master process -> edge process -> service and back), nothing else, so
//! its connection setup is what the hops alone cost on this machine. Each side runs as its own
//! process with a single-threaded runtime, as the tunnel's server and agent do.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// Idle connections the edge side keeps dialled out.
const POOL: usize = 8;
/// What the master side logs once both listeners are up.
pub const READY: &str = "floor master ready";

/// The master side: takes the edge side's connections on `pool`, visitors on `visit`.
pub async fn master(pool: SocketAddr, visit: SocketAddr) -> Result<()> {
    let pool = TcpListener::bind(pool)
        .await
        .with_context(|| format!("bind {pool}"))?;
    let visit = TcpListener::bind(visit)
        .await
        .with_context(|| format!("bind {visit}"))?;
    eprintln!("{READY}");
    let (tx, mut rx) = mpsc::unbounded_channel::<TcpStream>();
    tokio::spawn(async move {
        while let Ok((c, _)) = pool.accept().await {
            let _ = c.set_nodelay(true);
            let _ = tx.send(c);
        }
    });
    while let Ok((mut client, _)) = visit.accept().await {
        let _ = client.set_nodelay(true);
        let Some(mut out) = rx.recv().await else {
            break;
        };
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut out).await;
        });
    }
    Ok(())
}

/// The edge side: keeps [`POOL`] connections dialled to `pool`, relays each used one to
/// `service`.
pub async fn edge(pool: SocketAddr, service: SocketAddr) {
    let (used_tx, mut used_rx) = mpsc::unbounded_channel::<()>();
    for _ in 0..POOL {
        tokio::spawn(pooled(pool, service, used_tx.clone()));
    }
    // One replacement for each pooled connection put to use.
    while used_rx.recv().await.is_some() {
        tokio::spawn(pooled(pool, service, used_tx.clone()));
    }
}

async fn pooled(pool: SocketAddr, service: SocketAddr, used: mpsc::UnboundedSender<()>) {
    let Ok(mut up) = TcpStream::connect(pool).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    // The first bytes (or EOF) say a visitor took this connection.
    if up.readable().await.is_err() {
        return;
    }
    let _ = used.send(());
    let Ok(mut svc) = TcpStream::connect(service).await else {
        return;
    };
    let _ = svc.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut up, &mut svc).await;
}
