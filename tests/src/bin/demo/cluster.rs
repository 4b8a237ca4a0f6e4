//! Starts the demo's processes with the real binaries and waits until each is ready:
//! on every edge a kubelet stand-in, node-exporter and the tunnel agent; on the master the
//! redirector, the tunnel server and Prometheus.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use redirector_tests::{
    LoggedProc,
    spawn::{self, workspace_bin},
    tunnel_procs,
};

use redirector::node_table::NodeTable;

use crate::{
    tools::Tools,
    world::{DemoWorld, POOL},
};

pub const INGRESS: &str = "127.0.0.1:10266";
pub const AGENT_PORT: u16 = 10262;
pub const SERVER_METRICS: &str = "127.0.0.1:10263";
pub const REDIRECTOR_METRICS: &str = "127.0.0.1:10269";
pub const PROMETHEUS: &str = "127.0.0.1:9090";
pub const SYNC_METRICS: &str = "127.0.0.1:10270";
/// Kubelet ports plus node-exporter's, which the demo adds to the redirected ports.
pub const PORTS: &str = "10250,10255,10350,9100";

/// Fields drop in order: master side first, so no agent sees its server vanish mid-teardown
/// while clients still run. Most are only held for their Drop (which stops the process).
#[allow(dead_code)]
pub struct Cluster {
    /// Node name -> tunnel address, as `sync-nodes` assigned them.
    pub tunnel: BTreeMap<String, IpAddr>,
    pub prometheus: LoggedProc,
    pub server: LoggedProc,
    pub redirector: LoggedProc,
    pub agents: Vec<LoggedProc>,
    pub edge_services: Vec<LoggedProc>,
    pub sync: LoggedProc,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits for `ready()` or the process's exit, whichever comes first, up to 30 s.
fn wait_until(p: &mut LoggedProc, what: &str, mut ready: impl FnMut(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = p.log();
        if ready(&log) {
            return;
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!("{what} exited ({st}) before it was ready:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready in 30 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `redirector sync-nodes` in embedded mode: the operator's node list in, the node table with
/// a tunnel address per node out. Returns once the table lists every node with one.
fn start_sync(w: &DemoWorld) -> (LoggedProc, BTreeMap<String, IpAddr>) {
    let cmd = w.master_plain(
        &s(&workspace_bin("redirector")),
        &[
            "sync-nodes",
            "--nodes",
            &s(&w.nodes_input),
            "--state",
            &s(&w.pool_state),
            "--pool",
            POOL,
            "--out",
            &s(&w.node_table),
            "--metrics-listen",
            SYNC_METRICS,
        ],
    );
    let mut sync = LoggedProc::start(&w.dir, "sync-nodes", cmd);
    let mut tunnel = BTreeMap::new();
    wait_until(&mut sync, "sync-nodes", |_| {
        tunnel = std::fs::read_to_string(&w.node_table)
            .ok()
            .and_then(|t| NodeTable::parse(&t, &w.node_table).ok())
            .map(|t| t.tunnel)
            .unwrap_or_default();
        tunnel.len() == w.edges.len()
    });
    (sync, tunnel)
}

pub fn start(w: &DemoWorld, tools: &Tools) -> Cluster {
    let (sync, tunnel) = start_sync(w);
    let mut edge_services = Vec::new();
    for edge in &w.edges {
        let name = edge.spec.name;
        // The kubelet's certificate names every way the API server may dial it.
        let (cert, key) = w.pki.kubelet.serving(
            &format!("kubelet-{name}"),
            &[
                name.to_owned(),
                edge.spec.internal_ip.to_owned(),
                tunnel[name].to_string(),
            ],
        );
        let cmd = w.on_edge(
            edge,
            &workspace_bin("kubelet-standin"),
            &[
                "--node",
                name,
                "--listen",
                "0.0.0.0:10250",
                "--ca",
                &s(&w.pki.kubelet.ca_pem),
                "--cert",
                &s(&cert),
                "--key",
                &s(&key),
            ],
        );
        let mut kubelet = LoggedProc::start(&w.dir, &format!("kubelet-{name}"), cmd);
        wait_until(&mut kubelet, "kubelet stand-in", |l| {
            l.contains("kubelet stand-in for")
        });
        // Bound to the node's localhost only: reachable through the agent's `--dial` list.
        let cmd = w.on_edge(
            edge,
            &tools.node_exporter,
            &[
                "--web.listen-address=127.0.0.1:9100",
                "--collector.disable-defaults",
                "--collector.loadavg",
                "--collector.meminfo",
                "--collector.netdev",
            ],
        );
        let mut exporter = LoggedProc::start(&w.dir, &format!("node-exporter-{name}"), cmd);
        wait_until(&mut exporter, "node-exporter", |l| {
            l.contains("Listening on")
        });
        edge_services.extend([kubelet, exporter]);
    }

    let ready_file = w.dir.join("redirector.ready");
    let cmd = w.master_plain(
        &s(&workspace_bin("redirector")),
        &[
            "--pin-dir",
            &s(&w.pin_dir),
            "run",
            "--cgroup",
            &s(&w.cgroup.path),
            "--node-table",
            &s(&w.node_table),
            "--ports",
            PORTS,
            "--host-ingress",
            INGRESS,
            "--hosts-file",
            &s(&w.hosts),
            "--metrics-listen",
            REDIRECTOR_METRICS,
            "--ready-file",
            &s(&ready_file),
            "--reload-interval",
            "0.5",
            // The ingress probe, on a documentation address (192.0.0.8 by default).
            "--probe-address",
            "192.0.2.254",
            "--self-check-interval",
            "5",
        ],
    );
    let mut redirector = LoggedProc::start(&w.dir, "redirector", cmd);
    wait_until(&mut redirector, "redirector", |_| ready_file.exists());

    let args = tunnel_procs::server_args(
        &w.pki.tunnel,
        INGRESS.parse().unwrap(),
        ([0, 0, 0, 0], AGENT_PORT).into(),
        SERVER_METRICS.parse().unwrap(),
        &w.node_table,
        &w.pin_dir,
    );
    // In the cgroup the programs are attached to, as the server's pod is under the host's
    // cgroup root: the getsockopt program answers its ingress there.
    let mut cmd = Command::new(workspace_bin("tunnel"));
    cmd.args(&args);
    spawn::place(&mut cmd, Some(&w.cgroup), Some(&w.master));
    let mut server = LoggedProc::start(&w.dir, "tunnel-server", cmd);
    wait_until(&mut server, "tunnel server", |l| {
        l.contains("tunnel server ready")
    });

    let mut agents = Vec::new();
    for edge in &w.edges {
        let name = edge.spec.name;
        let args = tunnel_procs::agent_args(
            &w.pki.tunnel,
            name,
            &format!("{}:{AGENT_PORT}", edge.gateway),
            PORTS,
            // The node's own address first, then its localhost (node-exporter listens there).
            &format!("{},127.0.0.1", edge.spec.internal_ip),
            "127.0.0.1:10264",
        );
        let cmd = w.on_edge(edge, &workspace_bin("tunnel-agent"), &strs(&args));
        agents.push(LoggedProc::start(&w.dir, &format!("agent-{name}"), cmd));
        wait_until(&mut server, "tunnel server", |l| {
            l.lines()
                .any(|l| l.contains("agent session up") && l.contains(&format!("node={name}")))
        });
    }

    let prometheus = start_prometheus(w, tools);
    Cluster {
        tunnel,
        sync,
        prometheus,
        server,
        redirector,
        agents,
        edge_services,
    }
}

/// Prometheus as a client on the master (in the cgroup, names from the managed hosts file),
/// scraping every edge's node-exporter by node name.
fn start_prometheus(w: &DemoWorld, tools: &Tools) -> LoggedProc {
    let mut targets = String::new();
    for e in &w.edges {
        targets.push_str(&format!(
            "      - targets: ['{n}:9100']\n        labels: {{node: {n}}}\n",
            n = e.spec.name
        ));
    }
    // The project's alert rules, and the master's own daemons as the PodMonitor scrapes them.
    let rules = w.dir.join("rules.yaml");
    std::fs::write(&rules, redirector_tests::monitoring::rules()).expect("rule file");
    // The scrape timeout must not exceed the interval.
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: edge-node-exporter\n    static_configs:\n{targets}  - job_name: edge-redirector-master\n    static_configs:\n      - targets: ['{SERVER_METRICS}', '{REDIRECTOR_METRICS}']\n",
        s(&rules)
    );
    let config_file = w.dir.join("prometheus.yml");
    std::fs::write(&config_file, config).expect("prometheus config");
    let cmd = w.master_client(
        &tools.prometheus,
        &[
            &format!("--config.file={}", s(&config_file)),
            &format!("--storage.tsdb.path={}", s(&w.dir.join("prometheus-data"))),
            &format!("--web.listen-address={PROMETHEUS}"),
        ],
    );
    let mut p = LoggedProc::start(&w.dir, "prometheus", cmd);
    wait_until(&mut p, "prometheus", |l| {
        l.contains("Server is ready to receive web requests")
    });
    p
}

/// `curl` from the master namespace, outside the cgroup (for the local HTTP endpoints).
pub fn local_get(w: &DemoWorld, tools: &Tools, url: &str) -> String {
    let out = w
        .master_plain(&s(&tools.curl), &["-sS", "--max-time", "5", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kubelet client flags: the kubelet CA and the API server's client certificate.
pub fn kubelet_curl_args(w: &DemoWorld) -> Vec<String> {
    vec![
        "--cacert".into(),
        s(&w.pki.kubelet.ca_pem),
        "--cert".into(),
        s(&w.pki.client.0),
        "--key".into(),
        s(&w.pki.client.1),
    ]
}

/// Shorthand for a master client command running `program`.
pub fn client(w: &DemoWorld, program: &Path, args: &[String]) -> Command {
    w.master_client(program, &strs(args))
}
