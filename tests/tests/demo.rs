//! README's first quick-start command runs this demo: run it non-interactively and check what
//! it shows (root only, like every end-to-end test).
use std::process::Command;

#[test]
fn demo_runs_to_the_end_with_every_check_passing_and_cleans_up() {
    redirector_tests::require_root();
    let out = Command::new(redirector_tests::env_bin("demo"))
        .output()
        .expect("spawn demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "answered by: ingress 198.51.100.10:10250 pod=false (client's getpeername: 198.51.100.10:10250)",
        "answered by: edge 198.51.100.99:10250",
        "answered by: ingress 198.51.100.11:10250 pod=true",
        "answered by: ingress 198.51.100.12:9100 pod=false",
        "attached to: /",
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
        .filter_map(|l| l.split_whitespace().nth(2).filter(|w| w.starts_with("rt")))
        .collect();
    assert!(!demo_ns.is_empty(), "demo printed its namespace names");
    for n in demo_ns {
        assert!(!names.contains(n), "namespace {n} left behind");
    }
}
