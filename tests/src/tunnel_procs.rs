//! Starting the real `tunnel` binaries inside a [`World`], for end-to-end tests and benchmarks.
use std::{net::SocketAddr, path::Path, process::Command};

use crate::{LoggedProc, World, pki::TestPki, spawn};

/// The name agents verify in the server certificate.
pub const SERVER_NAME: &str = "tunnel.test";

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Arguments of `tunnel server` (certificates from `pki`, server name [`SERVER_NAME`]).
pub fn server_args(
    pki: &TestPki,
    ingress: SocketAddr,
    agents_at: SocketAddr,
    metrics_at: SocketAddr,
    node_table: &Path,
    pin_dir: &Path,
) -> Vec<String> {
    let (cert, key) = pki.server(SERVER_NAME);
    [
        "server",
        "--ca",
        &s(&pki.ca_pem),
        "--cert",
        &s(&cert),
        "--key",
        &s(&key),
        "--agent-listen",
        &agents_at.to_string(),
        "--host-ingress",
        &ingress.to_string(),
        "--node-table",
        &s(node_table),
        "--pin-dir",
        &s(pin_dir),
        "--metrics-listen",
        &metrics_at.to_string(),
        "--orig-dst",
        "sockopt",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Arguments of `tunnel-agent` for `node`, dialling `servers` (comma list), serving `ports`
/// (comma list) by dialling `dial` (comma list), metrics on `metrics_at`.
pub fn agent_args(
    pki: &TestPki,
    node: &str,
    servers: &str,
    ports: &str,
    dial: &str,
    metrics_at: &str,
) -> Vec<String> {
    let (cert, key) = pki.agent(node);
    [
        "--node-id",
        node,
        "--servers",
        servers,
        "--server-name",
        SERVER_NAME,
        "--ca",
        &s(&pki.ca_pem),
        "--cert",
        &s(&cert),
        "--key",
        &s(&key),
        "--ports",
        ports,
        "--dial",
        dial,
        "--metrics-listen",
        metrics_at,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Where a `tunnel server --ca-dir` (a CA it keeps, and enrollment) listens.
pub struct CaDirServer<'a> {
    pub ca_dir: &'a Path,
    /// `--server-names` (comma list).
    pub names: &'a str,
    pub enroll_at: SocketAddr,
    pub agents_at: SocketAddr,
    pub ingress: SocketAddr,
    pub metrics_at: SocketAddr,
}

impl CaDirServer<'_> {
    /// Its arguments, with the world's node table and pins.
    pub fn args(&self, w: &World) -> Vec<String> {
        [
            "server",
            "--ca-dir",
            &s(self.ca_dir),
            "--server-names",
            self.names,
            "--enroll-listen",
            &self.enroll_at.to_string(),
            "--agent-listen",
            &self.agents_at.to_string(),
            "--host-ingress",
            &self.ingress.to_string(),
            "--node-table",
            &s(&w.node_table),
            "--pin-dir",
            &s(&w.pin_dir),
            "--metrics-listen",
            &self.metrics_at.to_string(),
            "--orig-dst",
            "sockopt",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// `tunnel token create --<store_flag> <store> --node <node>` (`store_flag`: `tokens` or
/// `ca-dir`): the token it printed.
pub fn token_create(store_flag: &str, store: &Path, node: &str) -> String {
    let out = std::process::Command::new(crate::spawn::workspace_bin("tunnel"))
        .args(["token", "create", &format!("--{store_flag}")])
        .arg(store)
        .args(["--node", node])
        .output()
        .expect("spawn tunnel token create");
    assert!(
        out.status.success(),
        "tunnel token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("token text")
        .trim()
        .to_owned()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `tunnel server ARGS` in the master namespace and in the world's cgroup, as in a pod under
/// the host cgroup the redirector attaches to: its getsockopt program answers the ingress's
/// `SO_ORIGINAL_DST` there (`--orig-dst sockopt`, which the argument lists above give).
pub fn server_command(w: &World, args: &[String]) -> Command {
    let mut cmd = Command::new(spawn::workspace_bin("tunnel"));
    cmd.args(args);
    spawn::place(&mut cmd, Some(&w.cgroup), Some(&w.master));
    cmd
}

/// [`server_command`] started, logging as `name`.
pub fn spawn_server(w: &World, name: &str, args: &[String]) -> LoggedProc {
    LoggedProc::start(&w.dir, name, server_command(w, args))
}

/// `tunnel server` in the master namespace, as the unprivileged user with no capability (as
/// the master DaemonSet runs it); returns once it logged that it is ready. `ingress` is the
/// IPv4 and the IPv6 host ingress.
pub fn server(
    w: &World,
    pki: &TestPki,
    ingress: (SocketAddr, SocketAddr),
    agents_at: SocketAddr,
    metrics_at: SocketAddr,
) -> LoggedProc {
    server_with(w, pki, ingress, agents_at, metrics_at, &[])
}

/// [`server`] with `extra` arguments.
pub fn server_with(
    w: &World,
    pki: &TestPki,
    ingress: (SocketAddr, SocketAddr),
    agents_at: SocketAddr,
    metrics_at: SocketAddr,
    extra: &[&str],
) -> LoggedProc {
    let mut args = server_args(
        pki,
        ingress.0,
        agents_at,
        metrics_at,
        &w.node_table,
        &w.pin_dir,
    );
    args.extend(["--host-ingress6".to_owned(), ingress.1.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut cmd = server_command(w, &args);
    spawn::drop_privileges(&mut cmd);
    let mut p = LoggedProc::start(&w.dir, "tunnel-server", cmd);
    p.wait_log(&["tunnel server ready"]);
    p
}

/// `tunnel-agent` for `node` in the edge namespace, dialling `dial` on `ports` (comma list);
/// returns once `server` logged the node's session.
pub fn agent(
    w: &World,
    pki: &TestPki,
    server: &mut LoggedProc,
    node: &str,
    agents_at: SocketAddr,
    ports: &str,
    dial: &str,
) -> LoggedProc {
    // Several agents may share the edge namespace: no fixed metrics port.
    let args = agent_args(
        pki,
        node,
        &agents_at.to_string(),
        ports,
        dial,
        "127.0.0.1:0",
    );
    let p = LoggedProc::spawn(w, node, &w.edge, "tunnel-agent", &strs(&args));
    server.wait_log(&["agent session up", &format!("node={node}")]);
    p
}

/// The master side of the whole path: redirector (sending host clients to the tunnel's
/// ingress) and tunnel server, on addresses picked free in the master namespace.
pub struct Stack {
    pub ingress: SocketAddr,
    /// The server's ingress for IPv6 destinations (the redirector's --host-ingress6).
    pub ingress6: SocketAddr,
    pub agents_at: SocketAddr,
    pub metrics_at: SocketAddr,
    pub server: LoggedProc,
    /// Declared last: dropped after the server, so the ingress never outlives its redirector.
    pub redirector: crate::RedirectorProc,
}

impl Stack {
    /// [`agent`] for `node` dialling this stack's server.
    pub fn agent(
        &mut self,
        w: &World,
        pki: &TestPki,
        node: &str,
        ports: &str,
        dial: &str,
    ) -> LoggedProc {
        agent(w, pki, &mut self.server, node, self.agents_at, ports, dial)
    }
}

/// A free loopback address in the master namespace (a metrics listener's).
pub fn master_loopback(w: &World) -> SocketAddr {
    let _m = w.master.enter();
    crate::free_addr("127.0.0.1")
}

pub fn stack(w: &World, pki: &TestPki, redirector_args: &[&str]) -> Stack {
    stack_with(w, pki, redirector_args, &[])
}

/// [`stack`] with `server_args` added to the tunnel server's.
pub fn stack_with(
    w: &World,
    pki: &TestPki,
    redirector_args: &[&str],
    server_args: &[&str],
) -> Stack {
    let (ingress, ingress6, agents_at, metrics_at) = {
        let _m = w.master.enter();
        (
            crate::free_addr("127.0.0.1"),
            crate::free_addr("[::1]"),
            crate::free_addr("198.51.100.1"),
            crate::free_addr("127.0.0.1"),
        )
    };
    let redirector =
        crate::RedirectorProc::start_with_ingresses(w, ingress, ingress6, redirector_args);
    // Agents dial `agents_at`; the server listens on every master address (a benchmark adds a
    // second, long-RTT link to the master).
    let any = std::net::SocketAddr::from(([0, 0, 0, 0], agents_at.port()));
    let server = server_with(w, pki, (ingress, ingress6), any, metrics_at, server_args);
    Stack {
        ingress,
        ingress6,
        agents_at,
        metrics_at,
        server,
        redirector,
    }
}

/// A plain HTTP/1.0 GET from the master namespace (no client dependency for one request).
pub fn http_get(w: &World, at: SocketAddr, path: &str) -> String {
    http_get_in(&w.master, at, path)
}

/// [`http_get`] from `netns`.
pub fn http_get_in(netns: &crate::Netns, at: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let _in = netns.enter();
    let mut s = std::net::TcpStream::connect(at).expect("HTTP endpoint");
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}
