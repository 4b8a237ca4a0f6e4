//! README's first quick-start command runs this demo: run it non-interactively and check what
//! it shows (root only, like every end-to-end test), and that a machine lacking something gets
//! one clear message with nothing set up.
use std::process::Command;

fn netns_names() -> Vec<String> {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn demo_runs_to_the_end_with_every_check_passing_and_cleans_up() {
    redirector_tests::require_root();
    let out = Command::new(redirector_tests::spawn::workspace_bin("demo"))
        .output()
        .expect("spawn demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("demo output lacks {needle:?}:\n{stdout}"))
            .to_owned()
    };
    // Behind "NAT": not reachable without the redirector.
    assert!(line("curl https://192.0.2.10:10250/healthz ->").contains("curl: (7)"));
    // Every node by name and tunnel address, edge-a also by its unique InternalIP.
    for (host, node) in [
        ("edge-a", "edge-a"),
        ("198.51.100.1:", "edge-a"),
        ("192.0.2.10:", "edge-a"),
        ("edge-b", "edge-b"),
        ("198.51.100.2:", "edge-b"),
        ("edge-c", "edge-c"),
        ("198.51.100.3:", "edge-c"),
    ] {
        let (url, answer) = (format!("curl https://{host}"), format!("-> ok {node}"));
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&url) && l.ends_with(&answer)),
            "no {url:?} line ending {answer:?}:\n{stdout}"
        );
    }
    // The shared InternalIP: refused, with the server naming both nodes.
    assert!(line("curl https://192.0.2.20:10250/healthz").contains("curl: ("));
    assert!(
        line("tunnel server log:")
            .contains(r#"192.0.2.20 belongs to several nodes ["edge-b", "edge-c"]"#)
    );
    for expected in [
        // sync-nodes assigned tunnel addresses from the pool; the hosts block names them.
        "edge-b 192.0.2.20 tunnel=198.51.100.2",
        "edge-c 192.0.2.20 tunnel=198.51.100.3",
        "198.51.100.1\tedge-a",
        "edge-b /containerLogs/default/web/app?follow=true: log line 5",
        "ECHO HELLO FROM THE API SERVER",
        "edge-c: read 31 bytes until the client's half-close; exit 0",
        "attached to: /",
        "tunnel_server_sessions 3",
        r#"tunnel_server_refused_total{reason="ambiguous_address"} 1"#,
        "demo: every check passed",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
    for node in ["edge-a", "edge-b", "edge-c"] {
        assert!(
            line(&format!("target {node}:9100")).contains("health=up"),
            "{stdout}"
        );
    }
    // Its namespaces are gone.
    let demo_ns: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains(" namespace "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|n| n.trim_end_matches(':').to_owned())
        .collect();
    assert_eq!(
        demo_ns.len(),
        4,
        "demo printed its namespace names: {demo_ns:?}"
    );
    let left = netns_names();
    for n in demo_ns {
        assert!(!left.contains(&n), "namespace {n} left behind");
    }
}

#[test]
fn demo_without_root_or_tools_says_what_is_missing_and_sets_nothing_up() {
    redirector_tests::require_root();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(redirector_tests::spawn::workspace_bin("demo"))
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        err.trim(),
        "demo: needs root (it loads eBPF programs and builds network namespaces): run `sudo bash scripts/demo.sh`"
    );

    // Prometheus missing: pointed at the setup script.
    let child = Command::new(redirector_tests::spawn::workspace_bin("demo"))
        .env("EDGE_DEMO_TOOLS", "/nonexistent")
        .env("PATH", "/usr/sbin:/sbin")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn demo");
    // The demo names its namespaces after its PID.
    let prefix = format!("demo{}", child.id() % 100_000);
    let out = child.wait_with_output().expect("demo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.starts_with("demo: missing prometheus, prometheus-node-exporter, curl")
            && err.contains("run `sudo bash scripts/setup.sh`"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing was started");
    let made: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(made.is_empty(), "namespaces made: {made:?}");
}

/// A component that fails to start (here a Prometheus that exits at once) ends the demo with
/// one message naming it, and everything already set up is removed: namespaces, pins, cgroup.
#[test]
fn a_failing_component_is_named_and_everything_set_up_is_removed() {
    redirector_tests::require_root();
    let tools = std::env::temp_dir().join(format!("demo-fake-tools-{}", std::process::id()));
    std::fs::create_dir_all(&tools).unwrap();
    let fake = tools.join("prometheus");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'prometheus: cannot start (simulated)' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(
        "/opt/edge-redirector-demo/usr/bin/prometheus-node-exporter",
        tools.join("prometheus-node-exporter"),
    )
    .unwrap();
    let child = Command::new(redirector_tests::spawn::workspace_bin("demo"))
        .env("EDGE_DEMO_TOOLS", &tools)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn demo");
    let id = child.id() % 100_000;
    let out = child.wait_with_output().expect("demo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("demo: prometheus exited (exit status: 3) before it was ready")
            && err.contains("cannot start (simulated)")
            && err.contains("everything it set up was removed"),
        "{err}"
    );
    assert!(
        !err.contains("panicked at"),
        "a message, not a panic location: {err}"
    );
    let left: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("demo{id}")))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/edge-redirector-demo-{id}"));
    assert!(!pins.exists(), "{} left", pins.display());
    let cg = redirector::cgroup::cgroup2_mount()
        .unwrap()
        .join(format!("edge-redirector-demo-{id}"));
    assert!(!cg.exists(), "{} left", cg.display());
    std::fs::remove_dir_all(&tools).unwrap();
}
