//! `redirector sync-nodes` (embedded mode) with the real redirector, tunnel server and agents:
//! nodes from a list get tunnel addresses from the pool; two nodes sharing an InternalIP are
//! each reachable by their tunnel address while the shared address is refused; a node added to
//! the list becomes reachable and a node removed stops being redirected, without restarting
//! anything; a restarted sync keeps every node's address. Root only.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use redirector::follow::Follower;
use redirector_tests::{LoggedProc, World, pki::TestPki, replies, tunnel_procs};

const POOL: &str = "192.0.2.0/29";

fn start_sync(w: &World, input: &std::path::Path) -> LoggedProc {
    let state = w.dir.join("tunnel-addresses");
    let s = |p: &std::path::Path| p.display().to_string();
    LoggedProc::spawn(
        w,
        "sync-nodes",
        &w.master,
        "redirector",
        &[
            "sync-nodes",
            "--nodes",
            &s(input),
            "--state",
            &s(&state),
            "--pool",
            POOL,
            "--out",
            &s(&w.node_table),
            "--release-after",
            "1",
            "--metrics-listen",
            "off",
        ],
    )
}

/// Waits until the node table's tunnel addresses satisfy `ok`, and returns them.
fn wait_table(
    w: &World,
    what: &str,
    ok: impl Fn(&BTreeMap<String, IpAddr>) -> bool,
) -> BTreeMap<String, IpAddr> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // As the followers read it: the table file and its journal.
        let t = Follower::open(&w.node_table)
            .map(|f| f.current().table().tunnel.clone())
            .unwrap_or_default();
        if ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: node table tunnel addresses {t:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects until the reply to `target` is `want` (followers reload within a second or two).
fn wait_reply(w: &World, target: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = w.probe(true, None, &["connect", target]);
        if replies(&v)[0].1 == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{target}: wanted {want:?}, got {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn synced_nodes_get_tunnel_addresses_and_follow_list_edits_live() {
    let w = World::new();
    let input = w.dir.join("nodes-input.txt");
    std::fs::write(&input, "edge-a 198.51.100.10\nedge-b 198.51.100.10\n").unwrap();
    let mut sync = start_sync(&w, &input);
    let t = wait_table(&w, "first sync", |t| t.len() == 2);
    let (a, b) = (t["edge-a"], t["edge-b"]);
    assert_ne!(a, b);

    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    // Each agent dials its node differently, so the reply says which agent served it.
    let agent = |st: &mut tunnel_procs::Stack, node: &str, dial: &str| {
        tunnel_procs::agent(&w, &pki, &mut st.server, node, st.agents_at, "10250", dial)
    };
    let _a = agent(&mut st, "edge-a", "127.0.0.1");
    let _b = agent(&mut st, "edge-b", "198.51.100.11");
    let v = w.probe(
        true,
        None,
        &[
            "connect",
            &format!("{a}:10250"),
            &format!("{b}:10250"),
            "198.51.100.10:10250",
        ],
    );
    let got = replies(&v);
    assert_eq!(
        got[0].1, "edge 127.0.0.1:10250",
        "edge-a by its tunnel address: {v}"
    );
    assert_eq!(
        got[1].1, "edge 198.51.100.11:10250",
        "edge-b by its tunnel address: {v}"
    );
    assert_eq!(got[2].1, "", "the shared InternalIP is refused: {v}");
    st.server
        .wait_log(&["198.51.100.10 belongs to several nodes", "edge-a", "edge-b"]);

    // A node added to the list: a tunnel address, then reachable, with nothing restarted.
    std::fs::write(
        &input,
        "edge-a 198.51.100.10\nedge-b 198.51.100.10\nedge-c 198.51.100.12\n",
    )
    .unwrap();
    let t = wait_table(&w, "edge-c added", |t| t.len() == 3);
    assert_eq!(
        (t["edge-a"], t["edge-b"]),
        (a, b),
        "existing nodes keep their addresses"
    );
    let c = t["edge-c"];
    // It came as one journal entry: the table file was not rewritten, and the redirector and
    // the tunnel server applied that entry alone.
    let journal =
        std::fs::read_to_string(redirector::journal::journal_path(&w.node_table)).unwrap();
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("+ edge-c 198.51.100.12 tunnel=")),
        "journal: {journal}"
    );
    let _c = agent(&mut st, "edge-c", "198.51.100.12");
    wait_reply(&w, &format!("{c}:10250"), "edge 198.51.100.12:10250");

    // Removed from the list: released after the grace period, no longer redirected (the
    // master has no route to the pool, so nothing answers).
    std::fs::write(&input, "edge-a 198.51.100.10\nedge-b 198.51.100.10\n").unwrap();
    wait_table(&w, "edge-c removed", |t| t.len() == 2);
    wait_reply(&w, &format!("{c}:10250"), "");

    // A restarted sync keeps every node's address (persisted in the state file).
    drop(sync);
    std::fs::remove_file(&w.node_table).unwrap();
    sync = start_sync(&w, &input);
    let t = wait_table(&w, "after restart", |t| t.len() == 2);
    assert_eq!((t["edge-a"], t["edge-b"]), (a, b));
    drop(sync);
}
