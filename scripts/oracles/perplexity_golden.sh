#!/usr/bin/env bash
# Golden values of the evaluate stage's perplexity scorer from transformers' own loss
# (scripts/oracles/perplexity_golden.py), in target/ppl-oracle-venv with pinned versions.
# ORACLE_PYTHON=/path/to/python uses an interpreter that already has exactly these versions.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
py=${ORACLE_PYTHON:-}
if [ -z "$py" ]; then
    venv="$root/target/ppl-oracle-venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.15.0 transformers==5.24.0 safetensors==0.8.0
    py=$venv/bin/python
fi
"$py" - <<'PY'
import torch, transformers
assert torch.__version__.split("+")[0] == "2.15.0" and transformers.__version__ == "5.24.0", (torch.__version__, transformers.__version__)
PY
exec "$py" "$root/scripts/oracles/perplexity_golden.py" "$@"
