//! deploy/monitoring/ as Prometheus itself reads it: the PrometheusRule's spec is a plain rule
//! file (the demo's Prometheus loads it, promtool checks and tests it).
use std::path::PathBuf;

pub fn dir() -> PathBuf {
    crate::yaml::deploy_dir().join("monitoring")
}

/// The rule file inside a PrometheusRule manifest: everything under its top-level `spec:`,
/// indented two spaces less. The manifest keeps `spec` last and block-indented, so this is
/// exact (the monitoring test compares it with a YAML parser's reading).
pub fn rule_file(manifest: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in manifest.lines() {
        if inside {
            out.push_str(line.strip_prefix("  ").unwrap_or(line));
            out.push('\n');
        } else if line == "spec:" {
            inside = true;
        }
    }
    out
}

/// deploy/monitoring/prometheusrule.yaml's rules, as a plain rule file.
pub fn rules() -> String {
    let manifest = std::fs::read_to_string(dir().join("prometheusrule.yaml"))
        .expect("deploy/monitoring/prometheusrule.yaml");
    rule_file(&manifest)
}
