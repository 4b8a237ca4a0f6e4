//! The tunnel benchmark's floor: the least a reverse tunnel of this shape can do. The edge side
//! keeps plain TCP connections dialled out to the master side ahead of time (no TLS, no
//! multiplexing, no identity, no flow control); a visitor takes one, the edge side dials the
//! service when the first bytes arrive, and both sides copy. Every hop a real tunnel has is
//! here (visitor -> master process -> edge process -> service and back), nothing else, so
//! its connection setup is what the hops alone cost on this machine.
use std::{net::SocketAddr, thread};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use crate::Netns;

/// Idle connections the edge side keeps dialled out.
const POOL: usize = 8;

/// A running floor relay.
pub struct Floor {
    /// Where visitors connect, in the master namespace.
    pub at: SocketAddr,
    /// Thread IDs of its two sides (in this process), for CPU accounting.
    pub threads: Vec<u32>,
}

/// Starts both sides (a thread each, each with a single-threaded runtime, in its namespace).
/// `uplink` is the master's address the edge reaches; `service` is dialled from `edge`. Runs
/// until the process exits.
pub fn start(master: &Netns, uplink: &str, edge: &Netns, service: SocketAddr) -> Result<Floor> {
    let (pool_l, visit_l) = {
        let _in = master.enter();
        let bind = |a: SocketAddr| -> Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(a).with_context(|| format!("bind {a}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        (
            bind(SocketAddr::new(uplink.parse()?, 0))?,
            bind("127.0.0.1:0".parse()?)?,
        )
    };
    let (pool_at, visit_at) = (pool_l.local_addr()?, visit_l.local_addr()?);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let tid = tid_tx.clone();
    thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tid.send(unsafe { libc::gettid() } as u32);
        runtime().block_on(master_side(pool_l, visit_l))
    });
    let edge_ns = edge.open();
    thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tid_tx.send(unsafe { libc::gettid() } as u32);
        // SAFETY: setns on a valid namespace fd; this thread only.
        let r = unsafe {
            libc::setns(
                std::os::fd::AsRawFd::as_raw_fd(&edge_ns),
                libc::CLONE_NEWNET,
            )
        };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        runtime().block_on(edge_side(pool_at, service))
    });
    Ok(Floor {
        at: visit_at,
        threads: tid_rx.iter().take(2).collect(),
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn master_side(pool: std::net::TcpListener, visit: std::net::TcpListener) {
    let (pool, visit) = (
        TcpListener::from_std(pool).expect("pool listener"),
        TcpListener::from_std(visit).expect("visit listener"),
    );
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
            return;
        };
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut out).await;
        });
    }
}

async fn edge_side(pool_at: SocketAddr, service: SocketAddr) {
    let (used_tx, mut used_rx) = mpsc::unbounded_channel::<()>();
    for _ in 0..POOL {
        tokio::spawn(pooled(pool_at, service, used_tx.clone()));
    }
    // One replacement for each pooled connection put to use.
    while used_rx.recv().await.is_some() {
        tokio::spawn(pooled(pool_at, service, used_tx.clone()));
    }
}

async fn pooled(pool_at: SocketAddr, service: SocketAddr, used: mpsc::UnboundedSender<()>) {
    let Ok(mut up) = TcpStream::connect(pool_at).await else {
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
