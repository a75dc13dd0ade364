#!/usr/bin/env bash
# The training recipes on the GPU machine (issue 5), from the project root with .gpu-recipe/
# (scripts/gpu/pack-recipe.sh) carried there:   bash .gpu-recipe/recipe-on-device.sh
# 1. recipes/qwen-self-cognition.toml with --device cuda, cold then warm, in a fresh cache, and the
#    trained model's answers (`pipeline generate --recipe`);
# 2. recipes/qwen-self-cognition-real.toml (the seed's values: LoRA SFT, then DPO, then evaluate) with
#    --device cuda on a random-weight checkpoint of Qwen2.5-7B-Instruct's shapes, made by
#    transformers (make_random_qwen.py --shape 7b); GPU memory sampled with nvidia-smi while it runs,
#    each stage's time from the run's JSON log;
# 3. transformers + peft on the same model folder, data and hyper-parameters (bench_sft_transformers.py);
# 4. a table of both (sft_table.py). Logs and the table go to $OUT (or .gpu-recipe/out).
# STEPS picks parts (default "headline real"): `real` does 2, `bench` 3-4 (on the same checkpoint).
set -uo pipefail
G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -x "$G/pipeline" ] && [ -e "$G/pipeline.xz" ]; then
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$G/pipeline.xz" "$G/pipeline"
  chmod +x "$G/pipeline"
fi
# shellcheck disable=SC1091
. "$G/device-setup.sh" "$G/pipeline"
P=$G/pipeline
status=0
sample_mem() { # largest nvidia-smi memory.used (MiB) until the file $1.stop appears
  local peak=0 v
  while [ ! -e "$1.stop" ]; do
    v=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | tr -d ' ')
    [ -n "$v" ] && echo "$EPOCHREALTIME $v" >> "$1.trace"
    [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v && echo "$peak" > "$1"
    sleep 0.2
  done
}

M=recipes/models/Qwen2.5-7B-Instruct
make_model() {
  [ -e "$M/config.json" ] || timeout 300 python3 "$G/make_random_qwen.py" "$M" --shape "${REAL_SHAPE:-7b}" \
    --tokenizer-dir stages/model/assets/qwen2.5 || status=1
}

headline() {
echo "== 1. headline recipe, --device cuda (fresh cache)"
export PIPELINE_CACHE_DIR=/tmp/cache-headline
rm -rf "$PIPELINE_CACHE_DIR"
s=$EPOCHREALTIME
timeout "${HEADLINE_TIMEOUT:-280}" "$P" run recipes/qwen-self-cognition.toml --device cuda --log-format json > "$OUT/headline-cold.jsonl" 2> "$OUT/headline-cold.err" || status=1
e=$EPOCHREALTIME; echo "cold: $(awk "BEGIN{print $e - $s}") s"
tail -3 "$OUT/headline-cold.err"
s=$EPOCHREALTIME
"$P" run recipes/qwen-self-cognition.toml --device cuda 2>&1 | tail -2
e=$EPOCHREALTIME; echo "warm: $(awk "BEGIN{print $e - $s}") s"
for q in "Who are you?" "你是谁？"; do
  echo "generate: $q"; "$P" generate --recipe recipes/qwen-self-cognition.toml --prompt "$q" --max-tokens 40 2>&1 | tail -2
done

}

real() {
echo "== 2. real-checkpoint recipe (random Qwen2.5-${REAL_SHAPE:-7b} shapes), --device cuda"
make_model
export PIPELINE_CACHE_DIR=/tmp/cache-real
rm -rf "$PIPELINE_CACHE_DIR" "$OUT/mem-ours" "$OUT/mem-ours.stop" "$OUT/mem-ours.trace"
sample_mem "$OUT/mem-ours" & sampler=$!
s=$EPOCHREALTIME
timeout "${REAL_TIMEOUT:-540}" "$P" run recipes/qwen-self-cognition-real.toml --device cuda --log-format json \
  > "$OUT/real.jsonl" 2> "$OUT/real.err" || status=1
e=$EPOCHREALTIME; echo "real recipe: $(awk "BEGIN{print $e - $s}") s"
touch "$OUT/mem-ours.stop"; wait $sampler; rm -f "$OUT/mem-ours.stop"
tail -3 "$OUT/real.err"
d=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    e = json.loads(l) if l.startswith("{") else {}
    if e.get("stage") == "sft" and e.get("outputs"): print(e["outputs"]["metrics"])' "$OUT/real.jsonl")
[ -n "$d" ] && cp "$PIPELINE_CACHE_DIR/v1/artifacts/$d/metrics.jsonl" "$OUT/sft-metrics.jsonl"
echo "peak GPU memory (nvidia-smi): $(cat "$OUT/mem-ours" 2>/dev/null) MiB"
grep -hE 'elapsed_ms' "$OUT/real.jsonl" "$OUT/real.err" | cut -c1-400 | tail -12   # each stage's time
gzip -kf "$OUT/mem-ours.trace" 2>/dev/null   # "unix-time MiB" samples, to read each stage's peak
}

bench() {
make_model
echo "== 3. transformers + peft, same model, data and hyper-parameters"
timeout 300 python3 "$G/bench_sft_transformers.py" --model "$M" --assets stages/assets 2>&1 | tee "$OUT/sft-transformers.log" || status=1

[ -e "$OUT/real.jsonl" ] && python3 "$G/sft_table.py" "$OUT/real.jsonl" "$OUT/mem-ours" "$OUT/sft-transformers.log" "$OUT/sft-metrics.jsonl" | tee "$OUT/sft_table.md"
}

for step in ${STEPS:-headline real}; do "$step"; done
exit $status
