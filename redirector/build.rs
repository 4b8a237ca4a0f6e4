//! Builds redirector-ebpf for bpfel-unknown-none with the pinned nightly (aya-build) and
//! embeds the object in the redirector binary.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// A nightly whose LLVM is not newer than the libLLVM bpf-linker links (Debian llvm-22-dev):
/// nightly-2026-08-05 is the last on LLVM 22. Override with REDIRECTOR_BPF_TOOLCHAIN.
const BPF_TOOLCHAIN: &str = "nightly-2026-08-05";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=REDIRECTOR_BPF_TOOLCHAIN");
    let toolchain =
        std::env::var("REDIRECTOR_BPF_TOOLCHAIN").unwrap_or_else(|_| BPF_TOOLCHAIN.into());
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "redirector-ebpf")
        .ok_or_else(|| anyhow!("redirector-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain)).context(
        "building the eBPF programs failed; run `bash scripts/setup.sh` to install bpf-linker \
         and the pinned nightly with rust-src",
    )
}
