//! Benchmark: the tunnel across a WAN. The agent's session crosses a 50 ms RTT link with a
//! 1500-byte MTU (the delay line: this kernel has no sch_netem) that can drop every packet for
//! a while (an outage) or 1% of them at random. Side by side in one run:
//!
//! - connection setup (connect + 1-byte echo + close) through the tunnel's established
//!   session, against direct TCP across the same link and against rathole over it, in RTTs;
//! - one stream's upload throughput at 1% loss, against direct TCP;
//! - outages of 5, 20 and 50 s with a log stream (a line every 10 ms) and a bulk download
//!   running through the tunnel, and a direct TCP log stream beside them: the time from the
//!   link's return to the first byte after it, every line once and in order, and what the
//!   parked streams hold (bytes kept for resumption, RSS of both ends) during the outage.
//!
//! `bench-wan [--rathole PATH] [--conns N] [--mib N] [--outages 5,20,50] [--out FILE]`
//! Root only; builds its own namespaces and cgroup.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use redirector_tests::{
    LoggedProc, World,
    bench::{median, rss_kib, write_report},
    delayline::DelayLink,
    free_addr,
    pki::TestPki,
    rathole, scrape, tunnel_procs,
};
use serde_json::json;

const ONE_WAY: Duration = Duration::from_millis(25);
const LINE_EVERY: Duration = Duration::from_millis(10);
/// The node whose agent reaches the server across the link.
const NODE: [u8; 4] = [198, 51, 100, 20];

#[derive(Parser)]
struct Cli {
    /// rathole 0.5 binary (built with its default TLS feature); skipped if absent.
    #[arg(long, default_value = "/tmp/rathole-inst/bin/rathole")]
    rathole: PathBuf,
    /// Connections per setup measurement.
    #[arg(long, default_value_t = 40)]
    conns: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// MiB uploaded per throughput measurement at 1% loss.
    #[arg(long, default_value_t = 8)]
    mib: u64,
    /// Outages to ride out, seconds.
    #[arg(long, value_delimiter = ',', default_value = "5,20,50")]
    outages: Vec<u64>,
    #[arg(long, default_value = "target/bench/wan.json")]
    out: PathBuf,
}

/// The edge services (all addresses of the edge namespace): 1-byte echo, discard-and-count,
/// a line every [`LINE_EVERY`], an endless download.
struct Services {
    echo: u16,
    discard: u16,
    ticker: u16,
    firehose: u16,
}

fn each_conn(l: TcpListener, serve: fn(TcpStream)) {
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            thread::spawn(move || serve(c));
        }
    });
}

fn services(w: &World) -> Services {
    let _in = w.edge.enter();
    let l = || TcpListener::bind("0.0.0.0:0").expect("bind in edge");
    let (echo, discard, ticker, firehose) = (l(), l(), l(), l());
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    let s = Services {
        echo: port(&echo),
        discard: port(&discard),
        ticker: port(&ticker),
        firehose: port(&firehose),
    };
    each_conn(echo, |mut c| {
        let mut b = [0u8; 1];
        if c.read_exact(&mut b).is_ok() {
            let _ = c.write_all(&b);
        }
    });
    each_conn(discard, |mut c| {
        let (mut buf, mut total) = (vec![0u8; 256 << 10], 0u64);
        while let Ok(n @ 1..) = c.read(&mut buf) {
            total += n as u64;
        }
        let _ = c.write_all(&total.to_be_bytes());
    });
    each_conn(ticker, |mut c| {
        for i in 0u64.. {
            if c.write_all(format!("line {i}\n").as_bytes()).is_err() {
                return;
            }
            thread::sleep(LINE_EVERY);
        }
    });
    each_conn(firehose, |mut c| {
        let buf = vec![0x5au8; 64 << 10];
        while c.write_all(&buf).is_ok() {}
    });
    s
}

/// Runs `f` in the master namespace with the process in the redirected cgroup: sockets made
/// there are redirected when they dial a node (and only then).
fn in_master<T>(w: &World, f: impl FnOnce() -> T) -> T {
    w.cgroup.create_inside(|| {
        let _m = w.master.enter();
        f()
    })
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sequential connect + 1-byte echo + close to `to`; the setup times, ms.
fn setup_times(to: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let t = Instant::now();
        let mut s = connect(to)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        drop(s);
        if i >= 3 {
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(v)
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
}

/// One upload of `bytes` to a discard service; MB/s.
fn upload(to: SocketAddr, bytes: u64) -> Result<f64> {
    let t = Instant::now();
    let mut s = connect(to)?;
    ensure!(
        redirector_tests::bench::upload_counted(&mut s, bytes)? == bytes,
        "the discard service counted otherwise"
    );
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// A log stream being read: every line's number and when it arrived.
struct Ticker {
    lines: Arc<Mutex<Vec<(u64, Instant)>>>,
    failed: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Ticker {
    fn start(s: TcpStream) -> Ticker {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, f, st) = (lines.clone(), failed.clone(), stop.clone());
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let thread = thread::spawn(move || {
            let mut r = BufReader::new(s);
            let mut line = String::new();
            while !st.load(Ordering::Relaxed) {
                match r.read_line(&mut line) {
                    Ok(0) => {
                        *f.lock().unwrap() = Some("EOF".into());
                        return;
                    }
                    Ok(_) if line.ends_with('\n') => {
                        let n = line
                            .trim()
                            .strip_prefix("line ")
                            .and_then(|n| n.parse().ok());
                        l.lock()
                            .unwrap()
                            .push((n.unwrap_or(u64::MAX), Instant::now()));
                        line.clear();
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        *f.lock().unwrap() = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        Ticker {
            lines,
            failed,
            stop,
            thread,
        }
    }

    /// How long after `at` the first line arrived that came after it, waiting up to `within`.
    fn first_after(&self, at: Instant, within: Duration) -> Option<Duration> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some((_, t)) = self.lines.lock().unwrap().iter().find(|(_, t)| *t > at) {
                return Some(t.duration_since(at));
            }
            if self.failed.lock().unwrap().is_some() {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Stops reading; (lines, missing or doubled lines, how it failed if it did).
    fn finish(self) -> (usize, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let lines = self.lines.lock().unwrap();
        let wrong = lines
            .iter()
            .enumerate()
            .filter(|(i, (n, _))| *n != *i as u64)
            .count() as u64;
        (lines.len(), wrong, self.failed.lock().unwrap().clone())
    }
}

/// A download read as fast as it comes; counts bytes and notes when each read came, and a
/// failure.
fn download(
    s: TcpStream,
    got: Arc<AtomicU64>,
    reads: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Option<String>> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    thread::spawn(move || {
        let mut s = s;
        let mut buf = vec![0u8; 256 << 10];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => return Some("EOF".into()),
                Ok(n) => {
                    got.fetch_add(n as u64, Ordering::Relaxed);
                    reads.lock().unwrap().push(Instant::now());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Some(e.to_string()),
            }
        }
        None
    })
}

fn metric(w: &World, at: SocketAddr, series: &str) -> f64 {
    let text = tunnel_procs::http_get(w, at, "/metrics");
    scrape::sample(&text, series).unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    redirector_tests::require_root();
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let link = DelayLink::with_mtu(
        &w.master,
        "192.0.2.1/30",
        &w.edge,
        "192.0.2.2/30",
        ONE_WAY,
        "1500",
    );
    let svc = services(&w);
    let ports = format!(
        "{},{},{},{}",
        svc.echo, svc.discard, svc.ticker, svc.firehose
    );
    let mut st = tunnel_procs::stack(&w, &pki, &["--ports", &ports]);
    let mut table = std::fs::read_to_string(&w.node_table)?;
    table.push_str(&format!(
        "edge-wan {}.{}.{}.{}\n",
        NODE[0], NODE[1], NODE[2], NODE[3]
    ));
    std::fs::write(&w.node_table, table)?;
    thread::sleep(Duration::from_millis(1500)); // the redirector and the server reload it
    let agent_metrics = {
        let _e = w.edge.enter();
        free_addr("127.0.0.1")
    };
    let args = tunnel_procs::agent_args(
        &pki,
        "edge-wan",
        &SocketAddr::from(([192, 0, 2, 1], st.agents_at.port())).to_string(),
        &ports,
        "127.0.0.1",
        &agent_metrics.to_string(),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = LoggedProc::spawn(&w, "edge-wan", &w.edge, "tunnel-agent", &args);
    st.server.wait_log(&["agent session up", "node=edge-wan"]);
    let agent_metric = |series: &str| {
        let text = tunnel_procs::http_get_in(&w.edge, agent_metrics, "/metrics");
        scrape::sample(&text, series).unwrap_or(f64::NAN)
    };
    let tunnel = |port| SocketAddr::from((NODE, port));
    let direct = |port| SocketAddr::from(([192, 0, 2, 2], port));
    // rathole, its control channel across the same link.
    let (ctl, visit) = {
        let _m = w.master.enter();
        (free_addr("192.0.2.1"), free_addr("127.0.0.1"))
    };
    let rh = if cli.rathole.exists() {
        let services = [rathole::Service {
            name: "echo",
            visit,
            local: SocketAddr::from(([127, 0, 0, 1], svc.echo)),
        }];
        match rathole::start(&w, &cli.rathole, ctl, &services) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("bench: rathole skipped: {e:#}");
                None
            }
        }
    } else {
        eprintln!(
            "bench: rathole not found at {} (cargo install rathole@0.5.0 --root /tmp/rathole-inst); skipped",
            cli.rathole.display()
        );
        None
    };

    // The link's real RTT: a TCP handshake across it (SYN, SYN-ACK).
    let rtt_ms = median(in_master(&w, || -> Result<Vec<f64>> {
        (0..10)
            .map(|_| {
                let t = Instant::now();
                let s = connect(direct(svc.discard))?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                drop(s);
                Ok(ms)
            })
            .collect()
    })?);

    // Setup, interleaved per round.
    let mut paths: Vec<(&str, SocketAddr)> = vec![
        ("direct TCP", direct(svc.echo)),
        ("edge-redirector (established session)", tunnel(svc.echo)),
    ];
    if rh.is_some() {
        paths.push(("rathole 0.5 (TLS)", visit));
    }
    let mut setup: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for r in 0..cli.rounds {
        for (i, (name, to)) in paths.iter().enumerate() {
            eprintln!("bench: round {} of {}: setup, {name}", r + 1, cli.rounds);
            setup[i].extend(in_master(&w, || setup_times(*to, cli.conns))?);
        }
    }
    drop(rh);

    // One stream at 1% loss.
    link.faults().set_loss(0.01);
    let (mut d, mut t) = (Vec::new(), Vec::new());
    for r in 0..cli.rounds {
        eprintln!(
            "bench: round {} of {}: one stream at 1% loss",
            r + 1,
            cli.rounds
        );
        d.push(in_master(&w, || {
            upload(direct(svc.discard), cli.mib << 20)
        })?);
        t.push(in_master(&w, || {
            upload(tunnel(svc.discard), cli.mib << 20)
        })?);
    }
    link.faults().set_loss(0.0);
    let (loss_direct, loss_tunnel) = (median(d), median(t));

    // Outages.
    let mut outages = Vec::new();
    for secs in &cli.outages {
        eprintln!("bench: outage of {secs} s");
        let resumed0 = metric(&w, st.metrics_at, "tunnel_server_streams_resumed_total");
        let sessions0 = metric(&w, st.metrics_at, "tunnel_server_sessions_accepted_total");
        let (log, direct_log, bulk) = in_master(&w, || -> Result<_> {
            Ok((
                connect(tunnel(svc.ticker))?,
                connect(direct(svc.ticker))?,
                connect(tunnel(svc.firehose))?,
            ))
        })?;
        let (log, direct_log) = (Ticker::start(log), Ticker::start(direct_log));
        let (got, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let reads = Arc::new(Mutex::new(Vec::new()));
        let bulk = download(bulk, got.clone(), reads.clone(), stop.clone());
        thread::sleep(Duration::from_secs(2));
        let rss0 = (rss_kib(st.server.child.id()), rss_kib(agent.child.id()));
        link.faults().set_down(true);
        thread::sleep(Duration::from_secs(*secs).saturating_sub(Duration::from_secs(1)));
        // What the parked streams hold, a second before the link returns.
        let held = (
            metric(&w, st.metrics_at, "tunnel_server_resume_held_bytes"),
            agent_metric("tunnel_agent_resume_held_bytes"),
        );
        let parked = (
            metric(&w, st.metrics_at, "tunnel_server_streams_parked"),
            agent_metric("tunnel_agent_streams_parked"),
        );
        let rss1 = (rss_kib(st.server.child.id()), rss_kib(agent.child.id()));
        thread::sleep(Duration::from_secs(1));

        link.faults().set_down(false);
        let back = Instant::now();
        let first_line = log.first_after(back, Duration::from_secs(90));
        let first_direct = direct_log.first_after(back, Duration::from_secs(90));
        let first_bulk = reads
            .lock()
            .unwrap()
            .iter()
            .find(|t| **t > back)
            .map(|t| t.duration_since(back));
        thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let bulk_failed = bulk.join().unwrap();
        let (lines, wrong, log_failed) = log.finish();
        let (dlines, dwrong, dfailed) = direct_log.finish();
        let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        outages.push(json!({
            "outage_s": secs,
            "new_session": metric(&w, st.metrics_at, "tunnel_server_sessions_accepted_total") > sessions0,
            "streams_resumed": metric(&w, st.metrics_at, "tunnel_server_streams_resumed_total") - resumed0,
            "tunnel_first_line_after_ms": ms(first_line),
            "tunnel_first_bulk_byte_after_ms": ms(first_bulk),
            "direct_first_line_after_ms": ms(first_direct),
            "tunnel_lines": lines, "tunnel_lines_lost_or_doubled": wrong,
            "tunnel_log_failed": log_failed, "tunnel_bulk_failed": bulk_failed,
            "direct_lines": dlines, "direct_lines_lost_or_doubled": dwrong, "direct_failed": dfailed,
            "server_parked_streams": parked.0, "agent_parked_streams": parked.1, "server_resume_held_bytes": held.0, "agent_resume_held_bytes": held.1,
            "server_rss_growth_kib": rss1.0 as f64 - rss0.0 as f64,
            "agent_rss_growth_kib": rss1.1 as f64 - rss0.1 as f64,
        }));
    }
    drop(link);

    let ms_rtt = |v: &[f64]| (median(v.to_vec()), p99(v.to_vec()));
    println!("\nlink: 50 ms RTT by its delay (TCP handshake measured {rtt_ms:.1} ms), MTU 1500");
    println!(
        "\n{:<40} {:>10} {:>10} {:>10}",
        "connection setup (connect + echo + close)", "p50 ms", "p99 ms", "p50 RTTs"
    );
    let mut setup_json = Vec::new();
    for (i, (name, _)) in paths.iter().enumerate() {
        let (p50, p99) = ms_rtt(&setup[i]);
        println!("{name:<40} {p50:>10.1} {p99:>10.1} {:>10.2}", p50 / rtt_ms);
        setup_json
            .push(json!({"path": name, "p50_ms": p50, "p99_ms": p99, "p50_rtts": p50 / rtt_ms}));
    }
    println!(
        "\none stream at 1% loss: direct TCP {loss_direct:.2} MB/s | edge-redirector {loss_tunnel:.2} MB/s ({:.0}% of direct)",
        100.0 * loss_tunnel / loss_direct
    );
    println!(
        "\n{:>8} {:>8} {:>8} {:>14} {:>14} {:>14} {:>10} {:>8} {:>12} {:>12}",
        "outage",
        "new sess",
        "resumed",
        "tunnel line",
        "tunnel bulk",
        "direct line",
        "lines bad",
        "parked s/a",
        "held s/a",
        "RSS +KiB s/a"
    );
    for o in &outages {
        let f = |k: &str| o[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>7}s {:>8} {:>8} {:>12.0}ms {:>12.0}ms {:>12.0}ms {:>10} {:>8} {:>12} {:>12}",
            o["outage_s"],
            o["new_session"],
            f("streams_resumed"),
            f("tunnel_first_line_after_ms"),
            f("tunnel_first_bulk_byte_after_ms"),
            f("direct_first_line_after_ms"),
            f("tunnel_lines_lost_or_doubled"),
            format!(
                "{}/{}",
                f("server_parked_streams"),
                f("agent_parked_streams")
            ),
            format!(
                "{}/{}",
                f("server_resume_held_bytes"),
                f("agent_resume_held_bytes")
            ),
            format!(
                "{}/{}",
                f("server_rss_growth_kib"),
                f("agent_rss_growth_kib")
            ),
        );
        for k in ["tunnel_log_failed", "tunnel_bulk_failed"] {
            if !o[k].is_null() {
                println!("         {k}: {}", o[k]);
            }
        }
    }
    write_report(
        &cli.out,
        &json!({
            "rtt_ms": rtt_ms,
            "setup": setup_json,
            "loss_1pct_single_stream": {"direct_MBps": loss_direct, "tunnel_MBps": loss_tunnel, "ratio": loss_tunnel / loss_direct, "mib": cli.mib},
            "outages": outages,
        }),
    )
}
