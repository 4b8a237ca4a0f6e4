//! The whole path with the real binaries: a client in the cgroup dials a node's address, the
//! redirector sends it to the tunnel server's ingress, the server maps the original destination
//! to the node ID and opens a stream on that node's agent session (mutual TLS), and the agent
//! dials its own node. Root only.
use redirector_tests::{
    World, pki::TestPki, procstat::Credentials, replies, spawn::NOBODY, tunnel_procs,
};

#[test]
fn a_connection_to_a_node_port_travels_redirector_server_and_that_nodes_agent() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    // Keeps the redirector and the tunnel server alive for the whole test.
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    // edge-a's agent reaches its services on localhost, edge-b's on its node address.
    let _a = st.agent(&w, &pki, "edge-a", "10250,10255", "127.0.0.1");
    let _b = st.agent(&w, &pki, "edge-b", "10250,10255", "198.51.100.11");

    let v = w.probe(
        true,
        None,
        &[
            "connect",
            "198.51.100.10:10250",
            "198.51.100.11:10255",
            "198.51.100.12:10250",
        ],
    );
    let got = replies(&v);
    assert_eq!(
        got[0].1, "edge 127.0.0.1:10250",
        "edge-a via its agent's localhost dial: {v}"
    );
    assert_eq!(
        got[0].2.as_deref(),
        Some("198.51.100.10:10250"),
        "the client still sees what it dialled"
    );
    assert_eq!(got[1].1, "edge 198.51.100.11:10255", "{v}");
    assert_eq!(
        got[2].1, "",
        "edge-c has no agent: refused, nothing answered: {v}"
    );
    assert_eq!(v[2]["ok"], false, "{v}");

    let edge = w.edge_log.all();
    assert_eq!(
        edge.len(),
        2,
        "exactly the two tunnelled connections reached the edge: {edge:?}"
    );
    for a in &edge {
        let from = a.peer.expect("peer").ip().to_string();
        assert_ne!(
            from, "198.51.100.1",
            "a connection came straight from the master, not through an agent: {a:?}"
        );
    }
    assert!(
        st.server
            .log()
            .contains("node edge-c has no agent session; refused"),
        "{}",
        st.server.log()
    );
    // All of this with a server that holds nothing: not root, no capability in any set, so
    // no bpf() call could have succeeded; the kernel answered SO_ORIGINAL_DST.
    let creds = Credentials::of(st.server.child.id());
    assert_eq!(
        creds,
        Credentials {
            uid: NOBODY,
            ..Default::default()
        },
        "the tunnel server runs unprivileged"
    );
    assert!(
        st.server.log().contains("getsockopt(SO_ORIGINAL_DST)"),
        "{}",
        st.server.log()
    );

    let metrics = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    for line in [
        "tunnel_server_sessions 2",
        "tunnel_server_streams_total 2",
        "tunnel_server_refused_total{reason=\"no_session\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "/metrics lacks {line:?}:\n{metrics}"
        );
    }
}

#[test]
fn a_stopping_server_refuses_new_connections_but_lets_open_streams_finish() {
    use std::io::{BufRead, BufReader, Write};
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    // Keeps the redirector and the tunnel server alive for the whole test.
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    let _a = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");

    // An open stream (think `kubectl exec`), idle across the stop signal.
    let mut cmd = std::process::Command::new(redirector_tests::spawn::workspace_bin("probe"));
    cmd.args(["hold", "198.51.100.10:10250"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    redirector_tests::spawn::place(&mut cmd, Some(&w.cgroup), Some(&w.master));
    let mut held = cmd.spawn().unwrap();
    let mut out = BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    // The server has taken the connection (it counts it from acceptance) before the signal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !tunnel_procs::http_get(&w, st.metrics_at, "/metrics")
        .lines()
        .any(|l| l == "tunnel_server_streams_open 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the held connection never reached the server"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(st.server.child.id() as i32, libc::SIGTERM) };
    st.server.wait_log(&["draining open streams", "streams=1"]);
    let v = w.probe(true, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(
        v[0]["ok"], false,
        "a new connection must be refused while draining: {v}"
    );

    held.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let r: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(
        r["reply"], "edge 127.0.0.1:10250",
        "the open stream finished its exchange: {r}"
    );
    held.wait().unwrap();
    // With nothing left open the server exits well before the drain deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while st.server.child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "server did not exit after draining:\n{}",
            st.server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn an_ipv6_node_address_travels_the_ipv6_ingress_to_that_nodes_agent() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    // edge-v6's agent reaches its services on its own IPv6 address.
    let _v6 = st.agent(&w, &pki, "edge-v6", "10250", "2001:db8::10");

    let v = w.probe(true, None, &["connect", "[2001:db8::10]:10250"]);
    let got = replies(&v);
    assert_eq!(
        got[0].1, "edge [2001:db8::10]:10250",
        "through the IPv6 ingress and edge-v6's agent: {v}"
    );
    assert_eq!(
        got[0].2.as_deref(),
        Some("[2001:db8::10]:10250"),
        "the client still sees what it dialled"
    );
    let edge = w.edge_log.all();
    assert_eq!(edge.len(), 1, "{edge:?}");
    assert_ne!(
        edge[0].peer.expect("peer").ip().to_string(),
        "198.51.100.1",
        "came through the agent, not straight from the master: {edge:?}"
    );
    assert!(
        w.ingress_log.all().is_empty(),
        "nothing reached the world's stand-in ingresses: {:?}",
        w.ingress_log.all()
    );
    let metrics = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "tunnel_server_streams_total 1"),
        "{metrics}"
    );
}

#[test]
fn an_agent_whose_node_id_differs_from_its_certificate_refuses_to_start_naming_both() {
    let dir = std::env::temp_dir().join(format!("agent-node-id-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = TestPki::new(&dir);
    let mut args = tunnel_procs::agent_args(
        &pki,
        "edge-a",
        "127.0.0.1:1",
        "10250",
        "127.0.0.1",
        "127.0.0.1:0",
    );
    let i = args.iter().position(|a| a == "--node-id").unwrap();
    args[i + 1] = "edge-b".into();
    let out = std::process::Command::new(redirector_tests::spawn::workspace_bin("tunnel-agent"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(r#"--node-id is "edge-b""#) && err.contains(r#"names node "edge-a""#),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_token_is_created_from_the_servers_ca_dir_as_the_server_finds_it() {
    let dir = std::env::temp_dir().join(format!("token-ca-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(!tunnel_procs::token_create("ca-dir", &dir, "edge-a").is_empty());
    let store = std::fs::read_to_string(dir.join("tokens")).unwrap();
    assert!(store.contains("edge-a"), "{store}");
    std::fs::remove_dir_all(&dir).unwrap();
}
