//! Certificates with the real binaries: `tunnel server --ca-dir` creates the CA and serves
//! enrollment, `tunnel token create` makes a token, `tunnel-agent --cert-dir --token` enrolls
//! (its key made and kept on the node) and its session carries redirected connections; a reused
//! token is refused with its reason. Root only.
use std::process::Command;

use redirector_tests::{LoggedProc, World, free_addr, replies, spawn::workspace_bin, tunnel_procs};

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[test]
fn an_agent_enrolled_with_a_token_serves_its_node_through_the_real_binaries() {
    let w = World::new();
    let ca_dir = w.dir.join("tunnel-ca");
    let tokens = ca_dir.join("tokens");
    let (ingress, agents_at, enroll_at, metrics_at) = {
        let _m = w.master.enter();
        (
            free_addr("127.0.0.1"),
            free_addr("198.51.100.1"),
            free_addr("198.51.100.1"),
            free_addr("127.0.0.1"),
        )
    };
    let _redirector = redirector_tests::RedirectorProc::start_with_ingress(&w, ingress, &[]);
    let args = tunnel_procs::CaDirServer {
        ca_dir: &ca_dir,
        names: "tunnel.test,198.51.100.1",
        enroll_at,
        agents_at,
        ingress,
        metrics_at,
    }
    .args(&w);
    let mut server = tunnel_procs::spawn_server(&w, "tunnel-server", &args);
    server.wait_log(&["tunnel server ready"]);
    let token = |node: &str| tunnel_procs::token_create("tokens", &tokens, node);
    let t = token("edge-a");
    let cert_dir = w.dir.join("agent-edge-a");
    let agent_args = |t: &str, dir: &std::path::Path| {
        vec![
            "--node-id".to_owned(),
            "edge-a".into(),
            "--servers".into(),
            agents_at.to_string(),
            "--server-name".into(),
            "tunnel.test".into(),
            "--ca".into(),
            s(&ca_dir.join("ca.crt")),
            "--cert-dir".into(),
            s(dir),
            "--enroll".into(),
            enroll_at.to_string(),
            "--token".into(),
            t.to_owned(),
            "--ports".into(),
            "10250".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let args = agent_args(&t, &cert_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _agent = LoggedProc::spawn(&w, "agent-edge-a", &w.edge, "tunnel-agent", &args);
    server.wait_log(&["agent session up", "node=edge-a"]);
    assert!(
        cert_dir.join("tls.key").exists(),
        "the key was made on the node"
    );
    let v = w.probe(true, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(replies(&v)[0].1, "edge 127.0.0.1:10250", "{v}");

    // The same token again (another agent directory): refused, and the agent says why.
    let args = agent_args(&t, &w.dir.join("agent-again"));
    let out = {
        let mut cmd = Command::new(workspace_bin("tunnel-agent"));
        cmd.args(&args);
        redirector_tests::spawn::place(&mut cmd, None, Some(&w.edge));
        cmd.output().unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("already used") && err.contains("create a new one"),
        "{err}"
    );
    server.wait_log(&["enrollment refused", "already used"]);
}
