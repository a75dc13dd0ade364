#!/usr/bin/env bash
# Builds the `pipeline` binary with CUDA (and NCCL) and packs what scripts/gpu/dp-on-device.sh
# needs into .gpu-dp/ (add "/.gpu-dp/" to .git/info/exclude once). Then, with the device tool, on a
# kind with 2 or 4 GPUs:   command "bash .gpu-dp/dp-on-device.sh", carry [".gpu-dp"]
# Linking needs libnccl.so: cudarc's `nccl` feature links `-lnccl`. Point NCCL_LIB at a folder
# holding it (e.g. the nvidia-nccl-cu13 wheel's nvidia/nccl/lib, unpacked), as the PyTorch on the
# GPU machine ships the same library at run time.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# shellcheck disable=SC1091
. "${PIPELINE_CUDA_ENV:-../shared/gpu/cuda-env.sh}"
# shellcheck disable=SC1091
. scripts/gpu/pack-lib.sh
pack_pipeline .gpu-dp \
  scripts/gpu/dp-on-device.sh scripts/gpu/make_random_qwen.py scripts/gpu/bench_dp_peft.py
