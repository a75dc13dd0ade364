# Sourced by the *-on-device.sh scripts on the GPU machine: `G=<packed dir>; . "$G/device-setup.sh" <binary>`.
# Makes $OUT (default $G/out), records the device, sources the NVRTC header setup, installs carried
# wheels when the image lacks peft, and finds cuBLAS / NVRTC 13 beside PyTorch when <binary> lacks them.
OUT=${OUT:-$G/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
# shellcheck disable=SC1091
source "$G/setup.sh"
if ! python3 -c 'import peft' 2>/dev/null && ls "$G"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$G"/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -e "$1" ] && ldd "$1" | grep -q "not found"; then
  extra=$(python3 -c "import glob,site; print(':'.join(sorted({p.rsplit('/',1)[0] for s in site.getsitepackages() for p in glob.glob(s+'/nvidia/**/lib/lib*.so*', recursive=True)})))")
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$extra"
fi
export RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
