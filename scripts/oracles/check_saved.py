#!/usr/bin/env python3
"""Checks that transformers and peft load what pipeline-model writes.

Usage: check_saved.py <base_dir> <adapter_dir> <golden.json written by the Rust side>
The Rust test `saved_model_loads_in_transformers` (ignored; run via scripts/check_saved.sh)
writes a model folder, a LoRA adapter and the logits it computes; this script loads both with
transformers / peft and compares the logits (1e-4 relative).
"""
import json
import sys

import peft
import torch
from transformers import AutoModelForCausalLM

base, adapter, golden = sys.argv[1:4]
g = json.load(open(golden))
ids = torch.tensor([g["ids"]])
m = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
with torch.no_grad():
    got = m(ids).logits[0].reshape(-1)
want = torch.tensor(g["base_logits"])
err = ((got - want).abs() / want.abs().clamp(min=0.1 * want.abs().max())).max().item()
print("base max rel err", err)
assert err < 1e-4
pm = peft.PeftModel.from_pretrained(m, adapter).eval()
with torch.no_grad():
    got = pm(ids).logits[0].reshape(-1)
want = torch.tensor(g["lora_logits"])
err = ((got - want).abs() / want.abs().clamp(min=0.1 * want.abs().max())).max().item()
print("lora max rel err", err)
assert err < 1e-4
print("ok")
