#!/usr/bin/env python3
"""Heavy check: the evaluate stage's perplexity scorer against llama.cpp on the same GGUF file.

    check_perplexity_llama.py --pipeline target/debug/pipeline --model FILE.gguf --text FILE.txt \
        [--n-ctx 128] [--windows 4]

Runs `pipeline eval --dataset text --scorer perplexity` on FILE.txt and computes the same windows
with llama-cpp-python (run it with the llama-venv's python, scripts/bench-quant.sh builds it):
llama.cpp's own tokenizer, BOS first when the file says add_bos, logits of every position, the
second half of each n_ctx window scored (llama.cpp's `perplexity` tool). Prints both perplexities
and their relative difference; exits 1 when it exceeds --tol (llama.cpp also rounds activations to
int8 blocks, so the two differ by float rounding only).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--pipeline", required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--text", required=True)
ap.add_argument("--n-ctx", type=int, default=128)
ap.add_argument("--windows", type=int, default=4)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--tol", type=float, default=0.01)
a = ap.parse_args()

with tempfile.TemporaryDirectory() as d:
    os.symlink(os.path.abspath(a.text), os.path.join(d, "held_out.txt"))
    out = os.path.join(d, "out")
    subprocess.run(
        [a.pipeline, "eval", "--model", a.model, "--dataset", "text", "--scorer", "perplexity", "--local-path", d,
         "--n-ctx", str(a.n_ctx), "--limit", str(a.windows), "--output", out],
        check=True, env=dict(os.environ, RAYON_NUM_THREADS=str(a.threads)), stdout=subprocess.DEVNULL,
    )
    with open(os.path.join(out, "report.json")) as f:
        ours = json.load(f)["rows"][0]["score"]

llm = Llama(model_path=a.model, n_ctx=a.n_ctx, n_batch=a.n_ctx, n_threads=a.threads, logits_all=True, verbose=False)
text = open(a.text, encoding="utf-8").read()
tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
first = a.n_ctx // 2
nll, count = 0.0, 0
for i in range(min(len(tokens) // a.n_ctx, a.windows)):
    w = tokens[i * a.n_ctx:(i + 1) * a.n_ctx]
    if add_bos:
        w[0] = llm.token_bos()
    llm.reset()
    llm.eval(w)
    logits = np.asarray(llm.scores[: a.n_ctx], dtype=np.float64)
    for j in range(first, a.n_ctx - 1):
        row = logits[j]
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        nll -= row[w[j + 1]] - lse
        count += 1
theirs = math.exp(nll / count)
rel = abs(ours - theirs) / theirs
print(f"{os.path.basename(a.model)}: perplexity ours {ours:.4f}, llama.cpp {theirs:.4f} ({count} tokens, n_ctx {a.n_ctx}), relative difference {rel:.2e}")
sys.exit(0 if rel <= a.tol else 1)
