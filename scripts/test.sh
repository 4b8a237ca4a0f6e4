#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (idempotent) and runs every check and test.
# Needs root: the end-to-end tests load eBPF programs and build network namespaces.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
exec cargo xtask test "$@"
