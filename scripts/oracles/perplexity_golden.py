#!/usr/bin/env python3
"""Golden values for the evaluate stage's `perplexity` scorer (stages/src/evaluate_model.rs,
`perplexity_equals_transformers_loss_on_the_tiny_model`), from transformers' own loss.

The model is the committed random Qwen2 fixture stages/model/tests/fixtures/qwen2_tiny (vocab 256,
so a text's bytes are its token ids). The text is cut as llama.cpp's `perplexity` tool cuts it
(pipeline_metrics::perplexity): windows of N_CTX tokens, the first half context only; each
window's NLL is transformers' `loss` with the labels of the first N_CTX/2 + 1 positions set to
-100 (so the tokens N_CTX/2 + 1 .. N_CTX are scored) times the tokens scored, equal (1e-6) to the
sum of the float64 log-softmax at those positions, which is what is written.
Writes stages/model/tests/fixtures/perplexity_golden.json. Run by scripts/oracles/perplexity_golden.sh.
"""
import json
import math
import os
import sys

import torch
import transformers
from transformers import Qwen2ForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FIX = os.path.join(ROOT, "stages", "model", "tests", "fixtures")
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(FIX, "perplexity_golden.json")
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow."
)
N_CTX = 16

model = Qwen2ForCausalLM.from_pretrained(os.path.join(FIX, "qwen2_tiny")).double().eval()
ids = list(TEXT.encode())
first = N_CTX // 2
scored = N_CTX - 1 - first
window_nll = []
with torch.no_grad():
    for i in range(len(ids) // N_CTX):
        w = torch.tensor([ids[i * N_CTX : (i + 1) * N_CTX]])
        labels = w.clone()
        labels[0, : first + 1] = -100
        loss = model(input_ids=w, labels=labels).loss.item()
        # the same from the float64 logits (transformers' loss casts the logits to float32): the
        # golden value, and a check of which positions `loss` averages over
        lp = torch.log_softmax(model(input_ids=w).logits[0], dim=-1)
        direct = -sum(lp[j, w[0, j + 1]].item() for j in range(first, N_CTX - 1))
        assert abs(direct - loss * scored) < 1e-6 * abs(direct), (direct, loss * scored)
        window_nll.append(direct)
ppl = math.exp(sum(window_nll) / (scored * len(window_nll)))
golden = {
    "oracle": f"torch {torch.__version__}, transformers {transformers.__version__} (float64)",
    "model": "qwen2_tiny",
    "text": TEXT,
    "n_ctx": N_CTX,
    "window_nll": window_nll,
    "scored_tokens": scored * len(window_nll),
    "perplexity": ppl,
}
with open(OUT, "w") as f:
    json.dump(golden, f, indent=1)
    f.write("\n")
print(f"perplexity {ppl:.6f} over {len(window_nll)} windows -> {OUT}")
