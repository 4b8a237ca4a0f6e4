//! `redirector run`: install (or adopt), configure, keep the node maps in step with the node
//! table, and leave everything pinned on exit so redirection never stops with the process.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use edge_model::follow::Follower;
use redirector_common::{Config, Ingress};
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    loader::{self, InstallOptions},
    maps::PinnedMaps,
    metrics::MapsCollector,
    node_maps::NodeMaps,
    node_table::ip6_words,
    sys,
};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub install: InstallOptions,
    pub node_table: PathBuf,
    pub ports: BTreeSet<u16>,
    pub host_ingress4: Option<SocketAddr>,
    pub pod_ingress4: Option<SocketAddr>,
    pub host_ingress6: Option<SocketAddr>,
    pub pod_ingress6: Option<SocketAddr>,
    /// How often the node table file is checked for changes (SIGHUP checks at once).
    pub reload_interval: Duration,
    /// Created once the programs are attached and the maps filled.
    pub ready_file: Option<PathBuf>,
    /// Hosts file whose managed block names every node's tunnel address.
    pub hosts_file: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (None: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// How often the programs' attachment is checked (and a detached one attached again),
    /// and the ingress probed.
    pub self_check_interval: Duration,
    /// The ingress probe's address (None: no probe). See [`crate::probe`].
    pub probe_address: Option<std::net::Ipv4Addr>,
}

impl RunConfig {
    /// Checks what can be checked before touching the kernel.
    pub fn validate(&self) -> Result<()> {
        let family = |a: &Option<SocketAddr>, v6: bool, flag: &str| match a {
            Some(a) if a.is_ipv6() != v6 || a.port() == 0 || a.ip().is_unspecified() => {
                Err(Error::Config(format!(
                    "{flag} {a}: expected a specific {} address with a non-zero port",
                    if v6 { "IPv6" } else { "IPv4" }
                )))
            }
            _ => Ok(()),
        };
        family(&self.host_ingress4, false, "--host-ingress")?;
        family(&self.pod_ingress4, false, "--pod-ingress")?;
        family(&self.host_ingress6, true, "--host-ingress6")?;
        family(&self.pod_ingress6, true, "--pod-ingress6")?;
        if self.host_ingress4.is_none() && self.pod_ingress4.is_none() {
            return Err(Error::Config(
                "neither --host-ingress nor --pod-ingress is set: nothing to redirect to".into(),
            ));
        }
        if self.ports.is_empty() || self.ports.contains(&0) {
            return Err(Error::Config(
                "--ports must list at least one port, none of them 0".into(),
            ));
        }
        if self.install.max_node_addresses == 0 {
            return Err(Error::Config(
                "--max-node-addresses must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

fn ingress(a: Option<SocketAddr>) -> Ingress {
    match a {
        None => Ingress::default(),
        Some(SocketAddr::V4(v4)) => Ingress {
            ip: redirector_common::v4_mapped(u32::from_ne_bytes(v4.ip().octets())),
            port: v4.port(),
            _pad: 0,
        },
        Some(SocketAddr::V6(v6)) => Ingress {
            ip: ip6_words(&v6.ip().octets()),
            port: v6.port(),
            _pad: 0,
        },
    }
}

fn kernel_config(cfg: &RunConfig) -> Result<Config> {
    let host_netns_cookie = sys::current_netns_cookie().map_err(|e| {
        Error::io(
            "reading this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14+)",
            e,
        )
    })?;
    Ok(Config {
        host_netns_cookie,
        host4: ingress(cfg.host_ingress4),
        pod4: ingress(cfg.pod_ingress4),
        host6: ingress(cfg.host_ingress6),
        pod6: ingress(cfg.pod_ingress6),
    })
}

/// The redirected ports once a start has reconciled the declared ones with the pinned map.
struct AdoptedPorts {
    now: BTreeSet<u16>,
    /// Run-time ports (`redirector ports add`) the pinned map had and `--ports` does not list.
    kept: usize,
    /// Declared ports the pinned map lacked (new in `--ports`, or removed at run time).
    added: usize,
}

impl AdoptedPorts {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::gauge::Gauge;
        let (kept, added) = (Gauge::<i64>::default(), Gauge::<i64>::default());
        kept.set(self.kept as i64);
        added.set(self.added as i64);
        r.register(
            "redirector_ports_kept_at_start",
            "Run-time ports (ports add) found pinned at start and kept although --ports does not list them",
            kept,
        );
        r.register(
            "redirector_ports_added_at_start",
            "Declared ports (--ports) the pinned map lacked at start",
            added,
        );
    }
}

/// The declared ports (`--ports`) are the lasting truth; `ports add` and `ports remove` change
/// the pinned map, which outlives this process. A start therefore only adds: a port the
/// pinned map redirects stays redirected through the restart (removing it here would let its
/// connections escape to the real address), and a declared port the map lacks is added. Both
/// differences are logged and counted; a fresh install starts from the declared ports alone.
fn adopt_ports(maps: &mut PinnedMaps, declared: &BTreeSet<u16>) -> Result<AdoptedPorts> {
    let pinned = maps.ports()?;
    let kept: Vec<u16> = pinned.difference(declared).copied().collect();
    let added: Vec<u16> = declared.difference(&pinned).copied().collect();
    for p in &added {
        maps.add_port(*p)?;
    }
    if !kept.is_empty() {
        tracing::warn!(ports = ?kept, "ports added at run time are still redirected (kept from the pinned map); add them to --ports (REDIRECTOR_PORTS) to make them lasting, or `redirector ports remove` them");
    }
    if !added.is_empty() && !pinned.is_empty() {
        tracing::info!(ports = ?added, "declared ports the pinned map lacked are redirected again (new in --ports, or removed at run time)");
    }
    Ok(AdoptedPorts {
        now: maps.ports()?,
        kept: kept.len(),
        added: added.len(),
    })
}

/// Installs and serves until `shutdown` is cancelled. Pins stay in place on return.
pub async fn run(cfg: RunConfig, shutdown: CancellationToken) -> Result<()> {
    cfg.validate()?;
    // Parse the node table before touching the kernel: a bad file fails fast, nothing changes.
    let nodes = Follower::open(&cfg.node_table)?;
    let mut installed = loader::install(&cfg.install)?;
    tracing::info!(
        cgroup = %cfg.install.cgroup.display(),
        pin_dir = %cfg.install.pin_dir.display(),
        attached = ?installed.attached,
        adopted = ?installed.adopted,
        "programs in place"
    );
    let cgroup_id = crate::cgroup::cgroup_id(&cfg.install.cgroup)?;
    let repairs = prometheus_client::metrics::counter::Counter::<u64>::default();
    let probes = crate::probe::Probes::default();
    let mut maps = PinnedMaps::open(&cfg.install.pin_dir)?;
    maps.set_config(&kernel_config(&cfg)?)?;
    let ports = adopt_ports(&mut maps, &cfg.ports)?;
    let ambiguous = Arc::new(AtomicU64::new(0));
    let mut snapshots = nodes.subscribe();
    let mut node_maps = NodeMaps::new(
        cfg.probe_address,
        cfg.install.max_node_addresses,
        cfg.hosts_file.clone(),
        cfg.node_table.clone(),
        ambiguous.clone(),
    );
    let first = snapshots.borrow_and_update().clone();
    node_maps.apply(&mut maps, &first)?;
    if let Some(at) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(at).await.map_err(|e| {
            Error::io(
                format!("listening for metrics on {at} (--metrics-listen)"),
                e,
            )
        })?;
        let mut registry = prometheus_client::registry::Registry::default();
        let collector =
            MapsCollector::new(PinnedMaps::open(&cfg.install.pin_dir)?, ambiguous.clone());
        registry.register_collector(Box::new(collector));
        ports.register(&mut registry);
        registry.register_collector(Box::new(crate::self_check::AttachCollector {
            pin_dir: cfg.install.pin_dir.clone(),
            cgroup_id,
        }));
        registry.register(
            "redirector_program_repairs",
            "Times the self-check found programs detached and attached them again",
            repairs.clone(),
        );
        if cfg.probe_address.is_some() {
            probes.register(&mut registry);
        }
        // Ready from here on: the programs are attached and the maps filled.
        tokio::spawn(edge_cli::http::serve(
            listener,
            registry,
            Arc::new(|| true),
            shutdown.clone(),
        ));
        tracing::info!(%at, "serving /metrics, /healthz, /readyz");
    }
    if let Some(ready) = &cfg.ready_file {
        std::fs::write(ready, b"ready\n")
            .map_err(|e| Error::io(format!("writing {}", ready.display()), e))?;
    }
    tracing::info!(ports = ?ports.now, "redirector ready");

    if let (Some(addr), Some(_)) = (cfg.probe_address, cfg.host_ingress4) {
        tokio::spawn(probes.clone().run(
            addr,
            cfg.install.pin_dir.clone(),
            cfg.install.cgroup.clone(),
            cfg.self_check_interval,
            shutdown.clone(),
        ));
    }
    // The one node-table follower: polls, and reloads at once on SIGHUP.
    tokio::spawn(nodes.clone().run(cfg.reload_interval, shutdown.clone()));
    let mut flush = tokio::time::interval(cfg.reload_interval);
    let mut check = tokio::time::interval(cfg.self_check_interval);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = check.tick() => {
                let gone = crate::self_check::detached(&cfg.install.pin_dir, cgroup_id);
                if gone.is_empty() {
                    continue;
                }
                tracing::error!(programs = ?gone, cgroup = %cfg.install.cgroup.display(), "programs are no longer attached (a link was detached or its pin removed): connections their hooks handle are not redirected; attaching them again");
                match loader::install(&cfg.install) {
                    Ok(again) => {
                        repairs.inc();
                        tracing::info!(attached = ?again.attached, adopted = ?again.adopted, "programs attached again");
                        installed = again;
                    }
                    Err(e) => tracing::error!("attaching the programs again failed, retrying in {:?}: {e}", cfg.self_check_interval),
                }
            }
            _ = flush.tick() => {
                if let Some(l) = installed.logger.as_mut() {
                    l.flush();
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snap = snapshots.borrow_and_update().clone();
                // A failed write keeps what the kernel has: every node stays reachable.
                if let Err(e) = node_maps.apply(&mut maps, &snap) {
                    tracing::error!("node table not applied, keeping the previous one: {e}");
                }
            }
        }
    }
    tracing::info!("shutting down; programs and maps stay pinned and keep redirecting");
    Ok(())
}
