//! deploy/monitoring/: the alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`, cases in rules.test.yaml), and every metric the rules and the
//! dashboard name is one the real daemons export. promtool comes from Debian's prometheus
//! package, unpacked by scripts/setup.sh. Root only (the metric check runs the stack).
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use redirector_tests::{World, pki::TestPki, tunnel_procs, yaml::documents};

fn monitoring() -> PathBuf {
    redirector_tests::monitoring::dir()
}

fn promtool() -> PathBuf {
    let dir = std::env::var_os("EDGE_DEMO_TOOLS")
        .map_or_else(|| "/opt/edge-redirector-demo/usr/bin".into(), PathBuf::from);
    dir.join("promtool")
}

/// The PrometheusRule's spec: a plain rule file.
fn rule_groups() -> serde_json::Value {
    let docs = documents(&[monitoring().join("prometheusrule.yaml")]);
    assert_eq!(docs[0]["kind"], "PrometheusRule");
    docs[0]["spec"].clone()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}; run scripts/setup.sh"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = std::env::temp_dir().join(format!("edge-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The rule file the demo's Prometheus loads, and what a YAML parser reads in the manifest.
    let rules = redirector_tests::monitoring::rules();
    std::fs::write(dir.join("rules.yaml"), &rules).unwrap();
    std::fs::write(dir.join("parsed.json"), rule_groups().to_string()).unwrap();
    assert_eq!(
        documents(&[dir.join("rules.yaml")])[0],
        documents(&[dir.join("parsed.json")])[0],
        "the de-indented spec differs from the manifest's spec"
    );
    std::fs::copy(
        monitoring().join("rules.test.yaml"),
        dir.join("rules.test.yaml"),
    )
    .unwrap();
    let checked = run(Command::new(promtool())
        .args(["check", "rules"])
        .arg(dir.join("rules.yaml")));
    let alerts = rule_groups()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .count();
    assert!(
        checked.contains(&format!("SUCCESS: {alerts} rules found")),
        "{checked}"
    );
    run(Command::new(promtool())
        .args(["test", "rules"])
        .arg(dir.join("rules.test.yaml")));
    let _ = std::fs::remove_dir_all(&dir);
    // Every alert has a unit test.
    let cases = std::fs::read_to_string(monitoring().join("rules.test.yaml")).unwrap();
    for g in rule_groups()["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().unwrap();
            assert!(
                cases.contains(&format!("alertname: {name}\n")),
                "no promtool case for {name}"
            );
        }
    }
}

/// Metric names in PromQL text: the project's prefixes only.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if ["tunnel_server_", "tunnel_agent_", "redirector_"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            out.insert(word.to_owned());
        }
    }
    out
}

/// The sample names a scrape can contain: every `# TYPE` family, counters with `_total`.
fn exported(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in text.lines() {
        let mut f = l.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (f.next(), f.next(), f.next(), f.next())
        {
            out.insert(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            });
        }
    }
    out
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_exported() {
    let rules = rule_groups().to_string();
    let dashboard = std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 6));
    let wanted: BTreeSet<String> = referenced(&rules)
        .union(&referenced(&dashboard))
        .cloned()
        .collect();
    assert!(wanted.len() >= 10, "{wanted:?}");

    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let redirector_metrics = tunnel_procs::master_loopback(&w);
    let mut st = tunnel_procs::stack(
        &w,
        &pki,
        &[
            "--metrics-listen",
            &redirector_metrics.to_string(),
            // On by default in a deployment (192.0.0.8); here on a documentation address.
            "--probe-address",
            "203.0.113.254",
        ],
    );
    let _agent = st.agent(&w, &pki, "edge-a", "10250", "127.0.0.1");
    let mut have = exported(&tunnel_procs::http_get(&w, st.metrics_at, "/metrics"));
    have.extend(exported(&tunnel_procs::http_get(
        &w,
        redirector_metrics,
        "/metrics",
    )));
    let missing: Vec<&String> = wanted.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "named by the rules or the dashboard but exported by no daemon: {missing:?}"
    );
}
