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
if [ -n "${NCCL_LIB:-}" ]; then
  export LIBRARY_PATH="$NCCL_LIB:${LIBRARY_PATH:-}"
  [ -e "$NCCL_LIB/libnccl.so" ] || ln -sf "$NCCL_LIB"/libnccl.so.2 "$NCCL_LIB/libnccl.so"
fi
scripts/gpu/cargo-cuda.sh build --features cuda --bin pipeline
# shellcheck disable=SC1091
. scripts/gpu/pack-lib.sh
rm -rf .gpu-dp
export PACK_DIR=.gpu-dp
pack_for_device target/cuda/debug/pipeline scripts/gpu/device-setup.sh scripts/gpu/dp-on-device.sh \
  scripts/gpu/make_random_qwen.py scripts/gpu/bench_dp_peft.py
if [ -n "${GPU_WHEELS:-}" ]; then cp "$GPU_WHEELS"/*.whl .gpu-dp/; fi
strip .gpu-dp/pipeline 2>/dev/null || true
xz -T2 -6 -f .gpu-dp/pipeline
du -sh .gpu-dp
