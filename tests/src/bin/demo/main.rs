//! The local demo, on one machine, in namespaces it builds and removes: the whole path with the
//! real binaries and real clients. A master and three edge nodes behind "NAT" (the master has no
//! route to them); two edges share an InternalIP. `curl` on the master dials an edge node by
//! name or address; the eBPF redirector sends the connection to the tunnel server; the server
//! finds the node from the original destination and opens a stream on that node's agent session
//! (mutual TLS, identity from the certificate); the agent dials its own node's service. A real
//! Prometheus scrapes every edge's node-exporter the same way.
//!
//! `demo [--keep]`: `--keep` leaves everything up until Ctrl-C and prints how to try it.
mod cluster;
mod scenes;
mod tools;
mod world;

use std::{
    io::Write,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

pub fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

/// Set by SIGINT/SIGTERM: the demo then ends through the normal path, so every Drop cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// What the demo needs from the machine, checked before anything is set up.
fn preflight() -> Result<tools::Tools, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (it loads eBPF programs and builds network namespaces): run `sudo bash scripts/demo.sh`".into());
    }
    redirector::cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
    tools::Tools::find()
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    let tools = match preflight() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(1);
        }
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores an atomic flag.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    // A failure inside unwinds through every guard (processes, pins, cgroup, namespaces); the
    // newcomer sees what failed, not a Rust panic location.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        eprintln!("demo: {what}");
    }));
    let result = std::panic::catch_unwind(|| run(&tools, keep));
    match result {
        Ok(true) => say("demo: every check passed"),
        Ok(false) => {
            eprintln!("demo: some checks FAILED (see above)");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("demo: FAILED (the reason is above); everything it set up was removed");
            std::process::exit(1);
        }
    }
}

fn run(tools: &tools::Tools, keep: bool) -> bool {
    say(
        "== Building the demo cluster (network namespaces and one child cgroup; nothing else on the host changes)",
    );
    let w = world::DemoWorld::new();
    say(&format!(
        "   master namespace {}: redirector, tunnel server, Prometheus; clients run in cgroup {}",
        w.master.name,
        w.cgroup.path.display()
    ));
    for e in &w.edges {
        say(&format!(
            "   edge namespace   {}: {} InternalIP {:<11} kubelet stand-in (HTTPS :10250), node-exporter (127.0.0.1:9100), agent dialling {}",
            e.ns.name, e.spec.name, e.spec.internal_ip, e.gateway
        ));
    }
    say("   the nodes, as an operator lists them:");
    for l in world::nodes_input_text().lines() {
        say(&format!("     {l}"));
    }

    let mut ok = scenes::unreachable_without_redirector(&w, tools);
    let mut c = cluster::start(&w, tools);
    ok &= scenes::tunnel_addresses_assigned(&w, &c);
    say(&format!(
        "   started: redirector (ingress {}), tunnel server (agents dial :{}), 3 agents, 3 kubelets, 3 node-exporters, Prometheus",
        cluster::INGRESS,
        cluster::AGENT_PORT
    ));
    ok &= scenes::hosts_block(&w, &c);
    ok &= scenes::kubelets_by_name_and_address(&w, tools, &c);
    ok &= scenes::shared_internal_ip_refused(&w, tools, &mut c);
    ok &= scenes::streaming_logs(&w, tools);
    ok &= scenes::exec_half_close(&w);
    ok &= scenes::prometheus_scrapes_every_edge(&w, tools);
    ok &= scenes::status_and_metrics(&w, tools);
    ok &= scenes::dashboard_panels(&w, tools);

    if keep {
        scenes::how_to_try(&w, tools);
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    say("\n== Tearing down (processes, programs, links, pins, cgroup, namespaces)");
    let pins = w.pin_dir.clone();
    drop(c);
    drop(w);
    if pins.exists() {
        eprintln!("demo: {} was not removed", pins.display());
        ok = false;
    }
    ok
}
