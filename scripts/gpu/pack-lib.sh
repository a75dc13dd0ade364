# Sourced by scripts/gpu/pack*.sh (after cuda-env.sh): `pack_for_device FILE...` fills $PACK_DIR
# (default .gpu/; pack-recipe.sh and pack-dp.sh use their own, so one pack never removes another).
# ../shared/gpu/pack-for-device.sh looks for dfdx's NVRTC headers under target/*/build, but the
# patched CUDA build lives in target/cuda/<profile>/build: the same steps with that path.
pack_for_device() {
  local dir=${PACK_DIR:-.gpu}
  mkdir -p "$dir"
  cp -f "$@" "$dir/"
  outs=$(for d in target/cuda/*/build/dfdx-*/out; do ls "$d"/*.cuh >/dev/null 2>&1 && (cd "$d" && pwd); done)
  # shellcheck disable=SC2086
  tar czf "$dir/headers.tgz" -P "$CUDA_ROOT/include" $outs
  cat > "$dir/setup.sh" <<'EOS'
# Sourced on the GPU machine.
tar xzf "$(dirname "${BASH_SOURCE[0]}")/headers.tgz" -P
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
EOS
}

# `pack_pipeline DIR FILE...`: builds the `pipeline` binary with CUDA (dev profile, against the
# patched dfdx in target/cuda) and packs it with FILE... into DIR (replaced), plus any wheels in
# $GPU_WHEELS. Linking needs libnccl.so (cudarc's `nccl` feature, behind `cuda`): $NCCL_LIB names
# a folder holding libnccl.so.2 (e.g. the nvidia-nccl-cu13 wheel's nvidia/nccl/lib). The device
# tool moves at most 64 MiB with the tree, so the binary ships xz-compressed (~13 MB); the
# on-device scripts unpack it with Python's lzma.
pack_pipeline() {
  local dir=$1
  shift
  if [ -n "${NCCL_LIB:-}" ]; then
    export LIBRARY_PATH="$NCCL_LIB:${LIBRARY_PATH:-}"
    [ -e "$NCCL_LIB/libnccl.so" ] || ln -sf "$NCCL_LIB"/libnccl.so.2 "$NCCL_LIB/libnccl.so"
  fi
  scripts/gpu/cargo-cuda.sh build --features cuda --bin pipeline
  rm -rf "$dir"
  PACK_DIR=$dir pack_for_device target/cuda/debug/pipeline scripts/gpu/device-setup.sh "$@"
  if [ -n "${GPU_WHEELS:-}" ]; then cp "$GPU_WHEELS"/*.whl "$dir/"; fi
  strip "$dir/pipeline" 2>/dev/null || true
  xz -T2 -6 -f "$dir/pipeline"
  du -sh "$dir"
}
