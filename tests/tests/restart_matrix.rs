//! What survives a restart: each process of the path (`redirector run`, `tunnel server`,
//! `tunnel-agent`, `redirector sync-nodes`) is stopped with SIGTERM and with SIGKILL and started
//! again with the same arguments, while a client connects steadily to a node's tunnel address
//! through the whole path. For each, the test checks what persisted (run-time ports, node
//! table, tunnel addresses, sessions, the CA, tokens, the agent's certificate), measures the
//! longest gap between two answers, and asserts that no connection escaped to the real address
//! and none reached another node. The table it prints is README's "What survives a restart".
//! Root only.
use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use redirector::node_table::NodeTable;
use redirector_tests::{LoggedProc, RedirectorProc, World, free_addr, replies, tunnel_procs};

const POOL: &str = "192.0.2.0/29";
const SERVED: &str = "edge 127.0.0.1:10250";

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The master and one edge node, each process with the arguments it restarts with.
struct Fleet {
    w: World,
    ingress: (SocketAddr, SocketAddr),
    ca_dir: PathBuf,
    cert_dir: PathBuf,
    sync_args: Vec<String>,
    server_args: Vec<String>,
    agent_args: Vec<String>,
    sync: LoggedProc,
    redirector: RedirectorProc,
    server: LoggedProc,
    agent: LoggedProc,
    /// "agent session up" lines in earlier servers' logs (a restarted server has a new log).
    sessions_before: usize,
}

fn spawn(
    w: &World,
    name: &str,
    netns: &redirector_tests::Netns,
    bin: &str,
    args: &[String],
) -> LoggedProc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    LoggedProc::spawn(w, name, netns, bin, &args)
}

impl Fleet {
    fn new() -> Self {
        let w = World::new();
        let (ingress, ingress6, agents_at, enroll_at, metrics_at) = {
            let _m = w.master.enter();
            (
                free_addr("127.0.0.1"),
                free_addr("[::1]"),
                free_addr("198.51.100.1"),
                free_addr("198.51.100.1"),
                free_addr("127.0.0.1"),
            )
        };
        let input = w.dir.join("nodes-input.txt");
        fs::write(&input, "edge-a 198.51.100.10\n").unwrap();
        let sync_args: Vec<String> = [
            "sync-nodes",
            "--nodes",
            &s(&input),
            "--state",
            &s(&w.dir.join("tunnel-addresses")),
            "--pool",
            POOL,
            "--out",
            &s(&w.node_table),
            "--metrics-listen",
            "off",
        ]
        .map(str::to_owned)
        .to_vec();
        let mut sync = spawn(&w, "sync-nodes", &w.master, "redirector", &sync_args);
        sync.wait_log(&["node table written"]);
        let redirector = RedirectorProc::start_with_ingresses(&w, ingress, ingress6, &[]);
        let ca_dir = w.dir.join("tunnel-ca");
        let mut server_args = tunnel_procs::CaDirServer {
            ca_dir: &ca_dir,
            names: "tunnel.test",
            enroll_at,
            agents_at,
            ingress,
            metrics_at,
        }
        .args(&w);
        server_args.extend(["--host-ingress6".to_owned(), ingress6.to_string()]);
        let mut server = tunnel_procs::spawn_server(&w, "tunnel-server", &server_args);
        server.wait_log(&["tunnel server ready"]);
        let token = |node: &str| tunnel_procs::token_create("ca-dir", &ca_dir, node);
        // A token not used yet must outlive every restart too.
        token("edge-b");
        let cert_dir = w.dir.join("agent-edge-a");
        let agent_args: Vec<String> = [
            "--node-id",
            "edge-a",
            "--servers",
            &agents_at.to_string(),
            "--server-name",
            "tunnel.test",
            "--ca",
            &s(&ca_dir.join("ca.crt")),
            "--cert-dir",
            &s(&cert_dir),
            "--enroll",
            &enroll_at.to_string(),
            "--token",
            &token("edge-a"),
            "--ports",
            "10250",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .map(str::to_owned)
        .to_vec();
        let agent = spawn(&w, "agent", &w.edge, "tunnel-agent", &agent_args);
        server.wait_log(&["agent session up", "node=edge-a"]);
        // A port added at run time (not in --ports) is state a restart must keep too.
        let out = w.cli(&["ports", "add", "9100"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            w,
            ingress: (ingress, ingress6),
            ca_dir,
            cert_dir,
            sync_args,
            server_args,
            agent_args,
            sync,
            redirector,
            server,
            agent,
            sessions_before: 0,
        }
    }

    fn target(&self) -> String {
        let table = NodeTable::parse(
            &fs::read_to_string(&self.w.node_table).unwrap(),
            &self.w.node_table,
        )
        .unwrap();
        format!("{}:10250", table.tunnel["edge-a"])
    }

    fn sessions_up(&self) -> usize {
        self.sessions_before + self.server.count_log(&["agent session up", "node=edge-a"])
    }

    /// Everything a restart must not lose, as comparable text.
    fn state(&self) -> BTreeMap<&'static str, String> {
        let read =
            |p: PathBuf| fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let table = NodeTable::parse(&read(self.w.node_table.clone()), &self.w.node_table).unwrap();
        let ports = self.w.cli(&["ports", "list"]);
        BTreeMap::from([
            (
                "ports",
                String::from_utf8_lossy(&ports.stdout).trim().to_owned(),
            ),
            ("node table", format!("{:?}", table.nodes)),
            ("tunnel addresses", format!("{:?}", table.tunnel)),
            (
                "CA",
                read(self.ca_dir.join("ca.crt")) + &read(self.ca_dir.join("ca.key")),
            ),
            ("tokens", read(self.ca_dir.join("tokens"))),
            ("agent certificate", read(self.cert_dir.join("tls.crt"))),
        ])
    }

    /// Stops `process` with `signal`, starts it again with the same arguments, and returns
    /// once it is serving again.
    fn restart(&mut self, process: &str, signal: i32) {
        let within = Duration::from_secs(30);
        match process {
            "redirector run" => {
                self.redirector.proc.stop(signal, within);
                self.redirector = RedirectorProc::start_with_ingresses(
                    &self.w,
                    self.ingress.0,
                    self.ingress.1,
                    &[],
                );
            }
            "tunnel server" => {
                self.server.stop(signal, within);
                self.sessions_before = self.sessions_up();
                self.server =
                    tunnel_procs::spawn_server(&self.w, "tunnel-server", &self.server_args);
                self.server.wait_log(&["agent session up", "node=edge-a"]);
            }
            "tunnel-agent" => {
                let n = self.server.count_log(&["agent session up", "node=edge-a"]);
                self.agent.stop(signal, within);
                self.agent = spawn(
                    &self.w,
                    "agent",
                    &self.w.edge,
                    "tunnel-agent",
                    &self.agent_args,
                );
                self.server
                    .wait_log_count(&["agent session up", "node=edge-a"], n + 1);
            }
            "redirector sync-nodes" => {
                self.sync.stop(signal, within);
                self.sync = spawn(
                    &self.w,
                    "sync-nodes",
                    &self.w.master,
                    "redirector",
                    &self.sync_args,
                );
                self.sync.wait_log(&["node sync starting"]);
            }
            other => unreachable!("{other}"),
        }
    }
}

struct Row {
    process: &'static str,
    signal: &'static str,
    ok: u64,
    failed: u64,
    gap_ms: u64,
    escaped: usize,
    misrouted: u64,
    sessions: &'static str,
    lost: Vec<&'static str>,
}

#[test]
fn every_process_restarts_under_sigterm_and_sigkill_losing_no_state_and_misrouting_nothing() {
    let mut p = Fleet::new();
    let target = p.target();
    let v = p.w.probe(true, None, &["connect", &target]);
    assert_eq!(
        replies(&v)[0].1,
        SERVED,
        "the path works before any restart: {v}"
    );
    let mut rows = Vec::new();
    for process in [
        "redirector run",
        "tunnel server",
        "tunnel-agent",
        "redirector sync-nodes",
    ] {
        for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
            let before = p.state();
            let sessions = p.sessions_up();
            let escaped_before = p.w.edge_log.len();
            let client = p.w.paced_loop(&target, 5000, 5);
            thread::sleep(Duration::from_millis(1000));
            p.restart(process, signal);
            let summary = client.summary();
            let after = p.state();
            let labels = summary["labels"].as_object().unwrap();
            let misrouted = labels
                .iter()
                .filter(|(l, _)| *l != SERVED)
                .map(|(_, n)| n.as_u64().unwrap())
                .sum();
            // The edge services log every connection they take: through the agent they come
            // from 127.0.0.1; from the master's address, they escaped the tunnel.
            let escaped = p.w.edge_log.all()[escaped_before..]
                .iter()
                .filter(|a| a.peer.is_none_or(|peer| !peer.ip().is_loopback()))
                .count();
            let row = Row {
                process,
                signal: name,
                ok: summary["ok"].as_u64().unwrap(),
                failed: summary["failed"].as_u64().unwrap(),
                gap_ms: summary["max_gap_ms"].as_u64().unwrap(),
                escaped,
                misrouted,
                sessions: if p.sessions_up() == sessions {
                    "kept"
                } else {
                    "re-established"
                },
                lost: before
                    .iter()
                    .filter(|(k, v)| after.get(*k) != Some(v))
                    .map(|(k, _)| *k)
                    .collect(),
            };
            eprintln!("{process} {name}: {summary}");
            // The path works again, and the loop saw it work after the restart.
            let v = p.w.probe(true, None, &["connect", &target]);
            assert_eq!(
                replies(&v)[0].1,
                SERVED,
                "{process} {name}: after the restart: {v}"
            );
            rows.push(row);
        }
    }

    eprintln!(
        "\n| process | signal | longest gap | connections failed / answered | escaped | misrouted | sessions | state lost |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        eprintln!(
            "| `{}` | {} | {} ms | {} / {} | {} | {} | {} | {} |",
            r.process,
            r.signal,
            r.gap_ms,
            r.failed,
            r.ok,
            r.escaped,
            r.misrouted,
            r.sessions,
            if r.lost.is_empty() {
                "none".to_owned()
            } else {
                r.lost.join(", ")
            }
        );
    }
    for r in &rows {
        let what = format!("{} {}", r.process, r.signal);
        assert_eq!(
            r.escaped, 0,
            "{what}: connections escaped to the real address"
        );
        assert_eq!(r.misrouted, 0, "{what}: answers from elsewhere");
        assert!(r.lost.is_empty(), "{what}: lost {:?}", r.lost);
        assert!(
            r.ok > 50,
            "{what}: too few answers ({}) to mean anything",
            r.ok
        );
        match r.process {
            // Off the data path: the pinned programs and the running server carry on.
            "redirector run" | "redirector sync-nodes" => {
                assert_eq!(r.failed, 0, "{what}");
                assert_eq!(r.sessions, "kept", "{what}");
                assert!(r.gap_ms < 2000, "{what}: a gap of {} ms", r.gap_ms);
            }
            // On it: connections fail while it is down, and sessions come back by themselves.
            _ => {
                assert_eq!(r.sessions, "re-established", "{what}");
                assert!(r.gap_ms < 10_000, "{what}: a gap of {} ms", r.gap_ms);
            }
        }
    }
}
