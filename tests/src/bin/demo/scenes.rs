//! What the demo shows, one scene per function; each prints what a newcomer should see and
//! returns whether it saw it.
use std::{
    io::{BufRead, BufReader},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use redirector_tests::spawn::workspace_bin;

use crate::{
    cluster::{self, Cluster, client, kubelet_curl_args},
    say,
    tools::Tools,
    world::DemoWorld,
};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_owned()
}

fn check(ok: bool, what: &str) -> bool {
    if !ok {
        say(&format!("   !! FAILED: {what}"));
    }
    ok
}

/// `curl` as the API server would dial a kubelet: from the master's cgroup, names from the
/// managed hosts file, the kubelet CA and the API server's client certificate.
fn kubelet_curl(w: &DemoWorld, tools: &Tools, url: &str) -> Output {
    let mut args = vec!["-sS".into(), "--max-time".into(), "10".into()];
    args.extend(kubelet_curl_args(w));
    args.push(url.into());
    client(w, &tools.curl, &args).output().expect("curl")
}

pub fn unreachable_without_redirector(w: &DemoWorld, tools: &Tools) -> bool {
    say(
        "\n== The master cannot dial the edges: they are behind NAT (a process outside the cgroup)",
    );
    let out = w
        .master_plain(
            &tools.curl.display().to_string(),
            &["-sS", "--max-time", "3", "https://192.0.2.10:10250/healthz"],
        )
        .output()
        .expect("curl");
    say(&format!(
        "   curl https://192.0.2.10:10250/healthz -> {}",
        text(&out.stderr)
    ));
    check(!out.status.success(), "the master reached an edge directly")
}

pub fn tunnel_addresses_assigned(w: &DemoWorld, c: &Cluster) -> bool {
    say(&format!(
        "\n== redirector sync-nodes gave each node a unique tunnel address from {} (kept in {}); the node table it wrote:",
        crate::world::POOL,
        w.pool_state.display()
    ));
    let table = std::fs::read_to_string(&w.node_table).unwrap_or_default();
    for l in table.lines() {
        say(&format!("   {l}"));
    }
    let distinct: std::collections::BTreeSet<_> = c.tunnel.values().collect();
    check(
        c.tunnel.len() == w.edges.len() && distinct.len() == c.tunnel.len(),
        "one distinct tunnel address per node",
    )
}

pub fn hosts_block(w: &DemoWorld, c: &Cluster) -> bool {
    say(
        "\n== Node names resolve to unique tunnel addresses (block the redirector manages in the hosts file)",
    );
    let hosts = std::fs::read_to_string(&w.hosts).unwrap_or_default();
    for l in hosts.lines().filter(|l| !l.contains("localhost")) {
        say(&format!("   {l}"));
    }
    w.edges.iter().all(|e| {
        check(
            hosts.contains(&format!("{}\t{}\n", c.tunnel[e.spec.name], e.spec.name)),
            &format!("hosts block lacks {}", e.spec.name),
        )
    })
}

pub fn kubelets_by_name_and_address(w: &DemoWorld, tools: &Tools, c: &Cluster) -> bool {
    say(
        "\n== The API server's view: each kubelet by name, by tunnel address, by a unique InternalIP (HTTPS, client certificate, end to end)",
    );
    let mut ok = true;
    for e in &w.edges {
        let tunnel = c.tunnel[e.spec.name].to_string();
        let mut hosts = vec![e.spec.name, &tunnel];
        if e.spec.name == "edge-a" {
            hosts.push(e.spec.internal_ip);
        }
        for host in hosts {
            let url = format!("https://{host}:10250/healthz");
            let out = kubelet_curl(w, tools, &url);
            let answer = if out.status.success() {
                text(&out.stdout)
            } else {
                text(&out.stderr)
            };
            say(&format!("   curl {url:<36} -> {answer}"));
            ok &= check(
                answer == format!("ok {}", e.spec.name),
                &format!("{url} did not reach {}", e.spec.name),
            );
        }
    }
    ok
}

pub fn shared_internal_ip_refused(w: &DemoWorld, tools: &Tools, c: &mut Cluster) -> bool {
    say("\n== edge-b and edge-c share InternalIP 192.0.2.20: refused at once, never guessed");
    let url = "https://192.0.2.20:10250/healthz";
    let started = Instant::now();
    let out = kubelet_curl(w, tools, url);
    say(&format!(
        "   curl {url:<36} -> {} (after {} ms)",
        text(&out.stderr),
        started.elapsed().as_millis()
    ));
    let mut ok = check(!out.status.success(), "the shared InternalIP was routed");
    let log = c.server.log();
    match log.lines().find(|l| l.contains("belongs to several nodes")) {
        Some(line) => say(&format!(
            "   tunnel server log: {}",
            line.split("WARN").last().unwrap_or(line).trim()
        )),
        None => ok &= check(false, "no tunnel server log line names both nodes"),
    }
    say("   (both nodes still answer by name and tunnel address, above)");
    ok
}

pub fn streaming_logs(w: &DemoWorld, tools: &Tools) -> bool {
    say("\n== A streaming response, like `kubectl logs -f` (each line printed as it arrives)");
    let url = "https://edge-b:10250/containerLogs/default/web/app?follow=true";
    say(&format!("   curl -N {url}"));
    let mut args = vec!["-sSN".into(), "--max-time".into(), "10".into()];
    args.extend(kubelet_curl_args(w));
    args.push(url.into());
    let mut child = client(w, &tools.curl, &args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let started = Instant::now();
    let mut lines = 0;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.unwrap_or_default();
        say(&format!(
            "   +{:>4} ms  {line}",
            started.elapsed().as_millis()
        ));
        if line.starts_with("edge-b ") {
            lines += 1;
        }
    }
    let status = child.wait().expect("curl");
    check(status.success() && lines == 5, "five log lines from edge-b")
}

pub fn exec_half_close(w: &DemoWorld) -> bool {
    say(
        "\n== An exec-like upgraded stream that relies on half-close: the client sends its input, closes its write side, then reads the answer",
    );
    let input = "echo hello from the api server\n";
    let mut args = vec![
        "--host".to_owned(),
        "edge-c".to_owned(),
        "--input".to_owned(),
        input.to_owned(),
    ];
    for (flag, v) in [
        ("--ca", &w.pki.kubelet.ca_pem),
        ("--cert", &w.pki.client.0),
        ("--key", &w.pki.client.1),
    ] {
        args.push(flag.into());
        args.push(v.display().to_string());
    }
    let out = client(w, &workspace_bin("exec-client"), &args)
        .output()
        .expect("exec-client");
    let answer = if out.status.success() {
        text(&out.stdout)
    } else {
        text(&out.stderr)
    };
    for l in answer.lines() {
        say(&format!("   {l}"));
    }
    check(
        out.status.success()
            && answer.contains("ECHO HELLO FROM THE API SERVER")
            && answer.contains(&format!(
                "edge-c: read {} bytes until the client's half-close; exit 0",
                input.len()
            )),
        "the exec answer after the half-close",
    )
}

pub fn prometheus_scrapes_every_edge(w: &DemoWorld, tools: &Tools) -> bool {
    say(&format!(
        "\n== Prometheus (Debian's) on the master scrapes each edge's node-exporter by name (http://{}/targets)",
        cluster::PROMETHEUS
    ));
    let url = format!("http://{}/api/v1/targets", cluster::PROMETHEUS);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut targets = Vec::new();
    while Instant::now() < deadline {
        let v: serde_json::Value =
            serde_json::from_str(&cluster::local_get(w, tools, &url)).unwrap_or_default();
        targets = v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // The master's own daemons are scraped too (the dashboard scene); these are the edges.
        targets.retain(|t| t["labels"]["job"] == "edge-node-exporter");
        if targets.len() == w.edges.len() && targets.iter().all(|t| t["health"] == "up") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut ok = check(targets.len() == w.edges.len(), "one target per edge");
    for t in &targets {
        say(&format!(
            "   target {:<12} node={:<7} health={} last scrape {:.1} ms {}",
            t["labels"]["instance"].as_str().unwrap_or("?"),
            t["labels"]["node"].as_str().unwrap_or("?"),
            t["health"].as_str().unwrap_or("?"),
            t["lastScrapeDuration"].as_f64().unwrap_or(0.0) * 1000.0,
            t["lastError"].as_str().unwrap_or("")
        ));
        ok &= check(t["health"] == "up", "target up");
    }
    ok
}

pub fn status_and_metrics(w: &DemoWorld, tools: &Tools) -> bool {
    say("\n== redirector status");
    let out = std::process::Command::new(workspace_bin("redirector"))
        .arg("--pin-dir")
        .arg(&w.pin_dir)
        .arg("status")
        .output()
        .expect("redirector status");
    for line in text(&out.stdout).lines() {
        say(&format!("   {line}"));
    }
    let mut ok = check(out.status.success(), "redirector status");
    say(&format!(
        "\n== Metrics (http://{}/metrics and http://{}/metrics, excerpts)",
        cluster::REDIRECTOR_METRICS,
        cluster::SERVER_METRICS
    ));
    let r = cluster::local_get(
        w,
        tools,
        &format!("http://{}/metrics", cluster::REDIRECTOR_METRICS),
    );
    for line in r.lines().filter(|l| {
        l.starts_with("redirector_redirected")
            || l.starts_with("redirector_ambiguous_addresses")
            || l.starts_with("redirector_node_addresses_ipv4")
    }) {
        say(&format!("   {line}"));
    }
    let m = cluster::local_get(
        w,
        tools,
        &format!("http://{}/metrics", cluster::SERVER_METRICS),
    );
    for line in m.lines().filter(|l| {
        l.starts_with("tunnel_server_sessions ")
            || l.starts_with("tunnel_server_streams_total")
            || l.starts_with("tunnel_server_refused_total")
    }) {
        say(&format!("   {line}"));
    }
    ok &= check(
        m.contains("tunnel_server_sessions 3"),
        "three agent sessions",
    );
    ok &= check(
        r.contains("redirector_ambiguous_addresses 1"),
        "one ambiguous address",
    );
    ok
}

/// A PromQL instant query against the demo's Prometheus: each result's labels and value.
fn query(w: &DemoWorld, tools: &Tools, expr: &str) -> Vec<(serde_json::Value, String)> {
    let url = format!(
        "http://{}/api/v1/query?query={}",
        cluster::PROMETHEUS,
        url_escape(expr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&cluster::local_get(w, tools, &url)).unwrap_or_default();
    v["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let value = r["value"][1].as_str().unwrap_or("?").to_owned();
            (r["metric"].clone(), value)
        })
        .collect()
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The main panels of deploy/monitoring/dashboard.json as text, each query run by the demo's
/// Prometheus (which scrapes the master's daemons and loads the project's alert rules).
pub fn dashboard_panels(w: &DemoWorld, tools: &Tools) -> bool {
    say(&format!(
        "\n== The dashboard's main panels (deploy/monitoring/dashboard.json), queried from Prometheus at http://{}",
        cluster::PROMETHEUS
    ));
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(redirector_tests::monitoring::dir().join("dashboard.json"))
            .expect("dashboard.json"),
    )
    .expect("dashboard JSON");
    // The master's series arrive with the first scrapes and rates need two of them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while query(w, tools, "count(tunnel_server_node_reachable)").is_empty()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
    let mut reachable = None;
    for panel in dash["panels"].as_array().into_iter().flatten().take(6) {
        say(&format!("   [{}]", panel["title"].as_str().unwrap_or("?")));
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or("");
            let legend = t["legendFormat"].as_str().unwrap_or("");
            let results = query(w, tools, expr);
            if results.is_empty() {
                let what = legend.replace("{{node}} ", "").replace("{{node}}", "");
                say(&format!("      {what:<28} (none)"));
            }
            for (labels, value) in results {
                let mut name = legend.to_owned();
                for (k, v) in labels.as_object().into_iter().flatten() {
                    name = name.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or(""));
                }
                if expr.starts_with("count(max by (node) (tunnel_server_node_reachable) == 1)") {
                    reachable = value.parse::<f64>().ok();
                }
                say(&format!("      {name:<28} {value}"));
            }
        }
    }
    let v: serde_json::Value = serde_json::from_str(&cluster::local_get(
        w,
        tools,
        &format!("http://{}/api/v1/rules", cluster::PROMETHEUS),
    ))
    .unwrap_or_default();
    let rules: Vec<(String, String)> = v["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("?").to_owned(),
                r["state"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    let firing: Vec<&String> = rules
        .iter()
        .filter(|(_, s)| s != "inactive")
        .map(|(n, _)| n)
        .collect();
    say(&format!(
        "   alert rules loaded: {}; pending or firing: {firing:?}",
        rules.len()
    ));
    let mut ok = check(
        reachable == Some(w.edges.len() as f64),
        "every edge node reachable on the dashboard",
    );
    ok &= check(rules.len() >= 10, "the project's alert rules loaded");
    ok
}

pub fn how_to_try(w: &DemoWorld, tools: &Tools) {
    let client = format!(
        "nsenter --net={} sh -c 'echo $$ > {}; exec unshare --mount --propagation private sh -c \"mount --bind {} /etc/hosts && exec $SHELL\"'",
        w.master.path().display(),
        w.cgroup.procs_file().display(),
        w.hosts.display()
    );
    let kubelet = kubelet_curl_args(w).join(" ");
    say("\n== Left running; Ctrl-C tears everything down. Try, as root:");
    say(&format!(
        "   # a shell on the master whose connections are redirected:\n   {client}"
    ));
    for e in &w.edges {
        say(&format!(
            "   {} -sS {kubelet} https://{}:10250/healthz",
            tools.curl.display(),
            e.spec.name
        ));
    }
    say(&format!(
        "   Prometheus: nsenter --net={} curl -s http://{}/api/v1/targets",
        w.master.path().display(),
        cluster::PROMETHEUS
    ));
    say(&format!(
        "   {} --pin-dir {} status",
        workspace_bin("redirector").display(),
        w.pin_dir.display()
    ));
}
