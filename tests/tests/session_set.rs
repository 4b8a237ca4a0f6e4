//! A node stays reachable while any of its sessions lives, with the real binaries: a rolling
//! agent upgrade with `maxSurge` (a second agent beside the first, on the same node's network
//! and metrics port, ready by its own probe, then the first drained with SIGTERM), then a third
//! agent and a SIGKILL of that newest one. A client connects steadily through all of it. Each
//! agent dials its node differently, so every answer says which agent served it. Root only.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use redirector_tests::{LoggedProc, World, pki::TestPki, tunnel_procs};

const TARGET: &str = "198.51.100.12:10250";

/// The metrics port every agent is given, as the DaemonSet gives it (the edge namespace is
/// this test's own, so the port is free), and the span they may take from it.
const METRICS_AT: &str = "127.0.0.1:10264";
const METRICS_SPAN: &str = "3";

/// Where the `nth` agent records its metrics address (as in its pod's volume).
fn addr_file(w: &World, nth: usize) -> PathBuf {
    w.dir.join(format!("agent-{nth}.metrics.addr"))
}

/// An agent of edge-c (with `args`) reaching its kubelet stand-in at `dial`; returns once the
/// server has logged `nth` sessions of edge-c in all.
fn agent(
    w: &World,
    args: &[String],
    st: &mut tunnel_procs::Stack,
    dial: &str,
    nth: usize,
) -> LoggedProc {
    let at = args.iter().position(|a| a == "--dial").expect("--dial") + 1;
    let ml = args
        .iter()
        .position(|a| a == "--metrics-listen")
        .expect("--metrics-listen")
        + 1;
    let file = addr_file(w, nth).display().to_string();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args[at] = dial;
    args[ml] = METRICS_AT;
    args.extend([
        "--metrics-port-span",
        METRICS_SPAN,
        "--metrics-addr-file",
        &file,
    ]);
    let p = LoggedProc::spawn(w, &format!("agent-{nth}"), &w.edge, "tunnel-agent", &args);
    st.server
        .wait_log_count(&["agent session up", "node=edge-c"], nth);
    p
}

/// `tunnel-agent probe` against the agent that recorded `file`, run where a pod's exec probe
/// runs (the node's network); Ok or the probe's complaint.
fn probe(w: &World, file: &Path, path: &str) -> Result<(), String> {
    let mut cmd =
        std::process::Command::new(redirector_tests::spawn::workspace_bin("tunnel-agent"));
    cmd.args(["probe", "--path", path, "--metrics-addr-file"])
        .arg(file);
    redirector_tests::spawn::place(&mut cmd, None, Some(&w.edge));
    let out = cmd.output().expect("tunnel-agent probe");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Waits (10 s at most) for the agent of `file` to call itself ready.
fn wait_ready(w: &World, file: &Path) {
    let t0 = Instant::now();
    loop {
        match probe(w, file, "/readyz") {
            Ok(()) => return,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                panic!("{} never ready: {e}", file.display())
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn surge_drain_and_a_killed_newest_session_leave_no_gap_over_a_second() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    // One certificate for all three: issuing another would rewrite the files the running
    // agents watch, and they would rotate their sessions (a different test).
    let args = tunnel_procs::agent_args(
        &pki,
        "edge-c",
        &st.agents_at.to_string(),
        "10250",
        "127.0.0.1",
        "127.0.0.1:0",
    );
    let mut first = agent(&w, &args, &mut st, "127.0.0.1", 1);
    wait_ready(&w, &addr_file(&w, 1));
    let client = w.paced_loop(TARGET, 9000, 5);

    thread::sleep(Duration::from_millis(1000));
    // Surge: the upgraded agent comes up beside the old one, on the next metrics port (a fixed
    // one would stop it), and takes new streams. Each pod's probe reaches its own agent.
    let _second = agent(&w, &args, &mut st, "198.51.100.12", 2);
    wait_ready(&w, &addr_file(&w, 2));
    let port = |nth| std::fs::read_to_string(addr_file(&w, nth)).unwrap();
    assert_eq!(port(1).trim(), "127.0.0.1:10264");
    assert_eq!(port(2).trim(), "127.0.0.1:10265");
    probe(&w, &addr_file(&w, 1), "/healthz").expect("the old agent still answers its own probe");
    thread::sleep(Duration::from_millis(1000));
    // The old one is drained (GOAWAY) and exits, as a pod deletion does.
    let st_first = first.stop(libc::SIGTERM, Duration::from_secs(15));
    assert!(
        st_first.success(),
        "drained agent exited {st_first}:\n{}",
        first.log()
    );
    let gone = probe(&w, &addr_file(&w, 1), "/healthz").unwrap_err();
    assert!(gone.contains("127.0.0.1:10264"), "{gone}");
    thread::sleep(Duration::from_millis(1000));
    // A third (say, a replacement started by hand), then it dies at once. The first's port is
    // free again: it takes that.
    let mut third = agent(&w, &args, &mut st, "::1", 3);
    wait_ready(&w, &addr_file(&w, 3));
    assert_eq!(port(3).trim(), "127.0.0.1:10264");
    thread::sleep(Duration::from_millis(1000));
    third.stop(libc::SIGKILL, Duration::from_secs(5));
    st.server.wait_log(&[
        "agent session down; the node's other session takes its new streams",
        "node=edge-c",
    ]);
    let summary = client.summary();
    eprintln!("connect loop: {summary}");

    let labels = summary["labels"].as_object().unwrap();
    let served_by = |label: &str| labels.get(label).and_then(|n| n.as_u64()).unwrap_or(0);
    // Every agent served while it was the newest, and nothing else answered.
    for who in [
        "edge 127.0.0.1:10250",
        "edge 198.51.100.12:10250",
        "edge [::1]:10250",
    ] {
        assert!(served_by(who) > 0, "{who} never answered: {summary}");
    }
    assert_eq!(labels.len(), 3, "an answer from elsewhere: {summary}");
    // Only a request in flight on the killed session may fail (this client has one at a time;
    // a second may have been sent before the server saw the connection close).
    assert!(summary["failed"].as_u64().unwrap() <= 2, "{summary}");
    let gap = summary["max_gap_ms"].as_u64().unwrap();
    assert!(gap <= 1000, "a gap of {gap} ms between answers: {summary}");
    assert!(
        w.edge_log
            .all()
            .iter()
            .all(|a| a.peer.is_some_and(|p| p.ip().to_string() != "198.51.100.1")),
        "a connection escaped the tunnel and came straight from the master"
    );
    // The old agent's drain and the kill both left the node with a session: never no_session.
    let metrics = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    assert_eq!(
        redirector_tests::scrape::sample(
            &metrics,
            "tunnel_server_refused_total{reason=\"no_session\"}"
        ),
        Some(0.0),
        "the node was without a session at some point:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "tunnel_server_session_takeovers_total 2"),
        "{metrics}"
    );
}

#[test]
fn a_session_idle_after_a_burst_is_replaced_and_streams_flow_throughout() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    let mut agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    // A burst of 300 streams at once, over the agent's threshold (256): h2 keeps the session's
    // tables at that size, so once idle the agent replaces the session.
    let mut args = vec!["connect"];
    args.extend(std::iter::repeat_n("198.51.100.10:10250", 300));
    let v = w.probe(true, None, &args);
    let replies = v.as_array().expect("array");
    assert_eq!(replies.len(), 300);
    assert!(
        replies.iter().all(|r| r["reply"] == "edge 127.0.0.1:10250"),
        "{v}"
    );
    agent.wait_log(&["a session is idle after a burst"]);
    // Streams during the replacement: the new session comes up before the old one drains.
    let client = w.paced_loop("198.51.100.10:10250", 3000, 5);
    st.server
        .wait_log_count(&["agent session up", "node=edge-a"], 2);
    st.server.wait_log(&["agent session down", "node=edge-a"]);
    let summary = client.summary();
    assert_eq!(summary["failed"].as_u64(), Some(0), "{summary}");
    assert!(summary["ok"].as_u64().unwrap_or(0) > 50, "{summary}");
    // The new session carried no burst: it stays.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        st.server.count_log(&["agent session up", "node=edge-a"]),
        2,
        "{}",
        st.server.log()
    );
}
