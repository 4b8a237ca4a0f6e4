//! Churn soak: does memory stay flat and does everything a connection, stream or session took
//! come back? For `--minutes`, cycle after cycle on the test world (redirector, tunnel server,
//! three agents):
//! - `--streams` streams opened and closed, `--batch` at a time held open together;
//! - edge-c's agent restarted (SIGTERM and SIGKILL in turn) and reconnecting;
//! - a node added to the node table and the previous cycle's removed (both followers reload);
//! - edge-a's certificate renewed (its agent opens a new session and drains the old one);
//! - and, since every agent's session carries bursts of 333 streams, each agent replaces its
//!   session once idle (the wait before each sample lets that finish).
//!
//! After every cycle, once nothing is in flight, it records RSS, descriptors, threads and
//! async tasks of every process. Target: after the first cycle, anonymous RSS (heap and stacks;
//! the whole RSS is reported too) grows by less than 5% (`--rss-limit-pct`) and descriptors and
//! tasks return to their baseline. Prints a table, writes
//! `target/bench/soak.json`; `--check` exits non-zero when a target is missed. Root only.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Parser;
use redirector_tests::{
    LoggedProc, NODE_TABLE, Netns, World, bench, free_addr, pki::TestPki, procstat::ProcStats,
    tunnel_procs,
};
use serde::Serialize;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Streams per cycle.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Streams held open together.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    #[arg(long, default_value = "target/bench/soak.json")]
    out: PathBuf,
    /// Exit non-zero when a target is missed.
    #[arg(long)]
    check: bool,
    /// RSS growth allowed from the end of the first cycle to the end of the run.
    #[arg(long, default_value_t = 5.0)]
    rss_limit_pct: f64,
}

/// The three nodes, how each agent reaches its service (so the answer names the agent).
const NODES: [(&str, &str, &str); 3] = [
    ("edge-a", "198.51.100.10", "127.0.0.1"),
    ("edge-b", "198.51.100.11", "198.51.100.11"),
    ("edge-c", "198.51.100.12", "198.51.100.12"),
];

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
struct Sample {
    pid: u32,
    #[serde(flatten)]
    stats: ProcStats,
    tasks: u64,
    /// The allocator's view (`process_heap_bytes`): handed out, and kept free.
    heap_in_use_kib: u64,
    heap_free_kib: u64,
}

struct Agent {
    proc: LoggedProc,
    args: Vec<String>,
    metrics_at: SocketAddr,
}

fn sample(pid: u32, netns: &Netns, at: SocketAddr) -> Sample {
    // Before the scrape: its connection may still be closing (lingering) in the process.
    let stats = ProcStats::of(pid);
    let body = tunnel_procs::http_get_in(netns, at, "/metrics");
    let value = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Sample {
        pid,
        stats,
        tasks: value("runtime_tasks_alive "),
        heap_in_use_kib: value("process_heap_bytes{state=\"in_use\"} ") / 1024,
        heap_free_kib: value("process_heap_bytes{state=\"free\"} ") / 1024,
    }
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            bail!("not within {within:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn spawn_agent(w: &World, args: &[String]) -> LoggedProc {
    let node = &args[1];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    LoggedProc::spawn(w, node, &w.edge, "tunnel-agent", &args)
}

fn sessions_of(server: &LoggedProc, node: &str) -> (usize, usize) {
    let n = format!("node={node}");
    (
        server.count_log(&["agent session up", &n]),
        server.count_log(&["agent session down", &n]),
    )
}

/// Opens `n` streams, `batch` at a time, spread over the nodes; returns (answered by the
/// right agent, failed or answered by another).
fn streams(w: &World, n: usize, batch: usize) -> (u64, u64) {
    let (mut ok, mut bad) = (0, 0);
    let mut left = n;
    while left > 0 {
        let k = left.min(batch);
        let targets: Vec<String> = (0..k)
            .map(|i| format!("{}:10250", NODES[i % 3].1))
            .collect();
        let mut args = vec!["connect"];
        args.extend(targets.iter().map(String::as_str));
        let v = w.probe(true, None, &args);
        for (i, c) in v.as_array().expect("array").iter().enumerate() {
            let want = format!("edge {}:10250", NODES[i % 3].2);
            if c["reply"].as_str() == Some(want.as_str()) {
                ok += 1;
            } else {
                bad += 1;
            }
        }
        left -= k;
    }
    // The edge services' log is for tests that check escapes; a soak would only grow it.
    w.edge_log.clear();
    (ok, bad)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let redirector_metrics = {
        let _m = w.master.enter();
        free_addr("127.0.0.1")
    };
    let mut st = tunnel_procs::stack(
        &w,
        &pki,
        &["--metrics-listen", &redirector_metrics.to_string()],
    );
    let mut agents: Vec<Agent> = NODES
        .iter()
        .map(|(node, _, dial)| {
            let metrics_at = {
                let _e = w.edge.enter();
                free_addr("127.0.0.1")
            };
            let args = tunnel_procs::agent_args(
                &pki,
                node,
                &st.agents_at.to_string(),
                "10250",
                dial,
                &metrics_at.to_string(),
            );
            let proc = spawn_agent(&w, &args);
            st.server
                .wait_log(&["agent session up", &format!("node={node}")]);
            Agent {
                proc,
                args,
                metrics_at,
            }
        })
        .collect();

    let start = Instant::now();
    let budget = Duration::from_secs_f64(args.minutes * 60.0);
    let mut cycles = Vec::new();
    let (mut total_ok, mut total_bad) = (0u64, 0u64);
    let mut cycle = 0usize;
    while cycle == 0 || start.elapsed() < budget {
        cycle += 1;
        let t = Instant::now();
        let (ok, bad) = streams(&w, args.streams, args.batch);
        total_ok += ok;
        total_bad += bad;

        // edge-c's agent goes away and comes back (a pod restart, a node reboot).
        let c = &mut agents[2];
        let before = sessions_of(&st.server, "edge-c").0;
        let signal = if cycle.is_multiple_of(2) {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        c.proc.stop(signal, Duration::from_secs(30));
        c.proc = spawn_agent(&w, &c.args);
        st.server
            .wait_log_count(&["agent session up", "node=edge-c"], before + 1);

        // A node joins and the previous one leaves; both followers reload the file.
        let table = format!("{NODE_TABLE}soak-{cycle} 192.0.2.{}\n", 1 + cycle % 250);
        let tmp = w.node_table.with_extension("tmp");
        std::fs::write(&tmp, table)?;
        std::fs::rename(&tmp, &w.node_table)?;

        // edge-a's certificate is renewed: its agent swaps sessions.
        let before = sessions_of(&st.server, "edge-a").0;
        pki.agent("edge-a");
        st.server
            .wait_log_count(&["agent session up", "node=edge-a"], before + 1);

        // An agent whose session carried a burst replaces it after a second of idle: let that
        // start, so that the wait below covers its end too and every sample is of a quiet
        // world (a sample in the middle of a replacement holds a second session).
        std::thread::sleep(Duration::from_secs(2));
        // Nothing in flight: every node down to one session, no stream open.
        wait_until("sessions settle", Duration::from_secs(30), || {
            NODES.iter().all(|(n, _, _)| {
                let (up, down) = sessions_of(&st.server, n);
                up == down + 1
            }) && tunnel_procs::http_get(&w, st.metrics_at, "/metrics")
                .lines()
                .any(|l| l == "tunnel_server_streams_open 0")
        })?;
        // Tasks of closed connections finish on the runtime a moment after the close.
        std::thread::sleep(Duration::from_millis(500));
        let mut procs = BTreeMap::new();
        procs.insert(
            "redirector",
            sample(st.redirector.proc.child.id(), &w.master, redirector_metrics),
        );
        procs.insert(
            "tunnel server",
            sample(st.server.child.id(), &w.master, st.metrics_at),
        );
        for (a, (node, _, _)) in agents.iter().zip(NODES) {
            let name = match node {
                "edge-a" => "agent edge-a (renewed every cycle)",
                "edge-b" => "agent edge-b",
                _ => "agent edge-c (restarted every cycle)",
            };
            procs.insert(name, sample(a.proc.child.id(), &w.edge, a.metrics_at));
        }
        eprintln!(
            "cycle {cycle}: {ok} streams answered, {bad} not, {:.1} s; {}",
            t.elapsed().as_secs_f64(),
            procs
                .iter()
                .map(|(n, s)| format!(
                    "{n}: {} KiB ({} anonymous, heap {} in use {} free) {} fds {} tasks",
                    s.stats.rss_kib,
                    s.stats.rss_anon_kib,
                    s.heap_in_use_kib,
                    s.heap_free_kib,
                    s.stats.fds,
                    s.tasks
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        cycles.push(json!({
            "cycle": cycle,
            "elapsed_s": start.elapsed().as_secs_f64(),
            "seconds": t.elapsed().as_secs_f64(),
            "streams_ok": ok,
            "streams_failed": bad,
            "processes": procs,
        }));
    }

    // Baseline: after the first cycle (the allocator has seen a full cycle's peak by then).
    let first = &cycles[0]["processes"];
    let last = &cycles[cycles.len() - 1]["processes"];
    let mut missed = Vec::new();
    let mut summary = serde_json::Map::new();
    println!(
        "\nsoak: {} cycles in {:.1} min, {total_ok} streams answered, {total_bad} not\n",
        cycles.len(),
        start.elapsed().as_secs_f64() / 60.0
    );
    println!(
        "| process | anonymous RSS after cycle 1 -> end | growth | whole RSS | heap in use | heap free | fds | tasks | threads |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (name, s0) in first.as_object().unwrap() {
        let s1 = &last[name];
        let get = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
        let pct =
            |k: &str| 100.0 * (get(s1, k) as f64 - get(s0, k) as f64) / get(s0, k).max(1) as f64;
        // The target is on the anonymous part: heap and stacks, what a leak grows.
        let growth = pct("rss_anon_kib");
        println!(
            "| {name} | {} -> {} KiB | {growth:+.1}% | {} -> {} KiB ({:+.1}%) | {} -> {} KiB ({:+.1}%) | {} -> {} KiB | {} -> {} | {} -> {} | {} -> {} |",
            get(s0, "rss_anon_kib"),
            get(s1, "rss_anon_kib"),
            get(s0, "rss_kib"),
            get(s1, "rss_kib"),
            pct("rss_kib"),
            get(s0, "heap_in_use_kib"),
            get(s1, "heap_in_use_kib"),
            pct("heap_in_use_kib"),
            get(s0, "heap_free_kib"),
            get(s1, "heap_free_kib"),
            get(s0, "fds"),
            get(s1, "fds"),
            get(s0, "tasks"),
            get(s1, "tasks"),
            get(s0, "threads"),
            get(s1, "threads"),
        );
        // A process started anew every cycle has no baseline to hold to.
        let long_lived = !name.contains("restarted");
        if long_lived {
            if growth >= args.rss_limit_pct {
                missed.push(format!("{name}: anonymous RSS grew {growth:.1}%"));
            }
            for k in ["fds", "tasks"] {
                if get(s1, k) != get(s0, k) {
                    missed.push(format!("{name}: {k} {} -> {}", get(s0, k), get(s1, k)));
                }
            }
        }
        summary.insert(
            name.clone(),
            json!({"after_first_cycle": s0, "end": s1, "rss_anon_growth_pct": growth, "rss_growth_pct": pct("rss_kib"), "heap_in_use_growth_pct": pct("heap_in_use_kib"), "long_lived": long_lived}),
        );
    }
    if total_bad > 0 {
        missed.push(format!(
            "{total_bad} streams not answered by their node's agent"
        ));
    }
    let report = json!({
        "benchmark": "soak",
        "minutes": start.elapsed().as_secs_f64() / 60.0,
        "streams_per_cycle": args.streams,
        "held_open_together": args.batch,
        "cycles": cycles.len(),
        "streams_ok": total_ok,
        "streams_failed": total_bad,
        "targets": {"rss_anon_growth_pct_below": args.rss_limit_pct, "fds_and_tasks": "back to the value after cycle 1"},
        "summary": summary,
        "missed": missed,
        "per_cycle": cycles,
    });
    bench::write_report(&args.out, &report)?;
    if missed.is_empty() {
        println!("soak: every target met");
    } else {
        println!("soak: targets missed: {missed:?}");
        if args.check {
            bail!("soak targets missed: {missed:?}");
        }
    }
    Ok(())
}
