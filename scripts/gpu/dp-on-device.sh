#!/usr/bin/env bash
# Data-parallel scaling on the GPU machine (issue 17), from the project root with .gpu-dp/
# (scripts/gpu/pack-dp.sh) carried there:   bash .gpu-dp/dp-on-device.sh
# For each model shape (SHAPES, default "0.5b"; "0.5b 7b" adds Qwen2.5-7B's shapes) and each world
# size N in WORLDS (default: 1 2, and 4 when 4 GPUs are visible), at a fixed per-GPU batch:
#   ours:  pipeline run --nproc-per-node N --device cuda  (LoRA SFT, NCCL all-reduce)
#   peft:  torchrun --nproc_per_node N bench_dp_peft.py   (transformers + peft, DDP)
# on the same random-weight checkpoint (make_random_qwen.py), the same synthetic chat rows, LoRA
# r=8 alpha=32 all-linear, bf16 frozen base with f32 adapters, max_length, steps. Prints a table of
# global tokens/s (non-padding tokens, the second half of the steps) and scaling efficiency
# tokens/s(N) / (N × tokens/s(1)); rows also go to $OUT/dp.tsv.
# BATCH (per GPU, default 4), STEPS (default 40), MAXLEN (default 512), ROWS (default 2048).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -x "$G/pipeline" ] && [ -e "$G/pipeline.xz" ]; then
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$G/pipeline.xz" "$G/pipeline"
  chmod +x "$G/pipeline"
fi
# shellcheck disable=SC1091
. "$G/device-setup.sh" "$G/pipeline"
P=$G/pipeline
BATCH=${BATCH:-4} STEPS=${STEPS:-40} MAXLEN=${MAXLEN:-512} ROWS=${ROWS:-2048}
ngpu=$(nvidia-smi -L | wc -l)
WORLDS=${WORLDS:-$( [ "$ngpu" -ge 4 ] && echo "1 2 4" || echo "1 2")}
status=0
DATA=$OUT/dp-rows.jsonl
python3 - "$DATA" "$ROWS" <<'PY'
import json, random, sys
random.seed(0)
words = "the model trains on several cards at once while every rank reads its own shard of the batch".split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        q = " ".join(random.choice(words) for _ in range(random.randint(20, 60)))
        a = " ".join(random.choice(words) for _ in range(random.randint(60, 180)))
        f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
PY
printf 'shape\tworld\tsystem\ttokens_per_s\n' > "$OUT/dp.tsv"
for shape in ${SHAPES:-0.5b}; do
  M=$OUT/model-$shape
  [ -e "$M/config.json" ] || timeout 900 python3 "$G/make_random_qwen.py" "$M" --shape "$shape" --tokenizer-dir stages/model/assets/qwen2.5 || { status=1; continue; }
  cat > "$OUT/dp-$shape.toml" <<TOML
[pipeline]
name = "dp-bench"
seed = 1

[stages.collect]
kind = "collect"
params = { datasets = ["$DATA"], shuffle = false }

[stages.sft]
kind = "sft"
inputs = { data = "collect.data" }
params = { model = "$M", train_type = "lora", lora_rank = 8, lora_alpha = 32, target_modules = ["all-linear"], system = "You are a helpful assistant.", learning_rate = 1e-4, max_steps = $STEPS, per_device_train_batch_size = $BATCH, gradient_accumulation_steps = 1, max_length = $MAXLEN, warmup_ratio = 0.0, split_ratio = 0.0, logging_steps = $((STEPS / 2)), save_steps = 100000, report_to = "none", torch_dtype = "bfloat16" }
TOML
  for n in $WORLDS; do
    echo "== $shape, $n GPU(s): ours"
    export PIPELINE_CACHE_DIR=/tmp/cache-dp-$shape-$n
    rm -rf "$PIPELINE_CACHE_DIR"
    timeout "${RUN_TIMEOUT:-500}" "$P" --log-format json run "$OUT/dp-$shape.toml" --device cuda --nproc-per-node "$n" \
      > "$OUT/ours-$shape-$n.jsonl" 2> "$OUT/ours-$shape-$n.err" || { status=1; tail -5 "$OUT/ours-$shape-$n.err"; }
    tps=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    e = json.loads(l)
    if e.get("stage") == "sft" and e.get("event") == "stage_finished": print(e["report"]["tokens_per_second"])' "$OUT/ours-$shape-$n.jsonl")
    printf '%s\t%s\tpipeline\t%s\n' "$shape" "$n" "${tps:-nan}" | tee -a "$OUT/dp.tsv"
    echo "== $shape, $n GPU(s): torchrun + peft DDP"
    timeout "${RUN_TIMEOUT:-500}" torchrun --standalone --nproc_per_node "$n" "$G/bench_dp_peft.py" --model "$M" --data "$DATA" \
      --batch "$BATCH" --steps "$STEPS" --max-length "$MAXLEN" > "$OUT/peft-$shape-$n.out" 2> "$OUT/peft-$shape-$n.err" || { status=1; tail -5 "$OUT/peft-$shape-$n.err"; }
    tps=$(awk -F'\t' '$1 == "tokens_per_second" {print $2}' "$OUT/peft-$shape-$n.out")
    printf '%s\t%s\ttorchrun+peft\t%s\n' "$shape" "$n" "${tps:-nan}" | tee -a "$OUT/dp.tsv"
  done
done
python3 - "$OUT/dp.tsv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
tps = {(r["shape"], r["system"], int(r["world"])): float(r["tokens_per_s"]) for r in rows}
print("\n| shape | GPUs | pipeline tokens/s | scaling | torchrun+peft tokens/s | scaling | pipeline / peft |")
print("|---|---|---|---|---|---|---|")
for (shape, system, n) in sorted({(s, "pipeline", n) for (s, _, n) in tps}):
    ours, peft = tps.get((shape, "pipeline", n), float("nan")), tps.get((shape, "torchrun+peft", n), float("nan"))
    eff = lambda sysname, v: v / (n * tps.get((shape, sysname, 1), float("nan")))
    print(f"| {shape} | {n} | {ours:.0f} | {eff('pipeline', ours):.1%} | {peft:.0f} | {eff('torchrun+peft', peft):.1%} | {ours / peft:.2f}x |")
PY
exit $status
