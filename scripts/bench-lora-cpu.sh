#!/usr/bin/env bash
# The CPU LoRA step over the full Qwen2.5 vocabulary, ours and transformers + peft in one call:
#   scripts/bench-lora-cpu.sh            (first run makes target/bench-venv from PyPI: torch, transformers, peft)
# Rows: our `throughput` bench (release) with the fused head and frozen-weight products, then with
# dfdx's reference ops (PIPELINE_REFERENCE_KERNELS=1: what the model ran before), then the peer with
# glibc's default allocator and with it tuned to keep freed memory (no mmap, no trim). Each figure is
# tokens/s (wall) and tokens per CPU-second (robust on a busy machine). Results: scripts/bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BENCH_VENV:-target/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers peft
fi
bench=$(cargo bench -p pipeline-model --bench throughput --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "throughput":
        print(m["executable"])' | tail -n1)
echo "# $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg) at start"
"$bench" | grep "LoRA SFT step"
PIPELINE_REFERENCE_KERNELS=1 "$bench" | grep "LoRA SFT step"
BENCH_TAG=" (glibc default)" "$venv/bin/python" scripts/bench/lora_step_peer.py 8 64 3 2>/dev/null
BENCH_TAG=" (glibc tuned)" GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295 \
  "$venv/bin/python" scripts/bench/lora_step_peer.py 8 64 3 2>/dev/null
echo "# load $(cut -d' ' -f1 /proc/loadavg) at end"
