//! `cargo xtask fuzz [--seconds N] [--target NAME] [--minimize]`: runs every cargo-fuzz
//! target for N seconds (libFuzzer, address sanitizer, the pinned nightly) and reports the
//! executions of each; a crash fails the run and names its input.
//!
//! Each crate's `fuzz/` is a cargo workspace of its own, so the sanitizer flags never reach
//! the main build (or the eBPF build). New inputs go to `target/fuzz-corpus/<target>`; the
//! corpus kept in the repository (`<crate>/fuzz/corpus/<target>`) is only read, except by
//! `--minimize`, which merges what was found into it, minimized. Inputs that once crashed stay
//! in `<crate>/fuzz/regressions/<target>` and are replayed on every run.
use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// Fuzz directories and their targets.
pub const TARGETS: [(&str, &[&str]); 4] = [
    (
        "redirector/model/fuzz",
        &["node_table", "hosts_block", "allocations"],
    ),
    ("tunnel/proto/fuzz", &["cert_identity", "agent_answer"]),
    ("tunnel/fuzz", &["token_store", "enroll_request"]),
    ("tunnel/agent/fuzz", &["connect_request"]),
];

/// `cargo fuzz SUB --fuzz-dir DIR` with the pinned nightly (`SUB` is `build` or `run`).
fn cargo_fuzz(sub: &str, dir: &str) -> Command {
    let toolchain =
        std::env::var("REDIRECTOR_BPF_TOOLCHAIN").unwrap_or_else(|_| crate::BPF_TOOLCHAIN.into());
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{toolchain}"))
        .args([
            "fuzz",
            sub,
            "--fuzz-dir",
            dir,
            "--target-dir",
            "target/fuzz",
        ])
        // The host toolchain's cargo must not leak into the nightly one.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// "Done 590181 runs in 21 second(s)" -> 590181.
fn runs(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

pub fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut only: Option<String> = None;
    let mut minimize = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .context("--seconds takes a whole number")?
            }
            "--target" => only = Some(it.next().context("--target takes a name")?.clone()),
            "--minimize" => minimize = true,
            other => bail!("unknown argument {other:?}: --seconds N, --target NAME, --minimize"),
        }
    }
    let mut report = Vec::new();
    for (dir, targets) in TARGETS {
        for target in targets
            .iter()
            .filter(|t| only.as_deref().is_none_or(|o| o == **t))
        {
            let kept = format!("{dir}/corpus/{target}");
            let found = format!("target/fuzz-corpus/{target}");
            std::fs::create_dir_all(&found)?;
            std::fs::create_dir_all(&kept)?;
            // Built on its own first, so a failed build (a compile error, a full disk) is
            // reported as one and never mistaken for a crash the fuzzer found.
            crate::run(cargo_fuzz("build", dir).arg(target)).with_context(|| {
                format!(
                    "building fuzz target {target} ({dir}) failed; the compiler's message is above \
                     (\"No space left on device\": the sanitized builds need about 2 GiB in target/fuzz)"
                )
            })?;
            let mut cmd = cargo_fuzz("run", dir);
            cmd.args([target, found.as_str(), kept.as_str()]);
            // Inputs that once crashed: replayed on every run, never minimized away.
            let regressions = format!("{dir}/regressions/{target}");
            if Path::new(&regressions).is_dir() {
                cmd.arg(&regressions);
            }
            cmd.arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=2048")
                .arg("-print_final_stats=1");
            eprintln!("xtask: {cmd:?}");
            let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
            let log = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                let crash = log
                    .lines()
                    .find(|l| l.contains("Test unit written to"))
                    .unwrap_or("(no input written)");
                eprintln!("{log}");
                bail!(
                    "fuzz target {target} failed: {crash}\nreproduce: cargo +{} fuzz run --fuzz-dir {dir} {target} <that file>; fix it, add a regression test, and put the input in {kept}",
                    crate::BPF_TOOLCHAIN
                );
            }
            let n = runs(&log).context("no \"Done N runs\" line in libFuzzer's output")?;
            eprintln!("xtask: fuzz {target}: {n} executions, no crash");
            report.push((dir, *target, n, seconds));
            if minimize {
                let merged = format!("target/fuzz-merged/{target}");
                let _ = std::fs::remove_dir_all(&merged);
                std::fs::create_dir_all(&merged)?;
                crate::run(cargo_fuzz("run", dir).args([
                    target,
                    merged.as_str(),
                    kept.as_str(),
                    found.as_str(),
                    "--",
                    "-merge=1",
                ]))?;
                std::fs::remove_dir_all(&kept)?;
                copy_dir(Path::new(&merged), Path::new(&kept))?;
            }
        }
    }
    if report.is_empty() {
        bail!("no fuzz target named {only:?}");
    }
    println!("\n| fuzz target | crate | seconds | executions | crashes |\n|---|---|---|---|---|");
    for (dir, t, n, s) in &report {
        println!("| {t} | {dir} | {s} | {n} | 0 |");
    }
    let json: Vec<String> = report
        .iter()
        .map(|(dir, t, n, s)| {
            format!("{{\"target\": \"{t}\", \"dir\": \"{dir}\", \"seconds\": {s}, \"executions\": {n}, \"crashes\": 0}}")
        })
        .collect();
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/fuzz.json",
        format!("[\n  {}\n]\n", json.join(",\n  ")),
    )?;
    println!("wrote target/bench/fuzz.json");
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}
