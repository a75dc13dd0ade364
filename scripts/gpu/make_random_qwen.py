#!/usr/bin/env python3
"""Write a random-weight Hugging Face folder with Qwen2.5-0.5B-Instruct's dimensions (or, with
`--shape 7b`, Qwen2.5-7B-Instruct's: the data-parallel bench, scripts/gpu/dp-on-device.sh).

No model hub is reachable from our machines, so the real-checkpoint recipe
(recipes/qwen-self-cognition-real.toml) is exercised on the GPU machine with a checkpoint of the
real architecture and shapes made by transformers itself (`Qwen2Config` + `save_pretrained`).
The tokenizer files are copied from --tokenizer-dir (the Qwen2.5 tokenizer pipeline embeds and
writes into every tiny-preset model folder).

usage: make_random_qwen.py OUT_DIR [--tokenizer-dir DIR] [--seed 0] [--shape 0.5b|7b]
(the throughput bench needs no tokenizer; the recipes do)
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--tokenizer-dir", help="copy tokenizer.json and tokenizer_config.json from here")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--shape", choices=["0.5b", "7b"], default="0.5b")
a = ap.parse_args()
torch.manual_seed(a.seed)
shapes = {
    # Qwen/Qwen2.5-0.5B-Instruct's config.json
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen/Qwen2.5-7B-Instruct's config.json
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
cfg = Qwen2Config(
    **shapes[a.shape], rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
    hidden_act="silu", bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
if a.shape == "0.5b":
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
else:
    # built in bf16 (on the GPU when there is one) so the random init takes seconds, not minutes
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to("cpu")
out = Path(a.out)
model.save_pretrained(out, safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json"] if a.tokenizer_dir else []:
    shutil.copy(Path(a.tokenizer_dir) / f, out / f)
print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (bf16 on disk)")
