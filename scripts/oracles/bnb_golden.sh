#!/usr/bin/env bash
# Heavy check: make target/bnb-oracle-venv (PyPI bitsandbytes 0.50.2, hqq 0.2.8.post1, torch 2.9.1
# CPU) and regenerate stages/model/tests/fixtures/quant/golden.json with
# scripts/oracles/bnb_golden.py. The committed golden file is what `cargo test -p pipeline-model
# --test quant` compares against; re-run this only to re-derive it.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/bnb-oracle-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.9.1 bitsandbytes==0.50.2 hqq==0.2.8.post1 numpy safetensors
exec "$venv/bin/python" "$root/scripts/oracles/bnb_golden.py" "$@"
