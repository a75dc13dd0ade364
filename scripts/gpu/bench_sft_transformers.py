#!/usr/bin/env python3
"""transformers + peft baseline for the `sft` stage of recipes/qwen-self-cognition-real.toml.

Same model folder, same data (the recipe's datasets: builtin self-cognition with
model_name/model_author substituted, and the general-chat mix, read from stages/assets), same
chat template and system prompt, same hyper-parameters (LoRA r=8, alpha=32, all-linear, dropout
0; AdamW lr 1e-4; per-device batch 1; gradient accumulation 16; max_length 2048; one epoch),
f32 like ours (TF32 off). Loss on assistant tokens only.

Prints tab-separated lines `sft<TAB>transformers+peft<TAB>metric<TAB>value` : tokens/s (non-padding
tokens per second of the training loop, first optimizer step excluded as warm-up, and including
it), peak GPU memory (nvidia-smi, sampled; and torch's peak allocation), rows, tokens, steps.

usage: bench_sft_transformers.py --model DIR --assets stages/assets
"""
import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--assets", default="stages/assets")
ap.add_argument("--name", default="swift-robot")
ap.add_argument("--author", default="swift")
ap.add_argument("--system", default="You are a helpful assistant.")
ap.add_argument("--grad-accum", type=int, default=16)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--max-length", type=int, default=2048)
a = ap.parse_args()
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(42)


def rows():
    for line in open(Path(a.assets) / "self_cognition.jsonl", encoding="utf-8"):
        r = json.loads(line)
        sub = lambda s: s.replace("{{NAME}}", a.name).replace("{{AUTHOR}}", a.author)  # noqa: E731
        yield [{"role": "user", "content": sub(r["query"])}, {"role": "assistant", "content": sub(r["response"])}]
    for line in open(Path(a.assets) / "general_chat.jsonl", encoding="utf-8"):
        r = json.loads(line)
        q = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        yield [{"role": "user", "content": q}, {"role": "assistant", "content": r["output"]}]


tok = AutoTokenizer.from_pretrained(a.model)
examples = []
for msgs in rows():
    msgs = [{"role": "system", "content": a.system}] + msgs
    # Render, then tokenize (the return type of tokenize=True differs across transformers versions).
    prompt = tok(tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    full = full[: a.max_length]
    labels = [-100] * len(prompt) + full[len(prompt):]
    examples.append((full, labels[: len(full)]))

dev = torch.device("cuda")
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)

peak = [0.0]
stop = threading.Event()


def sample():
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, check=True).stdout
            peak[0] = max(peak[0], float(out.strip()))
        except Exception:  # noqa: BLE001 - a missing reading, not a failure
            pass
        time.sleep(0.2)


threading.Thread(target=sample, daemon=True).start()
perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(42)).tolist()
model.train()
tokens = tokens_after_first = 0
steps = 0
torch.cuda.synchronize()
t0 = time.perf_counter()
t_first = None
for i, idx in enumerate(perm):
    ids, labels = examples[idx]
    x = torch.tensor([ids], device=dev)
    y = torch.tensor([labels], device=dev)
    loss = model(input_ids=x, labels=y).loss / a.grad_accum
    loss.backward()
    tokens += len(ids)
    if t_first is not None:
        tokens_after_first += len(ids)
    if (i + 1) % a.grad_accum == 0 or i + 1 == len(perm):
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if t_first is None:
            torch.cuda.synchronize()
            t_first = time.perf_counter()
torch.cuda.synchronize()
t1 = time.perf_counter()
stop.set()
print(f"sft\ttransformers+peft\ttokens_per_second\t{tokens_after_first / (t1 - t_first):.1f}")
print(f"sft\ttransformers+peft\ttokens_per_second_incl_first_step\t{tokens / (t1 - t0):.1f}")
print(f"sft\ttransformers+peft\tpeak_gpu_memory_mib_nvidia_smi\t{peak[0]:.0f}")
print(f"sft\ttransformers+peft\tpeak_torch_allocated_mib\t{torch.cuda.max_memory_allocated() / 2**20:.0f}")
print(f"sft\ttransformers+peft\trows\t{len(examples)}")
print(f"sft\ttransformers+peft\ttokens\t{tokens}")
print(f"sft\ttransformers+peft\toptimizer_steps\t{steps}")
print(f"sft\ttransformers+peft\ttrain_seconds\t{t1 - t0:.2f}")
