//! `cargo xtask dist`: the binaries the images copy, per platform, under `target/dist/`:
//!
//! ```text
//! target/dist/linux-amd64/{tunnel-agent,redirector,tunnel}
//! target/dist/linux-arm64/tunnel-agent      (and the master binaries with --master)
//! target/dist/linux-armv7/tunnel-agent
//! ```
//!
//! The agent builds with the host's stable toolchain for x86_64 and aarch64, and for armv7 with
//! std built from source by the eBPF nightly (no prebuilt 32-bit ARM std can be downloaded
//! here). It never runs redirector's build script: its dependency closure has no eBPF.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{BPF_TOOLCHAIN, cargo, run};

/// A platform an image is built for.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// `docker buildx --platform` name.
    pub docker: &'static str,
    /// The directory under `target/dist/` (`linux-$TARGETARCH$TARGETVARIANT`).
    pub dir: &'static str,
    pub triple: &'static str,
    /// Built with std from source (`-Z build-std`, nightly).
    pub build_std: bool,
}

pub const PLATFORMS: [Platform; 3] = [
    Platform {
        docker: "linux/amd64",
        dir: "linux-amd64",
        triple: "x86_64-unknown-linux-gnu",
        build_std: false,
    },
    Platform {
        docker: "linux/arm64",
        dir: "linux-arm64",
        triple: "aarch64-unknown-linux-gnu",
        build_std: false,
    },
    Platform {
        docker: "linux/arm/v7",
        dir: "linux-armv7",
        triple: "armv7-unknown-linux-gnueabihf",
        build_std: true,
    },
];

pub fn platform(name: &str) -> Result<Platform> {
    PLATFORMS
        .into_iter()
        .find(|p| p.dir == name || p.docker == name || p.triple == name)
        .with_context(|| {
            format!("unknown platform {name:?}; known: linux-amd64, linux-arm64, linux-armv7")
        })
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Builds `package`'s binaries `bins` for `p` with the artifact profile and copies them into
/// `target/dist/<dir>/`; returns their paths.
fn build(p: Platform, package: &str, features: &[&str], bins: &[&str]) -> Result<Vec<PathBuf>> {
    compile(p, "artifact", package, features, bins)?;
    let out = workspace().join("target/dist").join(p.dir);
    std::fs::create_dir_all(&out)?;
    let mut paths = Vec::new();
    for b in bins {
        let built = workspace()
            .join("target")
            .join(p.triple)
            .join("artifact")
            .join(b);
        let to = out.join(b);
        std::fs::copy(&built, &to)
            .with_context(|| format!("copying {} to {}", built.display(), to.display()))?;
        paths.push(to);
    }
    Ok(paths)
}

/// `cargo build --profile <profile>` of `package`'s `bins` for `p`; they land in
/// `target/<triple>/<profile>/`.
pub fn compile(
    p: Platform,
    profile: &str,
    package: &str,
    features: &[&str],
    bins: &[&str],
) -> Result<()> {
    let mut cmd = if p.build_std {
        let toolchain =
            std::env::var("REDIRECTOR_BPF_TOOLCHAIN").unwrap_or_else(|_| BPF_TOOLCHAIN.into());
        let mut c = Command::new("cargo");
        c.arg(format!("+{toolchain}"))
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN");
        c
    } else {
        cargo()
    };
    cmd.current_dir(workspace()).args([
        "build",
        "--profile",
        profile,
        "-p",
        package,
        "--target",
        p.triple,
    ]);
    if p.build_std {
        cmd.args(["-Z", "build-std=std,panic_abort"]);
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    for b in bins {
        cmd.args(["--bin", b]);
    }
    run(&mut cmd)
}

/// The agent for `p`, as the agent image ships it (with the CSR API client: the DaemonSet
/// enrolls through it).
pub fn agent(p: Platform) -> Result<PathBuf> {
    Ok(build(p, "tunnel-agent", &["csr-api"], &["tunnel-agent"])?.remove(0))
}

/// `cargo xtask dist [--platform P]... [--master]`.
pub fn dist(args: &[String]) -> Result<()> {
    let mut platforms = Vec::new();
    let mut master = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--platform" => {
                platforms.push(platform(it.next().context("--platform needs a value")?)?)
            }
            "--master" => master = true,
            other => bail!("dist: unknown argument {other:?} (--platform P, --master)"),
        }
    }
    if platforms.is_empty() {
        platforms = PLATFORMS.to_vec();
    }
    for p in platforms {
        let a = agent(p)?;
        println!(
            "{:<14} {:>9} bytes  {}",
            p.docker,
            std::fs::metadata(&a)?.len(),
            a.display()
        );
        if master {
            // The master binaries embed the eBPF object (built by redirector's build script on
            // the host, whatever the target).
            build(p, "redirector", &[], &["redirector"])?;
            build(p, "tunnel", &[], &["tunnel"])?;
        }
    }
    Ok(())
}
