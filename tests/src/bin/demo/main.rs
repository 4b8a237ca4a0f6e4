//! The local demo, on one machine, in namespaces it builds and removes: the whole path with the
//! real binaries. A client in the master's cgroup dials an edge node's address; the eBPF
//! redirector sends it to the tunnel server; the server finds the node by the original
//! destination and opens a stream on that node's agent session (mutual TLS, identity from the
//! certificate); the agent dials its own node's service.
//!
//! `demo [--keep]`: `--keep` leaves everything up until Ctrl-C and prints how to try it.
use std::{
    io::Write,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redirector_tests::{World, pki::TestPki, replies, tunnel_procs};

/// Four nodes; edge-c and edge-d share an InternalIP, as many edge nodes do in public clouds.
const DEMO_NODES: &str = "\
# node-id  addresses
edge-a  198.51.100.10
edge-b  198.51.100.11
edge-c  198.51.100.12
edge-d  198.51.100.12
";

fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

/// Connects from the master's cgroup and shows who answered and from where the edge service
/// saw the connection come (an agent on the node, or the master directly).
fn show(w: &World, title: &str, targets: &[&str]) -> Vec<String> {
    say(&format!("\n== {title}"));
    let before = w.edge_log.len();
    let mut args = vec!["connect"];
    args.extend_from_slice(targets);
    let v = w.probe(true, None, &args);
    let seen = w.edge_log.all();
    let mut labels = Vec::new();
    for (i, (target, reply, _)) in replies(&v).into_iter().enumerate() {
        let token = format!("t{i}");
        let from = seen[before..]
            .iter()
            .find(|a| a.token == token)
            .and_then(|a| a.peer)
            .map(|p| p.ip().to_string());
        let how = match (reply.is_empty(), from.as_deref()) {
            (true, _) => format!("REFUSED ({})", v[i]["error"].as_str().unwrap_or("reset")),
            (false, Some("198.51.100.1")) => {
                format!("{reply}, straight from the master (not redirected)")
            }
            (false, Some(_)) => format!("{reply}, via the node's agent"),
            (false, None) => reply.clone(),
        };
        say(&format!("   connect({target:<19}) -> {how}"));
        labels.push(reply);
    }
    labels
}

/// Set by SIGINT/SIGTERM: the demo then ends through the normal path, so every Drop cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "demo: needs root (it loads eBPF programs and builds network namespaces): sudo bash scripts/demo.sh"
        );
        std::process::exit(1);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores an atomic flag.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }

    say(
        "== Building the demo world (network namespaces and a child cgroup; nothing else on the host changes)",
    );
    let w = World::new();
    std::fs::write(&w.node_table, DEMO_NODES).expect("node table");
    say(&format!(
        "   master namespace {}: the redirector and the tunnel server",
        w.master.name
    ));
    say(&format!(
        "   edge namespace   {}: the nodes' addresses 198.51.100.10-12 and their agents;",
        w.edge.name
    ));
    say("                     services on ports 80, 9100, 10250, 10255 and 10350");
    say(&format!(
        "   cgroup           {} (the only place the programs are attached)",
        w.cgroup.path.display()
    ));
    say(&format!(
        "   node table:\n{}",
        DEMO_NODES
            .lines()
            .map(|l| format!("     {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));

    let pki = TestPki::new(&w.dir);
    let tunnel_procs::Stack {
        ingress,
        agents_at,
        metrics_at,
        mut server,
        redirector,
    } = tunnel_procs::stack(&w, &pki, &[]);
    say(&format!("   redirector attached; ingress {ingress}"));
    say(&format!("   tunnel server up: agents dial {agents_at}"));
    let mut agents = Vec::new();
    for (node, dial) in [
        ("edge-a", "198.51.100.10"),
        ("edge-b", "198.51.100.11"),
        ("edge-c", "198.51.100.12"),
        ("edge-d", "127.0.0.1"),
    ] {
        agents.push(tunnel_procs::agent(
            &w,
            &pki,
            &mut server,
            node,
            agents_at,
            "10250,10255,10350,9100",
            dial,
        ));
        say(&format!(
            "   agent {node} connected (identity: urn:edge-redirector:node:{node} in its certificate)"
        ));
    }

    let mut ok = true;
    let l = show(
        &w,
        "Kubelet ports of edge nodes travel the tunnel to the right node",
        &[
            "198.51.100.10:10250",
            "198.51.100.11:10255",
            "198.51.100.10:10350",
        ],
    );
    ok &= l.iter().all(|x| x.starts_with("edge 198.51.100.1"));
    let l = show(
        &w,
        "An InternalIP shared by edge-c and edge-d is refused, never guessed",
        &["198.51.100.12:10250"],
    );
    ok &= l.iter().all(String::is_empty);
    if let Some(line) = server
        .log()
        .lines()
        .find(|l| l.contains("belongs to several nodes"))
    {
        say(&format!(
            "   tunnel server log: {}",
            line.split("WARN").last().unwrap_or(line).trim()
        ));
    } else {
        ok = false;
    }
    let l = show(&w, "Other ports are untouched", &["198.51.100.10:80"]);
    ok &= l.iter().all(|x| x == "edge 198.51.100.10:80");

    say("\n== Adding port 9100 (node-exporter) at run time: redirector ports add 9100");
    let out = w.cli(&["ports", "add", "9100"]);
    say(&format!(
        "   ports now: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ));
    let l = show(
        &w,
        "node-exporter port, after the change",
        &["198.51.100.11:9100"],
    );
    ok &= l.iter().all(|x| x == "edge 198.51.100.11:9100");

    say("\n== redirector status");
    for line in String::from_utf8_lossy(&w.cli(&["status"]).stdout).lines() {
        say(&format!("   {line}"));
    }
    say(&format!(
        "\n== tunnel server metrics (http://{metrics_at}/metrics, excerpt)"
    ));
    let metrics = tunnel_procs::http_get(&w, metrics_at, "/metrics");
    for line in metrics.lines().filter(|l| {
        l.starts_with("tunnel_server_sessions ")
            || l.starts_with("tunnel_server_streams_total")
            || l.starts_with("tunnel_server_refused_total")
    }) {
        say(&format!("   {line}"));
    }
    ok &= metrics.contains("tunnel_server_sessions 4");

    if keep {
        say(&format!(
            "\n== Left running (Ctrl-C to tear down). Try:\n   {bin} --pin-dir {pins} status\n   nsenter --net=/run/netns/{m} sh -c 'echo $$ > {cg}/cgroup.procs; exec {probe} connect 198.51.100.10:10250'",
            bin = redirector_tests::spawn::workspace_bin("redirector").display(),
            pins = w.pin_dir.display(),
            m = w.master.name,
            cg = w.cgroup.path.display(),
            probe = redirector_tests::spawn::workspace_bin("probe").display(),
        ));
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    say("\n== Tearing down (agents, tunnel server, programs, links, pins, cgroup, namespaces)");
    drop(agents);
    drop(server);
    drop(redirector);
    let pins = w.pin_dir.clone();
    drop(w);
    if Command::new("ls")
        .arg(&pins)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        eprintln!("demo: {} was not removed", pins.display());
        ok = false;
    }
    if ok {
        say("demo: every check passed");
    } else {
        eprintln!("demo: some checks FAILED (see above)");
        std::process::exit(1);
    }
}
