#!/usr/bin/env python3
"""torchrun + transformers + peft DDP baseline for scripts/gpu/dp-on-device.sh (issue 17).

LoRA SFT (r=8, alpha=32, all-linear, dropout 0) on a Hugging Face folder, bf16 frozen base with
f32 adapters (as our `torch_dtype = "bfloat16"`), AdamW lr 1e-4, per-GPU batch --batch, no
accumulation, the chat rows of --data through the tokenizer's chat template with the same system
prompt, truncated to --max-length, right-padded per batch, loss on every non-padding token.
Optimizer step s reads rows [s·B·W, (s+1)·B·W) of the file in order; rank r takes its B of them.

Rank 0 prints `tokens_per_second<TAB>value`: non-padding tokens of all ranks per second over the
second half of the steps (the first half is warm-up), as our trainer's last logging window.

usage: torchrun --standalone --nproc_per_node N bench_dp_peft.py --model DIR --data rows.jsonl
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--max-length", type=int, default=512)
ap.add_argument("--system", default="You are a helpful assistant.")
a = ap.parse_args()

dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dev = torch.device("cuda", local)
torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)

tok = AutoTokenizer.from_pretrained(a.model)
pad = tok.pad_token_id if tok.pad_token_id is not None else 0
rows = [json.loads(line) for line in open(a.data)]
enc = [
    tok(
        tok.apply_chat_template([{"role": "system", "content": a.system}] + r["messages"], tokenize=False),
        add_special_tokens=False,
    )["input_ids"][: a.max_length]
    for r in rows
]

model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16).to(dev)
model = get_peft_model(
    model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
)
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
ddp = DDP(model, device_ids=[local])
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)


def batch(step):
    base = step * a.batch * world + rank * a.batch
    seqs = [enc[(base + i) % len(enc)] for i in range(a.batch)]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(dev), mask.to(dev), labels.to(dev)


tokens = torch.zeros((), dtype=torch.long, device=dev)
start = None
for step in range(a.steps):
    if step == a.steps - a.steps // 2:
        torch.cuda.synchronize()
        dist.barrier()
        start, tokens = time.perf_counter(), torch.zeros((), dtype=torch.long, device=dev)
    ids, mask, labels = batch(step)
    loss = ddp(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tokens += mask.sum()
torch.cuda.synchronize()
elapsed = time.perf_counter() - start
dist.all_reduce(tokens)
if rank == 0:
    print(f"tokens_per_second\t{tokens.item() / elapsed:.1f}")
    print(f"loss\t{loss.item():.4f}")
dist.destroy_process_group()
