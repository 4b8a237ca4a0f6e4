//! The internet-facing agent port against a handshake flood: 5,000 TCP connections from 50
//! addresses (192.0.2.10-59, a namespace of their own) that never send a ClientHello, held
//! open. The server bounds what they hold (64 per source closed at once past that, 1,024 in
//! total with the oldest closed for a newcomer), and a real agent dialling in meanwhile gets
//! its session at once. Root only.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use redirector_tests::{
    Netns, World, netns, pki::TestPki, procstat::ProcStats, replies, tunnel_procs,
};

const CONNECTIONS: usize = 5_000;
const SOURCES: usize = 50;

/// Soft open-file limit up to the hard one: the flood's sockets are this process's.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur as usize > CONNECTIONS + 1000,
        "the open-file limit ({}) is too low for {CONNECTIONS} connections: raise it (ulimit -Hn)",
        lim.rlim_cur
    );
}

/// Opens `CONNECTIONS` connections to `at` from the attackers' addresses and keeps them.
fn flood(attackers: &Netns, at: SocketAddr) -> Vec<socket2::Socket> {
    let _in = attackers.enter();
    (0..CONNECTIONS)
        .filter_map(|i| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
            // Source by source: each one reaches its own limit.
            let source = i / (CONNECTIONS / SOURCES);
            let from: SocketAddr = format!("192.0.2.{}:0", 10 + source).parse().unwrap();
            s.bind(&from.into()).ok()?;
            s.connect_timeout(&at.into(), Duration::from_secs(5)).ok()?;
            Some(s)
        })
        .collect()
}

#[test]
fn a_real_agent_connects_at_once_while_5000_silent_connections_are_held_against_the_server() {
    raise_nofile();
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    let attackers = Netns::new(&format!("rt{}a", w.id));
    let sources: Vec<String> = (0..SOURCES)
        .map(|i| format!("192.0.2.{}/24", 10 + i))
        .collect();
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    // Not "ma": ip(8) reads that as an abbreviated keyword.
    netns::veth(
        &w.master,
        "mf",
        &["192.0.2.1/24"],
        &attackers,
        "fm",
        &sources,
    );
    let at = SocketAddr::from(([192, 0, 2, 1], st.agents_at.port()));

    let t = Instant::now();
    let held = flood(&attackers, at);
    let flood_took = t.elapsed();
    assert!(
        held.len() >= CONNECTIONS * 9 / 10,
        "only {} of {CONNECTIONS} connections opened",
        held.len()
    );
    // What the server holds once the closed ones are gone (the flood still open). Held: older
    // than --evict-handshakes-after (2 s), as connections that never finish become; younger
    // ones are left to finish and a newcomer retries (a reconnect storm's own handshakes).
    std::thread::sleep(Duration::from_millis(500));
    let during = ProcStats::of(st.server.child.id());
    std::thread::sleep(Duration::from_millis(1600));

    // The real agent, from the edge, while every silent connection is still open.
    let t = Instant::now();
    let _agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    let session_after = t.elapsed();
    let v = w.probe(true, None, &["connect", "198.51.100.10:10250"]);
    assert_eq!(replies(&v)[0].1, "edge 127.0.0.1:10250", "{v}");

    let metrics = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    let count = |reason: &str| -> u64 {
        let key = format!(
            "tunnel_server_admission_refused_total{{listener=\"agents\",reason=\"{reason}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    let (per_source, evicted, total_full) = (
        count("per_source_full"),
        count("evicted_oldest"),
        count("total_full"),
    );
    let log_lines = st.server.count_log(&["closed before authentication"]);
    eprintln!(
        "{} silent connections opened in {flood_took:?}; server then: {} fds, {} KiB; agent session after {session_after:?}; closed at once (per source): {per_source}, closed at once (all slots young): {total_full}, oldest closed for newer: {evicted}; {log_lines} log lines about it",
        held.len(),
        during.fds,
        during.rss_kib
    );
    // Source by source: 64 of each admitted and the rest of its 100 closed at once, until
    // the 1,024 slots are taken (16 sources); every later connection found them all young.
    assert!(
        per_source >= (1024 / 64 * (100 - 64)) as u64 * 9 / 10,
        "{metrics}"
    );
    assert!(
        per_source + total_full >= (CONNECTIONS as u64 - 1024) * 9 / 10,
        "{metrics}"
    );
    // The agent, later, found them stale and the oldest made room for it.
    assert!(evicted > 0, "{metrics}");
    assert!(
        during.fds < 1024 + 200,
        "the server holds {} descriptors: the flood was not bounded",
        during.fds
    );
    // Generous on a shared machine; the figure above is what it took.
    assert!(
        session_after < Duration::from_secs(5),
        "the agent's session took {session_after:?}"
    );
    assert!(
        log_lines <= 4,
        "{log_lines} log lines:\n{}",
        st.server.log()
    );
    drop(held);
}
