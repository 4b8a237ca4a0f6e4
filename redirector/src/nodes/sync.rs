//! `redirector sync-nodes`: keeps the node table file (which `redirector run` and
//! `tunnel server` follow) in step with the edge nodes, giving each a tunnel address from the
//! pool. Two sources, one reconciliation:
//!
//! - cluster mode: a kube-rs watcher and reflector on Nodes chosen by a label selector;
//!   allocations in a ConfigMap; Events on Nodes; optionally a CoreDNS hosts ConfigMap;
//! - embedded mode: a node table file without tunnel addresses; allocations in a local file
//!   under a lock.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

use super::{
    events::{NodeEvents, reason},
    incremental::{Cache, apply_one},
    model::{self, EdgeNode},
    pool::{Plan, Pool},
    store::{AllocationStore, FileStore, KubeStore, allocate},
};
use crate::node_table::NodeTable;
use edge_model::journal::TableWriter;

use super::error::{Result, SyncError};

#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub pool: Pool,
    /// The node table written for the redirector and the tunnel server.
    pub out: PathBuf,
    /// How long a node must be missing from this replica's view before its address is
    /// released (a node another replica has seen and this one not yet must keep its address).
    pub release_after: Duration,
    /// Full reconciliation at least this often (releases fall due without any Node event).
    pub resync: Duration,
}

/// The sync loop's metrics.
#[derive(Default, Clone)]
pub struct SyncMetrics {
    pub nodes: Gauge,
    pub pool_size: Gauge,
    pub pool_allocated: Gauge,
    pub pool_exhausted_nodes: Gauge,
    pub ambiguous_addresses: Gauge,
    pub node_problems: Gauge,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
}

impl SyncMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("redirector_sync");
        r.register("nodes", "Edge nodes in the node table", self.nodes.clone());
        r.register(
            "pool_size",
            "Usable tunnel addresses in the pool",
            self.pool_size.clone(),
        );
        r.register(
            "pool_allocated",
            "Tunnel addresses allocated",
            self.pool_allocated.clone(),
        );
        r.register(
            "pool_exhausted_nodes",
            "Nodes left without a tunnel address because the pool is full",
            self.pool_exhausted_nodes.clone(),
        );
        r.register(
            "ambiguous_addresses",
            "Addresses listed by more than one node (refused by the tunnel)",
            self.ambiguous_addresses.clone(),
        );
        r.register(
            "node_problems",
            "Unusable node addresses reported",
            self.node_problems.clone(),
        );
        r.register(
            "reconciles",
            "Reconciliations done",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciliations failed (the previous node table stays)",
            self.reconcile_errors.clone(),
        );
    }
}

/// What one reconciliation produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub table: NodeTable,
    pub plan: Plan,
    pub ambiguous: BTreeMap<IpAddr, Vec<String>>,
    pub problems: Vec<(String, String)>,
    /// Whether the node table file changed.
    pub written: bool,
}

/// Since when each allocated node has been missing from this replica's view.
#[derive(Debug, Default)]
pub struct Missing(pub(super) BTreeMap<String, Instant>);

/// What a sync loop carries from one reconciliation to the next.
#[derive(Default)]
pub struct SyncState {
    pub(super) missing: Missing,
    /// The node table's writer; it knows what the file and its journal hold.
    pub(super) writer: Option<TableWriter>,
    /// The allocations as last read or written, for single-node changes.
    pub(super) cache: Option<Cache>,
}

/// Nodes -> allocations (persisted through `store`) -> node table file.
pub async fn reconcile<S: AllocationStore>(
    nodes: &[EdgeNode],
    store: &S,
    cfg: &SyncConfig,
    state: &mut SyncState,
    metrics: &SyncMetrics,
) -> Result<Outcome> {
    let missing = &mut state.missing;
    let wanted = model::names(nodes);
    let (current, _) = store.load().await?;
    let now = Instant::now();
    missing
        .0
        .retain(|n, _| current.contains_key(n) && !wanted.contains(n));
    for n in current.keys().filter(|n| !wanted.contains(*n)) {
        missing.0.entry(n.clone()).or_insert(now);
    }
    let held: BTreeSet<String> = missing
        .0
        .iter()
        .filter(|(_, since)| now.duration_since(**since) < cfg.release_after)
        .map(|(n, _)| n.clone())
        .collect();
    let (plan, version) = allocate(store, &cfg.pool, &wanted, &|n| held.contains(n)).await?;
    state.cache = Some(Cache::new(&plan.allocations, version, &cfg.pool));
    for (n, ip) in &plan.released {
        tracing::info!(node = %n, %ip, "node gone: tunnel address released");
    }
    for (n, ip) in &plan.outside {
        tracing::warn!(node = %n, %ip, pool = %cfg.pool, "stored tunnel address is outside the pool (the pool changed?): reassigned");
    }
    // Exhaustion, ambiguity and address problems are logged (once each) by the caller.
    let tunnel: BTreeMap<String, IpAddr> = plan
        .allocations
        .iter()
        .filter(|(n, _)| wanted.contains(*n))
        .map(|(n, ip)| (n.clone(), *ip))
        .collect();
    let table = model::table(nodes, &tunnel);
    let ambiguous = model::ambiguous(&table);
    let problems: Vec<(String, String)> = nodes
        .iter()
        .flat_map(|n| n.problems.iter().map(|p| (n.name.clone(), p.clone())))
        .collect();
    let writer = state
        .writer
        .get_or_insert_with(|| TableWriter::new(&cfg.out));
    let written = match writer.publish(&table) {
        Ok(None) => {
            tracing::info!(nodes = table.nodes.len(), tunnel = tunnel.len(), file = %cfg.out.display(), "node table written");
            true
        }
        Ok(Some(0)) => false,
        Ok(Some(entries)) => {
            tracing::info!(nodes = table.nodes.len(), entries, file = %cfg.out.display(), "node table changes appended to its journal");
            true
        }
        Err(e) => {
            // What the file holds is unknown: the next publish writes it whole. A failed
            // write is retried soon (transient); a table the rules refuse waits for a change.
            state.writer = None;
            return Err(match e {
                edge_model::Error::Io { what, source } => SyncError::io(what, source),
                other => other.into(),
            });
        }
    };
    metrics.nodes.set(table.nodes.len() as i64);
    metrics
        .pool_size
        .set(i64::try_from(cfg.pool.size()).unwrap_or(i64::MAX));
    metrics.pool_allocated.set(plan.allocations.len() as i64);
    metrics
        .pool_exhausted_nodes
        .set(plan.exhausted.len() as i64);
    metrics.ambiguous_addresses.set(ambiguous.len() as i64);
    metrics.node_problems.set(problems.len() as i64);
    metrics.reconciles.inc();
    Ok(Outcome {
        table,
        plan,
        ambiguous,
        problems,
        written,
    })
}

/// Logs each problem once per appearance (not at every reconciliation).
#[derive(Default)]
struct Reported(BTreeSet<String>);

impl Reported {
    /// The outcome's problems not reported yet, each logged once: (node, reason, note). A
    /// problem that went away is forgotten, so it is reported again if it comes back.
    fn fresh(&mut self, o: &Outcome, pool: &Pool) -> Vec<(String, &'static str, String)> {
        let mut current = BTreeSet::new();
        let mut new = Vec::new();
        for (n, r, note, key) in notices(o, pool) {
            if !self.0.contains(&key) {
                tracing::warn!(node = %n, reason = r, "{note}");
                new.push((n, r, note));
            }
            current.insert(key);
        }
        self.0 = current;
        new
    }
}

/// The notes of one outcome: (node, reason, note, dedupe key).
fn notices(o: &Outcome, pool: &Pool) -> Vec<(String, &'static str, String, String)> {
    let mut out = Vec::new();
    for (ip, owners) in &o.ambiguous {
        for n in owners {
            out.push((
                n.clone(),
                reason::AMBIGUOUS_ADDRESS,
                format!("address {ip} is listed by nodes {owners:?}: connections to it are refused, never routed to either; reach this node by name or tunnel address"),
                format!("amb {ip} {n} {owners:?}"),
            ));
        }
    }
    for n in &o.plan.exhausted {
        out.push((
            n.clone(),
            reason::POOL_EXHAUSTED,
            format!("tunnel address pool {pool} ({} addresses) is exhausted: node {n} has no tunnel address and is not reachable by name; enlarge --pool", pool.size()),
            format!("exh {n}"),
        ));
    }
    for (n, p) in &o.problems {
        out.push((
            n.clone(),
            reason::UNUSABLE_ADDRESS,
            p.clone(),
            format!("prob {p}"),
        ));
    }
    out
}

/// Embedded mode: follows `nodes_file` (a node table without tunnel addresses), allocates from
/// the pool into `state_file`, writes `cfg.out`. Runs until `shutdown`.
pub async fn run_file(
    nodes_file: PathBuf,
    state_file: PathBuf,
    cfg: SyncConfig,
    metrics: SyncMetrics,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = FileStore::new(&state_file);
    let mut state = SyncState::default();
    let mut reported = Reported::default();
    let mut last_mtime = None;
    let mut last_full = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let mtime = edge_model::follow::FileStamp::of(&nodes_file);
        if mtime == last_mtime && last_full.elapsed() < cfg.resync && ready.load(Ordering::Relaxed)
        {
            continue;
        }
        last_mtime = mtime;
        last_full = Instant::now();
        let nodes = match file_nodes(&nodes_file) {
            Ok(n) => n,
            Err(e) => {
                metrics.reconcile_errors.inc();
                tracing::error!("{e}; keeping the previous node table");
                continue;
            }
        };
        match reconcile(&nodes, &store, &cfg, &mut state, &metrics).await {
            Ok(o) => {
                reported.fresh(&o, &cfg.pool);
                ready.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                metrics.reconcile_errors.inc();
                tracing::error!("node sync failed, keeping the previous node table: {e}");
            }
        }
    }
}

/// The nodes of an embedded-mode input file. `tunnel=` is refused: the pool assigns it.
fn file_nodes(path: &Path) -> Result<Vec<EdgeNode>> {
    let t = NodeTable::load(path)?;
    if let Some((n, _)) = t.tunnel.iter().next() {
        return Err(SyncError::Invalid(format!(
            "{}: node {n:?} has a tunnel= address, but with --pool the pool assigns them; remove tunnel= from the input",
            path.display()
        )));
    }
    Ok(t.nodes
        .into_iter()
        .map(|(name, addresses)| EdgeNode {
            name,
            addresses,
            problems: Vec::new(),
        })
        .collect())
}

/// Cluster mode settings.
#[derive(Debug, Clone)]
pub struct KubeSync {
    /// Label selector for edge Nodes (cloud nodes are never redirected).
    pub selector: String,
    pub namespace: String,
    /// The ConfigMap holding tunnel address allocations.
    pub allocations: String,
    /// A ConfigMap to keep a CoreDNS `hosts` file in (key `hosts`), if any.
    pub coredns: Option<String>,
    /// This replica's name, for Events.
    pub instance: Option<String>,
}

/// The edge nodes as this replica sees them, reduced to what the node table depends on, so a
/// Node update that changes none of it (a status heartbeat, at fleet scale hundreds a second)
/// costs one comparison and no reconciliation.
#[derive(Default)]
struct View {
    nodes: BTreeMap<String, EdgeNode>,
    /// The list being received during a (re)list.
    listing: Option<BTreeMap<String, EdgeNode>>,
    complete: bool,
}

/// What a watch event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Changed {
    /// One node, by name (its entry now is in the view, or it is gone).
    Node(String),
    /// Possibly any: a (re)list.
    All,
}

impl View {
    /// Applies one watch event; what the node table may owe it.
    fn apply(&mut self, ev: &watcher::Event<Node>) -> Option<Changed> {
        match ev {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                None
            }
            watcher::Event::InitApply(n) => {
                if let (Some(l), Some(e)) = (self.listing.as_mut(), model::edge_node(n)) {
                    l.insert(e.name.clone(), e);
                }
                None
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = !self.complete || listed != self.nodes;
                self.nodes = listed;
                self.complete = true;
                changed.then_some(Changed::All)
            }
            watcher::Event::Apply(n) => match model::edge_node(n) {
                Some(e) if self.nodes.get(&e.name) != Some(&e) => {
                    let name = e.name.clone();
                    self.nodes.insert(name.clone(), e);
                    Some(Changed::Node(name))
                }
                _ => None,
            },
            watcher::Event::Delete(n) => n
                .metadata
                .name
                .as_ref()
                .filter(|name| self.nodes.remove(*name).is_some())
                .map(|name| Changed::Node(name.clone())),
        }
    }
}

/// Cluster mode: watches Nodes and reconciles after every relevant change (debounced) and
/// every `cfg.resync`. Runs until `shutdown`.
pub async fn run_kube(
    client: Client,
    k: KubeSync,
    cfg: SyncConfig,
    metrics: SyncMetrics,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<()> {
    let nodes_api: Api<Node> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let watch = watcher(nodes_api, watcher::Config::default().labels(&k.selector));
    let mut stream = reflector(writer, watch).default_backoff().boxed();
    let store = KubeStore::new(client.clone(), &k.namespace, &k.allocations);
    let events = NodeEvents::new(client.clone(), k.instance.clone());
    let cm_api: Api<ConfigMap> = Api::namespaced(client, &k.namespace);
    let mut state = SyncState::default();
    let mut reported = Reported::default();
    let mut view = View::default();
    let mut retry = false;
    let mut last_hosts = None;
    let mut hosts_due = None;
    let mut resync = tokio::time::interval(cfg.resync);
    loop {
        let go = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            ev = stream.next() => match ev {
                Some(Ok(ev)) => view.apply(&ev),
                Some(Err(e)) => { tracing::warn!("Node watch: {e}; retrying with backoff"); None }
                None => return Err(SyncError::WatchEnded),
            },
            _ = resync.tick() => Some(Changed::All),
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => Some(Changed::All),
            // Single-node changes batch the CoreDNS block (a write of every name).
            _ = tokio::time::sleep_until(hosts_due.unwrap_or_else(tokio::time::Instant::now)), if hosts_due.is_some() => {
                hosts_due = None;
                if let (Some(name), Some(cur)) = (&k.coredns, state.writer.as_ref().and_then(|w| w.current())) {
                    let hosts = coredns_hosts(&cur.table());
                    if last_hosts.as_ref() != Some(&hosts) {
                        match apply_hosts(&cm_api, name, &hosts).await {
                            Ok(()) => last_hosts = Some(hosts),
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                }
                None
            }
        };
        // Until the first complete list, a partial view would release live nodes' addresses.
        let Some(change) = go else { continue };
        if !view.complete {
            continue;
        }
        // One node: its entry alone, appended to the journal, unless it needs the full pass.
        if let Changed::Node(name) = &change
            && !retry
        {
            match apply_one(
                name,
                view.nodes.get(name),
                &store,
                &cfg,
                &mut state,
                &metrics,
            )
            .await
            {
                Ok(true) => {
                    if k.coredns.is_some() && hosts_due.is_none() {
                        hosts_due = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(node = %name, "single-node change failed ({e}); reconciling in full")
                }
            }
        }
        // Debounce: a burst of Node changes (a fleet reconnecting) becomes one reconciliation.
        let burst_end = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(burst_end);
        loop {
            tokio::select! {
                _ = &mut burst_end => break,
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => { view.apply(&ev); }
                    Some(Err(e)) => tracing::warn!("Node watch: {e}"),
                    None => return Err(SyncError::WatchEnded),
                },
            }
        }
        let nodes: Vec<EdgeNode> = view.nodes.values().cloned().collect();
        // Events attach to the Node's current incarnation (uid) from the reflector's store.
        let uid = |name: &str| {
            reader
                .get(&reflector::ObjectRef::new(name))
                .and_then(|n| n.metadata.uid.clone())
        };
        match reconcile(&nodes, &store, &cfg, &mut state, &metrics).await {
            Ok(o) => {
                for (n, r, note) in reported.fresh(&o, &cfg.pool) {
                    events.warn(&n, uid(&n), r, &note).await;
                }
                if let Some(name) = &k.coredns {
                    let hosts = coredns_hosts(&o.table);
                    if last_hosts.as_ref() != Some(&hosts) {
                        match apply_hosts(&cm_api, name, &hosts).await {
                            Ok(()) => last_hosts = Some(hosts),
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                }
                ready.store(true, Ordering::Relaxed);
                retry = false;
            }
            Err(e) if e.is_transient() => {
                metrics.reconcile_errors.inc();
                tracing::error!(
                    "node sync failed, keeping the previous node table (retrying in 1 s): {e}"
                );
                retry = true;
            }
            Err(e) => {
                // Retrying the same input gives the same answer: wait for a change or the
                // periodic resync instead of repeating it every second.
                metrics.reconcile_errors.inc();
                tracing::error!(
                    "node sync refused its input, keeping the previous node table until Nodes or the allocation store change: {e}"
                );
                retry = false;
            }
        }
    }
}

pub use edge_model::hosts::coredns_hosts;

async fn apply_hosts(api: &Api<ConfigMap>, name: &str, hosts: &str) -> Result<()> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("hosts".to_owned(), hosts.to_owned())])),
        ..Default::default()
    };
    let pp = PatchParams::apply(super::events::CONTROLLER).force();
    api.patch(name, &pp, &Patch::Apply(&cm))
        .await
        .map(|_| ())
        .map_err(|e| SyncError::Api {
            what: format!("updating the CoreDNS hosts ConfigMap {name}"),
            hint: " (grant patch on it)",
            source: e,
        })
}

/// Where the nodes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Embedded mode: a node table file, allocations in a local state file.
    File { nodes: PathBuf, state: PathBuf },
    /// Cluster mode: Node objects through the Kubernetes API.
    Kube(KubeSync),
}

/// `redirector sync-nodes`: metrics and health on `metrics_listen`, then the loop for `source`.
pub async fn serve(
    source: Source,
    cfg: SyncConfig,
    metrics_listen: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> Result<()> {
    let metrics = SyncMetrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(at) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(at).await.map_err(|e| {
            SyncError::io(
                format!("listening for metrics on {at} (--metrics-listen)"),
                e,
            )
        })?;
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let r = ready.clone();
        tokio::spawn(edge_cli::http::serve(
            listener,
            registry,
            Arc::new(move || r.load(Ordering::Relaxed)),
            shutdown.clone(),
        ));
    }
    tracing::info!(pool = %cfg.pool, size = %cfg.pool.size(), out = %cfg.out.display(), "node sync starting");
    match source {
        Source::File { nodes, state } => {
            run_file(nodes, state, cfg, metrics, ready, shutdown).await
        }
        Source::Kube(k) => {
            let client = Client::try_default().await.map_err(SyncError::NoClient)?;
            run_kube(client, k, cfg, metrics, ready, shutdown).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, heartbeat: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "resourceVersion": heartbeat},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                       "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-23T00:00:00Z"}]}
        }))
        .unwrap()
    }

    #[test]
    fn only_changes_the_node_table_depends_on_count() {
        let mut v = View::default();
        let one = |n: &str| Some(Changed::Node(n.to_owned()));
        assert_eq!(v.apply(&watcher::Event::Init), None);
        assert_eq!(
            v.apply(&watcher::Event::InitApply(node("a", "192.0.2.1", "1"))),
            None
        );
        assert_eq!(
            v.apply(&watcher::Event::InitDone),
            Some(Changed::All),
            "first list"
        );
        // A heartbeat: new resourceVersion, same addresses.
        assert_eq!(
            v.apply(&watcher::Event::Apply(node("a", "192.0.2.1", "2"))),
            None
        );
        assert_eq!(
            v.apply(&watcher::Event::Apply(node("a", "192.0.2.9", "3"))),
            one("a"),
            "address change"
        );
        assert_eq!(
            v.apply(&watcher::Event::Apply(node("b", "192.0.2.2", "1"))),
            one("b"),
            "new node"
        );
        assert_eq!(
            v.apply(&watcher::Event::Delete(node("b", "192.0.2.2", "1"))),
            one("b")
        );
        assert_eq!(
            v.apply(&watcher::Event::Delete(node("b", "192.0.2.2", "1"))),
            None,
            "already gone"
        );
        // A relist with the same content changes nothing.
        v.apply(&watcher::Event::Init);
        v.apply(&watcher::Event::InitApply(node("a", "192.0.2.9", "7")));
        assert_eq!(v.apply(&watcher::Event::InitDone), None);
        assert_eq!(v.nodes.len(), 1);
    }
}
