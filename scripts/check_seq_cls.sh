#!/usr/bin/env bash
# transformers and peft load what `sft` with `task_type = "seq_cls"` writes: the folder as
# Qwen2ForSequenceClassification, the LoRA adapter (modules_to_save = ["score"]) on its base, both
# giving our logits (needs a python with torch, transformers, peft: PYTHON=/path/to/venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
PIPELINE_SEQ_CLS_CHECK_DIR="$dir" cargo test -p pipeline-stages --lib -- --ignored seq_cls_folder_for_transformers
"${PYTHON:-python3}" scripts/oracles/check_seq_cls.py "$dir"
rm -rf "$dir"
