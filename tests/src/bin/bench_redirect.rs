//! Benchmark: per-connection cost of eBPF redirection vs a direct connection vs iptables DNAT
//! laid out the way yurt-tunnel does it, at several node counts, and the cost of changing the
//! node set. Root only; builds its own namespaces and child cgroup and removes them.
//!
//! `bench-redirect [--rounds R] [--conns C] [--nodes 10,1000,...] [--out FILE]`
//!
//! Each variant's client is a separate process doing connect + 1-byte echo + close C times in
//! a row; variants are interleaved within a round and ratios are taken within a round (this
//! machine's absolute numbers drift between runs; ratios measured side by side do not).
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use clap::{Parser, Subcommand};
use redirector::{OrigDstTable, loader, maps::PinnedMaps, node_table::KernelEntries};
use redirector_common::{Config, Ingress, NodeValue};
use redirector_tests::{
    Netns, TestCgroup,
    bench::{PinCleanup, dnat_rules, filler, iptables_restore, median, write_report},
    netns, spawn,
};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    client: Option<ClientCmd>,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000,100000")]
    nodes: Vec<usize>,
    #[arg(long, default_value = "target/bench/redirect.json")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Internal: the measuring client, started inside the right namespace/cgroup.
    Client {
        target: SocketAddr,
        count: usize,
        warmup: usize,
    },
}

const TARGET: &str = "198.51.100.10:10250";

/// One connect + 1-byte echo + close; returns its duration.
fn one_conn(target: SocketAddr) -> Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    drop(s);
    Ok(t.elapsed())
}

fn client(target: SocketAddr, count: usize, warmup: usize) -> Result<()> {
    for _ in 0..warmup {
        one_conn(target)?;
    }
    let mut ns: Vec<u64> = Vec::with_capacity(count);
    for _ in 0..count {
        ns.push(one_conn(target)?.as_nanos() as u64);
    }
    println!("{}", serde_json::to_string(&ns)?);
    Ok(())
}

/// How an echo server learns each connection's original destination.
enum Lookup {
    None,
    /// The pinned map, one bpf() call per connection (needs CAP_BPF).
    Map(Box<OrigDstTable>),
    /// `getsockopt(SO_ORIGINAL_DST)`, answered by the getsockopt program (no capability).
    Sockopt,
}

/// Durations of the original-destination lookups an echo server made, in nanoseconds.
type LookupTimes = std::sync::Arc<std::sync::Mutex<Vec<u64>>>;

/// Echo server: accept, read 1 byte, (optionally look up the original destination), write 1
/// byte, close. One connection at a time, as the client is sequential.
fn echo_server(listener: TcpListener, orig: Lookup) -> LookupTimes {
    let times = LookupTimes::default();
    let record = times.clone();
    // Bound to one address: the local end of every connection, as at the tunnel's ingress.
    let local = listener.local_addr().expect("bound listener");
    thread::spawn(move || {
        loop {
            let Ok((mut conn, peer)) = listener.accept() else {
                continue;
            };
            // Part of the measured path: what the tunnel ingress does per connection (it has
            // both ends from accept() and its bound listener).
            let started = Instant::now();
            let found = match &orig {
                Lookup::None => Ok(Some(())),
                Lookup::Map(t) => t
                    .take(peer, local)
                    .map(|o| o.map(drop))
                    .map_err(|e| e.to_string()),
                Lookup::Sockopt => {
                    use std::os::fd::AsFd;
                    tunnel::orig_dst::take(conn.as_fd(), false)
                        .map(|o| o.map(drop))
                        .map_err(|e| e.to_string())
                }
            };
            if !matches!(orig, Lookup::None) {
                let ns = started.elapsed().as_nanos() as u64;
                record.lock().unwrap().push(ns);
            }
            if !matches!(found, Ok(Some(()))) {
                eprintln!("bench: original destination missing: {found:?}");
                continue;
            }
            let mut b = [0u8; 1];
            if conn.read_exact(&mut b).is_ok() {
                let _ = conn.write_all(&b);
            }
        }
    });
    times
}

fn listen_in(ns: &Netns) -> TcpListener {
    let _g = ns.enter();
    redirector_tests::servers::listen("127.0.0.1:0".parse().unwrap())
}

fn sysctl(ns: &Netns, kv: &str) {
    netns::sh(&["ip", "netns", "exec", &ns.name, "sysctl", "-qw", kv]);
}

/// A client namespace with a route to 198.51.100.0/24 through a veth to a peer namespace that
/// owns 198.51.100.10 (with nothing listening: an escaped connection fails loudly).
struct Site {
    ns: Netns,
    _peer: Netns,
}

fn site(tag: &str, id: &str) -> Site {
    let ns = Netns::new(&format!("rb{id}{tag}"));
    let peer = Netns::new(&format!("rb{id}{tag}x"));
    netns::veth(
        &ns,
        "b0",
        &["198.51.100.1/24"],
        &peer,
        "b1",
        &["198.51.100.10/24"],
    );
    // Many short connections to one destination: let TIME_WAIT ports be reused.
    sysctl(&ns, "net.ipv4.tcp_tw_reuse=1");
    sysctl(&ns, "net.ipv4.ip_local_port_range=1024 65000");
    Site { ns, _peer: peer }
}

fn node_entries(n: usize) -> KernelEntries {
    let mut e = KernelEntries::default();
    e.v4.insert(u32::from_ne_bytes([198, 51, 100, 10]), NodeValue::default());
    for i in 1..n {
        e.v4.insert(u32::from_ne_bytes(filler(i).octets()), NodeValue::default());
    }
    e
}

fn iptables(ns: &Netns, flavour: &str, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.name, &format!("iptables-{flavour}")])
        .args(args)
        .status()?;
    ensure!(st.success(), "iptables-{flavour} {args:?} failed");
    Ok(t.elapsed())
}

fn run_client(ns: &Netns, cg: Option<&TestCgroup>, target: &str, count: usize) -> Result<Vec<u64>> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["client", target, &count.to_string(), "50"]);
    spawn::place(&mut cmd, cg, Some(ns));
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<u64> = serde_json::from_slice(&out.stdout)?;
    v.sort_unstable();
    Ok(v)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(ClientCmd::Client {
        target,
        count,
        warmup,
    }) = cli.client
    {
        return client(target, count, warmup);
    }
    redirector_tests::require_root();
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!(
        "{}{}",
        std::process::id() % 10_000,
        N.fetch_add(1, Ordering::Relaxed)
    );

    // eBPF/direct site, and one site per iptables flavour (their own netfilter state).
    let ebpf_site = site("b", &id);
    let legacy_site = site("l", &id);
    let nft_site = site("n", &id);
    let cg = TestCgroup::new(&format!("redirector-bench-{id}"));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/redirector-bench-{id}"));
    let _cleanup = PinCleanup(pin_dir.clone());

    let direct_l = listen_in(&ebpf_site.ns);
    let direct_addr = direct_l.local_addr()?;
    echo_server(direct_l, Lookup::None);
    // Each variant has its own listener: a variant dialling the port the previous one just
    // used would pay for port selection among its TIME_WAIT sockets, a cost not its own.
    let redirect_l = listen_in(&ebpf_site.ns);
    let redirect_addr = redirect_l.local_addr()?;
    echo_server(redirect_l, Lookup::None);
    let lookup_l = listen_in(&ebpf_site.ns);
    let lookup_addr = lookup_l.local_addr()?;
    // Created inside the cgroup, as the tunnel server runs under it: the getsockopt program
    // answers only there.
    let sockopt_l = cg.create_inside(|| listen_in(&ebpf_site.ns));
    let sockopt_addr = sockopt_l.local_addr()?;
    let legacy_l = listen_in(&legacy_site.ns);
    let legacy_port = legacy_l.local_addr()?.port();
    echo_server(legacy_l, Lookup::None);
    let nft_l = listen_in(&nft_site.ns);
    let nft_port = nft_l.local_addr()?.port();
    echo_server(nft_l, Lookup::None);
    for s in [&legacy_site, &nft_site] {
        // DNAT from OUTPUT to 127.0.0.1 needs loopback destinations to be routable.
        sysctl(&s.ns, "net.ipv4.conf.all.route_localnet=1");
    }

    let max_nodes = cli.nodes.iter().copied().max().unwrap_or(10).max(10_001) as u32 + 16;
    let installed = loader::install(&loader::InstallOptions {
        cgroup: cg.path.clone(),
        pin_dir: pin_dir.clone(),
        max_node_addresses: max_nodes,
        record_callers: false,
    })?;
    let mut maps = PinnedMaps::open(&pin_dir)?;
    let cookie = {
        let _g = ebpf_site.ns.enter();
        redirector::sys::current_netns_cookie()?
    };
    let ingress = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => Ingress {
            ip: redirector_common::v4_mapped(u32::from_ne_bytes(v4.octets())),
            port: a.port(),
            _pad: 0,
        },
        IpAddr::V6(_) => unreachable!("IPv4 listeners"),
    };
    maps.set_ports(&[10250u16].into_iter().collect())?;
    let map_times = echo_server(
        lookup_l,
        Lookup::Map(Box::new(OrigDstTable::open(&pin_dir)?)),
    );
    let sockopt_times = echo_server(sockopt_l, Lookup::Sockopt);

    let mut table: Vec<serde_json::Value> = Vec::new();
    println!(
        "per-connection cost: connect + 1-byte echo + close, {} conns x {} rounds per variant; ratio = p50 / direct p50 (median over rounds)",
        cli.conns, cli.rounds
    );
    println!(
        "{:>7}  {:<30} {:>9} {:>9} {:>7}",
        "nodes", "variant", "p50 us", "p99 us", "ratio"
    );
    for &n in &cli.nodes {
        let t = Instant::now();
        maps.sync_nodes(&KernelEntries::default(), max_nodes)?;
        maps.sync_nodes(&node_entries(n), max_nodes)?;
        let map_fill = t.elapsed();
        let rules = dnat_rules(n, legacy_port);
        let legacy_load = iptables_restore(&legacy_site.ns, "legacy", &rules)?;
        let nft_load = iptables_restore(&nft_site.ns, "nft", &dnat_rules(n, nft_port))?;

        let variants = [
            Variant {
                name: "direct",
                ns: &ebpf_site.ns,
                cgroup: None,
                target: direct_addr.to_string(),
                ingress: None,
            },
            Variant {
                name: "ebpf redirect",
                ns: &ebpf_site.ns,
                cgroup: Some(&cg),
                target: TARGET.into(),
                ingress: Some(redirect_addr),
            },
            Variant {
                name: "ebpf redirect + orig dst map",
                ns: &ebpf_site.ns,
                cgroup: Some(&cg),
                target: TARGET.into(),
                ingress: Some(lookup_addr),
            },
            Variant {
                name: "ebpf redirect + getsockopt",
                ns: &ebpf_site.ns,
                cgroup: Some(&cg),
                target: TARGET.into(),
                ingress: Some(sockopt_addr),
            },
            Variant {
                name: "iptables DNAT (legacy)",
                ns: &legacy_site.ns,
                cgroup: None,
                target: TARGET.into(),
                ingress: None,
            },
            Variant {
                name: "iptables DNAT (nft)",
                ns: &nft_site.ns,
                cgroup: None,
                target: TARGET.into(),
                ingress: None,
            },
        ];
        let mut p50s: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut p99s: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut ratios: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for _ in 0..cli.rounds {
            let mut direct_p50 = 0.0;
            for Variant {
                name,
                ns,
                cgroup,
                target,
                ingress: to,
            } in &variants
            {
                if let Some(to) = to {
                    maps.set_config(&Config {
                        host_netns_cookie: cookie,
                        host4: ingress(*to),
                        ..Default::default()
                    })?;
                }
                let lat = run_client(ns, *cgroup, target, cli.conns)?;
                let p50 = us(pct(&lat, 0.5));
                if *name == "direct" {
                    direct_p50 = p50;
                }
                p50s.entry(name).or_default().push(p50);
                p99s.entry(name).or_default().push(us(pct(&lat, 0.99)));
                ratios.entry(name).or_default().push(p50 / direct_p50);
            }
        }
        for Variant { name, .. } in &variants {
            let (p50, p99, ratio) = (
                median(p50s[name].clone()),
                median(p99s[name].clone()),
                median(ratios[name].clone()),
            );
            println!("{n:>7}  {name:<30} {p50:>9.1} {p99:>9.1} {ratio:>7.3}");
            table.push(json!({"nodes": n, "variant": name, "p50_us": p50, "p99_us": p99, "ratio_to_direct": ratio}));
        }
        println!(
            "{n:>7}  load: map fill {:.2} ms, iptables-legacy-restore {:.2} ms, iptables-nft-restore {:.2} ms",
            map_fill.as_secs_f64() * 1e3,
            legacy_load.as_secs_f64() * 1e3,
            nft_load.as_secs_f64() * 1e3
        );
        table.push(json!({"nodes": n, "load_ms": {"ebpf_map": map_fill.as_secs_f64() * 1e3, "iptables_legacy_restore": legacy_load.as_secs_f64() * 1e3, "iptables_nft_restore": nft_load.as_secs_f64() * 1e3}}));
    }

    // The lookup alone, as the ingress makes it per connection (taken from the timings the two
    // echo servers recorded over every round above).
    let p50_ns = |t: &LookupTimes| {
        let mut v = t.lock().unwrap().clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let (map_ns, sockopt_ns) = (p50_ns(&map_times), p50_ns(&sockopt_times));
    println!(
        "original-destination lookup alone (p50 over every connection): pinned map {map_ns} ns (one bpf() call, needs CAP_BPF), getsockopt {sockopt_ns} ns (one system call, no capability): {:.2}x",
        sockopt_ns as f64 / map_ns.max(1) as f64
    );
    let lookup = json!({"map_p50_ns": map_ns, "getsockopt_p50_ns": sockopt_ns});

    let changes = node_changes(
        &mut maps,
        max_nodes,
        &legacy_site.ns,
        &nft_site.ns,
        legacy_port,
        nft_port,
    )?;
    drop(installed);
    let out = json!({"bench": "redirect", "conns_per_round": cli.conns, "rounds": cli.rounds, "results": table, "orig_dst_lookup": lookup, "node_changes": changes});
    write_report(&cli.out, &out)
}

/// Time to load a 10,000-node table and to add / remove ONE node while 10,000 are present.
fn node_changes(
    maps: &mut PinnedMaps,
    max_nodes: u32,
    legacy: &Netns,
    nft: &Netns,
    legacy_port: u16,
    nft_port: u16,
) -> Result<serde_json::Value> {
    const N: usize = 10_000;
    const REPS: usize = 20;
    let mut ebpf_load = Vec::new();
    let mut legacy_load = Vec::new();
    let mut nft_load = Vec::new();
    for _ in 0..5 {
        maps.sync_nodes(&KernelEntries::default(), max_nodes)?;
        let t = Instant::now();
        maps.sync_nodes(&node_entries(N), max_nodes)?;
        ebpf_load.push(t.elapsed().as_secs_f64() * 1e3);
        legacy_load.push(
            iptables_restore(legacy, "legacy", &dnat_rules(N, legacy_port))?.as_secs_f64() * 1e3,
        );
        nft_load.push(iptables_restore(nft, "nft", &dnat_rules(N, nft_port))?.as_secs_f64() * 1e3);
    }
    let one = IpAddr::V4(Ipv4Addr::new(240, 255, 0, 1));
    let (mut e_add, mut e_del, mut l_add, mut l_del, mut n_add, mut n_del) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let rule = [
        "-t",
        "nat",
        "TUNNEL-PORT-10250",
        "1",
        "-d",
        "240.255.0.1/32",
        "-j",
        "RETURN",
    ];
    // The eBPF change is a syscall from the long-running redirector; each iptables change is a
    // new process (as the iptables-based tunnels run it).
    for _ in 0..REPS {
        let t = Instant::now();
        maps.upsert_node_address(one, NodeValue::default(), max_nodes)?;
        e_add.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        if !maps.remove_node_address(one)? {
            bail!("node address vanished");
        }
        e_del.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for _ in 0..REPS {
        for (ns, flavour, add, del) in [
            (legacy, "legacy", &mut l_add, &mut l_del),
            (nft, "nft", &mut n_add, &mut n_del),
        ] {
            let ins = [
                rule[0], rule[1], "-I", rule[2], rule[3], rule[4], rule[5], rule[6], rule[7],
            ];
            add.push(iptables(ns, flavour, &ins)?.as_secs_f64() * 1e6);
            let dl = [
                rule[0], rule[1], "-D", rule[2], rule[4], rule[5], rule[6], rule[7],
            ];
            del.push(iptables(ns, flavour, &dl)?.as_secs_f64() * 1e6);
        }
    }
    let (ea, ed) = (median(e_add), median(e_del));
    let res = json!({
        "load_10000_ms": {"ebpf_map": median(ebpf_load.clone()), "iptables_legacy_restore": median(legacy_load.clone()), "iptables_nft_restore": median(nft_load.clone())},
        "one_node_us": {
            "ebpf_add": ea, "ebpf_remove": ed,
            "iptables_legacy_add": median(l_add.clone()), "iptables_legacy_remove": median(l_del.clone()),
            "iptables_nft_add": median(n_add.clone()), "iptables_nft_remove": median(n_del.clone()),
        },
    });
    println!("\nnode set changes with 10,000 nodes present (median of {REPS}; load: median of 5)");
    println!(
        "  load 10,000 nodes: eBPF maps {:.2} ms | iptables-legacy-restore {:.2} ms | iptables-nft-restore {:.2} ms",
        median(ebpf_load),
        median(legacy_load),
        median(nft_load)
    );
    println!(
        "  add one node:      eBPF {ea:.1} us | iptables-legacy {:.0} us ({:.0}x) | iptables-nft {:.0} us ({:.0}x)",
        median(l_add.clone()),
        median(l_add) / ea,
        median(n_add.clone()),
        median(n_add) / ea
    );
    println!(
        "  remove one node:   eBPF {ed:.1} us | iptables-legacy {:.0} us ({:.0}x) | iptables-nft {:.0} us ({:.0}x)",
        median(l_del.clone()),
        median(l_del) / ed,
        median(n_del.clone()),
        median(n_del) / ed
    );
    Ok(res)
}

/// One measured path: the client's namespace and cgroup, what it dials, and (for eBPF) which
/// echo server the redirect goes to.
struct Variant<'a> {
    name: &'static str,
    ns: &'a Netns,
    cgroup: Option<&'a TestCgroup>,
    target: String,
    ingress: Option<SocketAddr>,
}
