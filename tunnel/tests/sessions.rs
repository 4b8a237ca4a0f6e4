//! Sessions per node are a set: every live session of a node stays usable, new streams go to
//! the newest that takes them, and when it ends the next newest takes over at once. This is a
//! rolling agent upgrade (`maxSurge`), a certificate rotation, or a second holder of the node's
//! certificate; the server says so when it happens.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tunnel::server::Refusal;

const TABLE: &str = "edge-a 198.51.100.10 203.0.113.10\n";

/// One redirected connection to edge-a's `port`: who answered (its greeting line).
async fn who_answers(srv: &RunningServer, port: u16) -> String {
    let orig: SocketAddr = format!("203.0.113.10:{port}").parse().unwrap();
    let (mut c, task): (TcpStream, _) = redirected(&srv.server, orig).await;
    c.write_all(b"x").await.unwrap();
    c.shutdown().await.unwrap();
    let reply = String::from_utf8_lossy(&read_all(&mut c).await.unwrap_or_default()).into_owned();
    let _ = task.await;
    reply.lines().next().unwrap_or("").to_owned()
}

async fn agent_for_edge_a(ca: &Ca, srv: &RunningServer, dial: &str, port: u16) -> RunningAgent {
    start_agent(agent_config(
        ca,
        ca.agent("edge-a"),
        "edge-a",
        &[srv.agent_addr],
        dial.parse().unwrap(),
        &[port],
    ))
}

#[tokio::test]
async fn a_node_stays_reachable_while_any_of_its_sessions_lives() {
    let (logs, _g) = capture_logs();
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    // Three agent processes of one node, told apart by the local address each dials.
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "first").await;
    greeting_service("127.0.0.3".parse().unwrap(), port, "second").await;
    greeting_service("127.0.0.4".parse().unwrap(), port, "third").await;
    let stats = srv.server.stats().clone();

    let first = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;
    assert_eq!(who_answers(&srv, port).await, "first");

    // Surge: a second agent comes up and takes the new streams.
    let second = agent_for_edge_a(&ca, &srv, "127.0.0.3", port).await;
    wait_for(|| stats.session_takeovers.get() == 1, "the second session").await;
    assert_eq!(who_answers(&srv, port).await, "second");
    assert!(
        logs.text()
            .contains("a second session of this node takes its new streams"),
        "{}",
        logs.text()
    );

    // The first drains (SIGTERM: GOAWAY) while the second serves.
    first.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), first.task).await;
    assert_eq!(who_answers(&srv, port).await, "second");

    // A third, then the newest dies without a word (SIGKILL): the second takes over at once.
    let third = agent_for_edge_a(&ca, &srv, "127.0.0.4", port).await;
    wait_for(|| stats.session_takeovers.get() == 2, "the third session").await;
    assert_eq!(who_answers(&srv, port).await, "third");
    third.task.abort();
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(who_answers(&srv, port).await);
    }
    // At most what was in flight on the killed session fails; nothing is refused for want of
    // a session while the second lives.
    assert_eq!(srv.server.refused(Refusal::NoSession), 0, "{answers:?}");
    assert!(
        answers.iter().skip(1).all(|a| a == "second"),
        "after the newest session died: {answers:?}"
    );
    drop(second);
}
