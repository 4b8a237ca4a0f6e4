//! Where the ingress learns each connection's original destination: the redirector's
//! getsockopt program (no capability needed) or its pinned map (CAP_BPF).
use std::{
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use redirector::OrigDstTable;
use tokio::net::TcpListener;
use tunnel::{orig_dst, run::OrigDstLookup};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OrigDstFrom {
    /// The getsockopt program if it covers this process, else the pinned map.
    Auto,
    /// `getsockopt(SO_ORIGINAL_DST)`, answered by the redirector's program: no capability.
    Sockopt,
    /// The redirector's pinned map: needs CAP_BPF (and CAP_SYS_ADMIN on some kernels).
    Map,
}

fn covered(ingress: &[TcpListener]) -> bool {
    ingress.iter().all(|l| orig_dst::program_answers(l.as_fd()))
}

fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn sockopt_lookup() -> OrigDstLookup {
    Arc::new(|sock: BorrowedFd<'_>, _peer, local: std::net::SocketAddr| {
        match orig_dst::take(sock, local.is_ipv6()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("getsockopt(SO_ORIGINAL_DST) on an accepted connection: {e}");
                None
            }
        }
    })
}

fn map_lookup(table: OrigDstTable) -> OrigDstLookup {
    Arc::new(
        move |_sock: BorrowedFd<'_>, peer, local| match table.take(peer, local) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("original destination lookup failed: {e}");
                None
            }
        },
    )
}

/// Picks the source for `from`, waiting up to `wait` for the redirector to attach its
/// programs (or pin its maps) if it is still starting.
pub async fn open(
    from: OrigDstFrom,
    ingress: &[TcpListener],
    pin_dir: &Path,
    wait: Duration,
) -> Result<OrigDstLookup, String> {
    let started = Instant::now();
    let mut told = false;
    loop {
        if from != OrigDstFrom::Map && covered(ingress) {
            tracing::info!(
                "original destinations: getsockopt(SO_ORIGINAL_DST), answered by the redirector's program (no capability needed)"
            );
            return Ok(sockopt_lookup());
        }
        let map = match from {
            OrigDstFrom::Sockopt => None,
            _ => Some(OrigDstTable::open(pin_dir)),
        };
        match map {
            Some(Ok(table)) => {
                if from == OrigDstFrom::Auto {
                    tracing::warn!(cgroup = %own_cgroup(), "original destinations: the redirector's getsockopt program does not cover this process, so the pinned map is read instead (which needs CAP_BPF); an older redirector, or one attached below this process's cgroup");
                } else {
                    tracing::info!(
                        "original destinations: the pinned map in {}",
                        pin_dir.display()
                    );
                }
                return Ok(map_lookup(table));
            }
            Some(Err(e)) if started.elapsed() >= wait => {
                return Err(failure(from, pin_dir, Some(&e.to_string())));
            }
            None if started.elapsed() >= wait => {
                return Err(failure(from, pin_dir, None));
            }
            _ => {}
        }
        if !told {
            tracing::info!(
                "waiting up to {}s for the redirector's programs (original destinations)",
                wait.as_secs()
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn failure(from: OrigDstFrom, pin_dir: &Path, map_error: Option<&str>) -> String {
    let sockopt = format!(
        "the redirector's getsockopt program does not answer in this process's cgroup ({}): \
         start `redirector run` with a --cgroup at or above it (in Kubernetes, the host's \
         cgroup root)",
        own_cgroup()
    );
    match (from, map_error) {
        (OrigDstFrom::Sockopt, _) | (_, None) => {
            format!("cannot read original destinations: {sockopt}")
        }
        (OrigDstFrom::Map, Some(e)) => format!(
            "cannot read original destinations from the pinned map in {}: {e} (start the \
             redirector first, with the same --pin-dir; reading the map needs CAP_BPF)",
            pin_dir.display()
        ),
        (OrigDstFrom::Auto, Some(e)) => format!(
            "cannot read original destinations: {sockopt}; nor can the pinned map in {} be \
             read: {e}",
            pin_dir.display()
        ),
    }
}
