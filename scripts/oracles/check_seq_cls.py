#!/usr/bin/env python3
"""transformers + peft read the sft stage's seq_cls outputs (scripts/check_seq_cls.sh writes them).

argv[1] holds cls/ (our Qwen2ForSequenceClassification folder, with adapter/), base/ (the model
before training, a Qwen2ForCausalLM folder) and golden.json (our logits on right-padded rows).
Checks: AutoModelForSequenceClassification on cls/ and PeftModel(base + cls/adapter) give our
logits; the adapter's head is peft's modules_to_save tensor.
Pinned: torch 2.15.0, transformers 5.24.0, peft 0.21.2.
"""
import json
import os
import sys

import peft
import torch
import transformers
from transformers import AutoModelForSequenceClassification

root = sys.argv[1]
g = json.load(open(os.path.join(root, "golden.json")))
rows, pad = g["rows"], g["pad"]
L = max(len(r) for r in rows)
ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])
am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
want = torch.tensor(g["logits"]).reshape(len(rows), -1)


def check(name, model):
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am).logits.float()
    worst = (got - want).abs().max().item()
    print(f"{name}: max |Δlogit| {worst:.2e}")
    assert worst < 1e-4, (name, got, want)


cls = AutoModelForSequenceClassification.from_pretrained(os.path.join(root, "cls"), dtype=torch.float32).eval()
assert type(cls).__name__ == "Qwen2ForSequenceClassification", type(cls)
assert cls.config.num_labels == want.shape[1] and cls.config.problem_type == "single_label_classification"
check("Qwen2ForSequenceClassification", cls)

base = AutoModelForSequenceClassification.from_pretrained(
    os.path.join(root, "base"), num_labels=want.shape[1], pad_token_id=pad, dtype=torch.float32
)
model = peft.PeftModel.from_pretrained(base, os.path.join(root, "cls", "adapter")).eval()
check("PeftModel(base, adapter)", model)
check("merge_and_unload", model.merge_and_unload())
print(f"ok (torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})")
