//! A rolling agent upgrade drops no stream, with the real binaries: a log stream runs through
//! the node's agent while a connect loop dials the node; a second agent (the new pod) starts
//! beside it with the same `--handoff-socket`, then the first gets SIGTERM. It hands its open
//! stream to the second (the connection to the local service, what it read and delivered, the
//! bytes it kept) and exits at once instead of draining; the server resumes the stream on the
//! second agent's session. The log arrives whole (every line once, in order, a clean EOF), the
//! connect loop sees no failure, and nothing was reset. Root only.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use redirector_tests::{LoggedProc, World, pki::TestPki, scrape, servers, tunnel_procs};

const PORT: u16 = 10400;
const LINES: u64 = 800;
const LINE_EVERY: Duration = Duration::from_millis(10);

#[test]
fn a_rolling_upgrade_hands_a_running_stream_to_the_new_agent_and_resets_nothing() {
    // As the DaemonSet gives it (the abstract namespace of the node's network), then a path.
    upgrade(|w| format!("@edge-test-{}", w.id));
    upgrade(|w| {
        w.dir
            .join("agent-run")
            .join("handoff.sock")
            .display()
            .to_string()
    });
}

fn upgrade(place: impl Fn(&World) -> String) {
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let ports = format!("10250,{PORT}");
    let mut st = tunnel_procs::stack(&w, &pki, &["--ports", &ports]);
    {
        let _e = w.edge.enter();
        servers::commands(TcpListener::bind(("127.0.0.1", PORT)).unwrap(), LINE_EVERY);
    }
    let socket = place(&w);
    let agent = |nth: usize| {
        let mut args = tunnel_procs::agent_args(
            &pki,
            "edge-c",
            &st.agents_at.to_string(),
            &ports,
            "127.0.0.1",
            "127.0.0.1:0",
        );
        args.extend(["--handoff-socket".into(), socket.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        LoggedProc::spawn(&w, &format!("agent-{nth}"), &w.edge, "tunnel-agent", &args)
    };
    let mut old = agent(1);
    st.server
        .wait_log_count(&["agent session up", "node=edge-c"], 1);

    let to: SocketAddr = format!("198.51.100.12:{PORT}").parse().unwrap();
    let mut log = w.cgroup.create_inside(|| {
        let _m = w.master.enter();
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect")
    });
    log.write_all(format!("log {LINES}\n").as_bytes()).unwrap();
    let lines = thread::spawn(move || {
        BufReader::new(log)
            .lines()
            .map(|l| {
                let l = l.expect("no reset on the log stream");
                l.strip_prefix("line ").unwrap().parse::<u64>().unwrap()
            })
            .collect::<Vec<_>>()
    });
    let client = w.paced_loop("198.51.100.12:10250", 6000, 5);
    thread::sleep(Duration::from_secs(1));

    // The new pod: ready once its session is up; then the old one is told to stop.
    let mut new = agent(2);
    st.server
        .wait_log_count(&["agent session up", "node=edge-c"], 2);
    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let status = old.stop(libc::SIGTERM, Duration::from_secs(20));
    let stopped_in = t0.elapsed();
    assert!(
        status.success(),
        "the old agent exits cleanly: {status:?}\n{}",
        old.log()
    );
    // It did not drain (300 s by default): it handed over.
    assert!(
        stopped_in < Duration::from_secs(10),
        "stopped in {stopped_in:?}"
    );
    assert!(
        old.log().contains("its open streams go to it"),
        "{}",
        old.log()
    );

    let seen = lines.join();
    if seen.is_err() {
        panic!(
            "the log stream failed\nold:\n{}\nnew:\n{}\nserver:\n{}",
            old.log(),
            new.log(),
            st.server.log()
        );
    }
    let seen = seen.unwrap();
    assert_eq!(
        seen,
        (0..LINES).collect::<Vec<_>>(),
        "every line once, in order"
    );
    let summary = client.summary();
    assert_eq!(summary["failed"].as_u64(), Some(0), "{summary}");
    let m = tunnel_procs::http_get(&w, st.metrics_at, "/metrics");
    let value = |s: &str| scrape::sample(&m, s).unwrap_or_else(|| panic!("{s} missing:\n{m}"));
    assert!(value("tunnel_server_streams_resumed_total") >= 1.0, "{m}");
    assert_eq!(value("tunnel_server_streams_reset_total"), 0.0, "{m}");
    assert_eq!(
        new.count_log(&["hand-over"]),
        0,
        "no hand-over trouble on the new agent:\n{}",
        new.log()
    );
    eprintln!(
        "{socket}: old agent stopped {stopped_in:?} after SIGTERM; connect loop: {summary}; {} lines",
        seen.len()
    );
    let _ = new.stop(libc::SIGTERM, Duration::from_secs(20));
}
