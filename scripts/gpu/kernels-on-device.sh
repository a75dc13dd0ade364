#!/usr/bin/env bash
# The LoRA-step kernels on the GPU machine, in one call (.gpu/ from scripts/gpu/pack.sh carried):
#   bash .gpu/kernels-on-device.sh
# 1. parity on CUDA (transformers/peft golden values; the LoRA test also runs the fused head), and
#    CPU vs CUDA (`cuda_matches_cpu`);
# 2. Qwen2.5-0.5B-shaped LoRA step at each of $SHAPES: ours with the frozen-weight products and
#    the fused head (TF32 off, then on), ours with dfdx's reference ops (PIPELINE_REFERENCE_KERNELS=1,
#    what ran before), then transformers + peft (f32, bf16 autocast) on the same card.
# Logs to $OUT (or .gpu/out).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC1091
. "$G/device-setup.sh" "$G/model-tests"
export PIPELINE_TEST_FIXTURES=$G/fixtures
status=0
if [ "${PARITY:-1}" = 1 ]; then
echo "== parity on cuda"
PIPELINE_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-150}" "$G/model-tests" --test-threads 1 --nocapture \
  > "$OUT/parity.log" 2>&1 || status=1
PIPELINE_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-150}" "$G/model-tests" --ignored cuda_matches_cpu --nocapture \
  >> "$OUT/parity.log" 2>&1 || status=1
grep -E "^test |test result|lora loss|cuda vs cpu|panicked" "$OUT/parity.log" | head -60
fi
for shape in ${SHAPES:-8x256 8x512}; do
  b=${shape%x*}; s=${shape#*x}
  export PIPELINE_BENCH_DEVICE=cuda PIPELINE_BENCH_BATCH=$b PIPELINE_BENCH_SEQ=$s PIPELINE_BENCH_REPS=${REPS:-3} PIPELINE_BENCH_GEN=0 PIPELINE_BENCH_MODELS=Qwen2.5
  echo "== [$shape] ours: fused kernels, TF32 off / on; reference kernels"
  timeout "${BENCH_TIMEOUT:-200}" "$G/throughput" 2>&1 | grep -E "LoRA|kernels" | tee -a "$OUT/bench-dfdx.log" || status=1
  PIPELINE_BENCH_TF32=1 timeout "${BENCH_TIMEOUT:-200}" "$G/throughput" 2>&1 | grep -E "LoRA|kernels" | sed 's/fused kernels/fused kernels, TF32/' | tee -a "$OUT/bench-dfdx.log" || status=1
  PIPELINE_REFERENCE_KERNELS=1 timeout "${BENCH_TIMEOUT:-200}" "$G/throughput" 2>&1 | grep -E "LoRA|kernels" | tee -a "$OUT/bench-dfdx.log" || status=1
  echo "== [$shape] transformers + peft"
  timeout "${BENCH_TIMEOUT:-300}" python3 "$G/bench_transformers.py" --batch "$b" --seq "$s" --gen 0 --reps "${REPS:-3}" 2>&1 \
    | grep -E "Qwen2.5|^#" | grep -iE "lora|memory|^#" | tee -a "$OUT/bench-transformers.log" || status=1
done
exit $status
