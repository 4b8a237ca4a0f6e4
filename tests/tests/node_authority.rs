//! One node-table authority: the redirector and the tunnel server follow the same file, and the
//! server never refuses a node the kernel already redirected because its own copy is older.
//! The redirector reloads at once (SIGHUP) while the server polls only every second, so without
//! the server's check on a miss nearly every connection below would be `unknown_node`. Root
//! only.
use redirector_tests::{NODE_TABLE, World, pki::TestPki, tunnel_procs};

const ROUNDS: usize = 1000;

#[test]
fn a_node_added_and_dialled_at_once_is_never_unknown_to_the_server() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let st = tunnel_procs::stack(&w, &pki, &[]);
    let redirector_pid = st.redirector.proc.child.id() as i32;
    let mut not_redirected = Vec::new();
    for i in 0..ROUNDS {
        // A new node on an address the previous round's node had: the server must route it to
        // the new name, and know it the moment the kernel redirects it.
        let ip = format!("192.0.2.{}", 1 + i % 250);
        let table = format!("{NODE_TABLE}new-{i} {ip}\n");
        let tmp = w.node_table.with_extension("tmp");
        std::fs::write(&tmp, table).unwrap();
        std::fs::rename(&tmp, &w.node_table).unwrap();
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(redirector_pid, libc::SIGHUP) }, 0);
        let v = w.probe(
            true,
            None,
            &[
                "first-redirected",
                &format!("{ip}:10250"),
                "--within-ms",
                "3000",
            ],
        );
        if v["connected"] != true {
            not_redirected.push(v);
        }
    }
    assert!(
        not_redirected.is_empty(),
        "the kernel never redirected these: {not_redirected:?}"
    );
    // Every refusal has been counted by the time its client saw the reset.
    let metrics = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    let count = |reason: &str| -> u64 {
        let key = format!("tunnel_server_refused_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(count("unknown_node"), 0, "{metrics}");
    // Known, routed to its own name, and refused only because no agent serves it. (A client
    // whose connect timed out on this busy machine tries again: at least one per round.)
    assert!(count("no_session") >= ROUNDS as u64, "{metrics}");
    let log = st.server.log();
    let missed: Vec<usize> = (0..ROUNDS)
        .filter(|i| !log.contains(&format!("node new-{i} has no agent session")))
        .collect();
    assert!(
        missed.is_empty(),
        "rounds not routed to their new node: {missed:?}"
    );
}
