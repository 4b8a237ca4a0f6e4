#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (idempotent) and runs every check and test.
# Needs root: the end-to-end tests load eBPF programs and build network namespaces.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The whole run needs about 10 GiB under target/; a full disk shows up as a compiler I/O error.
echo "test.sh: free disk for target/: $(df -h --output=avail . | tail -1 | tr -d ' ')"
exec cargo xtask test "$@"
