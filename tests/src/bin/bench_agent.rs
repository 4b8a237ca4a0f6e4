//! Benchmark: the edge agent as an artifact. Its stripped size per target and build profile
//! (release against the artifact profile: fat LTO, one codegen unit), and its idle memory with one session up,
//! natively (x86_64) and under qemu-user (aarch64, armv7; qemu's own memory included, so an
//! upper bound for the board). `cargo xtask bench agent` builds what it measures first.
//! Prints a table and writes `target/bench/agent.json`.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use redirector_tests::{
    LoggedProc, World,
    bench::{rss_kib, write_report},
    pki::TestPki,
    spawn, tunnel_procs,
};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    /// Seconds the agent idles with its session up before its RSS is read.
    #[arg(long, default_value_t = 5)]
    idle_s: u64,
    #[arg(long, default_value = "target/bench/agent.json")]
    out: PathBuf,
}

fn target_dir() -> PathBuf {
    spawn::workspace_bin("probe")
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory")
        .to_owned()
}

/// Size of `bin` once stripped (a stripped copy, `bin` itself is left alone).
fn stripped_size(bin: &Path, strip: &str) -> Result<u64> {
    let tmp = std::env::temp_dir().join(format!("bench-agent-{}-strip", std::process::id()));
    std::fs::copy(bin, &tmp).with_context(|| format!("copying {}", bin.display()))?;
    let st = Command::new(strip)
        .arg(&tmp)
        .status()
        .context(strip.to_owned())?;
    if !st.success() {
        bail!("{strip} {} failed", tmp.display());
    }
    let n = std::fs::metadata(&tmp)?.len();
    std::fs::remove_file(&tmp)?;
    Ok(n)
}

/// Idle RSS (KiB) of the agent `bin` (through `runner`, e.g. qemu) with one session up.
fn idle_rss(
    w: &World,
    pki: &TestPki,
    st: &mut tunnel_procs::Stack,
    node: &str,
    runner: &[&str],
    bin: &Path,
    idle: Duration,
) -> Result<u64> {
    let args = tunnel_procs::agent_args(
        pki,
        node,
        &st.agents_at.to_string(),
        "10250",
        "127.0.0.1",
        "127.0.0.1:0",
    );
    let mut cmd = match runner.split_first() {
        Some((r, rest)) => {
            let mut c = Command::new(r);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(&args);
    spawn::place(&mut cmd, None, Some(&w.edge));
    let agent = LoggedProc::start(&w.dir, &format!("agent-{node}"), cmd);
    st.server
        .wait_log(&["agent session up", &format!("node={node}")]);
    std::thread::sleep(idle);
    let rss = rss_kib(agent.child.id());
    if rss == 0 {
        bail!("agent {} exited:\n{}", bin.display(), agent.log());
    }
    Ok(rss)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    redirector_tests::require_root();
    let t = target_dir();
    let idle = Duration::from_secs(cli.idle_s);
    let targets = [
        (
            "x86_64",
            "linux-amd64",
            "x86_64-unknown-linux-gnu",
            "strip",
            vec![],
        ),
        (
            "aarch64",
            "linux-arm64",
            "aarch64-unknown-linux-gnu",
            "aarch64-linux-gnu-strip",
            vec!["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"],
        ),
        (
            "armv7",
            "linux-armv7",
            "armv7-unknown-linux-gnueabihf",
            "arm-linux-gnueabihf-strip",
            vec!["qemu-arm-static", "-L", "/usr/arm-linux-gnueabihf"],
        ),
    ];
    let w = World::new();
    let pki = TestPki::new(&w.dir);
    let mut st = tunnel_procs::stack(&w, &pki, &[]);
    let nodes = ["edge-a", "edge-b", "edge-c"];
    let mut rows = Vec::new();
    for ((arch, dir, triple, strip, runner), node) in targets.iter().zip(nodes) {
        let dist = t.join("dist").join(dir).join("tunnel-agent");
        let release = t.join(triple).join("release").join("tunnel-agent");
        let dist_size = std::fs::metadata(&dist)
            .with_context(|| format!("{} (cargo xtask dist)", dist.display()))?
            .len();
        let release_size = match release.exists() {
            true => Some(stripped_size(&release, strip)?),
            false => None,
        };
        let rss = idle_rss(&w, &pki, &mut st, node, runner, &dist, idle)?;
        rows.push(json!({"target": arch, "dist_stripped_bytes": dist_size, "release_stripped_bytes": release_size,
            "idle_rss_kib_one_session": rss, "under_qemu": !runner.is_empty()}));
    }
    println!(
        "| target | stripped, artifact profile | stripped, release profile | idle RSS, one session |"
    );
    println!("|---|---|---|---|");
    for r in &rows {
        let mib = |v: &serde_json::Value| {
            v.as_u64().map_or("-".to_owned(), |b| {
                format!("{:.2} MiB", b as f64 / 1048576.0)
            })
        };
        println!(
            "| {} | {} | {} | {:.1} MiB{} |",
            r["target"].as_str().unwrap(),
            mib(&r["dist_stripped_bytes"]),
            mib(&r["release_stripped_bytes"]),
            r["idle_rss_kib_one_session"].as_u64().unwrap() as f64 / 1024.0,
            if r["under_qemu"] == true {
                " (under qemu-user, emulator included)"
            } else {
                ""
            }
        );
    }
    write_report(
        &cli.out,
        &json!({"bench": "agent", "idle_s": cli.idle_s, "results": rows}),
    )
}
