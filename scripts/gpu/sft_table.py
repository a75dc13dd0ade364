#!/usr/bin/env python3
"""Join our sft stage's figures (pipeline run --log-format json of the real recipe, its
metrics.jsonl, the sampled nvidia-smi peak) and bench_sft_transformers.py's lines into a table.

usage: sft_table.py REAL_JSONL MEM_OURS_FILE TRANSFORMERS_LOG [SFT_METRICS_JSONL]
"""
import json
import sys
from pathlib import Path

events = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
sft = next((e for e in events if e.get("stage") == "sft" and e.get("report")), None)
ours = {}
if sft:
    rep = sft["report"]
    ours["seconds (stage)"] = sft["duration_ms"] / 1000
    mfile = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(rep.get("metrics_dir", "")) / "metrics.jsonl"
    train = [json.loads(line) for line in open(mfile)] if mfile.is_file() else []
    train = [r for r in train if r.get("type") == "train"]
    if len(train) > 1:
        ours["tokens_per_second"] = sum(r["tokens_per_second"] for r in train[1:]) / len(train[1:])
    if train:
        ours["tokens_per_second_first_window"] = train[0]["tokens_per_second"]
        ours["optimizer_steps"] = train[-1]["step"]
    ours["rows"] = rep.get("rows")
    ours.setdefault("tokens_per_second_last_window", rep.get("tokens_per_second"))
try:
    ours["peak_gpu_memory_mib_nvidia_smi"] = float(open(sys.argv[2]).read().strip())
except (OSError, ValueError):
    pass
theirs = {}
for line in open(sys.argv[3]):
    parts = line.rstrip("\n").split("\t")
    if len(parts) == 4 and parts[0] == "sft":
        theirs[parts[2]] = float(parts[3])
print("| metric | pipeline (dfdx f32) | transformers + peft (f32) |")
print("|---|---|---|")
for k in ["tokens_per_second", "peak_gpu_memory_mib_nvidia_smi", "peak_torch_allocated_mib", "optimizer_steps", "rows",
          "tokens_per_second_first_window", "tokens_per_second_last_window", "tokens_per_second_incl_first_step", "seconds (stage)", "train_seconds"]:
    a, b = ours.get(k, ""), theirs.get(k, "")
    fmt = lambda v: f"{v:,.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    if a != "" or b != "":
        print(f"| {k} | {fmt(a)} | {fmt(b)} |")
