#!/usr/bin/env bash
# Run every cargo-fuzz target (fuzz/, outside the workspace) for SECONDS each (default 600), from
# the seed corpora in fuzz/corpus/<target>; new inputs go to fuzz/work/<target>, crashes to
# fuzz/artifacts/<target>. Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain
# (or RUSTC_BOOTSTRAP=1 on stable). Prints one line per target and exits 1 if any target failed.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(recipe collect mcq_csv gguf safetensors chat_template)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
toolchain=+nightly
rustup run nightly rustc --version >/dev/null 2>&1 || { toolchain=; export RUSTC_BOOTSTRAP=1; }
failed=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t"
  # -rss_limit_mb: a recipe or file that asks for a huge allocation must be refused, not tried.
  if cargo $toolchain fuzz run -j1 "$t" "work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 >"work/$t.log" 2>&1; then
    echo "$t: ok, $(grep -o 'stat::number_of_executed_units: *[0-9]*' "work/$t.log" | grep -o '[0-9]*$') runs in ${secs}s"
  else
    failed=1
    echo "$t: FAILED (see fuzz/work/$t.log and fuzz/artifacts/$t/)"
    grep -m3 -E "panicked|ERROR: libFuzzer|SUMMARY" "work/$t.log"
  fi
done
exit $failed
