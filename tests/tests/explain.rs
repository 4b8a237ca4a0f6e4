//! `redirector explain` against the real stack (redirector on a child cgroup, tunnel server,
//! agents): every verdict, each checked against what a real client then sees where it can be.
//! Root only.
use std::{path::Path, process::Command, time::Duration};

use redirector_tests::{World, pki::TestPki, replies, spawn, tunnel_procs, tunnel_procs::Stack};
use serde_json::Value;

/// The world's nodes, plus edge-d sharing edge-c's address (ambiguous).
const TABLE: &str = "edge-d 198.51.100.12\n";

fn explain(w: &World, st: &Stack, args: &[&str]) -> Value {
    explain_with(w, &w.pin_dir, &st.metrics_at.to_string(), args)
}

/// `redirector explain ...`, run in the master namespace (where the server listens): stdout.
fn run_explain(w: &World, pin_dir: &Path, server: &str, args: &[&str]) -> Vec<u8> {
    let mut cmd = Command::new(spawn::workspace_bin("redirector"));
    cmd.arg("--pin-dir").arg(pin_dir).arg("explain").args(args);
    cmd.arg("--node-table").arg(&w.node_table);
    cmd.args(["--server", server]);
    spawn::place(&mut cmd, None, Some(&w.master));
    let out = cmd.output().expect("spawn redirector explain");
    assert!(
        out.status.success(),
        "explain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// [`run_explain`] with `--json`, parsed.
fn explain_with(w: &World, pin_dir: &Path, server: &str, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = run_explain(w, pin_dir, server, &args);
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("explain output {:?}: {e}", String::from_utf8_lossy(&out)))
}

fn verdict(v: &Value) -> (&str, Option<&str>, Option<&str>) {
    (
        v["verdict"].as_str().unwrap_or("?"),
        v["reason"].as_str(),
        v["node"].as_str(),
    )
}

/// A process that stays in `cgroup` (optional) and `netns` while explained; killed on drop
/// (one outside the test cgroup is not killed with it).
struct Sleeper(std::process::Child);

impl Sleeper {
    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper(w: &World, in_cgroup: bool, netns: &redirector_tests::Netns) -> Sleeper {
    let mut cmd = Command::new("sleep");
    cmd.arg("120");
    spawn::place(&mut cmd, in_cgroup.then_some(&w.cgroup), Some(netns));
    Sleeper(cmd.spawn().expect("sleep"))
}

#[test]
fn explain_gives_every_verdict_as_the_data_path_decides_it() {
    let w = World::new();
    let mut table = std::fs::read_to_string(&w.node_table).unwrap();
    table.push_str(TABLE);
    std::fs::write(&w.node_table, table).unwrap();
    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    let mut agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    let client = sleeper(&w, true, &w.master);
    let pid = client.pid();
    let with_pid = |target: &str| explain(&w, &st, &[target, "--pid", &pid]);

    // Redirected: the node, its session, its agent allows the port; a client is answered by it.
    let v = with_pid("198.51.100.10:10250");
    assert_eq!(verdict(&v), ("redirected", None, Some("edge-a")), "{v:#}");
    let steps: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "program", "caller", "port", "address", "ingress", "tunnel", "session", "agent"
        ],
        "{v:#}"
    );
    assert!(
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ok"] == true),
        "{v:#}"
    );
    let text = run_explain(
        &w,
        &w.pin_dir,
        &st.metrics_at.to_string(),
        &["198.51.100.10:10250", "--pid", &pid],
    );
    let text = String::from_utf8_lossy(&text);
    eprintln!("{text}");
    assert!(
        text.contains("verdict: redirected to node edge-a"),
        "{text}"
    );
    let seen = w.probe(true, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(replies(&seen)[0].1, "edge 127.0.0.1:10250", "{seen}");

    // Refused by the agent's allow-list: 10255 is redirected, but edge-a allows only 10250.
    let v = with_pid("198.51.100.10:10255");
    assert_eq!(
        verdict(&v),
        ("refused", Some("agent_refused"), Some("edge-a")),
        "{v:#}"
    );
    assert!(v["fix"].as_str().unwrap().contains("--ports"), "{v:#}");

    // Refused, no session: edge-b is in the table, but its agent never connected.
    let v = with_pid("198.51.100.11:10250");
    assert_eq!(
        verdict(&v),
        ("refused", Some("no_session"), Some("edge-b")),
        "{v:#}"
    );
    let seen = w.probe(true, None, &["connect", "198.51.100.11:10250"]);
    assert_eq!(seen[0]["ok"], false, "a client is refused: {seen}");

    // Refused, ambiguous: both nodes named, by the kernel's side and by the server's.
    let v = with_pid("198.51.100.12:10250");
    assert_eq!(
        verdict(&v),
        ("refused", Some("ambiguous_address"), None),
        "{v:#}"
    );
    let summary = v["summary"].as_str().unwrap();
    assert!(
        summary.contains("edge-c") && summary.contains("edge-d"),
        "{v:#}"
    );
    let seen = w.probe(true, None, &["connect", "198.51.100.12:10250"]);
    assert_eq!(seen[0]["ok"], false, "a client is refused: {seen}");

    // Passes through: nobody's address, a port not redirected.
    let v = with_pid("198.51.100.99:10250");
    assert_eq!(verdict(&v), ("passes_through", None, None), "{v:#}");
    assert!(
        v["summary"].as_str().unwrap().contains("no edge node"),
        "{v:#}"
    );
    let v = with_pid("198.51.100.10:22");
    assert_eq!(verdict(&v), ("passes_through", None, None), "{v:#}");
    assert!(v["summary"].as_str().unwrap().contains("port 22"), "{v:#}");

    // A caller outside the attached cgroup: the explain command itself, and a process given
    // by pid, and by cgroup path.
    let v = explain(&w, &st, &["198.51.100.10:10250"]);
    assert_eq!(verdict(&v), ("passes_through", None, None), "{v:#}");
    assert!(
        v["summary"]
            .as_str()
            .unwrap()
            .contains("outside the attached cgroup"),
        "{v:#}"
    );
    let outside = sleeper(&w, false, &w.master);
    let v = explain(&w, &st, &["198.51.100.10:10250", "--pid", &outside.pid()]);
    assert_eq!(verdict(&v).0, "passes_through", "{v:#}");
    drop(outside);
    let cg = w.cgroup.path.display().to_string();
    let v = explain(&w, &st, &["198.51.100.10:10250", "--cgroup", &cg]);
    assert_eq!(verdict(&v), ("redirected", None, Some("edge-a")), "{v:#}");

    // No ingress: an IPv6 destination from a pod, and the redirector has no --pod-ingress6.
    let pod = sleeper(&w, true, &w.pod);
    let v = explain(&w, &st, &["[2001:db8::10]:10250", "--pid", &pod.pid()]);
    assert_eq!(verdict(&v), ("passes_through", None, None), "{v:#}");
    assert!(
        v["fix"].as_str().unwrap().contains("--pod-ingress6"),
        "{v:#}"
    );
    drop(pod);

    // The server not asked: what the kernel does, and that the rest is unknown.
    let v = explain_with(
        &w,
        &w.pin_dir,
        "off",
        &["198.51.100.10:10250", "--pid", &pid],
    );
    assert_eq!(verdict(&v), ("unknown", None, None), "{v:#}");

    // A hung agent: its session is up, but it answers no stream.
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGSTOP) };
    let v = with_pid("198.51.100.10:10250");
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGCONT) };
    assert_eq!(
        verdict(&v),
        ("refused", Some("stream_open_failed"), Some("edge-a")),
        "{v:#}"
    );

    // Programs not attached (another pin directory): nothing is redirected.
    let empty = w.dir.join("no-pins");
    std::fs::create_dir_all(&empty).unwrap();
    let v = explain_with(&w, &empty, "off", &["198.51.100.10:10250", "--pid", &pid]);
    assert_eq!(verdict(&v), ("passes_through", None, None), "{v:#}");
    assert!(
        v["fix"].as_str().unwrap().contains("redirector run"),
        "{v:#}"
    );

    drop(client);
    agent.stop(libc::SIGTERM, Duration::from_secs(5));
}
