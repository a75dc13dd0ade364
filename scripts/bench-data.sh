#!/usr/bin/env bash
# Benchmark collect -> dedupe -> clean on a generated JSONL corpus (default 1 GiB), reporting MiB per
# CPU-second, rows/s and peak RSS. Usage: scripts/bench-data.sh [MB] [DIR]   (BENCH_SHUFFLE=1: collect
# shuffles, spilling to scratch files). Built in the dev profile with pipeline-stages at opt-level 3
# (dependencies are at 3 there already), so it shares the test build instead of a --release polars.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_MB=${1:-1024}
export BENCH_DIR=${2:-$(mktemp -d)}
mkdir -p "$BENCH_DIR"
BIN=$(cargo bench -p pipeline-stages --bench data --no-run --profile dev \
  --config 'profile.dev.package.pipeline-stages.opt-level=3' --message-format=json \
  | python3 -c 'import json,sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "data": print(m["executable"])' | tail -n1)
/usr/bin/time -v "$BIN" 2> "$BENCH_DIR/time.txt"
grep -E 'Maximum resident|Elapsed|User time|System time|Percent of CPU' "$BENCH_DIR/time.txt"
rm -rf "$BENCH_DIR"/collect "$BENCH_DIR"/dedupe "$BENCH_DIR"/clean "$BENCH_DIR"/corpus.jsonl
