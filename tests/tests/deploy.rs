//! deploy/: every manifest validates against the Kubernetes schemas (`kubernetes-validate`
//! from PyPI, installed by scripts/setup.sh), the kustomization lists every manifest, every
//! flag and environment variable the manifests give the binaries exists, and every example
//! config parses as the binaries parse it.
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use redirector::node_table::NodeTable;
use redirector_tests::yaml::{deploy_dir, documents, venv};
use serde_json::Value;

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 6, "manifests: {v:?}");
    v
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = manifests();
    let validator = venv().join("bin/kubernetes-validate");
    let out = Command::new(&validator)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", validator.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    let passed = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, documents(&files).len(), "{report}");
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = &documents(&[deploy_dir().join("kustomization.yaml")])[0];
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present);
}

/// `bin [sub] --help`: `sub` is the first argument unless it is already a flag (a binary
/// without subcommands, like `tunnel-agent`).
fn help(bin: &str, sub: &str) -> String {
    let mut cmd = Command::new(redirector_tests::spawn::workspace_bin(bin));
    if !sub.starts_with("--") {
        cmd.arg(sub);
    }
    let out = cmd.arg("--help").output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_flag_and_variable_the_manifests_set_exists() {
    let docs = documents(&manifests());
    let mut checked = 0;
    for d in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
        let pod = &d["spec"]["template"]["spec"];
        for c in pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["initContainers"].as_array().into_iter().flatten())
        {
            let bin = c["command"][0].as_str().unwrap();
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let text = help(bin, args[0]);
            assert!(!text.is_empty(), "{bin} {} --help", args[0]);
            let flags = if args[0].starts_with("--") {
                &args[..]
            } else {
                &args[1..]
            };
            for flag in flags {
                let name = flag.split('=').next().unwrap();
                assert!(
                    // `--flag <VALUE>`, or a switch alone on its line.
                    text.lines().any(|l| {
                        let l = l.trim_start();
                        l.starts_with(&format!("{name} <")) || l == name
                    }),
                    "{bin} {}: no flag {name}",
                    args[0]
                );
                checked += 1;
            }
            for e in c["env"].as_array().into_iter().flatten() {
                let name = e["name"].as_str().unwrap();
                if name.starts_with("REDIRECTOR_") || name.starts_with("TUNNEL_") {
                    assert!(
                        text.contains(&format!("[env: {name}=")),
                        "{bin} {}: no variable {name}",
                        args[0]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} flags and variables checked");
}

#[test]
fn every_example_config_parses() {
    let docs = documents(&manifests());
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("ConfigMap");
    let mut tables = Vec::new();
    for e in std::fs::read_dir(deploy_dir().join("examples")).unwrap() {
        let p = e.unwrap().path();
        tables.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
    }
    for (name, text) in &tables {
        let t = NodeTable::parse(text, name).unwrap_or_else(|e| panic!("{e}"));
        assert!(!t.nodes.is_empty(), "{}", name.display());
        // Input for `sync-nodes --nodes` has no tunnel= (the pool assigns it); a static
        // table gives every node one.
        let sync_input = name
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("sync-");
        let expected = if sync_input { 0 } else { t.nodes.len() };
        assert_eq!(t.tunnel.len(), expected, "{}", name.display());
    }
    for key in ["REDIRECTOR_PORTS", "TUNNEL_PORTS"] {
        let ports: Vec<u16> = cm["data"][key]
            .as_str()
            .unwrap()
            .split(',')
            .map(|p| p.parse().unwrap_or_else(|e| panic!("{key}: {p:?}: {e}")))
            .collect();
        assert!(ports.contains(&10250) && !ports.contains(&0), "{key}");
    }
    assert_eq!(
        cm["data"]["REDIRECTOR_PORTS"], cm["data"]["TUNNEL_PORTS"],
        "the agents serve what the masters redirect"
    );
    let pool = cm["data"]["REDIRECTOR_POOL"].as_str().unwrap();
    let pool = redirector::nodes::pool::Pool::parse(pool).unwrap();
    assert!(pool.size() >= 1000, "a pool for a fleet");
    assert_eq!(tables.len(), 2, "{tables:?}");
}

/// deploy/make-certs.sh makes certificates the tunnel accepts: a real mutual-TLS handshake with
/// the tunnel's own configs, and the server reads the node ID from the agent's certificate.
#[test]
fn make_certs_script_issues_certificates_the_tunnel_accepts() {
    use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};
    let dir = std::env::temp_dir().join(format!("make-certs-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new("bash")
        .arg(deploy_dir().join("make-certs.sh"))
        .arg(&dir)
        .args(["tunnel.edge.example.com", "edge-shop-17"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = |c: &str, k: &str| {
        tunnel::tls::PemFiles::load(&dir.join("ca.crt"), &dir.join(c), &dir.join(k)).unwrap()
    };
    let s = pem("server.crt", "server.key");
    let a = pem("agent-edge-shop-17.crt", "agent-edge-shop-17.key");
    let node = tunnel::identity::node_id_from_cert(&a.chain[0]).unwrap();
    assert_eq!(node, "edge-shop-17");
    let server_cfg = tunnel::tls::server_config(&s.ca, s.chain, s.key).unwrap();
    let agent_cfg = tunnel::tls::agent_config(&a.ca, a.chain, a.key).unwrap();
    let (mut st, mut at) = std::os::unix::net::UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut conn = ServerConnection::new(server_cfg).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut st).unwrap();
        }
        let peer = conn.peer_certificates().unwrap()[0].clone();
        tunnel::identity::node_id_from_cert(&peer).unwrap()
    });
    let name = ServerName::try_from("tunnel.edge.example.com").unwrap();
    let mut conn = ClientConnection::new(agent_cfg, name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut at).unwrap();
    }
    // The client finishes first in TLS 1.3; flush its last flight to the server.
    while conn.wants_write() {
        conn.write_tls(&mut at).unwrap();
    }
    assert_eq!(server.join().unwrap(), "edge-shop-17");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Least privilege: the master pod mounts an API token only into the containers that call the
/// API (sync-nodes, tunnel-server), never into the privileged redirector; the agent pod's
/// token can only file and read CSRs.
#[test]
fn api_tokens_only_where_the_api_is_used() {
    let docs = documents(&manifests());
    let ds = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == name)
            .unwrap()["spec"]["template"]["spec"]
            .clone()
    };
    let master = ds("edge-redirector-master");
    assert_eq!(master["automountServiceAccountToken"], false);
    let all = master["containers"].as_array().unwrap().iter();
    for c in all.chain(master["initContainers"].as_array().into_iter().flatten()) {
        let token = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == "api-token");
        let uses_api = c["name"] == "sync-nodes" || c["name"] == "tunnel-server";
        assert_eq!(token, uses_api, "{}", c["name"]);
    }
    let agent_rules: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "edge-redirector-agent")
        .flat_map(|d| d["rules"].as_array().unwrap().iter())
        .collect();
    assert_eq!(agent_rules.len(), 1);
    assert_eq!(
        agent_rules[0]["resources"],
        serde_json::json!(["certificatesigningrequests"])
    );
    assert_eq!(
        agent_rules[0]["verbs"],
        serde_json::json!(["create", "get"])
    );
    let subjects: BTreeSet<String> = docs
        .iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| k.ends_with("Binding")))
        .flat_map(|d| d["subjects"].as_array().unwrap().iter())
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        subjects,
        BTreeSet::from([
            "edge-redirector-master".to_owned(),
            "edge-redirector-agent".to_owned()
        ])
    );
}

/// Least privilege: only the redirector (it loads eBPF programs) is privileged. Every other
/// container, the internet-facing tunnel server and agent included, runs as a non-root user
/// with every capability dropped, none added, and a read-only root filesystem; the tunnel
/// server mounts no bpffs (it asks the kernel for original destinations, `--orig-dst=sockopt`).
#[test]
fn only_the_redirector_holds_privileges() {
    let docs = documents(&manifests());
    let mut seen = BTreeSet::new();
    for ds in docs.iter().filter(|d| d["kind"] == "DaemonSet") {
        let spec = &ds["spec"]["template"]["spec"];
        let all = spec["containers"].as_array().unwrap().iter();
        for c in all.chain(spec["initContainers"].as_array().into_iter().flatten()) {
            let name = c["name"].as_str().unwrap().to_owned();
            if name == "redirector" {
                continue;
            }
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{name}");
            assert!(sc["runAsUser"].as_u64().is_some_and(|u| u != 0), "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
            assert!(
                sc["capabilities"]["add"].is_null(),
                "{name} adds capabilities"
            );
            assert!(sc["privileged"] != true, "{name}");
            seen.insert(name);
        }
    }
    assert!(
        seen.contains("tunnel-server") && seen.contains("agent"),
        "{seen:?}"
    );
    let master = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "edge-redirector-master")
        .unwrap();
    let server = master["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tunnel-server")
        .unwrap();
    assert!(
        !server["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "bpffs"),
        "the tunnel server needs no bpffs"
    );
    assert!(
        server["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--orig-dst=sockopt"),
        "{server}"
    );
}
