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

#[test]
fn a_detached_program_is_reported_and_attached_again_within_the_interval() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let metrics_at = tunnel_procs::master_loopback(&w);
    let mut st = tunnel_procs::stack(
        &w,
        &pki,
        &[
            "--self-check-interval",
            "2",
            "--metrics-listen",
            &metrics_at.to_string(),
        ],
    );
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
