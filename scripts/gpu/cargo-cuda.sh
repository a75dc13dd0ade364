#!/usr/bin/env bash
# `cargo "$@"` against the patched dfdx (scripts/gpu/patch-dfdx.sh), in its own target directory
# (target/cuda) so the CPU build is untouched, with Cargo.lock restored afterwards.
# Examples: scripts/gpu/cargo-cuda.sh check -p pipeline-model --features cuda,dfdx/ci-check
#           scripts/gpu/cargo-cuda.sh build --release --features cuda
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cfg="$("$root/scripts/gpu/patch-dfdx.sh")"
cp "$root/Cargo.lock" "$root/target/patched/Cargo.lock.orig"
trap 'cp "$root/target/patched/Cargo.lock.orig" "$root/Cargo.lock"' EXIT
cd "$root"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}" cargo --config "$cfg" "$@"
