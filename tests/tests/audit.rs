//! The per-stream audit trail with the real binaries: the redirector records who connects
//! (`--record-callers`), the tunnel server writes one JSON line per redirected connection
//! (`--audit-log`). Each line names the calling process (pid, command, cgroup, network
//! namespace), the destination, node and replica, bytes and outcome; a refusal names its
//! reason. A sink that stops reading costs lines, counted, and never a connection. Root only.
use std::{
    io::Read,
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use redirector_tests::{World, pki::TestPki, scrape::sample, tunnel_procs};
use serde_json::Value;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = lines(path);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_redirected_connection_gets_a_line_naming_its_caller() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let log = w.dir.join("audit.jsonl");
    // The server runs as nobody (as the DaemonSet runs it): the file is made writable for it.
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let mut st = tunnel_procs::stack_with(
        &w,
        &pki,
        &["--record-callers"],
        &["--audit-log", &log.display().to_string()],
    );
    let _agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    let v = w.probe(
        true,
        None,
        &[
            "connect",
            "198.51.100.10:10250",
            "198.51.100.10:10250",
            "198.51.100.10:10250",
            "198.51.100.11:10250",
        ],
    );
    let got = wait_lines(&log, 4);
    assert_eq!(got.len(), 4, "{got:#?}\nprobe: {v}");
    let cgroup_id = std::fs::metadata(&w.cgroup.path).unwrap().ino();
    let netns = {
        let _m = w.master.enter();
        redirector::sys::current_netns_cookie().unwrap()
    };
    eprintln!("an audit line: {}", got[0]);
    let pid = got[0]["caller"]["pid"].as_u64().expect("a caller pid");
    for l in &got {
        let c = &l["caller"];
        assert_eq!(c["comm"], "probe", "{l}");
        assert_eq!(c["pid"].as_u64(), Some(pid), "one probe process: {l}");
        assert_eq!(c["cgroup_id"].as_u64(), Some(cgroup_id), "{l}");
        assert_eq!(c["netns_cookie"].as_u64(), Some(netns), "{l}");
        assert_eq!(l["from_pod"], false, "{l}");
        assert!(
            l["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{l}"
        );
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
        assert!(l["duration_ms"].as_f64().is_some(), "{l}");
        assert!(l["replica"].as_str().is_some_and(|r| !r.is_empty()), "{l}");
    }
    let closed: Vec<&Value> = got.iter().filter(|l| l["outcome"] == "closed").collect();
    assert_eq!(closed.len(), 3, "{got:#?}");
    for l in closed {
        assert_eq!(l["destination"], "198.51.100.10:10250", "{l}");
        assert_eq!(l["node"], "edge-a", "{l}");
        assert_eq!(l["port"], 10250, "{l}");
        assert!(l["bytes_to_node"].as_u64().unwrap() > 0, "{l}");
        assert!(l["bytes_from_node"].as_u64().unwrap() > 0, "{l}");
        assert_eq!(l["reason"], Value::Null, "{l}");
    }
    let refused = got.iter().find(|l| l["outcome"] == "refused").unwrap();
    assert_eq!(refused["node"], "edge-b", "{refused}");
    assert_eq!(refused["reason"], "no_session", "{refused}");
    let text = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    assert_eq!(
        sample(&text, "tunnel_server_audit_lines_total"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tunnel_server_audit_dropped_total"),
        Some(0.0),
        "{text}"
    );
}

#[test]
fn a_sink_that_stops_reading_costs_counted_lines_and_no_connection() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    // A FIFO held open for reading but not read: writes block once its 64 KiB are full.
    let fifo = w.dir.join("audit.fifo");
    let status = std::process::Command::new("mkfifo")
        .args(["-m", "666"])
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::File::open(fifo).unwrap()
    });
    let mut st =
        tunnel_procs::stack_with(&w, &pki, &[], &["--audit-log", &fifo.display().to_string()]);
    let mut reader = reader.join().unwrap();
    let _agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    let summary = w.connect_loop("198.51.100.10:10250", 4000).summary();
    let ok = summary["ok"].as_u64().unwrap();
    assert_eq!(
        summary["failed"], 0,
        "no connection fails for a stalled sink: {summary}"
    );
    let text = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    let dropped = sample(&text, "tunnel_server_audit_dropped_total").unwrap();
    assert!(
        dropped > 0.0,
        "{ok} connections through a stalled sink dropped no line: {text}"
    );
    eprintln!("{ok} connections through a stalled sink: {dropped} lines dropped");
    // Reading again: what was queued arrives, and with the dropped ones accounts for every
    // connection.
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 1 << 16];
    while (got.lines().count() as f64) + dropped < ok as f64 && Instant::now() < deadline {
        // Non-blocking enough: the server keeps the FIFO open, so read returns what is there.
        let n = reader.read(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(
        got.lines().count() as f64 + dropped,
        ok as f64,
        "written + dropped = connections ({ok})"
    );
    assert!(got.lines().all(|l| l.contains("\"outcome\":\"closed\"")));
}
