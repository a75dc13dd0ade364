#!/usr/bin/env bash
# Proof that TensorBoard reads our event files: runs recipes/tiny-train-eval.toml (pretrain with an
# eval split, DPO, evaluate; seconds) in a scratch folder, makes a venv with the `tensorboard`
# package from PyPI (pinned) and checks with its EventAccumulator that every scalar equals the
# stages' metrics.jsonl / report.json (scripts/monitor/check_tensorboard.py).
# Needs python3 with venv and PyPI; not part of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
TB_VERSION=2.18.0
venv="${PIPELINE_TEST_ASSETS:-target/test-assets}/tensorboard-$TB_VERSION-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "tensorboard==$TB_VERSION" "numpy<2.3" "setuptools<81"
fi
bin="${PIPELINE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --bin pipeline
  bin="$repo/target/debug/pipeline"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp recipes/tiny-train-eval.toml "$work/r.toml"
mkdir -p "$work/data"
cp -r recipes/data/self-cognition "$work/data/"
(cd "$work" && "$bin" --log-format json run r.toml > events.jsonl)
"$venv/bin/python" scripts/monitor/check_tensorboard.py "$work" "$work/events.jsonl"
