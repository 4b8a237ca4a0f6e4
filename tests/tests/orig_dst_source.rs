//! How the tunnel server learns original destinations (`--orig-dst`), with the real binaries:
//! the redirector's getsockopt program answers only inside the cgroup it is attached to, the
//! pinned map needs privileges; each way that cannot work says why and what to do. Root only.
use std::time::Duration;

use redirector_tests::{
    LoggedProc, RedirectorProc, World, free_addr, pki::TestPki, replies, spawn, tunnel_procs,
};

struct Setup {
    w: World,
    pki: TestPki,
    agents_at: std::net::SocketAddr,
    _redirector: RedirectorProc,
    args: Vec<String>,
}

fn setup(orig_dst: &str) -> Setup {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let (ingress, agents_at, metrics_at) = {
        let _m = w.master.enter();
        (
            free_addr("127.0.0.1"),
            free_addr("198.51.100.1"),
            free_addr("127.0.0.1"),
        )
    };
    let redirector = RedirectorProc::start_with_ingress(&w, ingress, &[]);
    let mut args = tunnel_procs::server_args(
        &pki,
        ingress,
        agents_at,
        metrics_at,
        &w.node_table,
        &w.pin_dir,
    );
    let at = args.iter().position(|a| a == "--orig-dst").unwrap();
    args[at + 1] = orig_dst.to_owned();
    args.extend(["--wait-for-redirector".to_owned(), "0.5".to_owned()]);
    Setup {
        w,
        pki,
        agents_at,
        _redirector: redirector,
        args,
    }
}

/// The server outside the test cgroup (in the master namespace only).
fn outside_cgroup(s: &Setup, drop_privileges: bool) -> LoggedProc {
    let mut cmd = std::process::Command::new(spawn::workspace_bin("tunnel"));
    cmd.args(&s.args);
    spawn::place(&mut cmd, None, Some(&s.w.master));
    if drop_privileges {
        spawn::drop_privileges(&mut cmd);
    }
    LoggedProc::start(&s.w.dir, "tunnel-server", cmd)
}

#[test]
fn sockopt_outside_the_programs_cgroup_fails_naming_the_cgroup_and_the_fix() {
    let s = setup("sockopt");
    let mut server = outside_cgroup(&s, true);
    let st = server.wait_exit(Duration::from_secs(20));
    assert!(!st.success(), "{}", server.log());
    let log = server.log();
    assert!(
        log.contains("does not answer in this process's cgroup (/")
            && log.contains("start `redirector run` with a --cgroup at or above it"),
        "{log}"
    );
}

#[test]
fn map_without_privileges_fails_saying_it_needs_cap_bpf() {
    let s = setup("map");
    let mut server = outside_cgroup(&s, true);
    let st = server.wait_exit(Duration::from_secs(20));
    assert!(!st.success(), "{}", server.log());
    let log = server.log();
    assert!(
        log.contains("from the pinned map in") && log.contains("needs CAP_BPF"),
        "{log}"
    );
}

#[test]
fn auto_outside_the_cgroup_falls_back_to_the_map_with_a_warning_and_still_routes() {
    let s = setup("auto");
    // Root: the map can be read.
    let server = outside_cgroup(&s, false);
    routes_saying(&s, server, "getsockopt program does not cover this process");
}

/// Once `server` is ready, its log says `said`, and a redirected connection reaches the agent.
fn routes_saying(s: &Setup, mut server: LoggedProc, said: &str) {
    server.wait_log(&["tunnel server ready"]);
    assert!(server.log().contains(said), "{}", server.log());
    let _agent = tunnel_procs::agent(
        &s.w,
        &s.pki,
        &mut server,
        "edge-a",
        s.agents_at,
        "10250",
        "127.0.0.1",
    );
    let v = s.w.probe(true, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(replies(&v)[0].1, "edge 127.0.0.1:10250", "{v}");
}

#[test]
fn auto_inside_the_cgroup_asks_the_kernel_even_as_root() {
    let s = setup("auto");
    let server = tunnel_procs::spawn_server(&s.w, "tunnel-server", &s.args);
    routes_saying(&s, server, "getsockopt(SO_ORIGINAL_DST)");
}
