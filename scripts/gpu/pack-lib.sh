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
