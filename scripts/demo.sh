#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (idempotent), builds, and runs the local demo.
# Needs root. `bash scripts/demo.sh --keep` leaves the demo up until Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
exec cargo xtask demo "$@"
