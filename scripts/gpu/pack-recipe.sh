#!/usr/bin/env bash
# Builds the `pipeline` binary with CUDA and packs what scripts/gpu/recipe-on-device.sh needs into
# .gpu-recipe/ (add "/.gpu-recipe/" to .git/info/exclude once). Dev profile: dependencies are
# optimised (opt-level 3) and it shares the build with the tests; GPU time is spent in cuBLAS and
# dfdx's kernels either way.
#   NCCL_LIB=dir-with-libnccl.so.2 GPU_WHEELS=dir-with-peft-wheel scripts/gpu/pack-recipe.sh    then, with the device tool:
#   command "bash .gpu-recipe/recipe-on-device.sh", carry [".gpu-recipe"]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# shellcheck disable=SC1091
. "${PIPELINE_CUDA_ENV:-../shared/gpu/cuda-env.sh}"
# linking needs libnccl.so (cudarc's `nccl` feature, behind `cuda`): NCCL_LIB as in pack-dp.sh
if [ -n "${NCCL_LIB:-}" ]; then
  export LIBRARY_PATH="$NCCL_LIB:${LIBRARY_PATH:-}"
  [ -e "$NCCL_LIB/libnccl.so" ] || ln -sf "$NCCL_LIB"/libnccl.so.2 "$NCCL_LIB/libnccl.so"
fi
# against dfdx with scripts/gpu/dfdx-0.13.0.diff applied, in target/cuda (scripts/gpu/cargo-cuda.sh)
scripts/gpu/cargo-cuda.sh build --features cuda --bin pipeline
# shellcheck disable=SC1091
. scripts/gpu/pack-lib.sh
rm -rf .gpu-recipe
export PACK_DIR=.gpu-recipe
pack_for_device target/cuda/debug/pipeline scripts/gpu/device-setup.sh scripts/gpu/recipe-on-device.sh \
  scripts/gpu/make_random_qwen.py scripts/gpu/bench_sft_transformers.py scripts/gpu/sft_table.py
if [ -n "${GPU_WHEELS:-}" ]; then cp "$GPU_WHEELS"/*.whl .gpu-recipe/; fi
strip .gpu-recipe/pipeline 2>/dev/null || true
# The device tool moves at most 64 MiB with the tree: ship the binary xz-compressed (~13 MB);
# recipe-on-device.sh unpacks it with Python's lzma.
xz -T2 -6 -f .gpu-recipe/pipeline
du -sh .gpu-recipe
