//! What outsiders may hold on the server, bounded: the sessions of one node identity (a newer
//! one closes the oldest, which first finishes its open streams) and the redirected
//! connections the ingress holds (past the limit, new ones are reset and counted).
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use edge_model::OriginalDst;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tunnel::server::Refusal;

const TABLE: &str = "edge-a 198.51.100.10\n";

#[tokio::test]
async fn a_node_over_its_session_bound_closes_its_oldest_after_that_sessions_streams() {
    let ca = Ca::new("cluster CA");
    let srv = start_server_with(&ca, routes(TABLE), |c| c.limits.max_sessions_per_node = 2).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "first").await;
    greeting_service("127.0.0.3".parse().unwrap(), port, "second").await;
    greeting_service("127.0.0.4".parse().unwrap(), port, "third").await;
    let stats = srv.server.stats().clone();
    let agent = |dial: &str| {
        start_agent(agent_config(
            &ca,
            ca.agent("edge-a"),
            "edge-a",
            &[srv.agent_addr],
            dial.parse().unwrap(),
            &[port],
        ))
    };
    let _first = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;
    // A stream open on the first session (think `kubectl logs -f`).
    let orig: SocketAddr = format!("198.51.100.10:{port}").parse().unwrap();
    let (mut held, held_task) = redirected(&srv.server, orig).await;
    let mut greeting = [0u8; 6];
    held.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"first\n");

    let _second = agent("127.0.0.3");
    wait_for(|| stats.session_takeovers.get() == 1, "the second session").await;
    let _third = agent("127.0.0.4");
    let evicted = || {
        stats
            .admission
            .get_or_create(&tunnel::metrics::AdmissionLabel {
                listener: "agents",
                reason: "sessions_per_node",
            })
            .get()
    };
    wait_for(
        || evicted() >= 1,
        "the oldest session closed over the bound",
    )
    .await;

    // The closed session's open stream still works to its end, every byte.
    held.write_all(&[7u8; 100_000]).await.unwrap();
    held.shutdown().await.unwrap();
    let rest = read_all(&mut held).await.unwrap();
    assert_eq!(rest.len(), 100_000 + b"bye 100000\n".len());
    assert!(rest.ends_with(b"bye 100000\n"));
    assert!(held_task.await.unwrap().is_ok());
    // And the node is served by its newer sessions.
    let (mut c, _t) = redirected(&srv.server, orig).await;
    c.shutdown().await.unwrap();
    let got = String::from_utf8(read_all(&mut c).await.unwrap()).unwrap();
    assert!(
        got.starts_with("second") || got.starts_with("third"),
        "{got}"
    );
    assert_eq!(srv.server.refused(Refusal::NoSession), 0);
}

#[tokio::test]
async fn the_ingress_resets_connections_past_its_limit_and_takes_them_again_after() {
    let ca = Ca::new("cluster CA");
    let srv = start_server_with(&ca, routes(TABLE), |c| c.limits.max_ingress_connections = 2).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "hello").await;
    let _agent = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;
    let ingress = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = ingress.local_addr().unwrap();
    let orig: SocketAddr = format!("198.51.100.10:{port}").parse().unwrap();
    let (s, stop) = (srv.server.clone(), srv.stop.clone());
    tokio::spawn(async move {
        s.serve_ingress(
            ingress,
            move |_, _, _| {
                Some(OriginalDst {
                    addr: orig,
                    from_pod: false,
                    ambiguous: false,
                    probe: false,
                })
            },
            stop,
        )
        .await
    });
    let greeted = |mut c: TcpStream| async move {
        let mut g = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut g))
            .await
            .expect("an answer or a reset")
            .map(|_| (g, c))
    };
    // Two held open: the limit.
    let (_, one) = greeted(TcpStream::connect(at).await.unwrap())
        .await
        .unwrap();
    let (g, _two) = greeted(TcpStream::connect(at).await.unwrap())
        .await
        .unwrap();
    assert_eq!(&g, b"hello\n");
    // The third is reset, and counted.
    let third = greeted(TcpStream::connect(at).await.unwrap()).await;
    assert!(third.is_err(), "the third connection was served");
    assert_eq!(srv.server.refused(Refusal::IngressFull), 1);
    // One closes: room again.
    drop(one);
    wait_for(
        || srv.server.stats().streams_open.get() < 2,
        "the closed connection released",
    )
    .await;
    let (g, _four) = greeted(TcpStream::connect(at).await.unwrap())
        .await
        .unwrap();
    assert_eq!(&g, b"hello\n");
    srv.stop.cancel();
}
