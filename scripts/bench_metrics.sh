#!/usr/bin/env bash
# Metric throughput: pipeline-metrics (release) vs evalscope 1.14.1's own functions, same 334 golden
# pairs (stages/metrics/tests/fixtures/metrics_golden.jsonl), one thread each.
# Needs the oracle venv of scripts/oracles/metrics_golden.py (VENV, default /work/venv-metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/work/venv-metrics}
rust=$(cargo bench -q -p pipeline-metrics --bench metrics_throughput 2>/dev/null | grep pairs_per_s)
py=$("$VENV/bin/python" scripts/oracles/metrics_golden.py --bench --repeat "${PY_REPEAT:-3}" 2>/dev/null | grep pairs_per_s)
echo "rust:      $rust"
echo "evalscope: $py"
python3 - "$rust" "$py" <<'PY'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"speed-up: {r['pairs_per_s'] / p['pairs_per_s']:.1f}x")
PY
