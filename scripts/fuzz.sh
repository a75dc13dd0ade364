#!/usr/bin/env bash
# Run every cargo-fuzz target (fuzz/, outside the workspace) for SECONDS each (default 600), from
# the seed corpora in fuzz/corpus/<target>; new inputs go to fuzz/work/<target>, crashes to
# fuzz/artifacts/<target>. Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain
# (or RUSTC_BOOTSTRAP=1 on stable).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      FUZZ_JOBS=2 targets at a time (default 2)
#   FUZZ_BIN_DIR=DIR scripts/fuzz.sh ...       run binaries built earlier (`cargo fuzz build -O -a`,
#                                              fuzz/target/<triple>/release/) on a machine without cargo
#
# Everything runs under `nice -n 10`. Built in release with debug assertions and overflow checks
# (`-O -a`) and AddressSanitizer; `-rss_limit_mb=2048` (which is also libFuzzer's per-allocation
# limit) so that a file or recipe that asks for a huge allocation is a finding, not a swap storm;
# `-timeout=20` so that an input that takes longer is reported as a hang.
# Prints one line per target (executions, seconds, findings) and exits 1 if any target failed.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(gguf safetensors mcq_csv chat_template recipe_engine recipe collect)
jobs=${FUZZ_JOBS:-2}
bindir=${FUZZ_BIN_DIR:-}
libfuzzer_args() { echo -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1; }
flags=(-O -a)
# The recipe and collect targets need the stage registry (feature `stages`: polars, the trainer),
# recipe_engine only the engine (feature `engine`); the others neither. Every target is built
# before any runs.
seeds() { if [ "$1" = recipe_engine ]; then echo corpus/recipe; else echo "corpus/$1"; fi; }
features() { case "$1" in recipe | collect) echo --features stages ;; recipe_engine) echo --features engine ;; esac; }
# dfdx 0.13's build script turns on its `nightly` feature when rustc says "nightly", and that code
# no longer compiles on a current nightly (E0310 in nn/conv.rs). The fuzz build uses a copy of the
# crate from cargo's registry (unpacked by any build of the main workspace) with that call
# removed, through an ignored fuzz/.cargo/config.toml patch; nothing of dfdx is committed.
patch_dfdx() {
  local src dst=target/dfdx-no-nightly
  [ -f "$dst/build.rs" ] && [ -f .cargo/config.toml ] && return 0
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/dfdx-0.13.0 2>/dev/null | head -1)
  [ -n "$src" ] || { echo "dfdx-0.13.0 is not unpacked in cargo's registry: build the main workspace first" >&2; exit 1; }
  mkdir -p target .cargo
  rm -rf "$dst" && cp -r "$src" "$dst"
  sed -i 's/^    maybe_enable_nightly();/    \/\/ maybe_enable_nightly(); (removed by scripts\/fuzz.sh)/' "$dst/build.rs"
  printf '[patch.crates-io]\ndfdx = { path = "%s" }\n' "$dst" > .cargo/config.toml
}
if [ -z "$bindir" ]; then
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
  toolchain=+nightly
  rustup run nightly rustc --version >/dev/null 2>&1 || { toolchain=; export RUSTC_BOOTSTRAP=1; }
  patch_dfdx
  for t in "${targets[@]}"; do
    nice -n 10 cargo $toolchain fuzz build "${flags[@]}" $(features "$t") "$t" || exit 1
  done
fi

run_one() {
  local t=$1
  mkdir -p "work/$t"
  local t0=$SECONDS
  local cmd
  if [ -n "$bindir" ]; then
    mkdir -p "artifacts/$t"
    cmd=(nice -n 10 "$bindir/$t" -artifact_prefix="artifacts/$t/" "work/$t" "$(seeds "$t")" $(libfuzzer_args))
  else
    cmd=(nice -n 10 cargo $toolchain fuzz run "${flags[@]}" $(features "$t") "$t" "work/$t" "$(seeds "$t")" -- $(libfuzzer_args))
  fi
  if "${cmd[@]}" >"work/$t.log" 2>&1; then
    echo "$t: ok, $(grep -o 'stat::number_of_executed_units: *[0-9]*' "work/$t.log" | grep -o '[0-9]*$') executions in $((SECONDS - t0))s, 0 findings," \
      "corpus $(ls "work/$t" | wc -l) inputs"
  else
    echo "$t: FAILED after $((SECONDS - t0))s (see fuzz/work/$t.log and fuzz/artifacts/$t/)"
    grep -m5 -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written" "work/$t.log"
    return 1
  fi
}

failed=0
pids=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done
exit $failed
