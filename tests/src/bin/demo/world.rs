//! The demo's small cluster, built from network namespaces and removed on drop:
//!
//! ```text
//!                      master (namespace)                        edge-a  InternalIP 192.0.2.10
//!   redirector + tunnel server + Prometheus  203.0.113.1 ─ veth ─ 203.0.113.2   (uplink)
//!   clients run in the demo's cgroup         203.0.113.5 ─ veth ─ 203.0.113.6   edge-b  192.0.2.20
//!   no route to 192.0.2.0/24 ("behind NAT")  203.0.113.9 ─ veth ─ 203.0.113.10  edge-c  192.0.2.20
//! ```
//!
//! Each edge holds its InternalIP as a /32 on its uplink: the master has no route to it, as
//! with edge nodes behind NAT, while the edge reaches the master's uplink address, where its
//! agent dials the tunnel server. Tunnel addresses (from the pool 198.51.100.0/28, assigned by
//! `redirector sync-nodes`) exist only in the node table: the redirector captures connections
//! to them; no interface has them.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use redirector_tests::{
    TestCgroup,
    netns::{self, Netns},
    pki::TestPki,
    spawn,
};

pub struct EdgeSpec {
    pub name: &'static str,
    pub internal_ip: &'static str,
}

/// Where `redirector sync-nodes` takes every node's tunnel address from.
pub const POOL: &str = "198.51.100.0/28";

/// edge-b and edge-c share an InternalIP, as edge nodes in different private networks do.
pub const EDGES: [EdgeSpec; 3] = [
    EdgeSpec {
        name: "edge-a",
        internal_ip: "192.0.2.10",
    },
    EdgeSpec {
        name: "edge-b",
        internal_ip: "192.0.2.20",
    },
    EdgeSpec {
        name: "edge-c",
        internal_ip: "192.0.2.20",
    },
];

pub struct Edge {
    pub spec: &'static EdgeSpec,
    pub ns: Netns,
    /// The master's address on this edge's link: where the agent dials the tunnel server.
    pub gateway: String,
}

/// Certificates: the tunnel's CA (agents, server) and a separate kubelet CA (kubelet serving
/// certificates, the API server's client certificate). The tunnel never holds the latter.
pub struct Pki {
    pub tunnel: TestPki,
    /// Issues each kubelet's serving certificate once its tunnel address is known.
    pub kubelet: TestPki,
    /// The "API server"'s kubelet client certificate and key.
    pub client: (PathBuf, PathBuf),
}

pub struct DemoWorld {
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    /// The nodes as an operator lists them (no tunnel addresses): `sync-nodes`'s input.
    pub nodes_input: PathBuf,
    /// Allocation state of `sync-nodes` (embedded mode).
    pub pool_state: PathBuf,
    /// The node table `sync-nodes` writes and the redirector and tunnel server follow.
    pub node_table: PathBuf,
    /// The hosts file the redirector manages and the master's clients resolve names with.
    pub hosts: PathBuf,
    pub pki: Pki,
    // Drop order: the cgroup (kills clients) before the namespaces.
    pub cgroup: TestCgroup,
    pub master: Netns,
    pub edges: Vec<Edge>,
}

impl DemoWorld {
    pub fn new() -> Self {
        let id = std::process::id() % 100_000;
        let dir = std::env::temp_dir().join(format!("edge-redirector-demo-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("demo directory");
        let master = Netns::new(&format!("demo{id}m"));
        let mut edges = Vec::new();
        for (i, spec) in EDGES.iter().enumerate() {
            let ns = Netns::new(&format!("demo{id}{}", &spec.name[5..]));
            let (gw, up) = (4 * i + 1, 4 * i + 2);
            netns::veth(
                &master,
                &format!("to-{}", spec.name),
                &[&format!("203.0.113.{gw}/30")],
                &ns,
                "uplink",
                &[
                    &format!("203.0.113.{up}/30"),
                    &format!("{}/32", spec.internal_ip),
                ],
            );
            edges.push(Edge {
                spec,
                ns,
                gateway: format!("203.0.113.{gw}"),
            });
        }
        let cgroup = TestCgroup::new(&format!("edge-redirector-demo-{id}"));
        let nodes_input = dir.join("nodes-input.txt");
        fs::write(&nodes_input, nodes_input_text()).expect("node list");
        let hosts = dir.join("hosts");
        fs::write(&hosts, "127.0.0.1\tlocalhost\n::1\tlocalhost\n").expect("hosts file");
        let pki = make_pki(&dir);
        Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/edge-redirector-demo-{id}")),
            node_table: dir.join("nodes.txt"),
            pool_state: dir.join("tunnel-addresses"),
            nodes_input,
            dir,
            hosts,
            pki,
            cgroup,
            master,
            edges,
        }
    }

    /// A command run as a client on the master: in the demo's cgroup (so the redirector sees
    /// its connections), in the master namespace, resolving names with the demo's hosts file
    /// (bound over /etc/hosts in a private mount namespace; the host's file is not touched).
    pub fn master_client(&self, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(&self.hosts)
            .arg(program)
            .args(args);
        spawn::place(&mut cmd, Some(&self.cgroup), Some(&self.master));
        cmd
    }

    /// A command in the master namespace, outside the demo's cgroup (not redirected).
    pub fn master_plain(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args);
        spawn::place(&mut cmd, None, Some(&self.master));
        cmd
    }

    /// A command in an edge's namespace.
    pub fn on_edge(&self, edge: &Edge, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args);
        spawn::place(&mut cmd, None, Some(&edge.ns));
        cmd
    }
}

impl Drop for DemoWorld {
    fn drop(&mut self) {
        if self.pin_dir.exists()
            && let Err(e) = redirector::uninstall::uninstall(&self.pin_dir)
        {
            eprintln!("cleanup: uninstall {}: {e}", self.pin_dir.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn nodes_input_text() -> String {
    let mut t = String::from("# node-id  InternalIP\n");
    for e in &EDGES {
        t.push_str(&format!("{:<10} {}\n", e.name, e.internal_ip));
    }
    t
}

fn make_pki(dir: &Path) -> Pki {
    let tunnel = TestPki::new(dir);
    let kubelet = TestPki::named(dir, "kubelet-ca", "demo kubelet CA");
    Pki {
        client: kubelet.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client"),
        tunnel,
        kubelet,
    }
}
