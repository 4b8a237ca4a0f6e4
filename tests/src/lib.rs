//! End-to-end test harness: a small world of network namespaces, a child cgroup, the real
//! redirector binary and real sockets. Everything is undone on drop, also when a test panics.
//!
//! ```text
//!   pod netns (p)                 master netns (m)                    edge netns (e)
//!   203.0.113.2  ── veth ──  203.0.113.1   198.51.100.1  ── veth ──  198.51.100.10 .11 .12 .99
//!   (a "pod" client)         redirector, ingress stand-ins           services on 80, 9100,
//!                            on 127.0.0.1 and 203.0.113.1            10250, 10255, 10350
//! ```
//!
//! The edge namespace answers every port the tests use, so a connection that escapes
//! redirection is *seen* (it lands on an edge service, labelled `edge ...`), never lost.
pub mod bench;
pub mod cgroup;
pub mod delayline;
pub mod monitoring;
pub mod netns;
pub mod pki;
pub mod procstat;
pub mod rathole;
pub mod relay_floor;
pub mod scrape;
pub mod servers;
pub mod spawn;
pub mod tunnel_procs;
pub mod yaml;

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub use cgroup::TestCgroup;
pub use netns::Netns;

/// Node table of the world: three edge nodes, one address each.
pub const NODE_TABLE: &str = "\
# node-id  addresses
edge-a  198.51.100.10
edge-b  198.51.100.11
edge-c  198.51.100.12
edge-v6 2001:db8::10
";
/// An address on the edge host that is not a node.
pub const NOT_A_NODE: &str = "198.51.100.99";
/// Ports served in the edge namespace.
pub const EDGE_PORTS: [u16; 5] = [80, 9100, 10250, 10255, 10350];
pub const POD_INGRESS_IP: &str = "203.0.113.1";

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load eBPF programs and build network namespaces: run them as root (`sudo cargo xtask test`)"
    );
}

/// Short unique names: interface names are limited to 15 bytes.
fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct World {
    pub id: String,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub node_table: PathBuf,
    pub host_ingress: SocketAddr,
    pub pod_ingress: SocketAddr,
    pub host_ingress6: SocketAddr,
    pub ingress_log: servers::Log,
    pub pod_ingress_log: servers::Log,
    /// Per edge port, what the edge services accepted (escapes).
    pub edge_log: servers::Log,
    // Drop order: cgroup (kills clients) before the namespaces.
    pub cgroup: TestCgroup,
    pub master: Netns,
    pub edge: Netns,
    pub pod: Netns,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        require_root();
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("redirector-test-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("test dir");
        let master = Netns::new(&format!("rt{id}m"));
        let edge = Netns::new(&format!("rt{id}e"));
        let pod = Netns::new(&format!("rt{id}p"));
        netns::veth(
            &master,
            "me",
            &["198.51.100.1/24"],
            &edge,
            "em",
            &[
                "198.51.100.10/24",
                "198.51.100.11/24",
                "198.51.100.12/24",
                "198.51.100.99/24",
            ],
        );
        netns::veth(
            &master,
            "mp",
            &["203.0.113.1/24"],
            &pod,
            "pm",
            &["203.0.113.2/24"],
        );
        // IPv6 documentation prefix; nodad: usable at once, no duplicate address detection wait.
        master.ip(&["addr", "add", "2001:db8::1/64", "dev", "me", "nodad"]);
        edge.ip(&["addr", "add", "2001:db8::10/64", "dev", "em", "nodad"]);
        let cgroup = TestCgroup::new(&format!("redirector-test-{id}"));
        let node_table = dir.join("nodes.txt");
        fs::write(&node_table, NODE_TABLE).expect("node table");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/redirector-test-{id}"));

        let edge_log = servers::Log::default();
        {
            let _in_edge = edge.enter();
            for port in EDGE_PORTS {
                servers::edge(
                    servers::listen(SocketAddr::from(([0, 0, 0, 0], port))),
                    edge_log.clone(),
                );
                servers::edge(
                    servers::listen(SocketAddr::from(([0u16; 8], port))),
                    edge_log.clone(),
                );
            }
        }
        let (ingress_log, pod_ingress_log) = (servers::Log::default(), servers::Log::default());
        let (host_ingress, pod_ingress, host_ingress6) = {
            let _in_master = master.enter();
            let host = servers::listen("127.0.0.1:0".parse().unwrap());
            let pod = servers::listen(format!("{POD_INGRESS_IP}:0").parse().unwrap());
            let host6 = servers::listen("[::1]:0".parse().unwrap());
            let addrs = (
                host.local_addr().unwrap(),
                pod.local_addr().unwrap(),
                host6.local_addr().unwrap(),
            );
            servers::ingress(host, &pin_dir, ingress_log.clone());
            servers::ingress(pod, &pin_dir, pod_ingress_log.clone());
            servers::ingress(host6, &pin_dir, ingress_log.clone());
            addrs
        };
        Self {
            id,
            dir,
            pin_dir,
            node_table,
            host_ingress,
            pod_ingress,
            host_ingress6,
            ingress_log,
            pod_ingress_log,
            edge_log,
            cgroup,
            master,
            edge,
            pod,
        }
    }

    /// Starts `redirector run` in the master namespace and waits until it is ready.
    pub fn start_redirector(&self, extra: &[&str]) -> RedirectorProc {
        RedirectorProc::start(self, extra)
    }

    /// Runs `probe` with `args` in the test cgroup (and optionally another namespace than
    /// master) and returns its stdout parsed as JSON.
    pub fn probe(
        &self,
        in_cgroup: bool,
        netns: Option<&Netns>,
        args: &[&str],
    ) -> serde_json::Value {
        let mut cmd = Command::new(spawn::workspace_bin("probe"));
        cmd.args(args);
        spawn::place(
            &mut cmd,
            in_cgroup.then_some(&self.cgroup),
            Some(netns.unwrap_or(&self.master)),
        );
        let out = cmd.output().expect("spawn probe");
        assert!(
            out.status.success(),
            "probe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe output {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `probe loop TARGET` for `duration_ms` from a client in the cgroup and the master
    /// namespace, started now (connections go on across whatever the test does meanwhile).
    pub fn connect_loop(&self, target: &str, duration_ms: u64) -> ConnectLoop {
        self.paced_loop(target, duration_ms, 0)
    }

    /// [`Self::connect_loop`] with `pause_ms` between connections (a steady client rather
    /// than a flood, for tests that measure gaps while processes restart).
    pub fn paced_loop(&self, target: &str, duration_ms: u64, pause_ms: u64) -> ConnectLoop {
        let mut cmd = Command::new(spawn::workspace_bin("probe"));
        cmd.args(["loop", target, "--duration-ms", &duration_ms.to_string()]);
        cmd.args(["--pause-ms", &pause_ms.to_string()]);
        spawn::place(&mut cmd, Some(&self.cgroup), Some(&self.master));
        ConnectLoop(cmd.stdout(Stdio::piped()).spawn().expect("probe loop"))
    }

    /// Runs the redirector CLI (not `run`) against this world's pins.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(spawn::workspace_bin("redirector"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args)
            .output()
            .expect("spawn redirector")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.pin_dir.exists()
            && let Err(e) = redirector::uninstall::uninstall(&self.pin_dir)
        {
            eprintln!("cleanup: uninstall {}: {e}", self.pin_dir.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running `probe loop` ([`World::connect_loop`]).
pub struct ConnectLoop(std::process::Child);

impl ConnectLoop {
    /// Waits for the loop's end: its JSON summary (`ok`, `failed`, `labels`, `errors`).
    pub fn summary(self) -> serde_json::Value {
        let out = self.0.wait_with_output().expect("probe loop");
        serde_json::from_slice(&out.stdout).expect("loop JSON")
    }
}

/// A running `redirector run`, killed on drop (its pins stay: [`World`] removes them).
pub struct RedirectorProc {
    pub proc: LoggedProc,
}

impl RedirectorProc {
    fn start(world: &World, extra: &[&str]) -> Self {
        Self::start_with_ingress(world, world.host_ingress, extra)
    }

    /// Starts with host clients sent to `host_ingress` (e.g. a real tunnel server's) and waits
    /// for its ready file.
    pub fn start_with_ingress(world: &World, host_ingress: SocketAddr, extra: &[&str]) -> Self {
        Self::start_with_ingresses(world, host_ingress, world.host_ingress6, extra)
    }

    /// Like [`Self::start_with_ingress`], with IPv6 destinations sent to `host_ingress6`.
    pub fn start_with_ingresses(
        world: &World,
        host_ingress: SocketAddr,
        host_ingress6: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let ready_file = world.dir.join(format!("ready-{}", unique_id()));
        let mut args: Vec<String> = ["--pin-dir", &world.pin_dir.display().to_string(), "run"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (flag, value) in [
            ("--cgroup", world.cgroup.path.display().to_string()),
            ("--node-table", world.node_table.display().to_string()),
            ("--host-ingress", host_ingress.to_string()),
            ("--pod-ingress", world.pod_ingress.to_string()),
            ("--host-ingress6", host_ingress6.to_string()),
            ("--ready-file", ready_file.display().to_string()),
            ("--reload-interval", "0.2".to_string()),
        ] {
            args.push(flag.to_string());
            args.push(value);
        }
        // No ingress probe unless a test asks for one: its connections would show in the
        // ingress logs and counters that tests count exactly.
        if !extra.contains(&"--probe-address") {
            args.extend(["--probe-address".to_string(), "off".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc = LoggedProc::spawn(world, "redirector", &world.master, "redirector", &args);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready_file.exists() {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("redirector exited ({status}) before ready:\n{}", proc.log());
            }
            assert!(
                Instant::now() < deadline,
                "redirector not ready in 30 s:\n{}",
                proc.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { proc }
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn sigkill(&mut self) {
        let _ = self.proc.child.kill(); // SIGKILL
        let _ = self.proc.child.wait();
    }
}

/// Labels the probe saw, per token, from `probe connect` output.
pub fn replies(v: &serde_json::Value) -> Vec<(String, String, Option<String>)> {
    v.as_array()
        .expect("probe connect prints an array")
        .iter()
        .map(|c| {
            (
                c["target"].as_str().unwrap_or_default().to_owned(),
                c["reply"].as_str().unwrap_or("").to_owned(),
                c["peer"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// A background process whose stderr goes to a file, killed on drop.
pub struct LoggedProc {
    pub child: Child,
    pub log_file: PathBuf,
}

impl LoggedProc {
    /// Starts the workspace binary `bin args` in `netns`, logging to the world's directory.
    pub fn spawn(world: &World, name: &str, netns: &Netns, bin: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(spawn::workspace_bin(bin));
        cmd.args(args);
        spawn::place(&mut cmd, None, Some(netns));
        Self::start(&world.dir, name, cmd)
    }

    /// Starts a prepared command with its stdout discarded and its stderr in
    /// `<log_dir>/<name>-<id>.log`.
    pub fn start(log_dir: &std::path::Path, name: &str, mut cmd: Command) -> Self {
        let log_file = log_dir.join(format!("{name}-{}.log", unique_id()));
        let log = fs::File::create(&log_file).expect("log file");
        cmd.stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        Self { child, log_file }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Waits until a log line contains every one of `parts`.
    pub fn wait_log(&mut self, parts: &[&str]) {
        self.wait_log_count(parts, 1);
    }

    /// How many log lines contain every one of `parts`.
    pub fn count_log(&self, parts: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// Waits until `n` log lines contain every one of `parts`.
    pub fn wait_log_count(&mut self, parts: &[&str], n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.count_log(parts) >= n {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "process exited ({st}) before logging {parts:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not {n} log lines with {parts:?} in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl LoggedProc {
    /// Sends `signal` and waits (at most `within`) for the process to exit.
    pub fn stop(&mut self, signal: i32, within: Duration) -> std::process::ExitStatus {
        // SAFETY: a signal to our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait_exit(within)
    }

    /// Waits (at most `within`) for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for LoggedProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on `ip` in the calling thread's namespace (bound, then released).
pub fn free_addr(ip: &str) -> SocketAddr {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .and_then(|l| l.local_addr())
        .expect("free port")
}
