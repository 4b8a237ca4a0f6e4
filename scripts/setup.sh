#!/usr/bin/env bash
# Idempotent setup for building and testing this project on Debian 12 (bookworm), x86_64, as root.
# Installs only what is missing; a second run changes nothing and takes about a second.
#
#   bash scripts/setup.sh
#
# Why these pins (verified on Debian 12, kernel 6.18):
#   * aya 0.16 / aya-ebpf 0.3 / aya-build 0.2.1 declare rust-version 1.98: host toolchain 1.99.1
#     (rust-toolchain.toml).
#   * bpf-linker must link against a libLLVM whose major is >= the eBPF nightly's LLVM. Debian 12
#     ships llvm-22-dev in bookworm-security; nightly-2026-08-05 is the last nightly on LLVM 22
#     (later ones are LLVM 23 and fail in bpf-linker with "Invalid record").
#   * bpf-linker 0.13.0 defaults to llvm-23: build it with --features llvm-22 and LLVM_PREFIX,
#     otherwise its build picks /usr/bin/llvm-config (LLVM 14) and fails with -lLLVM.
set -euo pipefail

HOST_TOOLCHAIN="${HOST_TOOLCHAIN:-1.99.1}"
BPF_TOOLCHAIN="${BPF_TOOLCHAIN:-nightly-2026-08-05}"
LLVM_MAJOR=22
BPF_LINKER_VERSION=0.13.0
LLVM_DIR="/usr/lib/llvm-${LLVM_MAJOR}"
# Runtime tools the tests, the demo and the benchmarks drive: iproute2 (netns, veth), iptables
# (the DNAT baseline), bpftool (inspection in tests and troubleshooting), procps (pgrep/pkill),
# curl (the demo's client), util-linux (nsenter, unshare, setpriv), python3-venv (the manifest
# validator's environment).
APT_PACKAGES=(iproute2 iptables bpftool procps curl util-linux python3-venv)
# The edge agent for ARM boards (cross builds and their qemu-user run in the tests): the C cross
# compilers ring's assembly needs, their libc, and qemu-user. No eBPF toolchain is involved.
APT_PACKAGES+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf
               libc6-dev-armhf-cross qemu-user-static)
# aarch64 has a prebuilt standard library for the host toolchain; 32-bit ARM has none that can be
# downloaded here, so armv7 builds std from source with the eBPF nightly's rust-src
# (cargo xtask dist).
AGENT_TARGETS=(aarch64-unknown-linux-gnu)
# Debian's Prometheus and node-exporter for the demo, unpacked (not installed: installing
# starts host-wide services on :9090 and :9100) into DEMO_TOOLS.
DEMO_TOOLS="${DEMO_TOOLS:-/opt/edge-redirector-demo}"
DEMO_DEBS=(prometheus prometheus-node-exporter)
# kubernetes-validate (PyPI) checks deploy/ against the Kubernetes schemas, in its own venv.
VALIDATE_VENV="${VALIDATE_VENV:-/opt/edge-redirector-dev/venv}"
KUBERNETES_VALIDATE_VERSION=1.37.0

export PATH="$HOME/.cargo/bin:$PATH"   # rustc invokes bpf-linker from PATH
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (apt-get, bpf). Try: sudo bash scripts/setup.sh" >&2
    exit 1
fi

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
    # --no-upgrade: never move shared libraries of an already installed package under the user.
    apt-get install -y -qq --no-install-recommends --no-upgrade "$@"
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ -x "$LLVM_DIR/bin/llvm-config" ] && [ -e "$LLVM_DIR/lib/libLLVM.so" ] \
   && "$LLVM_DIR/bin/llvm-config" --targets-built | grep -qw BPF; then :; else
    missing+=("llvm-${LLVM_MAJOR}-dev")
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: apt-get install ${missing[*]}"
    apt_install "${missing[@]}"
fi

if ! command -v rustup >/dev/null; then
    echo "setup: rustup not found. Install it from your distribution (apt-get install rustup) or rustup.rs, then rerun." >&2
    exit 1
fi
has_toolchain() { rustup toolchain list | grep -qF "$1-x86_64-unknown-linux-gnu"; }
if ! has_toolchain "$HOST_TOOLCHAIN"; then
    echo "setup: rustup toolchain install $HOST_TOOLCHAIN"
    rustup toolchain install "$HOST_TOOLCHAIN" --profile minimal --component clippy,rustfmt
fi
for c in clippy rustfmt; do
    rustup component list --toolchain "$HOST_TOOLCHAIN" --installed | grep -q "^$c" \
        || rustup component add "$c" --toolchain "$HOST_TOOLCHAIN"
done
for t in "${AGENT_TARGETS[@]}"; do
    rustup target list --toolchain "$HOST_TOOLCHAIN" --installed | grep -qx "$t" \
        || rustup target add "$t" --toolchain "$HOST_TOOLCHAIN"
done
if ! has_toolchain "$BPF_TOOLCHAIN"; then
    echo "setup: rustup toolchain install $BPF_TOOLCHAIN"
    rustup toolchain install "$BPF_TOOLCHAIN" --profile minimal --component rust-src,clippy
fi
for c in rust-src clippy; do
    rustup component list --toolchain "$BPF_TOOLCHAIN" --installed | grep -q "^$c" \
        || rustup component add "$c" --toolchain "$BPF_TOOLCHAIN"
done
bpf_llvm=$(rustc +"$BPF_TOOLCHAIN" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ "$bpf_llvm" -gt "$LLVM_MAJOR" ]; then
    echo "setup: $BPF_TOOLCHAIN uses LLVM $bpf_llvm but libLLVM is $LLVM_MAJOR; pick an older nightly (BPF_TOOLCHAIN=...)" >&2
    exit 1
fi

if command -v bpf-linker >/dev/null \
   && [ "$(bpf-linker --version)" = "bpf-linker $BPF_LINKER_VERSION" ] \
   && ldd "$(command -v bpf-linker)" | grep -q "libLLVM.so.${LLVM_MAJOR}"; then :; else
    echo "setup: cargo install bpf-linker $BPF_LINKER_VERSION (llvm-$LLVM_MAJOR)"
    LLVM_PREFIX="$LLVM_DIR" cargo +"$HOST_TOOLCHAIN" install --locked --force \
        "bpf-linker@$BPF_LINKER_VERSION" --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

# cargo-fuzz: the fuzz targets (cargo xtask fuzz) build with it on the eBPF nightly.
CARGO_FUZZ_VERSION=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    echo "setup: cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo +"$HOST_TOOLCHAIN" install --locked --force "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

for deb in "${DEMO_DEBS[@]}"; do
    if [ ! -x "$DEMO_TOOLS/usr/bin/$deb" ]; then
        echo "setup: unpacking Debian's $deb into $DEMO_TOOLS"
        if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
        tmp=$(mktemp -d) && chmod 755 "$tmp"   # apt downloads as user _apt
        (cd "$tmp" && apt-get download -qq "$deb")
        mkdir -p "$DEMO_TOOLS"
        dpkg-deb -x "$tmp"/"$deb"_*.deb "$DEMO_TOOLS"
        rm -rf "$tmp"
    fi
done

if [ ! -x "$VALIDATE_VENV/bin/kubernetes-validate" ] \
   || [ "$("$VALIDATE_VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "setup: kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VALIDATE_VENV"
    python3 -m venv "$VALIDATE_VENV" 2>/dev/null || /usr/bin/python3 -m venv "$VALIDATE_VENV"
    "$VALIDATE_VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# bpffs: the redirector pins its programs and maps here; it mounts it itself if missing, but
# tests and bpftool are friendlier with it present.
if ! awk '$3=="bpf" && $2=="/sys/fs/bpf"{f=1} END{exit !f}' /proc/mounts; then
    mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi
echo "setup: ok ($(rustc +"$HOST_TOOLCHAIN" --version | cut -d' ' -f1-2), $BPF_TOOLCHAIN, $(bpf-linker --version))"
