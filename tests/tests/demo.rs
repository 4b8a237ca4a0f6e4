//! README's first quick-start command runs this demo: run it non-interactively and check what
//! it shows (root only, like every end-to-end test).
use std::process::Command;

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
    for expected in [
        "connect(198.51.100.10:10250) -> edge 198.51.100.10:10250, via the node's agent",
        "connect(198.51.100.11:10255) -> edge 198.51.100.11:10255, via the node's agent",
        "connect(198.51.100.12:10250) -> REFUSED",
        r#"198.51.100.12 belongs to several nodes ["edge-c", "edge-d"]"#,
        "connect(198.51.100.10:80   ) -> edge 198.51.100.10:80, straight from the master (not redirected)",
        "connect(198.51.100.11:9100 ) -> edge 198.51.100.11:9100, via the node's agent",
        "attached to: /",
        "tunnel_server_sessions 4",
        "demo: every check passed",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
    // Its namespaces are gone.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let names = String::from_utf8_lossy(&ns.stdout);
    let demo_ns: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" namespace "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|n| n.trim_end_matches(':'))
        .collect();
    assert_eq!(
        demo_ns.len(),
        2,
        "demo printed its namespace names: {demo_ns:?}"
    );
    for n in demo_ns {
        assert!(
            !names
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n)),
            "namespace {n} left behind"
        );
    }
}
