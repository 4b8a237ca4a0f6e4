use which::which;

/// Rebuild the eBPF object when the bpf-linker binary changes.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found in PATH: run scripts/setup.sh"),
    }
}
