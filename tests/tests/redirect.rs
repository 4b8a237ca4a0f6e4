//! Kernel redirection end to end: the real redirector binary attaches its eBPF programs to a
//! child cgroup made for the test; clients are real processes in that cgroup; the ingress
//! stand-in recovers each connection's original destination through the library call; the
//! edge namespace's services reveal any connection that escaped. Root only.
use std::{process::Command, thread, time::Duration};

use redirector_tests::{World, replies};

fn ingress_label(target: &str, pod: bool) -> String {
    format!("ingress {target} pod={pod}")
}

#[test]
fn redirects_node_ports_and_leaves_everything_else_alone() {
    let w = World::new();
    let _r = w.start_redirector(&[]);
    let v = w.probe(
        true,
        None,
        &[
            "connect",
            "198.51.100.10:10250",
            "198.51.100.11:10255",
            "198.51.100.12:10350",
            "198.51.100.10:80",
            "198.51.100.99:10250",
        ],
    );
    let got = replies(&v);
    for (target, reply, peer) in &got[..3] {
        assert_eq!(reply, &ingress_label(target, false), "{v}");
        // getpeername shows the address the client dialled, not the ingress.
        assert_eq!(peer.as_deref(), Some(target.as_str()), "{v}");
    }
    assert_eq!(
        got[3].1, "edge 198.51.100.10:80",
        "other port untouched: {v}"
    );
    assert_eq!(
        got[4].1, "edge 198.51.100.99:10250",
        "other IP untouched: {v}"
    );

    // A process outside the cgroup is untouched even for a node port.
    let outside = w.probe(false, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(
        replies(&outside)[0].1,
        "edge 198.51.100.10:10250",
        "{outside}"
    );
    assert_eq!(
        w.ingress_log.len(),
        3,
        "exactly the three node connections reached the ingress"
    );
}

#[test]
fn thousand_concurrent_connections_each_recover_their_own_destination() {
    let w = World::new();
    let _r = w.start_redirector(&[]);
    let nodes = ["198.51.100.10", "198.51.100.11", "198.51.100.12"];
    let ports = ["10250", "10255", "10350"];
    let targets: Vec<String> = (0..1000)
        .map(|i| format!("{}:{}", nodes[i % 3], ports[(i / 3) % 3]))
        .collect();
    let mut args = vec!["connect"];
    args.extend(targets.iter().map(String::as_str));
    let v = w.probe(true, None, &args);
    let got = replies(&v);
    assert_eq!(got.len(), 1000);
    let wrong: Vec<_> = got
        .iter()
        .filter(|(t, reply, _)| reply != &ingress_label(t, false))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "connections whose recovered destination is not what they dialled: {wrong:?}"
    );
    assert_eq!(w.ingress_log.len(), 1000);
    assert!(w.edge_log.is_empty(), "escaped: {:?}", w.edge_log.all());
}

#[test]
fn ipv4_mapped_connect6_is_redirected_and_getpeername6_shows_the_dialled_address() {
    let w = World::new();
    let _r = w.start_redirector(&[]);
    let v = w.probe(true, None, &["connect", "[::ffff:198.51.100.11]:10250"]);
    let (_, reply, peer) = &replies(&v)[0];
    assert_eq!(reply, &ingress_label("198.51.100.11:10250", false), "{v}");
    assert_eq!(peer.as_deref(), Some("[::ffff:198.51.100.11]:10250"), "{v}");
}

#[test]
fn native_ipv6_node_is_redirected_to_the_ipv6_ingress_and_other_ports_are_not() {
    let w = World::new();
    let _r = w.start_redirector(&[]);
    let v = w.probe(
        true,
        None,
        &["connect", "[2001:db8::10]:10250", "[2001:db8::10]:80"],
    );
    let got = replies(&v);
    assert_eq!(
        got[0].1,
        ingress_label("[2001:db8::10]:10250", false),
        "{v}"
    );
    assert_eq!(
        got[0].2.as_deref(),
        Some("[2001:db8::10]:10250"),
        "getpeername6: {v}"
    );
    assert_eq!(got[1].1, "edge [2001:db8::10]:80", "{v}");
}

#[test]
fn client_in_another_network_namespace_reaches_the_pod_ingress() {
    let w = World::new();
    let _r = w.start_redirector(&[]);
    let v = w.probe(
        true,
        Some(&w.pod),
        &["connect", "198.51.100.10:10250", "198.51.100.12:10255"],
    );
    for (target, reply, peer) in replies(&v) {
        assert_eq!(reply, ingress_label(&target, true), "{v}");
        assert_eq!(peer.as_deref(), Some(target.as_str()));
    }
    assert_eq!(w.pod_ingress_log.len(), 2);
    assert!(
        w.ingress_log.is_empty(),
        "a pod must not be sent to its own loopback"
    );
}

#[test]
fn port_added_and_removed_at_run_time_applies_to_new_connections() {
    let w = World::new();
    let _r = w.start_redirector(&[]);
    let target = "198.51.100.10:9100";
    assert_eq!(
        replies(&w.probe(true, None, &["connect", target]))[0].1,
        "edge 198.51.100.10:9100"
    );

    let out = w.cli(&["ports", "add", "9100"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "9100,10250,10255,10350"
    );
    assert_eq!(
        replies(&w.probe(true, None, &["connect", target]))[0].1,
        ingress_label(target, false)
    );

    let out = w.cli(&["ports", "remove", "9100"]);
    assert!(out.status.success());
    assert_eq!(
        replies(&w.probe(true, None, &["connect", target]))[0].1,
        "edge 198.51.100.10:9100"
    );
}

#[test]
fn node_table_edits_apply_without_restart_and_bad_edits_keep_the_last_good_table() {
    let w = World::new();
    let r = w.start_redirector(&[]);
    let target = "198.51.100.99:10250";
    assert_eq!(
        replies(&w.probe(true, None, &["connect", target]))[0].1,
        "edge 198.51.100.99:10250"
    );

    replace_node_table(
        &w,
        &format!("{}edge-d 198.51.100.99\n", redirector_tests::NODE_TABLE),
    );
    wait_for(
        || r.log().matches("node table applied").count() >= 2,
        "reload after edit",
    );
    assert_eq!(
        replies(&w.probe(true, None, &["connect", target]))[0].1,
        ingress_label(target, false)
    );

    replace_node_table(&w, "edge-a 198.51.100.10\nedge-b not-an-ip\n");
    wait_for(
        || r.log().contains("node table not applied"),
        "rejection of the bad edit",
    );
    assert!(
        r.log().contains("nodes.txt:2:"),
        "error names file and line: {}",
        r.log()
    );
    assert_eq!(
        replies(&w.probe(true, None, &["connect", target]))[0].1,
        ingress_label(target, false),
        "last good table kept"
    );
}

/// Replaces the node table whole (written beside, then renamed), as sync-nodes does: a write
/// in place can be read half done, and a truncated table is often a valid one.
fn replace_node_table(w: &World, content: &str) {
    let staged = w.dir.join("nodes.txt.new");
    std::fs::write(&staged, content).unwrap();
    std::fs::rename(&staged, &w.node_table).unwrap();
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn status_json(w: &World) -> serde_json::Value {
    let out = w.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn ids(status: &serde_json::Value, field: &str) -> Vec<u64> {
    status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_u64().expect(field))
        .collect()
}

#[test]
fn sigkill_during_a_connect_loop_lets_nothing_escape_and_the_restart_adopts_the_pins() {
    let w = World::new();
    let mut first = w.start_redirector(&[]);
    let before = status_json(&w);

    let client = w.connect_loop("198.51.100.11:10250", 3000);

    thread::sleep(Duration::from_millis(500));
    first.sigkill();
    thread::sleep(Duration::from_millis(500)); // connections go on with no redirector process
    let second = w.start_redirector(&[]);
    let summary = client.summary();

    assert_eq!(summary["failed"], 0, "{summary}");
    let labels = summary["labels"].as_object().unwrap();
    assert_eq!(
        labels.len(),
        1,
        "every connection must reach the ingress: {summary}"
    );
    assert!(
        labels.contains_key(&ingress_label("198.51.100.11:10250", false)),
        "{summary}"
    );
    assert!(
        summary["ok"].as_u64().unwrap() > 50,
        "the loop made too few connections to mean anything: {summary}"
    );
    assert!(
        w.edge_log.is_empty(),
        "escaped during restart: {:?}",
        w.edge_log.all()
    );

    assert!(second.log().contains("adopted=[\"redirect_connect4\", \"redirect_connect6\", \"orig_getpeername4\", \"orig_getpeername6\", \"publish_sock_ops\", \"orig_getsockopt\"]"), "{}", second.log());
    let after = status_json(&w);
    assert_eq!(
        ids(&before, "link_id"),
        ids(&after, "link_id"),
        "the same links stay attached"
    );
    assert_ne!(
        ids(&before, "program_id"),
        ids(&after, "program_id"),
        "the new process swapped its programs in"
    );
}

#[test]
fn uninstall_removes_every_program_link_and_pin_even_while_run_is_alive() {
    let w = World::new();
    let _running = w.start_redirector(&[]);
    let st = status_json(&w);
    let (links, progs) = (ids(&st, "link_id"), ids(&st, "program_id"));
    assert_eq!(links.len(), 6);

    let out = w.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("detached 6 links"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!w.pin_dir.exists(), "pin directory left behind");

    let bpftool = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&w.cgroup.path)
        .arg("-j")
        .output()
        .expect("bpftool (installed by scripts/setup.sh)");
    let attached: serde_json::Value =
        serde_json::from_slice(&bpftool.stdout).unwrap_or(serde_json::json!([]));
    assert_eq!(
        attached.as_array().map_or(0, Vec::len),
        0,
        "still attached: {attached}"
    );
    let live_links: Vec<u64> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| u64::from(l.id()))
        .collect();
    assert!(
        links.iter().all(|l| !live_links.contains(l)),
        "links still exist: {links:?}"
    );
    // The running process still holds its program fds; they are detached (above) and go
    // when it exits. Kill it and check the programs are gone from the kernel.
    drop(_running);
    // The kernel frees a program once its last reference goes; allow it a moment.
    wait_for(
        || {
            let live: Vec<u64> = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .map(|p| u64::from(p.id()))
                .collect();
            progs.iter().all(|p| !live.contains(p))
        },
        "the redirector's programs to be unloaded",
    );

    // And connections are plain again.
    assert_eq!(
        replies(&w.probe(true, None, &["connect", "198.51.100.10:10250"]))[0].1,
        "edge 198.51.100.10:10250"
    );
    let again = w.cli(&["uninstall"]);
    assert!(again.status.success(), "uninstall is idempotent");
}

#[test]
fn bad_input_is_refused_with_file_line_and_fix_and_installs_nothing() {
    let w = World::new();
    std::fs::write(
        &w.node_table,
        "edge-a 198.51.100.10\nedge-b 198.51.100.300\n",
    )
    .unwrap();
    let out = Command::new(redirector_tests::spawn::workspace_bin("redirector"))
        .arg("--pin-dir")
        .arg(&w.pin_dir)
        .args(["run", "--node-table"])
        .arg(&w.node_table)
        .arg("--cgroup")
        .arg(&w.cgroup.path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "nodes.txt:2: node \"edge-b\": \"198.51.100.300\" is not an IPv4 or IPv6 address"
        ),
        "{err}"
    );
    assert!(!w.pin_dir.exists(), "a refused start must not leave pins");

    let out = Command::new(redirector_tests::spawn::workspace_bin("redirector"))
        .arg("--pin-dir")
        .arg(&w.pin_dir)
        .args(["run", "--node-table"])
        .arg(&w.node_table)
        .args(["--cgroup", "/tmp"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("is not a directory inside the cgroup v2 mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without privileges: a clear message naming what is needed, not a raw errno.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(redirector_tests::spawn::workspace_bin("redirector"))
        .arg("--pin-dir")
        .arg(&w.pin_dir)
        .args(["run", "--node-table", "/dev/null"])
        .arg("--cgroup")
        .arg(&w.cgroup.path)
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("permission denied while") && err.contains("needs root, or CAP_BPF"),
        "{err}"
    );

    let out = w.cli(&["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not installed: no pins in"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inside_a_cgroup_namespace_the_container_root_is_refused_not_attached() {
    let w = World::new();
    // A "container": a process in the test cgroup, with its own cgroup and mount namespaces,
    // whose only cgroup2 mount is its namespaced view (root = the test cgroup).
    let view = w.dir.join("cgroup-view");
    std::fs::create_dir_all(&view).unwrap();
    let script = format!(
        "set -e; for m in $(grep -w cgroup2 /proc/self/mounts | cut -d' ' -f2); do umount -l \"$m\"; done; \
         mount -t cgroup2 none {view}; exec timeout 20 {bin} --pin-dir {pins} run --node-table {table}",
        view = view.display(),
        bin = redirector_tests::spawn::workspace_bin("redirector").display(),
        pins = w.pin_dir.display(),
        table = w.node_table.display(),
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--cgroup",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]);
    redirector_tests::spawn::place(&mut cmd, Some(&w.cgroup), None);
    let out = cmd.output().expect("unshare (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse: {err}");
    assert!(
        err.contains("is not the host's root cgroup") && err.contains("cgroup namespace"),
        "{err}"
    );
    assert!(!w.pin_dir.exists(), "nothing installed");
}

#[test]
fn metrics_health_and_readiness_are_served_from_the_pinned_maps() {
    let w = World::new();
    std::fs::write(
        &w.node_table,
        format!("{}edge-x 198.51.100.12\n", redirector_tests::NODE_TABLE),
    )
    .unwrap();
    let _r = w.start_redirector(&[]);
    let v = w.probe(
        true,
        None,
        &["connect", "198.51.100.10:10250", "198.51.100.11:80"],
    );
    assert_eq!(replies(&v).len(), 2);
    let at: std::net::SocketAddr = "127.0.0.1:10269".parse().unwrap(); // the default
    assert!(
        redirector_tests::tunnel_procs::http_get(&w, at, "/readyz").starts_with("HTTP/1.0 200")
    );
    assert!(
        redirector_tests::tunnel_procs::http_get(&w, at, "/healthz").starts_with("HTTP/1.0 200")
    );
    let m = redirector_tests::tunnel_procs::http_get(&w, at, "/metrics");
    for line in [
        "redirector_redirected_total 1",
        "redirector_published_total 1",
        "redirector_node_addresses_ipv4 3",
        "redirector_node_addresses_ipv6 1",
        "redirector_ports 3",
        // 198.51.100.12 is listed by edge-c and edge-x.
        "redirector_ambiguous_addresses 1",
    ] {
        assert!(
            m.lines().any(|l| l == line),
            "/metrics lacks {line:?}:\n{m}"
        );
    }
    assert!(
        m.lines()
            .any(|l| l.starts_with("redirector_passed_total ") && l != "redirector_passed_total 0"),
        "{m}"
    );
}

/// An upgrade from a version without the getsockopt program: its five pinned links are
/// adopted in place (no gap) and the new program is attached beside them.
#[test]
fn a_restart_over_pins_without_the_getsockopt_program_attaches_it_and_adopts_the_rest() {
    let w = World::new();
    let mut first = w.start_redirector(&[]);
    first.sigkill();
    // What a previous version left: no link and no program pin for orig_getsockopt.
    // Unpinning the link detaches it (nothing else holds it).
    for dir in ["links", "programs"] {
        std::fs::remove_file(w.pin_dir.join(dir).join("orig_getsockopt")).unwrap();
    }
    let attached = |st: &serde_json::Value| {
        st["programs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["link_id"].is_u64())
            .count()
    };
    assert_eq!(attached(&status_json(&w)), 5);
    let second = w.start_redirector(&[]);
    let log = second.log();
    assert!(
        log.contains("attached=[\"orig_getsockopt\"]")
            && log.contains("adopted=[\"redirect_connect4\", \"redirect_connect6\", \"orig_getpeername4\", \"orig_getpeername6\", \"publish_sock_ops\"]"),
        "{log}"
    );
    assert_eq!(attached(&status_json(&w)), 6);
}
