#!/usr/bin/env bash
# What the GPU machine runs, from the project root with .gpu/ (scripts/gpu/pack.sh) copied there:
#   bash .gpu/run-on-device.sh          (device tool: command "bash .gpu/run-on-device.sh", carry [".gpu"])
# 1. parity: the pipeline-model tests with PIPELINE_TEST_DEVICE=cuda (transformers golden values on
#    the GPU), then the ignored `cuda_matches_cpu` (CPU vs CUDA within 1e-3);
# 2. throughput: our bench on the GPU, then transformers + peft on the same shapes and card;
# 3. a Markdown table of both. Logs and the table go to $OUT (or .gpu/out).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC1091
. "$G/device-setup.sh" "$G/model-tests"
ldd "$G/model-tests" | grep -E "cuda|cublas|nvrtc"
export PIPELINE_TEST_FIXTURES=$G/fixtures
status=0
echo "== parity on cuda"
PIPELINE_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-150}" "$G/model-tests" --test-threads 1 --nocapture \
  > "$OUT/parity.log" 2>&1 || status=1
PIPELINE_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-150}" "$G/model-tests" --ignored cuda_matches_cpu --nocapture \
  >> "$OUT/parity.log" 2>&1 || status=1
grep -E "^test |test result|max rel err|cuda vs cpu|panicked" "$OUT/parity.log" | head -80
echo "== bench: dfdx on cuda"
PIPELINE_BENCH_DEVICE=cuda PIPELINE_BENCH_REPS=${REPS:-3} timeout "${BENCH_TIMEOUT:-200}" "$G/throughput" 2>&1 \
  | tee "$OUT/bench-dfdx.log" || status=1
echo "== bench: transformers + peft"
timeout "${BENCH_TIMEOUT:-200}" python3 "$G/bench_transformers.py" --reps "${REPS:-3}" 2>&1 \
  | tee "$OUT/bench-transformers.log" || status=1
python3 "$G/table.py" "$OUT/bench-dfdx.log" "$OUT/bench-transformers.log" | tee "$OUT/table.md"
exit $status
