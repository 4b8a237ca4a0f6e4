//! Streams across a WAN outage, with the real binaries: the edge namespace's link goes down for
//! 20 s (2 s keepalives, so both ends declare the session dead), then up. A 256 MiB download
//! and a line-numbered log stream, both running through it, arrive whole: sha256 equal, every
//! line exactly once and in order, both ended by a clean EOF, no stream reset; the server
//! counts both resumed. Root only.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use redirector_tests::{
    LoggedProc, World,
    pki::TestPki,
    scrape,
    servers::{self, pattern_sha},
    tunnel_procs,
};
use sha2::{Digest, Sha256};

/// A port of node edge-c that only this test's service listens on.
const PORT: u16 = 10400;
const NODE: &str = "198.51.100.12";
const BULK: u64 = 256 << 20;
const LINES: u64 = 3000;
const LINE_EVERY: Duration = Duration::from_millis(10);
const OUTAGE: Duration = Duration::from_secs(20);
/// The client reads the download at about this rate, so that it is mid-way at the outage.
const READ_RATE: u64 = 16 << 20;

/// A client in the redirected cgroup, in the master namespace, connected to edge-c's port.
fn client(w: &World) -> TcpStream {
    let to: SocketAddr = format!("{NODE}:{PORT}").parse().unwrap();
    w.cgroup.create_inside(|| {
        let _m = w.master.enter();
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .expect("connect through the redirector")
    })
}

#[test]
fn a_download_and_a_log_stream_run_through_a_20_s_outage_of_the_agents_link() {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let fast = ["--keepalive-interval", "2", "--keepalive-timeout", "2"];
    let mut st = tunnel_procs::stack_with(&w, &pki, &["--ports", &PORT.to_string()], &fast);
    {
        let _e = w.edge.enter();
        servers::commands(TcpListener::bind(("127.0.0.1", PORT)).unwrap(), LINE_EVERY);
    }
    let mut args = tunnel_procs::agent_args(
        &pki,
        "edge-c",
        &st.agents_at.to_string(),
        &PORT.to_string(),
        "127.0.0.1",
        "127.0.0.1:0",
    );
    args.extend(fast.map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _agent = LoggedProc::spawn(&w, "edge-c", &w.edge, "tunnel-agent", &args);
    st.server.wait_log(&["agent session up", "node=edge-c"]);

    let got = Arc::new(AtomicU64::new(0));
    let mut bulk = client(&w);
    bulk.write_all(format!("bulk {BULK}\n").as_bytes()).unwrap();
    let counter = got.clone();
    let download = thread::spawn(move || {
        let (mut h, mut buf, t0) = (Sha256::new(), vec![0u8; 256 << 10], Instant::now());
        let mut n = 0u64;
        loop {
            let k = bulk.read(&mut buf).expect("no reset on the download");
            if k == 0 {
                return (n, h.finalize().to_vec());
            }
            h.update(&buf[..k]);
            n += k as u64;
            counter.store(n, Ordering::Relaxed);
            // Paced: the download is still running when the link goes down.
            let due = Duration::from_secs_f64(n as f64 / READ_RATE as f64);
            if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                thread::sleep(ahead);
            }
        }
    });
    let mut log = client(&w);
    log.write_all(format!("log {LINES}\n").as_bytes()).unwrap();
    let lines = thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(log).lines() {
            let line = line.expect("no reset on the log stream");
            let n = line.strip_prefix("line ").unwrap().parse::<u64>().unwrap();
            seen.push((n, Instant::now()));
        }
        seen
    });

    thread::sleep(Duration::from_secs(3));
    let before = got.load(Ordering::Relaxed);
    assert!(
        before > 0 && before < BULK,
        "the download is under way: {before}"
    );
    w.edge.ip(&["link", "set", "em", "down"]);
    let down_at = Instant::now();
    // Both ends see the session dead (2 s + 2 s) well inside the outage.
    st.server.wait_log(&["session of edge-c is dead"]);
    thread::sleep(OUTAGE.saturating_sub(down_at.elapsed()));
    w.edge.ip(&["link", "set", "em", "up"]);
    let up_at = Instant::now();

    let (n, sha) = download.join().expect("the download thread");
    assert_eq!(n, BULK, "every byte of the download");
    assert_eq!(sha, pattern_sha(BULK), "sha256 of the download");
    let seen = lines.join().expect("the log thread");
    let numbers: Vec<u64> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (0..LINES).collect::<Vec<_>>(),
        "every line once, in order"
    );
    // The first line after the link came back: the resumption's latency as a client sees it.
    let first_after = seen
        .iter()
        .find(|(_, at)| *at > up_at)
        .map(|(_, at)| at.duration_since(up_at))
        .expect("lines after the outage");
    let m = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    let value = |s: &str| scrape::sample(&m, s).unwrap_or_else(|| panic!("{s} missing:\n{m}"));
    assert!(value("tunnel_server_streams_resumed_total") >= 2.0, "{m}");
    assert_eq!(value("tunnel_server_streams_reset_total"), 0.0);
    assert_eq!(value("tunnel_server_streams_parked"), 0.0);
    let resumed = st.server.log();
    eprintln!(
        "outage {OUTAGE:?}; first log line {first_after:?} after the link came back; download and log finished {:?} after it; {} sessions of edge-c up in all",
        up_at.elapsed(),
        resumed.matches("agent session up").count()
    );
}
