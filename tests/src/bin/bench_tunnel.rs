//! Benchmark: the whole path (eBPF redirect, tunnel server, mutual TLS, agent, local service)
//! against a direct loopback connection, against the floor of any reverse tunnel here (the same
//! hops with plain pre-dialled TCP: `relay_floor`) and against rathole (TLS transport) as a peer
//! reverse tunnel, side by side in one run. Root only; builds its own namespaces and cgroup.
//!
//! `bench-tunnel [--rathole PATH] [--conns N] [--mib N] [--idle N] [--out FILE]`
//!
//! Figures: connection setup (connect + 1-byte echo + close) p50/p99; one stream's upload
//! throughput; 64 streams' aggregate; one stream's throughput while a neighbour on the same
//! session is stalled; RSS per idle stream on each side; the tunnel processes' CPU time per
//! connection set up. Clients are separate processes.
use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use redirector_tests::{
    LoggedProc, Netns, World,
    bench::{median, rss_kib, write_report},
    free_addr,
    pki::TestPki,
    rathole, relay_floor, spawn, tunnel_procs,
};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    client: Option<ClientCmd>,
    /// rathole 0.5 binary (built with its default TLS feature); skipped if absent.
    #[arg(long, default_value = "/tmp/rathole-inst/bin/rathole")]
    rathole: PathBuf,
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// MiB uploaded per throughput measurement.
    #[arg(long, default_value_t = 512)]
    mib: usize,
    /// Idle streams for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// MiB uploaded per measurement at 50 ms RTT.
    #[arg(long, default_value_t = 128)]
    rtt_mib: usize,
    #[arg(long, default_value = "target/bench/tunnel.json")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Internal: sequential connect + 1-byte echo + close; prints latencies (ns).
    Latency { target: SocketAddr, count: usize },
    /// Internal: `streams` uploads of `bytes` each; prints seconds.
    Upload {
        target: SocketAddr,
        bytes: u64,
        streams: usize,
    },
    /// Internal: opens `count` connections, prints "ready", holds them until stdin closes.
    Idle { target: SocketAddr, count: usize },
    /// Internal: opens one connection and never reads from it; holds until stdin closes.
    Stall { target: SocketAddr },
    /// Internal: the floor relay's master side.
    FloorMaster { pool: SocketAddr, visit: SocketAddr },
    /// Internal: the floor relay's edge side.
    FloorEdge {
        pool: SocketAddr,
        service: SocketAddr,
    },
}

fn client(cmd: ClientCmd) -> Result<()> {
    match cmd {
        ClientCmd::Latency { target, count } => {
            let mut ns = Vec::with_capacity(count);
            for i in 0..count + 20 {
                let t = Instant::now();
                let mut s = TcpStream::connect(target)?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                drop(s);
                if i >= 20 {
                    ns.push(t.elapsed().as_nanos() as u64);
                }
            }
            println!("{}", serde_json::to_string(&ns)?);
        }
        ClientCmd::Upload {
            target,
            bytes,
            streams,
        } => {
            let t = Instant::now();
            let hs: Vec<_> = (0..streams)
                .map(|_| {
                    thread::spawn(move || -> Result<u64> {
                        let mut s = TcpStream::connect(target)?;
                        redirector_tests::bench::upload_counted(&mut s, bytes)
                    })
                })
                .collect();
            for h in hs {
                let got = h.join().expect("upload thread")?;
                ensure!(got == bytes, "service counted {got} bytes, sent {bytes}");
            }
            println!("{}", t.elapsed().as_secs_f64());
        }
        ClientCmd::Idle { target, count } => {
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                held.push(TcpStream::connect(target)?);
            }
            println!("ready");
            std::io::stdout().flush()?;
            let _ = std::io::stdin().read(&mut [0u8; 1]);
        }
        ClientCmd::FloorMaster { pool, visit } => {
            current_thread().block_on(relay_floor::master(pool, visit))?
        }
        ClientCmd::FloorEdge { pool, service } => {
            current_thread().block_on(relay_floor::edge(pool, service))
        }
        ClientCmd::Stall { target } => {
            let _s = TcpStream::connect(target)?;
            println!("ready");
            std::io::stdout().flush()?;
            let _ = std::io::stdin().read(&mut [0u8; 1]);
        }
    }
    Ok(())
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Starts the floor relay for the edge's `service` port: its two sides as processes in the
/// master and edge namespaces. Returns them and the address visitors dial in the master.
fn start_floor(w: &World, service: u16) -> Result<(Vec<LoggedProc>, SocketAddr)> {
    let (pool, visit) = {
        let _m = w.master.enter();
        (free_addr("198.51.100.1"), free_addr("127.0.0.1"))
    };
    let side = |ns: &Netns, args: Vec<String>| {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.args(args);
        spawn::place(&mut cmd, None, Some(ns));
        LoggedProc::start(&w.dir, "floor", cmd)
    };
    let mut master = side(
        &w.master,
        vec!["floor-master".into(), pool.to_string(), visit.to_string()],
    );
    master.wait_log(&[relay_floor::READY]);
    let edge = side(
        &w.edge,
        vec![
            "floor-edge".into(),
            pool.to_string(),
            format!("127.0.0.1:{service}"),
        ],
    );
    Ok((vec![master, edge], visit))
}

/// Reads each connection to its end, then answers the byte count (8 bytes, big endian).
fn discard_service(l: TcpListener) {
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            thread::spawn(move || {
                let mut c = c;
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = c.write_all(&total.to_be_bytes());
            });
        }
    });
}

/// One stream's upload throughput at 50 ms RTT: a direct TCP connection across a delayed link
/// (see `delayline`: this kernel has no sch_netem) and the tunnel whose agent session crosses
/// the same link, side by side per round. Returns (direct, tunnel) medians in MB/s.
fn long_rtt(
    w: &World,
    pki: &TestPki,
    st: &mut tunnel_procs::Stack,
    svc: &Services,
    ports: &str,
    mib: usize,
    rounds: usize,
) -> Result<(f64, f64)> {
    let _link = redirector_tests::delayline::DelayLink::new(
        &w.master,
        "192.0.2.1/30",
        &w.edge,
        "192.0.2.2/30",
        Duration::from_millis(25),
    );
    let direct = {
        let _e = w.edge.enter();
        let l = redirector_tests::servers::listen("192.0.2.2:0".parse().unwrap());
        let at = l.local_addr()?;
        discard_service(l);
        at
    };
    // A node whose agent reaches the server only across the delayed link.
    let mut table = std::fs::read_to_string(&w.node_table)?;
    table.push_str("edge-rtt 198.51.100.20\n");
    std::fs::write(&w.node_table, table)?;
    thread::sleep(Duration::from_millis(1500)); // the redirector and the server reload it
    let _agent = tunnel_procs::agent(
        w,
        pki,
        &mut st.server,
        "edge-rtt",
        SocketAddr::from(([192, 0, 2, 1], st.agents_at.port())),
        ports,
        "127.0.0.1",
    );
    let tunnel = SocketAddr::from(([198, 51, 100, 20], svc.discard));
    let bytes = (mib as u64) << 20;
    let up = |target: SocketAddr, cg: Option<&redirector_tests::TestCgroup>| -> Result<f64> {
        let args = [
            "upload".into(),
            target.to_string(),
            bytes.to_string(),
            "1".into(),
        ];
        let secs: f64 = run_client(&w.master, cg, &args)?.trim().parse()?;
        Ok(bytes as f64 / secs / 1e6)
    };
    let (mut d, mut t) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        eprintln!(
            "bench: round {} of {rounds}: one stream at 50 ms RTT",
            r + 1
        );
        d.push(up(direct, None)?);
        t.push(up(tunnel, Some(&w.cgroup))?);
    }
    Ok((median(d), median(t)))
}

/// The edge services, one port each: 1-byte echo, discard-and-count, firehose, hold.
struct Services {
    echo: u16,
    discard: u16,
    firehose: u16,
    hold: u16,
}

fn services(edge: &Netns) -> Services {
    let _in = edge.enter();
    let l = || redirector_tests::servers::listen("127.0.0.1:0".parse().unwrap());
    let (echo, discard, firehose, hold) = (l(), l(), l(), l());
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    let s = Services {
        echo: port(&echo),
        discard: port(&discard),
        firehose: port(&firehose),
        hold: port(&hold),
    };
    thread::spawn(move || {
        for c in echo.incoming().flatten() {
            let mut c = c;
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
        }
    });
    discard_service(discard);
    thread::spawn(move || {
        for c in firehose.incoming().flatten() {
            thread::spawn(move || {
                let mut c = c;
                let buf = vec![7u8; 64 * 1024];
                while c.write_all(&buf).is_ok() {}
            });
        }
    });
    thread::spawn(move || {
        // Holds connections without a thread each, and lets go of those the client closed
        // (one run opens tens of thousands over its paths).
        hold.set_nonblocking(true).expect("nonblocking");
        let mut held: Vec<TcpStream> = Vec::new();
        loop {
            match hold.accept() {
                Ok((c, _)) => {
                    held.push(c);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            held.retain(|c| {
                let _ = c.set_nonblocking(true);
                matches!(c.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            thread::sleep(Duration::from_millis(50));
        }
    });
    s
}

fn run_client(
    ns: &Netns,
    cg: Option<&redirector_tests::TestCgroup>,
    args: &[String],
) -> Result<String> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args);
    spawn::place(&mut cmd, cg, Some(ns));
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Starts a holding client (idle or stall) and returns it once its connections are open.
fn holder(ns: &Netns, cg: Option<&redirector_tests::TestCgroup>, args: &[String]) -> Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
    spawn::place(&mut cmd, cg, Some(ns));
    let mut child = cmd.spawn()?;
    let mut line = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .context("holder did not get ready")?;
    Ok(child)
}

/// CPU time (ns) all threads of `pid` have run, from the scheduler's own accounting.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// One path under test: where its clients run and what they dial for each service.
struct Path<'a> {
    name: &'static str,
    ns: &'a Netns,
    cg: Option<&'a redirector_tests::TestCgroup>,
    echo: SocketAddr,
    discard: SocketAddr,
    firehose: SocketAddr,
    hold: SocketAddr,
    /// Processes whose RSS is charged to idle streams and whose CPU to set-ups.
    pids: Vec<u32>,
    /// Further processes whose CPU (only) is charged to set-ups: the floor relay, whose pool
    /// of pre-dialled connections is not meant to hold thousands of idle visitors.
    cpu_pids: Vec<u32>,
}

/// One round's figures for one path: setup p50/p99 (us), 1-stream, 64-stream and
/// 1-stream-beside-a-stalled-one throughput (MB/s), and the tunnel's own CPU per set-up
/// connection (us, all its processes; on 2 vCPUs back-to-back setups compete for it).
fn measure_round(p: &Path, conns: usize, mib: usize) -> Result<[f64; 6]> {
    let cpu = || {
        p.pids
            .iter()
            .chain(&p.cpu_pids)
            .map(|p| cpu_ns(*p))
            .sum::<u64>()
    };
    let cpu0 = cpu();
    let mut lat: Vec<u64> = serde_json::from_str(&run_client(
        p.ns,
        p.cg,
        &["latency".into(), p.echo.to_string(), conns.to_string()],
    )?)?;
    // NaN where the path has no processes of its own to charge (printed as "-").
    let cpu_per_conn = match p.pids.is_empty() && p.cpu_pids.is_empty() {
        true => f64::NAN,
        false => (cpu() - cpu0) as f64 / lat.len() as f64 / 1000.0,
    };
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let bytes = (mib as u64) << 20;
    let up = |streams: usize| -> Result<f64> {
        let per = bytes / streams as u64;
        let args = [
            "upload".into(),
            p.discard.to_string(),
            per.to_string(),
            streams.to_string(),
        ];
        let secs: f64 = run_client(p.ns, p.cg, &args)?.trim().parse()?;
        Ok((per * streams as u64) as f64 / secs / 1e6)
    };
    let single = up(1)?;
    let agg = up(64)?;
    let mut stall = holder(p.ns, p.cg, &["stall".into(), p.firehose.to_string()])?;
    thread::sleep(Duration::from_millis(300)); // let the stalled stream's window fill
    let stalled = up(1)?;
    drop(stall.stdin.take());
    let _ = stall.wait();
    Ok([p50, p99, single, agg, stalled, cpu_per_conn])
}

/// RSS growth per idle stream of each of the path's processes, in bytes.
fn measure_rss(p: &Path, idle: usize) -> Result<Vec<f64>> {
    if p.pids.is_empty() {
        return Ok(Vec::new());
    }
    let before: Vec<u64> = p.pids.iter().map(|p| rss_kib(*p)).collect();
    let mut idle_c = holder(
        p.ns,
        p.cg,
        &["idle".into(), p.hold.to_string(), idle.to_string()],
    )?;
    thread::sleep(Duration::from_millis(500));
    let after: Vec<u64> = p.pids.iter().map(|p| rss_kib(*p)).collect();
    drop(idle_c.stdin.take());
    let _ = idle_c.wait();
    Ok(before
        .iter()
        .zip(&after)
        .map(|(b, a)| (*a as f64 - *b as f64) * 1024.0 / idle as f64)
        .collect())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(c) = cli.client {
        return client(c);
    }
    redirector_tests::require_root();
    let w = World::new();
    let svc = services(&w.edge);
    let pki = TestPki::new(&w.dir);
    let (rh_ctl, rh_visit) = {
        let _m = w.master.enter();
        (free_addr("198.51.100.1"), free_addr("127.0.0.1"))
    };
    let ports = format!("{},{},{},{}", svc.echo, svc.discard, svc.firehose, svc.hold);
    // Keeps the redirector and the tunnel server alive for the whole test.
    let mut st = tunnel_procs::stack(&w, &pki, &["--ports", &ports]);
    let agent = tunnel_procs::agent(
        &w,
        &pki,
        &mut st.server,
        "edge-a",
        st.agents_at,
        &ports,
        "127.0.0.1",
    );

    // The agent as the images ship it (artifact profile: fat LTO, one codegen unit, cold crates
    // for size), beside the release build, for edge-b: do the size settings cost speed?
    let shipped = redirector_tests::spawn::workspace_bin("probe")
        .parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("dist/linux-amd64/tunnel-agent"))
        .filter(|p| p.exists());
    let shipped_agent = match &shipped {
        Some(bin) => {
            let args = tunnel_procs::agent_args(
                &pki,
                "edge-b",
                &st.agents_at.to_string(),
                &ports,
                "127.0.0.1",
                "127.0.0.1:0",
            );
            let mut cmd = std::process::Command::new(bin);
            cmd.args(&args);
            redirector_tests::spawn::place(&mut cmd, None, Some(&w.edge));
            let p = LoggedProc::start(&w.dir, "agent-edge-b-artifact", cmd);
            st.server.wait_log(&["agent session up", "node=edge-b"]);
            Some(p)
        }
        None => {
            eprintln!(
                "bench: target/dist/linux-amd64/tunnel-agent not built (cargo xtask dist); the shipped agent's path is skipped"
            );
            None
        }
    };
    // A path through the tunnel: clients in the cgroup dial the node's address `at(port)`.
    let tunnel_path = |name, at: &dyn Fn(u16) -> SocketAddr, pids| Path {
        name,
        ns: &w.master,
        cg: Some(&w.cgroup),
        echo: at(svc.echo),
        discard: at(svc.discard),
        firehose: at(svc.firehose),
        hold: at(svc.hold),
        pids,
        cpu_pids: vec![],
    };
    let local = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let node = |p: u16| SocketAddr::from(([198, 51, 100, 10], p));
    let mut paths = vec![
        Path {
            name: "direct loopback",
            ns: &w.edge,
            cg: None,
            echo: local(svc.echo),
            discard: local(svc.discard),
            firehose: local(svc.firehose),
            hold: local(svc.hold),
            pids: vec![],
            cpu_pids: vec![],
        },
        tunnel_path(
            "edge-redirector (eBPF + h2/mTLS tunnel)",
            &node,
            vec![st.server.child.id(), agent.child.id()],
        ),
    ];
    if let Some(a) = &shipped_agent {
        let b = |p: u16| SocketAddr::from(([198, 51, 100, 11], p));
        let pids = vec![st.server.child.id(), a.child.id()];
        paths.push(tunnel_path(
            "edge-redirector, shipped agent (artifact profile)",
            &b,
            pids,
        ));
    }

    // The floor: the same hops with nothing else (plain TCP, pre-dialled, no TLS, no mux).
    let floors = [
        start_floor(&w, svc.echo)?,
        start_floor(&w, svc.discard)?,
        start_floor(&w, svc.firehose)?,
        start_floor(&w, svc.hold)?,
    ];
    paths.push(Path {
        name: "floor: plain 2-hop reverse relay",
        ns: &w.master,
        cg: None,
        echo: floors[0].1,
        discard: floors[1].1,
        firehose: floors[2].1,
        hold: floors[3].1,
        pids: vec![],
        cpu_pids: floors
            .iter()
            .flat_map(|f| &f.0)
            .map(|p| p.child.id())
            .collect(),
    });

    // rathole: one service per edge port, each exposed on its own visitor port in master.
    let mut rathole_procs = Vec::new();
    if cli.rathole.exists() {
        let names = ["echo", "discard", "firehose", "hold"];
        let ports = [svc.echo, svc.discard, svc.firehose, svc.hold];
        let visit: Vec<SocketAddr> = {
            let _m = w.master.enter();
            std::iter::once(rh_visit)
                .chain((1..4).map(|_| free_addr("127.0.0.1")))
                .collect()
        };
        let services: Vec<rathole::Service> = (0..4)
            .map(|i| rathole::Service {
                name: names[i],
                visit: visit[i],
                local: SocketAddr::from(([127, 0, 0, 1], ports[i])),
            })
            .collect();
        match rathole::start(&w, &cli.rathole, rh_ctl, &services) {
            Ok(procs) => {
                let pids = procs.iter().map(|p: &LoggedProc| p.child.id()).collect();
                rathole_procs = procs;
                paths.push(Path {
                    name: "rathole 0.5 (TLS)",
                    ns: &w.master,
                    cg: None,
                    echo: visit[0],
                    discard: visit[1],
                    firehose: visit[2],
                    hold: visit[3],
                    pids,
                    cpu_pids: vec![],
                });
            }
            Err(e) => eprintln!("bench: rathole skipped: {e:#}"),
        }
    } else {
        eprintln!(
            "bench: rathole not found at {} (cargo install rathole@0.5.0 --root /tmp/rathole-inst); skipped",
            cli.rathole.display()
        );
    }

    // Paths interleaved within each round; medians over rounds (this machine drifts).
    let mut rounds: Vec<Vec<[f64; 6]>> = vec![Vec::new(); paths.len()];
    for r in 0..cli.rounds {
        for (i, p) in paths.iter().enumerate() {
            eprintln!("bench: round {} of {}: {}", r + 1, cli.rounds, p.name);
            rounds[i].push(measure_round(p, cli.conns, cli.mib)?);
        }
    }
    let mut results = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let col = |k: usize| median(rounds[i].iter().map(|r| r[k]).collect());
        let stall_cost = median(rounds[i].iter().map(|r| 1.0 - r[4] / r[2]).collect());
        results.push(json!({
            "path": p.name, "setup_p50_us": col(0), "setup_p99_us": col(1), "setup_cpu_us_per_conn": col(5),
            "single_stream_MBps": col(2), "aggregate_64_MBps": col(3), "single_with_stalled_neighbour_MBps": col(4),
            "stalled_neighbour_cost": stall_cost,
            "rss_bytes_per_idle_stream": measure_rss(p, cli.idle)?,
        }));
    }
    drop(rathole_procs);
    print_table(&results);
    let (direct_rtt, tunnel_rtt) =
        long_rtt(&w, &pki, &mut st, &svc, &ports, cli.rtt_mib, cli.rounds)?;
    println!(
        "\none stream at 50 ms RTT (delayed link): direct TCP {direct_rtt:.1} MB/s | edge-redirector {tunnel_rtt:.1} MB/s ({:.0}% of direct)",
        100.0 * tunnel_rtt / direct_rtt
    );
    let out = json!({"bench": "tunnel", "conns": cli.conns, "mib": cli.mib, "rounds": cli.rounds, "idle_streams": cli.idle, "results": results,
        "rtt_50ms_single_stream": {"direct_MBps": direct_rtt, "tunnel_MBps": tunnel_rtt, "ratio": tunnel_rtt / direct_rtt, "mib": cli.rtt_mib}});
    write_report(&cli.out, &out)
}

fn print_table(results: &[serde_json::Value]) {
    let direct = &results[0];
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n{:<42} {:>10} {:>10} {:>10} {:>12} {:>12} {:>14} {:>18}",
        "path",
        "setup p50",
        "setup p99",
        "setup CPU",
        "1 stream",
        "64 streams",
        "1 + stalled",
        "RSS/idle stream"
    );
    println!(
        "{:<42} {:>10} {:>10} {:>10} {:>12} {:>12} {:>14} {:>18}",
        "", "us", "us", "us/conn", "MB/s", "MB/s", "MB/s", "bytes (each side)"
    );
    for r in results {
        let rss: Vec<String> = r["rss_bytes_per_idle_stream"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.0}", x.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<42} {:>10.1} {:>10.1} {:>10} {:>12.0} {:>12.0} {:>14.0} {:>18}",
            r["path"].as_str().unwrap_or("?"),
            f(r, "setup_p50_us"),
            f(r, "setup_p99_us"),
            Some(f(r, "setup_cpu_us_per_conn"))
                .filter(|c| c.is_finite())
                .map_or("-".into(), |c| format!("{c:.1}")),
            f(r, "single_stream_MBps"),
            f(r, "aggregate_64_MBps"),
            f(r, "single_with_stalled_neighbour_MBps"),
            rss.join(" / ")
        );
    }
    println!(
        "\nratios to direct loopback (setup p50: lower is better; throughput: higher is better)"
    );
    for r in &results[1..] {
        println!(
            "  {:<40} setup {:.1}x | 1 stream {:.2}x | 64 streams {:.2}x | stalled neighbour costs {:.0}%",
            r["path"].as_str().unwrap_or("?"),
            f(r, "setup_p50_us") / f(direct, "setup_p50_us"),
            f(r, "single_stream_MBps") / f(direct, "single_stream_MBps"),
            f(r, "aggregate_64_MBps") / f(direct, "aggregate_64_MBps"),
            f(r, "stalled_neighbour_cost") * 100.0,
        );
    }
}
