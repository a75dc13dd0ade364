#!/usr/bin/env bash
# Benchmark collect -> dedupe -> clean on a generated JSONL corpus (default 1 GiB) in --release,
# reporting MiB/s, rows/s and peak RSS. Usage: scripts/bench-data.sh [MB] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_MB=${1:-1024}
export BENCH_DIR=${2:-$(mktemp -d)}
cargo bench -p pipeline-stages --bench data --no-run
BIN=$(ls -t target/release/deps/data-* | grep -v '\.d$' | head -1)
/usr/bin/time -v "$BIN" 2> "$BENCH_DIR/time.txt"
grep -E 'Maximum resident|Elapsed|User time|System time|Percent of CPU' "$BENCH_DIR/time.txt"
rm -rf "$BENCH_DIR"/collect "$BENCH_DIR"/dedupe "$BENCH_DIR"/clean "$BENCH_DIR"/corpus.jsonl
