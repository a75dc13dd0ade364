#!/usr/bin/env python3
"""Heavy check (not in CI): transformers loads the `export` stage's HF folder unchanged and agrees
with pipeline on it.

  mkdir -p /tmp/qexport && PIPELINE_KEEP_EXPORT=/tmp/qexport \\
      cargo test -p pipeline-stages --lib export::tests::hf_export_bf16
  python scripts/oracles/check_hf_export.py /tmp/qexport      # needs torch + transformers

The folder (`hf-bf16/`) is the tiny preset's export (random weights, bf16, the standard Qwen2.5
tokenizer, vocabulary expanded to 151,936 rows); `hf-bf16.pipeline.json` holds pipeline's prompt
ids, last-position logits at every trained id, argmax and 8 greedy tokens on it. Checked: the
chat template renders the same prompt and ids, logits within 1e-5 relative, same argmax, same
greedy tokens (transformers `generate`, do_sample=False).
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

root = Path(sys.argv[1])
folder = root / "hf-bf16"
ours = json.loads((root / "hf-bf16.pipeline.json").read_text())
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Who are you?"}]
text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
assert text == ours["text"], (text, ours["text"])
ids = tok(text, add_special_tokens=False).input_ids
assert ids == ours["prompt_ids"], (ids, ours["prompt_ids"])
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
    gen = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(ids):]
for t, want in zip(ours["trained_ids"], ours["logits"]):
    got = float(logits[t])
    assert abs(got - want) <= 1e-5 * max(abs(want), 1.0), (t, got, want)
assert int(logits.argmax()) == ours["argmax"]
assert gen.tolist() == ours["greedy"], (gen.tolist(), ours["greedy"])
print(f"ok: transformers {transformers.__version__} (torch {torch.__version__}) agrees: "
      f"{len(ours['trained_ids'])} logits, greedy {ours['greedy']}")
