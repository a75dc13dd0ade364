#!/usr/bin/env bash
# transformers/peft load what pipeline-model saves (needs a python with torch, transformers, peft:
# PYTHON=/path/to/venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
PIPELINE_SAVE_CHECK_DIR="$dir" cargo test -p pipeline-model --test model -- --ignored saved_model_loads_in_transformers
"${PYTHON:-python3}" scripts/oracles/check_saved.py "$dir/base" "$dir/adapter" "$dir/golden.json"
rm -rf "$dir"
