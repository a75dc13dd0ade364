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
# shellcheck disable=SC1091
. scripts/gpu/pack-lib.sh
pack_pipeline .gpu-recipe \
  scripts/gpu/recipe-on-device.sh scripts/gpu/make_random_qwen.py scripts/gpu/bench_sft_transformers.py scripts/gpu/sft_table.py
