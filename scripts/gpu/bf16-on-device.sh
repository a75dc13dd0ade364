#!/usr/bin/env bash
# bf16 frozen base weights on the GPU machine, in one call (.gpu/ from scripts/gpu/pack.sh carried):
#   bash .gpu/bf16-on-device.sh
# 1. parity on CUDA: the transformers/peft golden-value tests, `cuda_matches_cpu` (CPU vs CUDA,
#    f32) and `cuda_bf16_matches_f32` (the bf16 base against the f32 path on the same GPU);
# 2. Qwen2.5-0.5B- (BxS) and Qwen2.5-7B-shaped (7b-BxS[-gc]) LoRA steps at each of $SHAPES, ours
#    then transformers + peft from the same weights (0.5B: our bench writes them,
#    PIPELINE_BENCH_SAVE; 7B: make_random_qwen.py writes them with transformers) and data: ours with
#    the bf16 base (variants `tf32:gc[:flash[:mlp]]`, TF32 off/on for the remaining f32 products, gradient
#    checkpointing off/on, the fused flash-attention kernel on (default) / off, the fused bf16 MLP
#    on (default) / off; $VARIANTS, or
#    $VARIANTS_<entry with - as _>; default TF32 on, checkpointing as the entry says), the peer
#    with its base in bf16 + autocast ($PEER_PRECISIONS, default bf16base; bf16 = f32 base +
#    autocast), gradient checkpointing as the entry says. Every step's loss is printed on both sides.
# Logs to $OUT (or .gpu/out).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC1091
. "$G/device-setup.sh" "$G/model-tests"
export PIPELINE_TEST_FIXTURES=$G/fixtures
W=${WEIGHTS_DIR:-/tmp/pipeline-bench-weights}
status=0
if [ "${PARITY:-1}" = 1 ]; then
  echo "== parity on cuda"
  PIPELINE_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-150}" "$G/model-tests" --test-threads 1 --nocapture \
    > "$OUT/parity.log" 2>&1 || status=1
  for t in ${PARITY_TESTS:-cuda_matches_cpu cuda_bf16_matches_f32 cuda_flash_attention_matches_dfdx_attention cuda_fused_mlp_matches_unfused}; do
    PIPELINE_TEST_DEVICE=cuda timeout "${PARITY_TIMEOUT:-150}" "$G/model-tests" --ignored "$t" --nocapture \
      >> "$OUT/parity.log" 2>&1 || status=1
  done
  grep -E "^test |test result|cuda vs cpu|bf16 vs f32|flash vs dfdx|fused vs|checkpointing|panicked|assert" "$OUT/parity.log" | tee "$OUT/parity-summary.log" | head -60
  gzip -f "$OUT/parity.log"
fi
# SHAPES entries: BxS (Qwen2.5-0.5B shape), 7b-BxS (Qwen2.5-7B shape, from a checkpoint that
# transformers writes here first), a "-gc" suffix: gradient checkpointing on both sides.
for entry in ${SHAPES:-8x512 4x2048}; do
  model=Qwen2.5-0.5B; shape=$entry; gc=0
  case $shape in 7b-*) model=Qwen2.5-7B; shape=${shape#7b-};; esac
  case $shape in *-gc) gc=1; shape=${shape%-gc};; esac
  b=${shape%x*}; s=${shape#*x}
  if [ "$model" = Qwen2.5-7B ] && [ ! -f "$W/Qwen2.5-7B-shape/config.json" ]; then
    echo "== writing a random Qwen2.5-7B-shaped checkpoint (transformers, bf16) to $W"
    t0=$(date +%s)
    python3 "$G/make_random_qwen.py" "$W/Qwen2.5-7B-shape" --shape 7b 2>&1 | tail -2 || status=1
    echo "   ($(( $(date +%s) - t0 )) s)"
  fi
  export PIPELINE_BENCH_DEVICE=cuda PIPELINE_BENCH_BATCH=$b PIPELINE_BENCH_SEQ=$s PIPELINE_BENCH_REPS=${REPS:-19} \
    PIPELINE_BENCH_GEN=0 PIPELINE_BENCH_MODELS=$model PIPELINE_BENCH_SAVE=$W
  var=VARIANTS_${entry//-/_}
  for v in ${!var:-${VARIANTS:-1:$gc}}; do
    IFS=: read -r tf32 vgc flash mlp <<< "$v"; flash=${flash:-1}; mlp=${mlp:-1}
    echo "== [$entry] ours: bf16 base, TF32 $tf32, gradient checkpointing $vgc, flash attention $flash, fused MLP $mlp"
    PIPELINE_BENCH_DTYPE=bf16 PIPELINE_BENCH_TF32=$tf32 PIPELINE_BENCH_GC=$vgc PIPELINE_BENCH_FLASH=$flash \
      PIPELINE_BENCH_FUSED_MLP=$mlp timeout "${BENCH_TIMEOUT:-150}" "$G/throughput" 2>&1 \
      | sed "s/bf16 base/bf16 base, TF32 $tf32, flash $flash, mlp $mlp/" | tee -a "$OUT/bench-dfdx.log" \
      | grep -E "LoRA|MFU|memory|loss step (1|2|20) |kernels|attention|weights|read|panicked|rror" || status=1
  done
  [ "${PEER:-1}" = 1 ] || continue
  echo "== [$entry] transformers + peft (gradient checkpointing $gc)"
  gcflag=(); [ "$gc" = 1 ] && gcflag=(--gc)
  timeout "${PEER_TIMEOUT:-200}" python3 "$G/bench_transformers.py" --batch "$b" --seq "$s" --gen 0 \
    --reps "${REPS:-19}" --models "$model" --precisions "${PEER_PRECISIONS:-bf16base}" --weights "$W" "${gcflag[@]}" 2>&1 \
    | grep -E "Qwen2.5|^#|rror" | grep -viE "forward" | sed "s/LoRA SFT step \[/LoRA SFT step (gc $gc) [/" \
    | tee -a "$OUT/bench-transformers.log" \
    | grep -E "LoRA|MFU|memory|allocated|loss step (1|2|20) |^#|rror" || status=1
done
if [ -n "${PROFILE:-}" ]; then
  # where the time of our step goes, per section of the forward and backward (the throughput
  # bench with PIPELINE_PROFILE=1: markers synchronise the device after each section). nsys is
  # not usable on this machine: its only copy (inside nsight-compute) cannot import its traces.
  for entry in $PROFILE; do
    model=Qwen2.5-0.5B; shape=$entry; gc=0
    case $shape in 7b-*) model=Qwen2.5-7B; shape=${shape#7b-};; esac
    case $shape in *-gc) gc=1; shape=${shape%-gc};; esac
    b=${shape%x*}; s=${shape#*x}
    echo "== profile: ours [$entry], bf16 base, TF32"
    PIPELINE_PROFILE=1 PIPELINE_BENCH_DEVICE=cuda PIPELINE_BENCH_BATCH=$b PIPELINE_BENCH_SEQ=$s PIPELINE_BENCH_REPS=5 \
      PIPELINE_BENCH_GEN=0 PIPELINE_BENCH_MODELS=$model PIPELINE_BENCH_DTYPE=bf16 PIPELINE_BENCH_TF32=1 \
      PIPELINE_BENCH_GC=$gc PIPELINE_BENCH_SAVE=$W timeout 200 "$G/throughput" 2>&1 | tee "$OUT/profile-$entry.log" \
      | sed -n '/where a step/,/^total/p'
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$OUT/device.txt"
exit $status
