//! Benchmark: following the edge node set at fleet scale. For 10,000 and 100,000 nodes, the
//! time from a node list to a live configuration, each step measured as the running system
//! does it:
//!
//! - sync: tunnel address allocation (compare-and-swap on the embedded mode's state file),
//!   the node table, its file (`redirector sync-nodes`);
//! - maps: reading that file and writing the differences into the pinned eBPF maps
//!   (`redirector run`, one batch syscall);
//! - routes: reading it and building the tunnel's address -> node routes (`tunnel server`);
//!
//! for the first load and for a change of 10% of the nodes (5% with a new address, 2.5% gone,
//! 2.5% new), against `iptables-restore` of the same number of node rules in the DNAT layout of
//! the iptables-based tunnels (a controller rewrites its chain on every change). Also the
//! memory of the node table and the routes at each size, measured in a child process.
//!
//! Then one node added, changed and removed beside the others, as a Node watch event does it:
//! the sync's single-node path (a journal entry; for a new node one appended allocation),
//! followed by the redirector's and the tunnel server's followers running as they run (woken
//! by inotify, no poll): the time from the event to the kernel maps and to the routes.
//!
//! `bench-nodes [--nodes 10000,100000] [--rounds 3] [--out target/bench/nodes.json]`
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use clap::{Parser, Subcommand};
use redirector::{
    follow::{Follower, Snapshot},
    loader,
    maps::PinnedMaps,
    node_maps::{Applied, NodeMaps},
    node_table::NodeTable,
    nodes::{
        incremental::apply_one,
        model::EdgeNode,
        pool::Pool,
        store::FileStore,
        sync::{SyncConfig, SyncMetrics, SyncState, reconcile},
    },
    routes::Route,
};
use redirector_tests::{
    Netns, TestCgroup,
    bench::{PinCleanup, dnat_rules, filler, iptables_restore, median, rss_bytes, write_report},
};
use serde_json::json;
use tunnel::server::Routes;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    memory: Option<MemoryCmd>,
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    nodes: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "target/bench/nodes.json")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum MemoryCmd {
    /// Internal: load a node table and build the routes; print the RSS growth of each.
    Memory { table: PathBuf },
}

/// `n` nodes from index `offset`; every 100th shares its InternalIP with the one before (as
/// in public clouds); the first `moved` of them have other addresses (a change set).
fn fleet(n: usize, offset: usize, moved: usize) -> Vec<EdgeNode> {
    (offset..offset + n)
        .map(|i| {
            let ip_index = if i % 100 == 1 { i - 1 } else { i };
            let ip = if i - offset < moved {
                filler(ip_index + 1_000_000)
            } else {
                filler(ip_index)
            };
            EdgeNode {
                name: format!("edge-{i:06}"),
                addresses: vec![IpAddr::V4(ip)],
                problems: Vec::new(),
            }
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One step's time: reads the node table file and its journal as a follower starting does.
fn apply_maps(maps: &mut PinnedMaps, table: &Path, capacity: u32) -> Result<Duration> {
    let t = Instant::now();
    let snap = Follower::open(table)?.current();
    maps.sync_nodes(&snap.table().kernel_entries(), capacity)?;
    Ok(t.elapsed())
}

fn build_routes(table: &Path) -> Result<(Duration, std::sync::Arc<Snapshot>)> {
    let t = Instant::now();
    let snap = Follower::open(table)?.current();
    Ok((t.elapsed(), snap))
}

fn memory(table: &Path) -> Result<()> {
    let before = rss_bytes();
    let nt = NodeTable::load(table)?;
    let after_table = rss_bytes();
    let routes = Routes::from_table(&nt);
    let after_routes = rss_bytes();
    println!(
        "{}",
        json!({"nodes": nt.nodes.len(), "table_bytes": after_table - before, "routes_bytes": after_routes - after_table})
    );
    drop(routes);
    Ok(())
}

struct Round {
    sync: f64,
    maps: f64,
    routes: f64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(MemoryCmd::Memory { table }) = cli.memory {
        return memory(&table);
    }
    redirector_tests::require_root();
    let id = std::process::id() % 100_000;
    let dir = std::env::temp_dir().join(format!("bench-nodes-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cgroup = TestCgroup::new(&format!("bench-nodes-{id}"));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/bench-nodes-{id}"));
    let max = *cli.nodes.iter().max().unwrap_or(&100_000);
    // Every node has its InternalIP and its tunnel address.
    let capacity = (2 * max + 1024).next_power_of_two() as u32;
    let installed = loader::install(&loader::InstallOptions {
        cgroup: cgroup.path.clone(),
        pin_dir: pin_dir.clone(),
        max_node_addresses: capacity,
        record_callers: false,
    })?;
    let _cleanup = PinCleanup(pin_dir.clone());
    let mut maps = PinnedMaps::open(&pin_dir)?;
    let legacy = Netns::new(&format!("bn{id}l"));
    let nft = Netns::new(&format!("bn{id}n"));

    let mut results = Vec::new();
    println!(
        "{:>8} | {:>24} | {:>9} {:>9} {:>9} {:>9} | {:>13} {:>13} | {:>8}",
        "nodes",
        "step",
        "sync ms",
        "maps ms",
        "routes ms",
        "total ms",
        "ipt-nft ms",
        "ipt-legacy ms",
        "vs nft"
    );
    for &n in &cli.nodes {
        let mut first = Vec::new();
        let mut change = Vec::new();
        let mut singles: BTreeMap<&'static str, Vec<Single>> = BTreeMap::new();
        let (mut nft_ms, mut legacy_ms) = (Vec::new(), Vec::new());
        for round in 0..cli.rounds {
            let state = dir.join(format!("state-{n}-{round}"));
            let out = dir.join(format!("nodes-{n}-{round}.txt"));
            let cfg = SyncConfig {
                pool: Pool::parse("100.64.0.0/12").map_err(anyhow::Error::msg)?,
                out: out.clone(),
                release_after: Duration::ZERO,
                resync: Duration::from_secs(30),
            };
            let store = FileStore::new(&state);
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            maps.sync_nodes(&Default::default(), capacity)?;
            let mut state = SyncState::default();
            let metrics = SyncMetrics::default();
            for (label, nodes, acc) in [
                ("first load", fleet(n, 0, 0), &mut first),
                // 5% moved, the last 2.5% gone, 2.5% new.
                ("10% changed", fleet(n, n / 40, n / 20), &mut change),
            ] {
                let t = Instant::now();
                let o = rt
                    .block_on(reconcile(&nodes, &store, &cfg, &mut state, &metrics))
                    .map_err(anyhow::Error::msg)?;
                let sync = t.elapsed();
                ensure!(
                    o.table.tunnel.len() == n,
                    "{label}: {} tunnel addresses",
                    o.table.tunnel.len()
                );
                let maps_t = apply_maps(&mut maps, &out, capacity)?;
                let (routes_t, routes) = build_routes(&out)?;
                ensure!(
                    routes.route(&o.table.tunnel[&nodes[n / 2].name]).is_some()
                        && routes.len() == n,
                    "routes miss a node"
                );
                acc.push(Round {
                    sync: ms(sync),
                    maps: ms(maps_t),
                    routes: ms(routes_t),
                });
            }
            let rt_multi = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            for (label, t) in rt_multi.block_on(single_changes(
                n, &out, &mut maps, capacity, &store, &cfg, &mut state, &metrics,
            ))? {
                singles.entry(label).or_default().push(t);
            }
            // The incumbent: the whole chain rewritten, at the same size, on every change.
            nft_ms.push(ms(iptables_restore(&nft, "nft", &dnat_rules(n, 10266))?));
            legacy_ms.push(ms(iptables_restore(
                &legacy,
                "legacy",
                &dnat_rules(n, 10266),
            )?));
        }
        let (ipt_nft, ipt_legacy) = (median(nft_ms), median(legacy_ms));
        let mem = memory_of(&dir.join(format!("nodes-{n}-0.txt")))?;
        let mut steps = BTreeMap::new();
        for (label, rounds) in [("first_load", first), ("change_10pct", change)] {
            let sync = median(rounds.iter().map(|r| r.sync).collect());
            let maps_ms = median(rounds.iter().map(|r| r.maps).collect());
            let routes = median(rounds.iter().map(|r| r.routes).collect());
            let total = sync + maps_ms + routes;
            println!(
                "{n:>8} | {label:>24} | {sync:>9.1} {maps_ms:>9.1} {routes:>9.1} {total:>9.1} | {ipt_nft:>13.1} {ipt_legacy:>13.1} | {:>7.2}x",
                total / ipt_nft
            );
            steps.insert(label, json!({"sync_ms": sync, "maps_ms": maps_ms, "routes_ms": routes, "total_ms": total, "ratio_total_vs_iptables_nft": total / ipt_nft, "ratio_total_vs_iptables_legacy": total / ipt_legacy}));
        }
        let mut single_json = BTreeMap::new();
        for (label, rounds) in &singles {
            let sync = median(rounds.iter().map(|r| r.sync).collect());
            let maps_ms = median(rounds.iter().map(|r| r.maps).collect());
            let routes = median(rounds.iter().map(|r| r.routes).collect());
            let total = median(rounds.iter().map(|r| r.maps.max(r.routes)).collect());
            println!(
                "{n:>8} | {label:>24} | {sync:>9.3} {maps_ms:>9.3} {routes:>9.3} {total:>9.3} | {ipt_nft:>13.1} {ipt_legacy:>13.1} | {:>7.4}x",
                total / ipt_nft
            );
            single_json.insert(*label, json!({"sync_ms": sync, "to_maps_ms": maps_ms, "to_routes_ms": routes, "total_ms": total, "ratio_total_vs_iptables_nft": total / ipt_nft}));
        }
        println!(
            "{n:>8} | {:>24} | node table {:.0} B/node, routes {:.0} B/node ({:.1} MiB in all)",
            "memory",
            mem.0 as f64 / n as f64,
            mem.1 as f64 / n as f64,
            (mem.0 + mem.1) as f64 / (1024.0 * 1024.0)
        );
        results.push(json!({"nodes": n, "steps": steps, "single_change": single_json, "iptables_nft_restore_ms": ipt_nft, "iptables_legacy_restore_ms": ipt_legacy,
            "memory": {"table_bytes": mem.0, "routes_bytes": mem.1, "table_bytes_per_node": mem.0 as f64 / n as f64, "routes_bytes_per_node": mem.1 as f64 / n as f64}}));
    }
    drop(installed);
    write_report(
        &cli.out,
        &json!({"bench": "nodes", "rounds": cli.rounds, "results": results}),
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One node's change: milliseconds from the event to the journal, to the kernel maps, and to
/// the routes (the last two from the event, not from the journal).
struct Single {
    sync: f64,
    maps: f64,
    routes: f64,
}

/// One node added, one changed and one removed beside the `n` nodes of `out`, each from the
/// sync's single-node path to both followers, running as in `redirector run` and
/// `tunnel server` with the poll an hour away: only their inotify wake brings the change.
#[allow(clippy::too_many_arguments)]
async fn single_changes(
    n: usize,
    out: &Path,
    maps: &mut PinnedMaps,
    capacity: u32,
    store: &FileStore,
    cfg: &SyncConfig,
    state: &mut SyncState,
    metrics: &SyncMetrics,
) -> Result<Vec<(&'static str, Single)>> {
    let redirector = Follower::open(out)?;
    let server = Follower::open(out)?;
    let mut node_maps = NodeMaps::new(
        None,
        capacity,
        None,
        out.to_owned(),
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    node_maps.apply(maps, &redirector.current())?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(
        redirector
            .clone()
            .run(Duration::from_secs(3600), stop.clone()),
    );
    tokio::spawn(server.clone().run(Duration::from_secs(3600), stop.clone()));
    let mut rx = redirector.subscribe();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The node added, the node whose address changes (to one nobody has), the node removed.
    let added = EdgeNode {
        name: "edge-added".into(),
        addresses: vec![IpAddr::V4(filler(3_000_000))],
        problems: Vec::new(),
    };
    let mut changed = fleet(n, n / 40, 0).swap_remove(n / 2);
    changed.addresses = vec![IpAddr::V4(filler(4_000_000))];
    let removed = fleet(n, n / 40, 0).swap_remove(n / 3);
    let gone_ip = removed.addresses[0];
    let mut out_rows = Vec::new();
    for (label, name, node, ip, present) in [
        (
            "one node added",
            added.name.clone(),
            Some(&added),
            added.addresses[0],
            true,
        ),
        (
            "one node changed",
            changed.name.clone(),
            Some(&changed),
            changed.addresses[0],
            true,
        ),
        (
            "one node removed",
            removed.name.clone(),
            None,
            gone_ip,
            false,
        ),
    ] {
        let entries = redirector.current().journal_entries();
        // The tunnel server's side, watched from the moment of the event.
        let routed = move |s: &Snapshot, name: &str| match s.route(&ip) {
            Some(Route::Node(who)) => present && *who == *name,
            None => !present,
            Some(Route::Ambiguous(_)) => false,
        };
        let (srv, who) = (server.clone(), name.clone());
        let mut srx = server.subscribe();
        let t = Instant::now();
        let server_saw = tokio::spawn(async move {
            while !routed(&srv.current(), &who) {
                tokio::time::timeout(Duration::from_secs(5), srx.changed()).await??;
            }
            anyhow::Ok(Instant::now())
        });
        ensure!(
            apply_one(&name, node, store, cfg, state, metrics)
                .await
                .map_err(anyhow::Error::msg)?,
            "{label}: the single-node path fell back to a full reconciliation"
        );
        let sync = t.elapsed();
        // The redirector: woken by inotify, then the maps.
        let snap = loop {
            tokio::time::timeout(Duration::from_secs(5), rx.changed()).await??;
            let s = rx.borrow_and_update().clone();
            if s.journal_entries() > entries {
                break s;
            }
        };
        let how = node_maps.apply(maps, &snap)?;
        let to_maps = t.elapsed();
        ensure!(how == Applied::Entries(1), "{label}: applied as {how:?}");
        ensure!(
            maps.node_value(ip)?.is_some() == present,
            "{label}: the kernel map does not show {ip} as {}",
            if present { "present" } else { "gone" }
        );
        // The tunnel server: its follower woke on the same write.
        let to_routes = server_saw.await??.duration_since(t);
        out_rows.push((
            label,
            Single {
                sync: ms(sync),
                maps: ms(to_maps),
                routes: ms(to_routes),
            },
        ));
    }
    Ok(out_rows)
}

/// (table bytes, routes bytes) of a node table file, from a fresh child process.
fn memory_of(table: &Path) -> Result<(u64, u64)> {
    let out = Command::new(std::env::current_exe()?)
        .arg("memory")
        .arg(table)
        .output()?;
    ensure!(
        out.status.success(),
        "memory child: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["table_bytes"].as_u64().unwrap_or(0),
        v["routes_bytes"].as_u64().unwrap_or(0),
    ))
}
