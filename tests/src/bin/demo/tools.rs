//! The outside programs the demo drives, found before anything is set up, so a missing one is
//! one clear message and nothing is left half built.
use std::path::{Path, PathBuf};

/// Where `scripts/setup.sh` unpacks Debian's prometheus and prometheus-node-exporter (unpacked,
/// not installed: installing them would start host-wide services on ports 9090 and 9100).
pub const DEMO_TOOLS_DIR: &str = "/opt/edge-redirector-demo";

pub struct Tools {
    pub prometheus: PathBuf,
    pub node_exporter: PathBuf,
    pub curl: PathBuf,
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn find(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("EDGE_DEMO_TOOLS")
        .map_or_else(|| Path::new(DEMO_TOOLS_DIR).join("usr/bin"), PathBuf::from);
    Some(dir.join(name))
        .filter(|p| p.is_file())
        .or_else(|| in_path(name))
}

impl Tools {
    /// Every tool, or the list of what is missing with the fix.
    pub fn find() -> Result<Self, String> {
        let names = ["prometheus", "prometheus-node-exporter", "curl", "unshare"];
        let found: Vec<Option<PathBuf>> = names.iter().map(|n| find(n)).collect();
        let missing: Vec<&str> = names
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "missing {}: run `sudo bash scripts/setup.sh` (it unpacks prometheus and node-exporter into {DEMO_TOOLS_DIR}; set EDGE_DEMO_TOOLS to use another directory)",
                missing.join(", ")
            ));
        }
        let mut it = found.into_iter().flatten();
        let mut next = || it.next().expect("checked above");
        Ok(Self {
            prometheus: next(),
            node_exporter: next(),
            curl: next(),
        })
    }
}
