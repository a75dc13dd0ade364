#!/usr/bin/env python3
"""Golden logits of transformers' Qwen2ForSequenceClassification for pipeline-train's seq_cls head.

Writes (under stages/train/tests/, or the folder given as argv[1]):
  fixtures/seq_cls_tiny/   a random Qwen2ForSequenceClassification (3 labels, pad_token_id 0,
                           tied embeddings), save_pretrained, f32
  data/seq_cls_golden.json its logits for three right-padded rows (the last non-padding token
                           is pooled, as transformers finds it from pad_token_id)

tests/train/cls.rs loads the folder with pipeline-model + pipeline_train::cls::read_seq_cls_head,
computes the same logits, writes the folder back and checks the round trip.
Run: python3 -m venv /work/venv-arch && /work/venv-arch/bin/pip install torch==2.15.0
transformers==5.24.0 safetensors && /work/venv-arch/bin/python scripts/oracles/seq_cls_golden.py
"""
import json
import os
import sys

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForSequenceClassification

OUT = sys.argv[1] if len(sys.argv) > 1 else "stages/train/tests"
torch.manual_seed(4321)

cfg = Qwen2Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    num_labels=3,
    pad_token_id=0,
    problem_type="single_label_classification",
    attn_implementation="eager",
)
model = Qwen2ForSequenceClassification(cfg).float().eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))
model.save_pretrained(os.path.join(OUT, "fixtures", "seq_cls_tiny"), safe_serialization=True)

ROWS = [[5, 9, 17, 33, 2], [12, 40], [7, 7, 61, 3, 18, 25, 44]]
L = max(len(r) for r in ROWS)
ids = torch.tensor([r + [0] * (L - len(r)) for r in ROWS])
am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in ROWS])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=am).logits
    labels = torch.tensor([2, 0, 1])
    loss = torch.nn.functional.cross_entropy(logits, labels)

golden = {
    "oracle": f"torch {torch.__version__}, transformers {transformers.__version__} (Qwen2ForSequenceClassification)",
    "rows": ROWS,
    "labels": labels.tolist(),
    "logits": [[float(x) for x in row] for row in logits.tolist()],
    "loss": float(loss),
}
os.makedirs(os.path.join(OUT, "data"), exist_ok=True)
with open(os.path.join(OUT, "data", "seq_cls_golden.json"), "w") as f:
    json.dump(golden, f, indent=1)
    f.write("\n")
print(golden["oracle"], golden["logits"], golden["loss"])
