//! deploy/*.Dockerfile: every binary an image copies is built by `cargo xtask dist` where the
//! Dockerfile says it is (no registry or Docker engine is reachable here, so the images
//! themselves are not built), the image each DaemonSet names runs a binary its Dockerfile
//! copies, and the agent's binaries are for the machines their platform names.
use std::path::{Path, PathBuf};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn dist_dir() -> PathBuf {
    redirector_tests::spawn::workspace_bin("probe")
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory")
        .join("dist")
}

/// `(TARGETARCH, TARGETVARIANT, ELF machine)` of a `docker buildx --platform` name.
fn platform(p: &str) -> (&'static str, &'static str, u16) {
    match p {
        "linux/amd64" => ("amd64", "", 62),
        "linux/arm64" => ("arm64", "", 183),
        "linux/arm/v7" => ("arm", "v7", 40),
        other => panic!("platform {other} has no dist build"),
    }
}

/// The COPY sources of a Dockerfile (the last word of a COPY line is its destination).
fn copied(dockerfile: &str) -> Vec<String> {
    dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The platforms a Dockerfile's documented `--platform` list names.
fn platforms(dockerfile: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find(|l| l.contains("--platform linux/"))
        .expect("a documented --platform list");
    let list = line.split("--platform ").nth(1).unwrap();
    list.split_whitespace()
        .next()
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn elf_machine(bin: &Path) -> u16 {
    let b = std::fs::read(bin).unwrap();
    assert_eq!(&b[..4], b"\x7fELF", "{}", bin.display());
    u16::from_le_bytes([b[18], b[19]])
}

/// Checks every COPY source of `file` for each of `built` (the platforms CI builds it for).
fn check(file: &str, built: &[&str]) -> Vec<String> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    let documented = platforms(&text);
    for b in built {
        assert!(
            documented.iter().any(|d| d == b),
            "{file} does not list {b}: {documented:?}"
        );
    }
    let sources = copied(&text);
    assert!(!sources.is_empty(), "{file} copies nothing");
    let mut bins = Vec::new();
    for p in built {
        let (arch, variant, machine) = platform(p);
        for src in &sources {
            let path = src
                .replace("${TARGETARCH}", arch)
                .replace("${TARGETVARIANT}", variant);
            let full = dist_dir().join(&path);
            assert!(
                full.is_file(),
                "{file} copies {path} for {p}, which `cargo xtask dist` did not build ({})",
                full.display()
            );
            assert_eq!(
                elf_machine(&full),
                machine,
                "{} is not a {p} binary",
                full.display()
            );
            bins.push(
                Path::new(&path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    bins
}

#[test]
fn the_agent_image_copies_the_agent_built_for_amd64_arm64_and_armv7() {
    let bins = check(
        "agent.Dockerfile",
        &["linux/amd64", "linux/arm64", "linux/arm/v7"],
    );
    assert!(
        bins.iter().all(|b| b == "tunnel-agent"),
        "only the agent: {bins:?}"
    );
    let ds = std::fs::read_to_string(deploy_dir().join("agent-daemonset.yaml")).unwrap();
    assert!(
        ds.contains("image: edge-redirector-agent"),
        "the agent DaemonSet runs the agent image"
    );
    assert!(ds.contains(r#"command: ["tunnel-agent"]"#));
}

#[test]
fn the_master_image_copies_the_redirector_and_the_server() {
    // CI builds the master binaries for amd64; arm64 masters build the same way (deploy/README).
    let mut bins = check("master.Dockerfile", &["linux/amd64"]);
    bins.sort();
    assert_eq!(bins, ["redirector", "tunnel"]);
    let ds = std::fs::read_to_string(deploy_dir().join("master-daemonset.yaml")).unwrap();
    assert!(!ds.contains("tunnel-agent"), "the masters run no agent");
}
