//! The redirector's self-check with the real binaries: a program detached behind its back
//! (`bpftool link detach`, as a cleanup script or an operator might) shows in
//! `redirector_path_ok` and is attached again within the check interval, after which
//! connections are redirected again. Root only.
use std::time::Duration;

use redirector_common::program_names;
use redirector_tests::{
    World,
    pki::TestPki,
    scrape::{sample, wait_sample},
    tunnel_procs,
};

/// The stack, with the redirector's metrics on a free address (returned) and `args`.
fn checked_stack(
    w: &World,
    pki: &TestPki,
    args: &[&str],
) -> (tunnel_procs::Stack, std::net::SocketAddr) {
    let metrics_at = tunnel_procs::master_loopback(w);
    let listen = metrics_at.to_string();
    let mut all = vec!["--metrics-listen", listen.as_str()];
    all.extend_from_slice(args);
    (tunnel_procs::stack(w, pki, &all), metrics_at)
}

#[test]
fn a_detached_program_is_reported_and_attached_again_within_the_interval() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let (mut st, metrics_at) = checked_stack(&w, &pki, &["--self-check-interval", "2"]);
    let _agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    let reply = |v: &serde_json::Value| v[0]["reply"].as_str().map(str::to_owned);
    let v = w.probe(true, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(reply(&v).as_deref(), Some("edge 127.0.0.1:10250"), "{v}");
    let text = tunnel_procs::http_get(&w, metrics_at, "/metrics");
    assert_eq!(sample(&text, "redirector_path_ok"), Some(1.0), "{text}");
    let connect4 = format!(
        "redirector_program_attached{{program=\"{}\"}}",
        program_names::CONNECT4
    );
    assert_eq!(sample(&text, &connect4), Some(1.0), "{text}");

    let pin = redirector::loader::link_pin(&w.pin_dir, program_names::CONNECT4);
    let out = std::process::Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&pin)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool link detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Between the detach and the next check the scrape tells the truth (read from the pins).
    let text = tunnel_procs::http_get(&w, metrics_at, "/metrics");
    if sample(&text, "redirector_program_repairs_total") == Some(0.0) {
        assert_eq!(sample(&text, "redirector_path_ok"), Some(0.0), "{text}");
        assert_eq!(sample(&text, &connect4), Some(0.0), "{text}");
    }
    // Found and repaired within the interval (1 s slack for a loaded machine).
    let took = wait_sample(
        &w.master,
        metrics_at,
        "redirector_program_repairs_total",
        1.0,
        Duration::from_secs(10),
    );
    assert!(took <= Duration::from_secs(3), "repaired after {took:?}");
    st.redirector
        .proc
        .wait_log(&["programs are no longer attached", program_names::CONNECT4]);
    st.redirector.proc.wait_log(&["programs attached again"]);
    let text = tunnel_procs::http_get(&w, metrics_at, "/metrics");
    assert_eq!(sample(&text, "redirector_path_ok"), Some(1.0), "{text}");
    assert_eq!(sample(&text, &connect4), Some(1.0), "{text}");
    let v = w.probe(true, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(reply(&v).as_deref(), Some("edge 127.0.0.1:10250"), "{v}");
}

/// The ingress probe: a connection to the probe address from inside the attached cgroup,
/// redirected by the kernel and answered by the tunnel ingress itself. With the tunnel server
/// gone the redirector sees it within the interval, though every program is still attached;
/// once a server listens again, it is answered again.
#[test]
fn the_ingress_probe_finds_a_dead_ingress_within_the_interval() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let (mut st, metrics_at) = checked_stack(
        &w,
        &pki,
        &[
            "--self-check-interval",
            "1",
            "--probe-address",
            "203.0.113.254",
        ],
    );
    let wait = |series: &str, want: f64, within: u64| {
        wait_sample(
            &w.master,
            metrics_at,
            series,
            want,
            Duration::from_secs(within),
        )
    };
    // The server may start after the first probe: answered within the next intervals.
    wait("redirector_ingress_ok", 1.0, 5);
    let text = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    let answered = sample(&text, "tunnel_server_ingress_probes_total").unwrap_or(0.0);
    assert!(answered >= 1.0, "{text}");
    // Probes are neither streams nor refusals at the server.
    assert_eq!(
        sample(&text, "tunnel_server_streams_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tunnel_server_refused_total{reason=\"unknown_node\"}"
        ),
        Some(0.0),
        "{text}"
    );

    // explain names the probe address for what it is.
    let out = w.cli(&[
        "explain",
        "203.0.113.254:10250",
        "--cgroup",
        &w.cgroup.path.display().to_string(),
        "--server",
        "off",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["verdict"], "redirected", "{v:#}");
    assert!(v["summary"].as_str().unwrap().contains("probe"), "{v:#}");

    st.server.stop(libc::SIGKILL, Duration::from_secs(5));
    let took = wait("redirector_ingress_ok", 0.0, 10);
    assert!(took <= Duration::from_secs(3), "seen after {took:?}");
    let text = tunnel_procs::http_get(&w, metrics_at, "/metrics");
    assert_eq!(
        sample(&text, "redirector_path_ok"),
        Some(1.0),
        "programs attached: {text}"
    );
    assert!(
        sample(&text, "redirector_ingress_probes_total{result=\"failed\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    st.redirector
        .proc
        .wait_log(&["ingress probe failed", "203.0.113.254"]);

    st.server = tunnel_procs::server(
        &w,
        &pki,
        (st.ingress, st.ingress6),
        std::net::SocketAddr::from(([0, 0, 0, 0], st.agents_at.port())),
        st.metrics_at,
    );
    wait("redirector_ingress_ok", 1.0, 5);
    st.redirector
        .proc
        .wait_log(&["ingress probe answered again"]);
}
