//! The server's node self-check with the real binaries: a node whose agent hangs (SIGSTOP)
//! while its session stays up is marked unreachable within two check intervals, long before
//! the keepalive would give up; it is reachable again once the agent answers; a killed agent
//! is unreachable at once. Health streams are neither relayed streams nor refusals. Root only.
use std::time::Duration;

use redirector_tests::{
    World,
    pki::TestPki,
    scrape::{sample, wait_sample},
    tunnel_procs,
};

fn wait_value(
    w: &World,
    st: &tunnel_procs::Stack,
    series: &str,
    want: f64,
    within: Duration,
) -> Duration {
    wait_sample(&w.master, st.metrics_at, series, want, within)
}

const REACHABLE_A: &str = "tunnel_server_node_reachable{node=\"edge-a\"}";

#[test]
fn a_hung_agent_is_unreachable_within_two_intervals_and_a_killed_one_at_once() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    // Keepalive far slower than the check: what marks the hung agent is the health stream.
    let mut st = tunnel_procs::stack_with(
        &w,
        &pki,
        &[],
        &[
            "--node-check-interval",
            "1",
            "--keepalive-interval",
            "30",
            "--keepalive-timeout",
            "30",
        ],
    );
    let mut agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    wait_value(&w, &st, REACHABLE_A, 1.0, Duration::from_secs(5));
    let text = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    // Table nodes that never connected are listed, unreachable, with no last success.
    assert_eq!(
        sample(&text, "tunnel_server_node_reachable{node=\"edge-b\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(!text.contains("last_reached_timestamp_seconds{node=\"edge-b\"}"));
    // The session's client certificate says when the node must have renewed.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = sample(
        &text,
        "tunnel_server_node_certificate_expiry_timestamp_seconds{node=\"edge-a\"}",
    );
    assert!(expiry.is_some_and(|t| t > now), "{expiry:?}\n{text}");
    // Idle for a few intervals: health streams keep it reachable, and are counted as checks,
    // not as relayed streams or refusals.
    std::thread::sleep(Duration::from_millis(3500));
    let text = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    assert_eq!(sample(&text, REACHABLE_A), Some(1.0), "{text}");
    let ok = sample(&text, "tunnel_server_node_checks_total{result=\"ok\"}").unwrap_or(0.0);
    assert!(ok >= 2.0, "health checks answered: {ok}\n{text}");
    assert_eq!(
        sample(&text, "tunnel_server_streams_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tunnel_server_refused_total{reason=\"agent_refused\"}"
        ),
        Some(0.0),
        "{text}"
    );

    // The agent hangs: its kernel keeps the TCP session, so only the check can tell.
    let pid = agent.child.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let took = wait_value(&w, &st, REACHABLE_A, 0.0, Duration::from_secs(10));
    let text = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    assert_eq!(
        sample(&text, "tunnel_server_sessions"),
        Some(1.0),
        "the session is still up: the keepalive has not given up\n{text}"
    );
    assert!(
        took <= Duration::from_millis(2 * 1000 + 500 + 1000),
        "a hung agent took {took:?} to be seen (two 1 s intervals and the 0.5 s answer time, 1 s slack)"
    );
    assert!(
        sample(&text, "tunnel_server_node_checks_total{result=\"failed\"}").unwrap_or(0.0) >= 1.0
    );
    st.server.wait_log(&[
        "node unreachable",
        "node=edge-a",
        "did not answer a health stream",
    ]);

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_value(&w, &st, REACHABLE_A, 1.0, Duration::from_secs(5));

    // A killed agent's kernel closes the session: unreachable without waiting for a check.
    agent.stop(libc::SIGKILL, Duration::from_secs(5));
    let took = wait_value(&w, &st, REACHABLE_A, 0.0, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(1),
        "a killed agent took {took:?}"
    );
    let text = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    assert!(
        sample(
            &text,
            "tunnel_server_node_last_reached_timestamp_seconds{node=\"edge-a\"}"
        )
        .is_some_and(|t| t > 1.7e9),
        "the last success stays on record: {text}"
    );
}
