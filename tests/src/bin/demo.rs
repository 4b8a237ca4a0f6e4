//! The local demo of kernel redirection, on one machine, in namespaces it builds and removes.
//!
//! It builds a master namespace, an edge host owning three node addresses and a "pod"
//! namespace; attaches the redirector to a cgroup made for the demo; and shows, with real
//! connections, what is redirected, what is not, and what the tunnel ingress learns. The tunnel
//! itself (issue 4) is stood in for by a listener that answers with the original destination.
//!
//! `demo [--keep]`: `--keep` leaves everything up until Ctrl-C and prints how to try it.
use std::{
    io::Write,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redirector_tests::{NODE_TABLE, World, replies};

fn say(s: &str) {
    println!("{s}");
    let _ = std::io::stdout().flush();
}

fn show_connections(
    w: &World,
    title: &str,
    in_cgroup: bool,
    ns: Option<&redirector_tests::Netns>,
    targets: &[&str],
) -> Vec<String> {
    say(&format!("\n== {title}"));
    let mut args = vec!["connect"];
    args.extend_from_slice(targets);
    let v = w.probe(in_cgroup, ns, &args);
    let mut labels = Vec::new();
    for (target, reply, peer) in replies(&v) {
        let seen = peer
            .map(|p| format!(" (client's getpeername: {p})"))
            .unwrap_or_default();
        say(&format!(
            "   connect({target:<21}) -> answered by: {reply}{seen}"
        ));
        labels.push(reply);
    }
    labels
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "demo: needs root (it loads eBPF programs and builds network namespaces): sudo bash scripts/demo.sh"
        );
        std::process::exit(1);
    }
    install_signal_handlers();

    say(
        "== Building the demo world (network namespaces, a child cgroup; nothing else on the host changes)",
    );
    let w = World::new();
    say(&format!(
        "   master namespace {}: the redirector and the tunnel ingress stand-ins",
        w.master.name
    ));
    say(&format!(
        "   edge namespace   {}: node addresses 198.51.100.10-12 and a non-node 198.51.100.99,",
        w.edge.name
    ));
    say("                     each serving ports 80, 9100, 10250, 10255, 10350");
    say(&format!(
        "   pod namespace    {}: a client like a Prometheus pod",
        w.pod.name
    ));
    say(&format!("   cgroup           {}", w.cgroup.path.display()));
    say(&format!(
        "   node table:\n{}",
        NODE_TABLE
            .lines()
            .map(|l| format!("     {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    say(&format!(
        "   ingress: host {} / pod {}",
        w.host_ingress, w.pod_ingress
    ));

    let _r = w.start_redirector(&[]);
    say("   redirector attached and ready");

    let mut ok = true;
    let l = show_connections(
        &w,
        "Clients in the cgroup: node addresses on kubelet ports go to the ingress, which learns the original destination",
        true,
        None,
        &[
            "198.51.100.10:10250",
            "198.51.100.11:10255",
            "198.51.100.12:10350",
        ],
    );
    ok &= l.iter().all(|x| x.starts_with("ingress 198.51.100."));
    let l = show_connections(
        &w,
        "Everything else is untouched: another port, an address that is not a node",
        true,
        None,
        &["198.51.100.10:80", "198.51.100.99:10250"],
    );
    ok &= l.iter().all(|x| x.starts_with("edge "));
    let l = show_connections(
        &w,
        "A process outside the cgroup is untouched",
        false,
        None,
        &["198.51.100.10:10250"],
    );
    ok &= l.iter().all(|x| x.starts_with("edge "));
    let l = show_connections(
        &w,
        "A client in a pod namespace goes to the pod ingress (not its own 127.0.0.1)",
        true,
        Some(&w.pod),
        &["198.51.100.11:10250"],
    );
    ok &= l.iter().all(|x| x.ends_with("pod=true"));

    say("\n== Adding port 9100 (node-exporter) at run time: redirector ports add 9100");
    let out = w.cli(&["ports", "add", "9100"]);
    say(&format!(
        "   ports now: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ));
    let l = show_connections(
        &w,
        "node-exporter port, after the change",
        true,
        None,
        &["198.51.100.12:9100"],
    );
    ok &= l
        .iter()
        .all(|x| x.starts_with("ingress 198.51.100.12:9100"));

    say("\n== redirector status");
    let out = w.cli(&["status"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        say(&format!("   {line}"));
    }

    if keep {
        say(&format!(
            "\n== Left running (Ctrl-C to tear down). Try:\n   redirector status: {bin} --pin-dir {pins} status\n   a client in the cgroup: nsenter --net=/run/netns/{m} sh -c 'echo $$ > {cg}/cgroup.procs; exec {probe} connect 198.51.100.10:10250'",
            bin = redirector_tests::spawn::workspace_bin("redirector").display(),
            pins = w.pin_dir.display(),
            m = w.master.name,
            cg = w.cgroup.path.display(),
            probe = redirector_tests::env_bin("probe").display(),
        ));
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    say("\n== Tearing down (programs, links, pins, cgroup, namespaces)");
    drop(_r);
    let pins = w.pin_dir.clone();
    drop(w);
    let leftover = Command::new("ls")
        .arg(&pins)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if leftover {
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

/// Set by SIGINT/SIGTERM: the demo then ends through the normal path, so every Drop cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores an atomic flag.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}
