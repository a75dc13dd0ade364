#!/usr/bin/env bash
# Builds pipeline-model's CUDA test and bench binaries (release) and packs everything the GPU
# machine needs into .gpu/ (add "/.gpu/" to .git/info/exclude once):
#   model-tests, throughput        test and bench binaries (--features cuda)
#   setup.sh, headers.tgz          from ../shared/gpu/pack-for-device.sh (NVRTC headers at their build paths)
#   fixtures/                      stages/model/tests/fixtures (the binaries read $PIPELINE_TEST_FIXTURES)
#   run-on-device.sh, bench_transformers.py, table.py, make_random_qwen.py (the 7B-shaped checkpoint)
#   *.whl                          optional: wheels in $GPU_WHEELS (e.g. peft, if the GPU image lacks it)
# Usage, from the project root: scripts/gpu/pack.sh   then see scripts/gpu/README.md.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# shellcheck disable=SC1091
. "${PIPELINE_CUDA_ENV:-../shared/gpu/cuda-env.sh}"
# shellcheck disable=SC1091
. scripts/gpu/pack-lib.sh
exe() { # executable of the cargo target named $1 in the JSON messages on stdin
  python3 -c 'import json,sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" | tail -n1
}
# against dfdx with scripts/gpu/dfdx-0.13.0.diff applied, in target/cuda (scripts/gpu/cargo-cuda.sh)
tests=$(scripts/gpu/cargo-cuda.sh test -p pipeline-model --features cuda --release --no-run --message-format=json | exe model)
bench=$(scripts/gpu/cargo-cuda.sh bench -p pipeline-model --features cuda --bench throughput --no-run --message-format=json | exe throughput)
tmp=$(mktemp -d)
cp "$tests" "$tmp/model-tests"
cp "$bench" "$tmp/throughput"
rm -rf .gpu
pack_for_device "$tmp/model-tests" "$tmp/throughput" \
  scripts/gpu/device-setup.sh scripts/gpu/run-on-device.sh scripts/gpu/kernels-on-device.sh scripts/gpu/bf16-on-device.sh scripts/gpu/bench_transformers.py scripts/gpu/table.py scripts/gpu/make_random_qwen.py
rm -rf "$tmp"
cp -r stages/model/tests/fixtures .gpu/fixtures
if [ -n "${GPU_WHEELS:-}" ]; then cp "$GPU_WHEELS"/*.whl .gpu/; fi
du -sh .gpu
