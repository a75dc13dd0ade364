#!/usr/bin/env bash
# Crash test: the headline recipe killed with SIGKILL at 20+ seeded moments, see crash_test.py.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bin pipeline
exec python3 scripts/crash_test.py "$@"
