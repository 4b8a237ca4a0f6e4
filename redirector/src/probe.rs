//! The ingress probe, the second half of the self-check: attached programs are not yet proof
//! that redirected connections arrive (a wrong ingress address, a tunnel server that is down,
//! a map that lost its config). So every `--self-check-interval` the redirector dials its
//! probe address (`--probe-address`, default 192.0.0.8, the IPv4 dummy address of RFC 7600,
//! which is no host's) on a redirected port from inside the attached cgroup. The kernel
//! redirects it like any node's connection, and the tunnel ingress answers it itself, naming
//! its replica, without routing it anywhere. Anything else (no answer, a refusal, another
//! answer) means clients' connections do not get through either.
//!
//! The probe leaves from this process when it is inside the attached cgroup (the DaemonSet:
//! the whole host), else from a short-lived helper (`redirector __probe-connect`) placed in
//! that cgroup, as a client there would be. It goes to the host ingress (this network
//! namespace's); the pod ingress is not probed.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::Command,
    time::Duration,
};

use edge_model::orig_dst::PROBE_REPLY;

/// Connect plus answer, end to end.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Dials `target` from this process and reads the ingress's answer: `Ok(replica)` when it
/// is the tunnel ingress's probe answer.
pub fn connect(target: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&target, TIMEOUT)
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let _ = s.flush();
    let mut answer = Vec::new();
    let r = s.take(256).read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    match (r, text.split_whitespace().collect::<Vec<_>>().as_slice()) {
        (_, [word, replica, ..]) if *word == PROBE_REPLY => Ok((*replica).to_owned()),
        (Err(e), _) => Err(format!("reading the answer from {target}: {e}")),
        (Ok(_), _) if answer.is_empty() => Err(format!(
            "{target} closed without an answer (a tunnel server older than the probe, or not the tunnel's ingress)"
        )),
        (Ok(_), _) => Err(format!(
            "{target} answered {:?}, not the tunnel ingress's probe answer",
            text.trim()
        )),
    }
}

/// [`connect`] from a helper process placed in `cgroup` (its `cgroup.procs`).
pub fn connect_from(cgroup: &Path, target: SocketAddr) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .map_err(|e| format!("opening {}/cgroup.procs: {e}", cgroup.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(["__probe-connect", &target.to_string()]);
    // SAFETY: the closure only calls write(2) on a descriptor opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd;
            // "0": the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| format!("starting the probe helper: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(if text.is_empty() {
            format!("probe helper failed ({})", out.status)
        } else {
            text
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The probe's metrics; clones share them.
#[derive(Clone, Default)]
pub struct Probes {
    ok: prometheus_client::metrics::gauge::Gauge,
    results: prometheus_client::metrics::family::Family<
        ResultLabel,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Probes {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        for result in ["ok", "failed"] {
            let _ = self.results.get_or_create(&ResultLabel { result });
        }
        r.register(
            "redirector_ingress_ok",
            "1 when the last ingress probe (a redirected connect to --probe-address from inside the attached cgroup) was answered by the tunnel ingress",
            self.ok.clone(),
        );
        r.register(
            "redirector_ingress_probes",
            "Ingress probes, by result",
            self.results.clone(),
        );
    }

    /// Probes `addr` on the lowest redirected port every `interval` until `shutdown`.
    pub async fn run(
        self,
        addr: std::net::Ipv4Addr,
        pin_dir: std::path::PathBuf,
        cgroup: std::path::PathBuf,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let inside = crate::cgroup::cgroup2_mount().ok().is_some_and(|mount| {
            let id = crate::cgroup::cgroup_id(&cgroup).unwrap_or(0);
            crate::cgroup::of_pid(&mount, std::process::id())
                .is_ok_and(|mine| crate::cgroup::is_under(&mine, id, &mount))
        });
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_ok = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let port = crate::maps::PinnedMaps::open(&pin_dir)
                .and_then(|m| m.ports())
                .ok()
                .and_then(|p| p.first().copied());
            let Some(port) = port else {
                continue;
            };
            let target = SocketAddr::from((addr, port));
            let cg = cgroup.clone();
            let r = tokio::task::spawn_blocking(move || {
                if inside {
                    connect(target)
                } else {
                    connect_from(&cg, target)
                }
            })
            .await
            .unwrap_or_else(|e| Err(format!("probe task: {e}")));
            let ok = r.is_ok();
            self.ok.set(i64::from(ok));
            let result = if ok { "ok" } else { "failed" };
            self.results.get_or_create(&ResultLabel { result }).inc();
            match (&r, was_ok) {
                (Err(e), Some(true) | None) => {
                    tracing::warn!(%target, "ingress probe failed: redirected connections do not reach the tunnel ingress ({e}); check that the tunnel server runs and listens on the --host-ingress address, and `redirector explain {target}`")
                }
                (Ok(replica), Some(false)) => {
                    tracing::info!(%target, %replica, "ingress probe answered again")
                }
                (Ok(replica), None) => tracing::debug!(%target, %replica, "ingress probe answered"),
                _ => {}
            }
            was_ok = Some(ok);
        }
    }
}
