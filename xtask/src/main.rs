//! `cargo xtask <task>`: lint, test, bench, soak, fuzz, dist, demo.
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod dist;
mod fuzz;

/// The nightly that builds the eBPF crate (see scripts/setup.sh for why this one).
pub(crate) const BPF_TOOLCHAIN: &str = "nightly-2026-08-05";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// fmt check, clippy -D warnings on the host crates, clippy on the eBPF crate.
    Lint,
    /// Lint, build every binary, run every test (root: the end-to-end tests load eBPF).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark (release build): `redirect`, `tunnel`, `nodes`, `agent` or `fleet`.
    Bench {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Churn soak (release build): streams, agent restarts, node-table edits and certificate
    /// renewals in cycles for `--minutes` (default 30); RSS, descriptors and tasks of every
    /// process after each cycle, in target/bench/soak.json. Fails when a target is missed.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every fuzz target (cargo-fuzz, the pinned nightly): `--seconds N` each (default
    /// 60), `--target NAME`, `--minimize` (merge what was found into the kept corpus).
    Fuzz {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the binaries the images ship into target/dist/<platform>/ (the agent for
    /// linux-amd64, linux-arm64 and linux-armv7; `--master` adds redirector and tunnel).
    Dist {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the local demo (release build).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The role split's dependency rules, from `cargo tree`: the edge agent (with or without its
/// `csr-api` feature, which speaks to the API server without a Kubernetes client library),
/// the protocol and the model link no eBPF (aya, the redirector and its build script) and no
/// kube.
fn dependency_rules() -> Result<()> {
    let tree = |pkg: &str, features: &str| -> Result<Vec<String>> {
        let mut cmd = cargo();
        cmd.args(["tree", "-p", pkg, "-e", "normal", "--prefix", "none"]);
        if !features.is_empty() {
            cmd.args(["--features", features]);
        }
        let out = cmd.output().context("cargo tree")?;
        if !out.status.success() {
            bail!(
                "cargo tree -p {pkg}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect())
    };
    const EBPF: [&str; 4] = ["aya", "aya-obj", "aya-build", "redirector"];
    const KUBE: [&str; 3] = ["kube", "kube-client", "k8s-openapi"];
    for (pkg, features, banned) in [
        ("tunnel-agent", "", [&EBPF[..], &KUBE[..]].concat()),
        ("tunnel-agent", "csr-api", [&EBPF[..], &KUBE[..]].concat()),
        ("tunnel-proto", "", [&EBPF[..], &KUBE[..]].concat()),
        ("edge-model", "", [&EBPF[..], &KUBE[..]].concat()),
    ] {
        let linked = tree(pkg, features)?;
        let bad: Vec<&&str> = banned
            .iter()
            .filter(|b| linked.iter().any(|l| l == **b))
            .collect();
        if !bad.is_empty() {
            bail!("dependency rule broken: {pkg} (features {features:?}) links {bad:?}");
        }
        eprintln!(
            "xtask: dependency rule holds: {pkg} (features {features:?}) links none of {banned:?}"
        );
    }
    Ok(())
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    dependency_rules()?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate in its own pass: its target and toolchain differ from the host's.
    let toolchain =
        std::env::var("REDIRECTOR_BPF_TOOLCHAIN").unwrap_or_else(|_| BPF_TOOLCHAIN.into());
    run(Command::new("cargo")
        .arg(format!("+{toolchain}"))
        .args([
            "clippy",
            "-p",
            "redirector-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        // Do not let the host toolchain's cargo leak into the nightly invocation.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN"))
}

/// Runs `cargo test`, passing its output through, and ends with one summary line over every
/// test binary (cargo prints one "test result" per binary, the last often a 0-test doc run).
fn test_with_summary(args: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut cmd = cargo();
    cmd.arg("test")
        .args(args)
        .stdout(std::process::Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut it = part.split_whitespace();
                if let (Some(n), Some(what)) =
                    (it.next().and_then(|n| n.parse::<u64>().ok()), it.next())
                {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let st = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !st.success() {
        bail!("cargo test failed ({st})");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Lint => lint(),
        Task::Test { args } => {
            lint()?;
            // The end-to-end tests start these binaries; `cargo test` alone builds only the
            // binaries of the package under test.
            run(cargo().args(["build", "--bins"]))?;
            // What the images ship, which the image and cross-architecture tests check: the
            // agent for every platform, the master binaries for this one.
            for p in dist::PLATFORMS {
                dist::agent(p)?;
            }
            dist::dist(&["--master".into(), "--platform".into(), "linux-amd64".into()])?;
            test_with_summary(&args)?;
            // The soak's bounded version, on the debug build just made: long enough that a
            // leak of descriptors or tasks shows (those must come back exactly). Over a few
            // cycles the heap still climbs to its high-water marks (a few hundred KiB on a
            // 1.5 MiB heap), so the short run only catches gross growth; the 30-minute release
            // run (`cargo xtask soak`) is the one held to 5%.
            run(Command::new("target/debug/soak").args([
                "--minutes",
                "2",
                "--check",
                "--rss-limit-pct",
                "50",
            ]))?;
            // Every fuzz target, bounded for CI.
            fuzz::fuzz(&["--seconds".into(), "30".into()])
        }
        Task::Fuzz { args } => fuzz::fuzz(&args),
        Task::Soak { minutes, args } => {
            run(cargo().args(["build", "--release", "--bins"]))?;
            run(Command::new("target/release/soak")
                .args(["--minutes", &minutes.to_string(), "--check"])
                .args(args))
        }
        Task::Bench { name, args } => {
            let bin = match name.as_str() {
                "redirect" => "bench-redirect",
                "tunnel" => "bench-tunnel",
                "agent" => "bench-agent",
                "nodes" => "bench-nodes",
                "fleet" => "bench-fleet",
                "wan" => "bench-wan",
                other => {
                    bail!(
                        "unknown benchmark {other:?}; known: redirect, tunnel, nodes, agent, fleet, wan"
                    )
                }
            };
            run(cargo().args(["build", "--release", "--bins"]))?;
            if bin == "bench-agent" {
                // What it compares: the shipped agent and a plain release build, per target.
                for p in dist::PLATFORMS {
                    dist::agent(p)?;
                    dist::compile(
                        p,
                        "release",
                        "tunnel-agent",
                        &["csr-api"],
                        &["tunnel-agent"],
                    )?;
                }
            }
            run(Command::new(format!("target/release/{bin}")).args(args))
        }
        Task::Dist { args } => dist::dist(&args),
        Task::Demo { args } => {
            run(cargo().args(["build", "--release", "--bins"]))?;
            run(Command::new("target/release/demo").args(args))
        }
    }
}
