//! `redirector explain ADDR:PORT`: what happens to a connection to ADDR:PORT, step by step,
//! read from what the kernel and the tunnel server use: the pinned links and maps, the node
//! table, and the server's own answer (`/debug/explain` on its metrics listener, which asks
//! the node's agent whether it allows the port). Ends with a verdict and the fix.
//!
//! The steps follow the data path: the programs attached, the caller under their cgroup, the
//! port, the address (a node, several, nobody), the ingress (host or pod), then the tunnel
//! server's route and the node's session, then the agent's allow-list.
mod caller;
mod server;

use std::{fmt, net::SocketAddr, path::PathBuf};

use redirector_common::{node_flags, program_names};

pub use caller::Caller;

use crate::{
    cgroup, error::Result, loader::pinned_link_info, maps::PinnedMaps, routes::Route,
    status::ingress_addr,
};

/// What to explain, and where to read it from.
pub struct Request {
    pub target: SocketAddr,
    pub caller: Caller,
    pub pin_dir: PathBuf,
    /// The node table `redirector run` follows (names the nodes of an address).
    pub node_table: Option<PathBuf>,
    /// The tunnel server's metrics listener (None: the server is not asked).
    pub server: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Reaches the node's agent, which dials the port.
    Redirected,
    /// Redirected by the kernel, then refused by the tunnel: the client sees a reset.
    Refused,
    /// Not redirected: the connection goes where it was dialled.
    PassesThrough,
    /// Redirected by the kernel; what the tunnel does was not learnt.
    Unknown,
}

#[derive(Debug, serde::Serialize)]
pub struct Step {
    pub check: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, serde::Serialize)]
pub struct Explanation {
    pub destination: SocketAddr,
    pub caller: String,
    pub steps: Vec<Step>,
    pub verdict: Verdict,
    /// The node it reaches (redirected), or is refused for.
    pub node: Option<String>,
    /// The reason, as the tunnel's refusal metrics label it (`ambiguous_address`, ...).
    pub reason: Option<&'static str>,
    pub summary: String,
    pub fix: Option<String>,
}

struct Builder {
    destination: SocketAddr,
    caller: String,
    steps: Vec<Step>,
}

impl Builder {
    fn step(&mut self, check: &'static str, ok: bool, detail: String) {
        self.steps.push(Step { check, ok, detail });
    }

    fn end(
        self,
        verdict: Verdict,
        node: Option<String>,
        reason: Option<&'static str>,
        summary: String,
        fix: Option<String>,
    ) -> Explanation {
        Explanation {
            destination: self.destination,
            caller: self.caller,
            steps: self.steps,
            verdict,
            node,
            reason,
            summary,
            fix,
        }
    }

    fn passes(self, summary: String, fix: String) -> Explanation {
        self.end(Verdict::PassesThrough, None, None, summary, Some(fix))
    }
}

pub fn explain(req: &Request) -> Result<Explanation> {
    let ip = req.target.ip().to_canonical();
    let port = req.target.port();
    let v6 = ip.is_ipv6();
    let facts = req.caller.facts()?;
    let mut b = Builder {
        destination: SocketAddr::new(ip, port),
        caller: facts.what.clone(),
        steps: Vec::new(),
    };

    // 1. The program for this address family, attached, and where.
    let prog = if v6 {
        program_names::CONNECT6
    } else {
        program_names::CONNECT4
    };
    let link = pinned_link_info(&req.pin_dir, prog).filter(|i| i.cgroup_id != 0);
    let Some(link) = link else {
        b.step(
            "program",
            false,
            format!(
                "{prog} has no attached link under {}",
                req.pin_dir.display()
            ),
        );
        return Ok(b.passes(
            format!("passes through untouched: {prog} is not attached"),
            "start `redirector run` (it attaches the programs; `redirector status` shows what is pinned), or pass --pin-dir if it pins elsewhere".into(),
        ));
    };
    let mount = cgroup::cgroup2_mount()?;
    let attached = cgroup::path_of_cgroup_id(link.cgroup_id)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("cgroup id {}", link.cgroup_id));
    b.step("program", true, format!("{prog} is attached to {attached}"));

    // 2. The caller under that cgroup: only its sockets see the programs.
    let inside = cgroup::is_under(&facts.cgroup, link.cgroup_id, &mount);
    b.step(
        "caller",
        inside,
        format!(
            "{} is in {}, {} the attached cgroup {attached}",
            facts.what,
            facts.cgroup.display(),
            if inside { "under" } else { "NOT under" }
        ),
    );
    if !inside {
        return Ok(b.passes(
            format!("passes through untouched: the caller is outside the attached cgroup {attached}"),
            format!("run the client in a cgroup under {attached}, or attach the redirector higher up (`redirector run --cgroup`; the default is the whole host)"),
        ));
    }

    // 3. The port.
    let maps = PinnedMaps::open(&req.pin_dir)?;
    let ports = maps.ports()?;
    let listed: Vec<String> = ports.iter().map(u16::to_string).collect();
    let redirected = ports.contains(&port);
    b.step(
        "port",
        redirected,
        format!(
            "port {port} is {}redirected (redirected: {})",
            if redirected { "" } else { "NOT " },
            listed.join(", ")
        ),
    );
    if !redirected {
        return Ok(b.passes(
            format!("passes through untouched: port {port} is not redirected"),
            format!("`redirector ports add {port}` (at once), and add it to --ports (REDIRECTOR_PORTS) to keep it"),
        ));
    }

    // 4. The address: whose is it, in the kernel map and in the node table.
    // As `redirector run` sees it: the table file and its journal.
    let owners: Vec<String> = match &req.node_table {
        Some(p) => match edge_model::follow::Follower::open(p)?.current().route(&ip) {
            Some(Route::Node(n)) => vec![n.to_string()],
            Some(Route::Ambiguous(v)) => v.iter().map(|n| n.to_string()).collect(),
            None => Vec::new(),
        },
        None => Vec::new(),
    };
    let named = match (&req.node_table, owners.as_slice()) {
        (None, _) => "(no --node-table: names come from the tunnel server)".to_owned(),
        (Some(_), []) => "no node of the node table lists it".to_owned(),
        (Some(_), [one]) => format!("node {one}"),
        (Some(_), many) => format!("nodes {}", many.join(", ")),
    };
    let Some(value) = maps.node_value(ip)? else {
        b.step(
            "address",
            false,
            format!("{ip} is not in the kernel's node map; node table: {named}"),
        );
        return Ok(if owners.is_empty() {
            b.passes(
                format!("passes through untouched: {ip} is no edge node's address"),
                "if it should be an edge node's: check that its Node carries the edge selector's label and lists this address (`redirector sync-nodes`), or the node table file".into(),
            )
        } else {
            b.passes(
                format!("passes through untouched: the node table lists {ip} for {}, but the kernel map does not hold it", owners.join(", ")),
                "`redirector run` has not loaded this node table: check that it runs and follows this file (--node-table), and its log".into(),
            )
        });
    };
    let ambiguous = value.flags & node_flags::AMBIGUOUS != 0;
    let probe = value.flags & node_flags::PROBE != 0;
    b.step(
        "address",
        !ambiguous,
        if probe {
            format!("{ip} is the redirector's ingress probe address (--probe-address), no node's")
        } else if ambiguous {
            format!("{ip} is shared by several nodes (ambiguous in the kernel's node map); node table: {named}")
        } else {
            format!("{ip} is an edge node's address; node table: {named}")
        },
    );

    // 5. The ingress the kernel sends it to: host or pod caller, IPv4 or IPv6.
    let cfg = maps.config()?;
    let from_pod = facts
        .netns_cookie
        .is_some_and(|c| c != cfg.host_netns_cookie);
    let ingress = match (v6, from_pod) {
        (false, false) => &cfg.host4,
        (false, true) => &cfg.pod4,
        (true, false) => &cfg.host6,
        (true, true) => &cfg.pod6,
    };
    let family = if v6 { "IPv6" } else { "IPv4" };
    let whose = match facts.netns_cookie {
        None => "host (assumed: a cgroup names no network namespace; give --pid to know)",
        Some(_) if from_pod => "pod (another network namespace than the redirector's)",
        Some(_) => "host (the redirector's network namespace)",
    };
    let Some(at) = ingress_addr(ingress) else {
        b.step(
            "ingress",
            false,
            format!("{whose} caller, {family}: no ingress configured"),
        );
        let flag = match (v6, from_pod) {
            (false, false) => "--host-ingress",
            (false, true) => "--pod-ingress",
            (true, false) => "--host-ingress6",
            (true, true) => "--pod-ingress6",
        };
        return Ok(b.passes(
            format!("passes through untouched: no {family} ingress for {} callers (counted as no_ingress)", if from_pod { "pod" } else { "host" }),
            format!("give `redirector run` {flag} (and the tunnel server the same listener)"),
        ));
    };
    b.step(
        "ingress",
        true,
        format!("{whose} caller, {family}: the kernel rewrites it to {at}"),
    );
    if probe {
        return Ok(b.end(
            Verdict::Redirected,
            None,
            None,
            format!(
                "redirected to {at}, where the tunnel ingress answers the probe itself (no node)"
            ),
            None,
        ));
    }
    if ambiguous && req.server.is_none() {
        return Ok(b.end(
            Verdict::Refused,
            None,
            Some("ambiguous_address"),
            format!(
                "refused: {ip} belongs to {named}, and the tunnel refuses it rather than guess"
            ),
            Some(AMBIGUOUS_FIX.into()),
        ));
    }

    // 6. The tunnel server: its route, the node's session, the agent's allow-list.
    let Some(server) = req.server else {
        return Ok(b.end(
            Verdict::Unknown,
            None,
            None,
            format!("redirected by the kernel to {at}; the tunnel server was not asked"),
            Some(
                "pass --server with the tunnel server's --metrics-listen address to learn the rest"
                    .into(),
            ),
        ));
    };
    Ok(server::ask(b, server, ip, port, &owners, at))
}

const AMBIGUOUS_FIX: &str = "dial the node by its own tunnel address (`tunnel=` in the node table; or by its name, which the hosts file maps to it), or give each node a unique address";

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "explain {} (caller: {})", self.destination, self.caller)?;
        for s in &self.steps {
            let mark = if s.ok { "ok  " } else { "FAIL" };
            writeln!(f, "  [{mark}] {:<8} {}", s.check, s.detail)?;
        }
        writeln!(f, "verdict: {}", self.summary)?;
        if let Some(fix) = &self.fix {
            writeln!(f, "fix:     {fix}")?;
        }
        Ok(())
    }
}
