#!/usr/bin/env bash
# Heavy check: transformers + bitsandbytes / hqq load pipeline's bnb and HQQ folders on the CPU
# (scripts/oracles/check_bnb_folder.py), in target/bnb-oracle-venv (scripts/oracles/bnb_golden.sh
# makes it; transformers 4.57.3 + accelerate added here). Without a folder argument it first
# writes the folders with `cargo test`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/bnb-oracle-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.9.1 bitsandbytes==0.50.2 hqq==0.2.8.post1 transformers==4.57.3 accelerate
dir="${1:-}"
if [ -z "$dir" ]; then
  dir="$root/target/bnb-folders"
  mkdir -p "$dir"
  (cd "$root" && PIPELINE_KEEP_EXPORT="$dir" cargo test -q -p pipeline-stages --lib quantize_bnb_and_eetq_folders)
fi
exec "$venv/bin/python" "$root/scripts/oracles/check_bnb_folder.py" "$dir"
