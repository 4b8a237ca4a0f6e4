//! `redirector`: run, inspect and remove the cgroup eBPF redirector.
use std::{
    collections::BTreeSet, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration,
};

use clap::{Parser, Subcommand};
use edge_cli::logging::LogFormat;
use redirector::{
    DEFAULT_HOST_INGRESS, DEFAULT_PIN_DIR, DEFAULT_PORTS, cgroup,
    loader::InstallOptions,
    maps::PinnedMaps,
    run::{RunConfig, run},
    status, uninstall,
};
use redirector_common::capacity;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "eBPF redirector: steers connections to edge node ports into the tunnel ingress"
)]
struct Cli {
    /// bpffs directory holding the pinned programs, links and maps.
    #[arg(long, global = true, env = "REDIRECTOR_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Log format.
    #[arg(long, global = true, env = "REDIRECTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach (or adopt the pinned programs), fill the maps, follow the node table.
    Run(Box<RunArgs>),
    /// Show the attach point, programs, node count, ports and counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change the redirected ports of a running installation, without a restart. Added ports
    /// stay redirected through restarts of `run` (until uninstall); declared ports (--ports)
    /// removed here come back when `run` restarts.
    Ports {
        #[command(subcommand)]
        action: PortsAction,
    },
    /// Explain what happens to a connection to ADDR:PORT, step by step (programs, caller's
    /// cgroup, port, address, ingress, tunnel session, agent allow-list), with a verdict and
    /// the fix. Reads the pinned maps, the node table and the tunnel server's answer.
    Explain(Box<ExplainArgs>),
    /// Detach every program and remove every link and pin.
    Uninstall,
    /// The ingress probe's helper (started by `run` inside the attached cgroup): dials the
    /// target and prints the ingress's answer.
    #[command(name = "__probe-connect", hide = true)]
    ProbeConnect { target: SocketAddr },
    /// Keep a node table file in step with the edge nodes (Kubernetes Nodes, or a file), each
    /// with a unique tunnel address from a pool; `run` and `tunnel server` follow that file.
    SyncNodes(Box<SyncArgs>),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["nodes", "kube"])))]
struct SyncArgs {
    /// Tunnel address pool (CIDR); every edge node gets a unique address from it.
    #[arg(long, env = "REDIRECTOR_POOL")]
    pool: String,
    /// Node table written for `redirector run` and `tunnel server` (their --node-table).
    #[arg(long, env = "REDIRECTOR_SYNC_OUT")]
    out: PathBuf,
    /// Embedded mode: a node table file without tunnel= addresses.
    #[arg(long, env = "REDIRECTOR_SYNC_NODES", requires = "state")]
    nodes: Option<PathBuf>,
    /// Embedded mode: the allocation state file (written under a lock beside it).
    #[arg(long, env = "REDIRECTOR_POOL_STATE")]
    state: Option<PathBuf>,
    /// Cluster mode: watch Nodes through the Kubernetes API (in-cluster or KUBECONFIG).
    #[arg(long, env = "REDIRECTOR_KUBE")]
    kube: bool,
    /// Label selector of edge Nodes; other nodes are never redirected.
    #[arg(
        long,
        env = "REDIRECTOR_NODE_SELECTOR",
        default_value = "node-role.kubernetes.io/edge"
    )]
    selector: String,
    /// Namespace of the ConfigMaps below.
    #[arg(long, env = "REDIRECTOR_NAMESPACE", default_value = "edge-redirector")]
    namespace: String,
    /// ConfigMap holding the tunnel address allocations (compare-and-swap by resourceVersion).
    #[arg(
        long,
        env = "REDIRECTOR_ALLOCATIONS_CONFIGMAP",
        default_value = "edge-redirector-tunnel-addresses"
    )]
    allocations_configmap: String,
    /// ConfigMap to keep a CoreDNS `hosts` file in (node name -> tunnel address, for pods).
    #[arg(long, env = "REDIRECTOR_COREDNS_CONFIGMAP")]
    coredns_configmap: Option<String>,
    /// Seconds a node must be missing before its tunnel address is released.
    #[arg(long, env = "REDIRECTOR_RELEASE_AFTER", default_value = "300", value_parser = edge_cli::seconds::positive)]
    release_after: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `off` disables them.
    #[arg(
        long,
        env = "REDIRECTOR_SYNC_METRICS_LISTEN",
        default_value = "127.0.0.1:10270"
    )]
    metrics_listen: String,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("who").args(["pid", "cgroup"])))]
struct ExplainArgs {
    /// The destination a client dials, e.g. 198.51.100.10:10250 or [2001:db8::10]:10250.
    target: SocketAddr,
    /// Explain it for this process's connections [default: this command's own].
    #[arg(long)]
    pid: Option<u32>,
    /// Explain it for a process in this cgroup (absolute, or relative to the cgroup v2 mount).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The node table `redirector run` follows (names the nodes of an address).
    #[arg(long, env = "REDIRECTOR_NODE_TABLE")]
    node_table: Option<PathBuf>,
    /// The tunnel server's metrics listener on this host (its --metrics-listen); `off` to ask
    /// only the kernel's side.
    #[arg(
        long,
        env = "REDIRECTOR_EXPLAIN_SERVER",
        default_value = "127.0.0.1:10267"
    )]
    server: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum PortsAction {
    /// Start redirecting these ports (new connections only).
    Add { ports: Vec<u16> },
    /// Stop redirecting these ports.
    Remove { ports: Vec<u16> },
    /// List the redirected ports.
    List,
}

#[derive(clap::Args)]
struct RunArgs {
    /// cgroup v2 directory to attach to [default: the cgroup v2 mount's root, the whole host].
    #[arg(long, env = "REDIRECTOR_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Static node table: `<node-id> <ip> [<ip>...]` per line.
    #[arg(long, env = "REDIRECTOR_NODE_TABLE")]
    node_table: PathBuf,
    /// Redirected destination ports, comma separated.
    #[arg(long, env = "REDIRECTOR_PORTS", value_delimiter = ',', default_value = DEFAULT_PORTS)]
    ports: Vec<u16>,
    /// Ingress for IPv4 clients in this host's network namespace (loopback).
    #[arg(long, env = "REDIRECTOR_HOST_INGRESS", default_value = DEFAULT_HOST_INGRESS)]
    host_ingress: SocketAddr,
    /// Ingress for IPv4 clients in other network namespaces (pods): an address their namespace can reach.
    #[arg(long, env = "REDIRECTOR_POD_INGRESS")]
    pod_ingress: Option<SocketAddr>,
    /// Ingress for IPv6 destinations from this host's namespace (e.g. [::1]:10266).
    #[arg(long, env = "REDIRECTOR_HOST_INGRESS6")]
    host_ingress6: Option<SocketAddr>,
    /// Ingress for IPv6 destinations from pods.
    #[arg(long, env = "REDIRECTOR_POD_INGRESS6")]
    pod_ingress6: Option<SocketAddr>,
    /// Capacity of each node address map (IPv4 and IPv6); fixed while pinned.
    #[arg(long, env = "REDIRECTOR_MAX_NODE_ADDRESSES", default_value_t = capacity::NODES)]
    max_node_addresses: u32,
    /// Seconds between checks of the node table file for changes (SIGHUP checks at once).
    #[arg(long, env = "REDIRECTOR_RELOAD_INTERVAL", default_value = "2", value_parser = edge_cli::seconds::positive)]
    reload_interval: Duration,
    /// Seconds between self-checks of the programs' attachment; a program found detached is
    /// attached again (`redirector_path_ok`, `redirector_program_repairs_total`).
    #[arg(long, env = "REDIRECTOR_SELF_CHECK_INTERVAL", default_value = "30", value_parser = edge_cli::seconds::positive)]
    self_check_interval: Duration,
    /// Ingress probe address (IPv4, no node's): every self-check interval a connection to it
    /// from inside the attached cgroup must be answered by the tunnel ingress itself
    /// (`redirector_ingress_ok`); `off` disables the probe.
    #[arg(long, env = "REDIRECTOR_PROBE_ADDRESS", default_value = "192.0.0.8")]
    probe_address: String,
    /// Record who opens each redirected connection (pid, command, cgroup, network namespace)
    /// for the tunnel server's audit trail (`tunnel server --audit-log`). Needs Linux 6.1+;
    /// older kernels redirect as usual, without callers.
    #[arg(long, env = "REDIRECTOR_RECORD_CALLERS")]
    record_callers: bool,
    /// File created once the redirector is attached and its maps are filled.
    #[arg(long, env = "REDIRECTOR_READY_FILE")]
    ready_file: Option<PathBuf>,

    /// Hosts file whose managed block maps each node name to its `tunnel=` address (e.g. the
    /// master's /etc/hosts, which the API server reads); lines outside the block are kept
    #[arg(long, env = "REDIRECTOR_HOSTS_FILE")]
    hosts_file: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `off` disables them.
    #[arg(
        long,
        env = "REDIRECTOR_METRICS_LISTEN",
        default_value = "127.0.0.1:10269"
    )]
    metrics_listen: String,
}

fn main() -> ExitCode {
    // Before any thread: flat memory after bursts (see edge_cli::memory).
    edge_cli::memory::without_thread_cache();
    let cli = Cli::parse();
    edge_cli::logging::init(cli.log_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> redirector::Result<()> {
    match cli.command {
        Command::Run(args) => run_cmd(cli.pin_dir, *args),
        Command::Status { json } => {
            let s = status::status(&cli.pin_dir)?;
            let text = if json {
                serde_json::to_string_pretty(&s).expect("status serializes") + "\n"
            } else {
                s.to_string()
            };
            // A closed pipe (`status | head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            Ok(())
        }
        Command::Ports { action } => {
            let mut maps = PinnedMaps::open(&cli.pin_dir)?;
            match action {
                PortsAction::Add { ports } => {
                    ports.iter().try_for_each(|p| maps.add_port(*p))?;
                    eprintln!(
                        "redirected now, and through restarts of `redirector run` until uninstall; add them to --ports (REDIRECTOR_PORTS) to make them part of the declared configuration"
                    );
                }
                PortsAction::Remove { ports } => {
                    for p in ports {
                        if !maps.remove_port(p)? {
                            eprintln!("port {p} was not redirected");
                        }
                    }
                    eprintln!(
                        "a port that --ports (REDIRECTOR_PORTS) lists is redirected again when `redirector run` restarts: remove it there to make this lasting"
                    );
                }
                PortsAction::List => {}
            }
            let ports: Vec<String> = maps.ports()?.iter().map(u16::to_string).collect();
            println!("{}", ports.join(","));
            Ok(())
        }
        Command::SyncNodes(args) => sync_cmd(*args),
        Command::ProbeConnect { target } => match redirector::probe::connect(target) {
            Ok(replica) => {
                println!("{replica}");
                Ok(())
            }
            Err(e) => {
                println!("{e}");
                std::process::exit(1)
            }
        },
        Command::Explain(a) => {
            use redirector::explain::{Caller, Request, explain};
            let caller = match (a.pid, a.cgroup) {
                (Some(pid), _) => Caller::Pid(pid),
                (None, Some(path)) => Caller::Cgroup(path),
                (None, None) => Caller::This,
            };
            let e = explain(&Request {
                target: a.target,
                caller,
                pin_dir: cli.pin_dir,
                node_table: a.node_table,
                server: parse_listen("--server", &a.server)?,
            })?;
            let text = if a.json {
                serde_json::to_string_pretty(&e).expect("explanation serializes") + "\n"
            } else {
                e.to_string()
            };
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            Ok(())
        }
        Command::Uninstall => {
            let r = uninstall::uninstall(&cli.pin_dir)?;
            println!(
                "detached {} links, removed {} pins from {}",
                r.links_detached,
                r.pins_removed,
                cli.pin_dir.display()
            );
            Ok(())
        }
    }
}

fn parse_listen(flag: &str, a: &str) -> redirector::Result<Option<SocketAddr>> {
    match a {
        "off" => Ok(None),
        a => a.parse().map(Some).map_err(|_| {
            redirector::Error::Config(format!("{flag} {a:?}: expected host:port or off"))
        }),
    }
}

/// Runs `f` on a single-threaded runtime until it ends or SIGTERM/SIGINT cancels its token.
fn block_on_until_signal<F, Fut, T>(f: F) -> redirector::Result<T>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = redirector::Result<T>>,
{
    let rt = edge_cli::process::runtime(1)
        .map_err(|e| redirector::Error::io("starting the async runtime", e))?;
    rt.block_on(async { f(edge_cli::process::shutdown_on_signal()).await })
}

fn sync_cmd(args: SyncArgs) -> redirector::Result<()> {
    use redirector::nodes::{pool::Pool, sync};
    let cfg = sync::SyncConfig {
        pool: Pool::parse(&args.pool).map_err(redirector::Error::Config)?,
        out: args.out,
        release_after: args.release_after,
        resync: Duration::from_secs(30),
    };
    let source = match (args.nodes, args.state) {
        (Some(nodes), Some(state)) => sync::Source::File { nodes, state },
        _ => sync::Source::Kube(sync::KubeSync {
            selector: args.selector,
            namespace: args.namespace,
            allocations: args.allocations_configmap,
            coredns: args.coredns_configmap,
            instance: std::env::var("POD_NAME")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok()),
        }),
    };
    let listen = parse_listen("--metrics-listen", &args.metrics_listen)?;
    block_on_until_signal(|shutdown| async move {
        Ok(sync::serve(source, cfg, listen, shutdown).await?)
    })
}

fn run_cmd(pin_dir: PathBuf, args: RunArgs) -> redirector::Result<()> {
    let cfg = RunConfig {
        install: InstallOptions {
            cgroup: cgroup::attach_point(args.cgroup.as_deref())?,
            pin_dir,
            max_node_addresses: args.max_node_addresses,
            record_callers: args.record_callers,
        },
        node_table: args.node_table,
        ports: args.ports.into_iter().collect::<BTreeSet<_>>(),
        host_ingress4: Some(args.host_ingress),
        pod_ingress4: args.pod_ingress,
        host_ingress6: args.host_ingress6,
        pod_ingress6: args.pod_ingress6,
        reload_interval: args.reload_interval,
        ready_file: args.ready_file,
        hosts_file: args.hosts_file,
        metrics_listen: parse_listen("--metrics-listen", &args.metrics_listen)?,
        self_check_interval: args.self_check_interval,
        probe_address: match args.probe_address.as_str() {
            "off" => None,
            a => Some(a.parse().map_err(|_| {
                redirector::Error::Config(format!(
                    "--probe-address {a:?}: expected an IPv4 address (no node's) or off"
                ))
            })?),
        },
    };
    block_on_until_signal(|shutdown| run(cfg, shutdown))
}
