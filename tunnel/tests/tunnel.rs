//! The tunnel over real TLS on real loopback sockets, certificates made in the test.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tunnel::{relay::End, server::Refusal};

const TABLE: &str = "\
edge-a 198.51.100.10 203.0.113.10
edge-b 198.51.100.10 203.0.113.11
";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Sends `msg`, half-closes, and returns everything the service answered.
async fn exchange(client: &mut TcpStream, msg: &[u8]) -> std::io::Result<String> {
    client.write_all(msg).await?;
    client.shutdown().await?;
    Ok(String::from_utf8_lossy(&read_all(client).await?).into_owned())
}

#[tokio::test]
async fn two_nodes_with_the_same_internal_ip_each_get_their_own_streams_and_the_shared_ip_is_refused()
 {
    let (logs, _g) = capture_logs();
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    // Each node's services are on its own loopback address, same port number.
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    greeting_service("127.0.0.3".parse().unwrap(), port, "I am edge-b").await;
    let _a = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;
    let _b = node_agent(&ca, &srv, "edge-b", "127.0.0.3", &[port]).await;

    for _ in 0..3 {
        for (tunnel_ip, who) in [("203.0.113.10", "edge-a"), ("203.0.113.11", "edge-b")] {
            let (mut c, task) = redirected(&srv.server, addr(&format!("{tunnel_ip}:{port}"))).await;
            let reply = exchange(&mut c, b"ping").await.unwrap();
            assert_eq!(reply, format!("I am {who}\npingbye 4\n"));
            assert_eq!(task.await.unwrap().unwrap().end, End::Closed);
        }
    }

    let (mut c, task) = redirected(&srv.server, addr(&format!("198.51.100.10:{port}"))).await;
    assert_eq!(task.await.unwrap(), Err(Refusal::Ambiguous));
    let r = exchange(&mut c, b"ping").await;
    assert!(
        r.is_err() || r.as_ref().unwrap().is_empty(),
        "refused connection must carry no data: {r:?}"
    );
    assert_eq!(srv.server.refused(Refusal::Ambiguous), 1);
    assert!(
        logs.text()
            .contains(r#"198.51.100.10 belongs to several nodes ["edge-a", "edge-b"]"#),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn identity_comes_from_the_certificate_an_agent_cannot_serve_another_node() {
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    // The agent claims to be edge-b in its configuration, but its certificate names edge-a.
    let _a = start_agent(agent_config(
        &ca,
        ca.agent("edge-a"),
        "edge-b",
        &[srv.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[port],
    ));
    wait_for(|| !srv.server.connected_nodes().is_empty(), "a session").await;
    assert_eq!(
        srv.server.connected_nodes(),
        ["edge-a"],
        "keyed by the certificate, not by config"
    );

    let (_c, task) = redirected(&srv.server, addr(&format!("203.0.113.11:{port}"))).await;
    assert_eq!(
        task.await.unwrap(),
        Err(Refusal::NoSession),
        "edge-b's traffic never reaches edge-a's agent"
    );
}

#[tokio::test]
async fn wrong_ca_expired_or_missing_client_certificate_is_refused_with_the_reason_logged() {
    let (logs, _g) = capture_logs();
    let ca = Ca::new("cluster CA");
    let other = Ca::new("some other CA");
    let srv = start_server(&ca, routes(TABLE)).await;

    let wrong = start_agent(agent_config(
        &ca,
        other.agent("edge-a"),
        "edge-a",
        &[srv.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[1],
    ));
    wait_for(
        || logs.text().contains("UnknownIssuer"),
        "the wrong-CA rejection in the log",
    )
    .await;
    // The agent says the server refused its certificate, not only which alert came.
    wait_for(
        || {
            logs.text()
                .contains("the server refused this agent's certificate")
        },
        "the agent's explanation",
    )
    .await;
    wrong.stop.cancel();

    // Another CA with the cluster CA's very name (two runs of a make-certs script): the server
    // sees a bad signature, the agent only a DecryptError alert, and still gets the hint.
    let twin = Ca::new("cluster CA");
    let before = logs
        .text()
        .matches("the server refused this agent's certificate")
        .count();
    let twin_agent = start_agent(agent_config(
        &ca,
        twin.agent("edge-a"),
        "edge-a",
        &[srv.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[1],
    ));
    wait_for(
        || {
            let t = logs.text();
            t.contains("BadSignature")
                && t.matches("the server refused this agent's certificate")
                    .count()
                    > before
        },
        "the same-name CA's rejection on both ends",
    )
    .await;
    twin_agent.stop.cancel();

    let expired_leaf = ca.agent_valid_until(
        "edge-a",
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    );
    let expired = start_agent(agent_config(
        &ca,
        expired_leaf,
        "edge-a",
        &[srv.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[1],
    ));
    wait_for(
        || logs.text().contains("Expired"),
        "the expired-certificate rejection in the log",
    )
    .await;
    expired.stop.cancel();

    // No client certificate at all.
    let mut cfg = agent_config(
        &ca,
        ca.agent("edge-a"),
        "edge-a",
        &[srv.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[1],
    );
    let mut no_cert = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates({
        let mut r = rustls::RootCertStore::empty();
        r.add(ca.cert.clone()).unwrap();
        r
    })
    .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    cfg.tls = std::sync::Arc::new(no_cert).into();
    let none = start_agent(cfg);
    wait_for(
        || {
            logs.text().contains("NoCertificatesPresented")
                || logs.text().contains("peer sent no certificates")
        },
        "the missing-certificate rejection",
    )
    .await;
    none.stop.cancel();

    assert!(
        srv.server.connected_nodes().is_empty(),
        "no session for any of them"
    );
    assert!(srv.server.stats().sessions_rejected.get() >= 3);
}

#[tokio::test]
async fn half_close_is_carried_both_ways() {
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    let _a = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;

    // Client -> service: after the client's shutdown(Write) the service sees EOF and still
    // sends its whole answer ("bye <n>" is written only after EOF).
    let (mut c, _t) = redirected(&srv.server, addr(&format!("203.0.113.10:{port}"))).await;
    let payload = vec![b'x'; 300_000];
    let reply = exchange(&mut c, &payload).await.unwrap();
    assert!(reply.starts_with("I am edge-a\n"));
    assert!(
        reply.ends_with("bye 300000\n"),
        "the answer after the half-close arrived: {}",
        &reply[reply.len().saturating_sub(40)..]
    );

    // Service -> client: a service that closes its write side first keeps receiving.
    let l = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let early_port = l.local_addr().unwrap().port();
    let svc = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"done talking\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let _a2 = start_agent(agent_config(
        &ca,
        ca.agent("edge-b"),
        "edge-b",
        &[srv.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[early_port],
    ));
    wait_for(|| srv.server.connected_nodes().len() == 2, "second session").await;
    let (mut c, _t) = redirected(&srv.server, addr(&format!("203.0.113.11:{early_port}"))).await;
    let mut first = vec![0u8; 13];
    c.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"done talking\n");
    assert_eq!(
        c.read(&mut [0u8; 1]).await.unwrap(),
        0,
        "client sees the service's EOF"
    );
    c.write_all(b"still sending after your FIN").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(svc.await.unwrap(), b"still sending after your FIN");
}

/// A server and edge-a's agent serving one port of a bare listener (the test plays the
/// service) on edge-a's loopback address.
async fn edge_a_bare_service(
    ca: &Ca,
) -> (RunningServer, RunningAgent, tokio::net::TcpListener, u16) {
    let srv = start_server(ca, routes(TABLE)).await;
    let l = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let a = node_agent(ca, &srv, "edge-a", "127.0.0.2", &[port]).await;
    (srv, a, l, port)
}

#[tokio::test]
async fn a_quiet_service_is_answered_without_waiting_for_its_first_bytes() {
    // The agent's answer rides with the service's first bytes when they come soon; a service
    // that stays silent still gets its stream accepted promptly.
    let ca = Ca::new("cluster CA");
    let (srv, _a, l, port) = edge_a_bare_service(&ca).await;

    let (mut c, task) = redirected(&srv.server, addr(&format!("203.0.113.10:{port}"))).await;
    let (mut s, _) = l.accept().await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    let t = std::time::Instant::now();
    while srv.server.stats().streams_total.get() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the agent never answered a stream whose service stays silent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Bytes the service sends much later still arrive, and both ends close cleanly.
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"late answer").await.unwrap();
    drop(s);
    c.shutdown().await.unwrap();
    assert_eq!(read_all(&mut c).await.unwrap(), b"late answer");
    let out = task.await.unwrap().unwrap();
    assert_eq!(
        (out.end, out.tcp_to_stream, out.stream_to_tcp),
        (End::Closed, 5, 11)
    );
}

#[tokio::test]
async fn an_abort_at_either_end_arrives_as_a_reset_not_an_eof() {
    let ca = Ca::new("cluster CA");
    let (srv, _a, l, port) = edge_a_bare_service(&ca).await;

    // Client aborts: the service must read an error, not a clean EOF.
    let (mut c, task) = redirected(&srv.server, addr(&format!("203.0.113.10:{port}"))).await;
    let (mut s, _) = l.accept().await.unwrap();
    c.write_all(b"partial").await.unwrap();
    let mut got = [0u8; 7];
    s.read_exact(&mut got).await.unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let r = s.read(&mut [0u8; 16]).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "service saw {r:?}"
    );
    assert_eq!(task.await.unwrap().unwrap().end, End::Reset);

    // Service aborts: the client must read an error.
    let (mut c, task) = redirected(&srv.server, addr(&format!("203.0.113.10:{port}"))).await;
    let (mut s, _) = l.accept().await.unwrap();
    s.write_all(b"half an ans").await.unwrap();
    let mut got = [0u8; 11];
    c.read_exact(&mut got).await.unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let r = read_all(&mut c).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client saw {r:?}"
    );
    assert_eq!(task.await.unwrap().unwrap().end, End::Reset);
}

#[tokio::test]
async fn a_port_that_is_not_allow_listed_is_refused_and_the_session_serves_the_rest() {
    let (logs, _g) = capture_logs();
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    let other = greeting_service("127.0.0.2".parse().unwrap(), 0, "secret").await;
    let a = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;

    let (mut c, task) = redirected(&srv.server, addr(&format!("203.0.113.10:{other}"))).await;
    assert_eq!(task.await.unwrap(), Err(Refusal::AgentRefused));
    let r = exchange(&mut c, b"x").await;
    assert!(r.is_err() || r.as_ref().unwrap().is_empty(), "{r:?}");
    assert!(
        logs.text()
            .contains("403 Forbidden: port not allow-listed on this node"),
        "{}",
        logs.text()
    );
    assert_eq!(
        a.stats
            .refused
            .get_or_create(&tunnel::metrics::Reason {
                reason: "port_not_allowed"
            })
            .get(),
        1
    );

    let (mut c, _) = redirected(&srv.server, addr(&format!("203.0.113.10:{port}"))).await;
    assert_eq!(
        exchange(&mut c, b"ok").await.unwrap(),
        "I am edge-a\nokbye 2\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_on_one_session_every_byte_checked() {
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    let _a = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;

    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let server = srv.server.clone();
        tasks.push(tokio::spawn(async move {
            let (mut c, task) = redirected(&server, addr(&format!("203.0.113.10:{port}"))).await;
            let payload: Vec<u8> = (0..32 * 1024u32)
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect();
            let reply = async {
                c.write_all(&payload).await?;
                c.shutdown().await?;
                read_all(&mut c).await
            }
            .await;
            let mut expected = b"I am edge-a\n".to_vec();
            expected.extend_from_slice(&payload);
            expected.extend_from_slice(format!("bye {}\n", payload.len()).as_bytes());
            match reply {
                Ok(reply) => assert!(
                    reply == expected,
                    "stream {i}: {} bytes back, content differs",
                    reply.len()
                ),
                Err(e) => panic!("stream {i}: {e}; server side: {:?}", task.await),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(srv.server.stats().streams_total.get(), 1000);
}

/// A service that streams `total` bytes as fast as its reader takes them, then closes.
async fn firehose(ip: &str, total: usize) -> u16 {
    let l = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                let mut sent = 0;
                while sent < total {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_freeze_its_neighbours_on_the_same_session() {
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    let hose = firehose("127.0.0.2", 100 << 20).await;
    let echo = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    let _a = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[hose, echo]).await;

    // Four streams whose readers never read, each with 100 MiB pending behind them.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let (c, _t) = redirected(&srv.server, addr(&format!("203.0.113.10:{hose}"))).await;
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // let their windows fill

    // A neighbour moves 32 MiB each way on the same session, every byte checked.
    let (mut c, _t) = redirected(&srv.server, addr(&format!("203.0.113.10:{echo}"))).await;
    let payload: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = c.split();
    let send = async {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let recv = async {
        let mut v = Vec::new();
        rd.read_to_end(&mut v).await.unwrap();
        v
    };
    let (_, got) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
            .await
            .expect("the neighbour stream froze behind the stalled ones");
    assert_eq!(&got[..12], b"I am edge-a\n");
    assert!(
        got[12..12 + payload.len()] == payload[..],
        "echoed bytes differ"
    );
    drop(stalled);
}

#[tokio::test]
async fn an_agent_keeps_a_session_to_every_server_and_survives_losing_one() {
    let ca = Ca::new("cluster CA");
    let s1 = start_server(&ca, routes(TABLE)).await;
    let s2 = start_server(&ca, routes(TABLE)).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    let _a = start_agent(agent_config(
        &ca,
        ca.agent("edge-a"),
        "edge-a",
        &[s1.agent_addr, s2.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[port],
    ));
    wait_for(
        || s1.server.connected_nodes() == ["edge-a"] && s2.server.connected_nodes() == ["edge-a"],
        "a session on both servers",
    )
    .await;
    for s in [&s1, &s2] {
        let (mut c, _) = redirected(&s.server, addr(&format!("203.0.113.10:{port}"))).await;
        assert_eq!(
            exchange(&mut c, b"hi").await.unwrap(),
            "I am edge-a\nhibye 2\n"
        );
    }
    // One master goes away; the other keeps serving the node.
    s1.stop.cancel();
    wait_for(
        || s1.server.connected_nodes().is_empty(),
        "server 1's session to end",
    )
    .await;
    let (mut c, _) = redirected(&s2.server, addr(&format!("203.0.113.10:{port}"))).await;
    assert_eq!(
        exchange(&mut c, b"still").await.unwrap(),
        "I am edge-a\nstillbye 5\n"
    );
}

#[tokio::test]
async fn agent_restart_and_server_restart_reconnect_and_nothing_is_misrouted() {
    let ca = Ca::new("cluster CA");
    let srv = start_server(&ca, routes(TABLE)).await;
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    greeting_service("127.0.0.3".parse().unwrap(), port, "I am edge-b").await;
    let a = node_agent(&ca, &srv, "edge-a", "127.0.0.2", &[port]).await;
    let _b = node_agent(&ca, &srv, "edge-b", "127.0.0.3", &[port]).await;

    // Agent restart.
    a.stop.cancel();
    a.task.await.unwrap();
    wait_for(
        || srv.server.connected_nodes() == ["edge-b"],
        "edge-a's session to end",
    )
    .await;
    let (_c, t) = redirected(&srv.server, addr(&format!("203.0.113.10:{port}"))).await;
    assert_eq!(
        t.await.unwrap(),
        Err(Refusal::NoSession),
        "while edge-a is away its traffic is refused, not sent to edge-b"
    );
    let _a2 = start_agent(agent_config(
        &ca,
        ca.agent("edge-a"),
        "edge-a",
        &[srv.agent_addr],
        "127.0.0.2".parse().unwrap(),
        &[port],
    ));
    wait_for(
        || srv.server.connected_nodes() == ["edge-a", "edge-b"],
        "edge-a back",
    )
    .await;
    let (mut c, _) = redirected(&srv.server, addr(&format!("203.0.113.10:{port}"))).await;
    assert_eq!(
        exchange(&mut c, b"1").await.unwrap(),
        "I am edge-a\n1bye 1\n"
    );

    // Server restart on the same address: both agents reconnect by themselves.
    let agent_addr = srv.agent_addr;
    srv.stop.cancel();
    wait_for(
        || srv.server.connected_nodes().is_empty(),
        "sessions to end",
    )
    .await;
    drop(srv);
    let leaf = ca.server();
    let cfg = tunnel::server::ServerConfig::new(
        tunnel::tls::server_config(std::slice::from_ref(&ca.cert), leaf.chain, leaf.key).unwrap(),
    );
    let server = tunnel::server::Server::new(cfg, routes(TABLE));
    let listener = rebind(agent_addr).await;
    let (s, t) = (server.clone(), tokio_util::sync::CancellationToken::new());
    tokio::spawn(async move { s.serve_agents(listener, t).await });
    wait_for(
        || server.connected_nodes() == ["edge-a", "edge-b"],
        "both agents back on the restarted server",
    )
    .await;
    for (ip, who) in [("203.0.113.10", "edge-a"), ("203.0.113.11", "edge-b")] {
        let (mut c, _) = redirected(&server, addr(&format!("{ip}:{port}"))).await;
        assert_eq!(
            exchange(&mut c, b"2").await.unwrap(),
            format!("I am {who}\n2bye 1\n")
        );
    }
}

/// Binds the address a stopped server used (its port may linger briefly).
async fn rebind(a: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(a).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not rebind {a}");
}

/// A TCP proxy that can be frozen: it stops moving bytes but keeps both connections open,
/// like a SIGSTOPped peer or a NAT that silently dropped its mapping. It counts the bytes it
/// carried: to the upstream, and back.
async fn counting_proxy(
    upstream: SocketAddr,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    [std::sync::Arc<std::sync::atomic::AtomicU64>; 2],
) {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let frozen = Arc::new(AtomicBool::new(false));
    let counts = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let c = counts.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let f = frozen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((down, _)) = l.accept().await else {
                return;
            };
            let Ok(up) = TcpStream::connect(upstream).await else {
                continue;
            };
            for ((mut from, mut to), count) in [(down.into_split(), up.into_split())]
                .into_iter()
                .flat_map(|((dr, dw), (ur, uw))| [(dr, uw), (ur, dw)])
                .zip(c.clone())
            {
                let f = f.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let Ok(n) = from.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        while f.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        }
    });
    (at, frozen, counts)
}

/// A server and edge-a's agent with keepalive `ka` on both ends, the session through a
/// [`counting_proxy`], once the session is up.
struct KeepaliveWorld {
    server: tunnel::server::Server,
    agent: RunningAgent,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bytes to the server, bytes back to the agent.
    counts: [std::sync::Arc<std::sync::atomic::AtomicU64>; 2],
}

async fn keepalive_world(ka: tunnel::keepalive::Keepalive) -> KeepaliveWorld {
    let ca = Ca::new("cluster CA");
    let leaf = ca.server();
    let mut cfg = tunnel::server::ServerConfig::new(
        tunnel::tls::server_config(std::slice::from_ref(&ca.cert), leaf.chain, leaf.key).unwrap(),
    );
    cfg.keepalive = ka;
    let server = tunnel::server::Server::new(cfg, routes(TABLE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (proxy, frozen, counts) = counting_proxy(listener.local_addr().unwrap()).await;
    let (s, t) = (server.clone(), tokio_util::sync::CancellationToken::new());
    tokio::spawn(async move { s.serve_agents(listener, t).await });
    let mut acfg = agent_config(
        &ca,
        ca.agent("edge-a"),
        "edge-a",
        &[proxy],
        "127.0.0.2".parse().unwrap(),
        &[1],
    );
    acfg.keepalive = ka;
    let agent = start_agent(acfg);
    wait_for(|| server.connected_nodes() == ["edge-a"], "session").await;
    KeepaliveWorld {
        server,
        agent,
        frozen,
        counts,
    }
}

/// The server only listens while the agent pings: an idle session carries one PING exchange
/// per interval (the agent's PING, the server's answer), not one from each end.
#[tokio::test]
async fn an_idle_session_carries_one_ping_exchange_per_interval_not_two() {
    use std::sync::atomic::Ordering;
    let ka = tunnel::keepalive::Keepalive {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(400),
    };
    // Bound, not `..`: an unbound server or agent would be dropped (stopped) right here.
    let KeepaliveWorld {
        server: _server,
        agent: _agent,
        counts: [to_server, to_agent],
        ..
    } = keepalive_world(ka).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (up0, down0) = (
        to_server.load(Ordering::Relaxed),
        to_agent.load(Ordering::Relaxed),
    );
    let idle = Duration::from_secs(2);
    tokio::time::sleep(idle).await;
    let (up, down) = (
        to_server.load(Ordering::Relaxed) - up0,
        to_agent.load(Ordering::Relaxed) - down0,
    );
    // One PING or PONG: a 17-byte HTTP/2 frame in a TLS 1.3 record (22 bytes more).
    let record = 39.0;
    let intervals = idle.as_secs_f64() / ka.interval.as_secs_f64();
    let (up_records, down_records) = (up as f64 / record, down as f64 / record);
    // The agent's PINGs go up and the server's PONGs come down, one each per interval; a
    // pinging server would double both.
    assert!(
        up_records > intervals * 0.5 && up_records < intervals * 1.4,
        "{up_records:.1} records to the server in {intervals} intervals ({up} bytes)"
    );
    assert!(
        down_records > intervals * 0.5 && down_records < intervals * 1.4,
        "{down_records:.1} records to the agent in {intervals} intervals ({down} bytes)"
    );
}

#[tokio::test]
async fn a_silent_peer_is_found_by_keepalive_on_both_sides_within_interval_plus_timeout() {
    let (logs, _g) = capture_logs();
    let KeepaliveWorld {
        server,
        agent: a,
        frozen,
        ..
    } = keepalive_world(tunnel::keepalive::Keepalive {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(400),
    })
    .await;
    // Idle session, no streams: keepalive still runs and measures a round trip.
    wait_for(
        || server.stats().keepalive_rtt_us.get() > 0,
        "a keepalive round trip",
    )
    .await;

    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let t0 = tokio::time::Instant::now();
    wait_for(
        || server.connected_nodes().is_empty(),
        "the server to drop the silent session",
    )
    .await;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "dead session found only after {took:?}"
    );
    wait_for(
        || {
            logs.text()
                .contains("did not answer a keepalive PING within 400ms")
        },
        "both sides to log the dead peer",
    )
    .await;
    assert_eq!(server.stats().sessions_dead.get(), 1);
    wait_for(
        || logs.text().matches("keepalive PING").count() >= 2,
        "the agent's own detection",
    )
    .await;

    // Thawed: the agent reconnects through the same path.
    frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for(|| server.connected_nodes() == ["edge-a"], "reconnection").await;
    // The server registers a session as soon as its side of the handshake is done; the
    // agent counts it when its side is.
    wait_for(
        || a.stats.sessions_established.get() >= 2,
        "the agent to count its second session",
    )
    .await;
}

#[tokio::test]
async fn replicas_behind_one_name_each_get_a_session_and_follow_the_name_as_it_changes() {
    let ca = Ca::new("cluster CA");
    let (s1, s2, s3) = (
        start_server(&ca, routes(TABLE)).await,
        start_server(&ca, routes(TABLE)).await,
        start_server(&ca, routes(TABLE)).await,
    );
    // Stands in for DNS: "tunnel.test:10262" resolves to whatever this list holds.
    let replicas = std::sync::Arc::new(std::sync::Mutex::new(vec![s1.agent_addr, s2.agent_addr]));
    let r = replicas.clone();
    let mut cfg = agent_config(
        &ca,
        ca.agent("edge-a"),
        "edge-a",
        &[],
        "127.0.0.2".parse().unwrap(),
        &[1],
    );
    cfg.servers = vec!["tunnel.test:10262".into()];
    cfg.resolve_interval = Duration::from_millis(50);
    cfg.resolver = std::sync::Arc::new(move |entry: String| {
        assert_eq!(entry, "tunnel.test:10262");
        let v = r.lock().unwrap().clone();
        Box::pin(async move { v })
    });
    let _a = start_agent(cfg);
    let up = |s: &RunningServer| s.server.connected_nodes() == ["edge-a"];
    wait_for(
        || up(&s1) && up(&s2) && !up(&s3),
        "sessions to both resolved replicas",
    )
    .await;

    *replicas.lock().unwrap() = vec![s2.agent_addr, s3.agent_addr];
    wait_for(
        || !up(&s1) && up(&s2) && up(&s3),
        "the session set to follow the new answer",
    )
    .await;

    // A failed resolution (no answer) keeps the replicas last known.
    replicas.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        up(&s2) && up(&s3),
        "sessions kept while the name does not resolve"
    );
}

/// Plays a tunnel server towards a real agent, to send it requests a real server never sends.
async fn fake_server(
    ca: &Ca,
) -> (
    tokio::net::TcpListener,
    std::sync::Arc<rustls::ServerConfig>,
) {
    let leaf = ca.server();
    let tls =
        tunnel::tls::server_config(std::slice::from_ref(&ca.cert), leaf.chain, leaf.key).unwrap();
    (
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls,
    )
}

#[tokio::test]
async fn unexpected_requests_and_a_garbled_session_end_only_that_stream_or_that_session() {
    let (logs, _g) = capture_logs();
    let ca = Ca::new("cluster CA");
    let port = greeting_service("127.0.0.2".parse().unwrap(), 0, "I am edge-a").await;
    let (listener, tls) = fake_server(&ca).await;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let a = start_agent(agent_config(
        &ca,
        ca.agent("edge-a"),
        "edge-a",
        &[listener.local_addr().unwrap()],
        "127.0.0.2".parse().unwrap(),
        &[port],
    ));

    // First session: garbage instead of HTTP/2. The agent logs it and dials again.
    let (tcp, _) = listener.accept().await.unwrap();
    let mut garbled = acceptor.accept(tcp).await.unwrap();
    garbled
        .write_all(b"this is not an HTTP/2 preface or frame\r\n\r\n")
        .await
        .unwrap();
    garbled.flush().await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    drop(garbled);
    wait_for(
        || logs.text().contains("handshake with server"),
        "the agent to report the garbled session",
    )
    .await;

    // Second session: well-formed HTTP/2, odd requests.
    let tls = acceptor.accept(tcp).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let mut ask = |method: http::Method, uri: String, node: Option<&str>| {
        let mut b = http::Request::builder().method(method).uri(uri);
        if let Some(n) = node {
            b = b.header(tunnel::server::NODE_HEADER, n);
        }
        let (resp, _tx) = send.send_request(b.body(()).unwrap(), false).unwrap();
        resp
    };
    let cases = [
        (
            http::Method::GET,
            format!("http://127.0.0.1:{port}/"),
            None,
            405,
        ),
        (http::Method::CONNECT, "127.0.0.1:22".to_string(), None, 403),
        (
            http::Method::CONNECT,
            format!("127.0.0.1:{port}"),
            Some("edge-b"),
            421,
        ),
    ];
    for (method, uri, node, status) in cases {
        let resp = ask(method.clone(), uri.clone(), node).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {uri} {node:?}");
    }
    // The same session still serves a proper stream.
    let resp = ask(
        http::Method::CONNECT,
        format!("127.0.0.1:{port}"),
        Some("edge-a"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.data().await.unwrap().unwrap();
    assert_eq!(&first[..], b"I am edge-a\n");
    let refused = |r: &str| {
        a.stats
            .refused
            .get_or_create(&tunnel::metrics::Reason {
                reason: match r {
                    "m" => "not_connect",
                    "p" => "port_not_allowed",
                    _ => "other_node",
                },
            })
            .get()
    };
    assert_eq!((refused("m"), refused("p"), refused("n")), (1, 1, 1));
    assert!(
        logs.text().contains("stream for another node refused"),
        "{}",
        logs.text()
    );
}
