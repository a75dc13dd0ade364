#!/usr/bin/env python3
"""Golden values for pipeline-model's Qwen2/Llama parity tests, from PyTorch + transformers + peft.

Writes, under stages/model/tests/fixtures/ (or the folder given as argv[1]):
  qwen2_tiny/            random Qwen2 (q/k/v bias, untied head), save_pretrained, f32
  llama_tiny_sharded/    random Llama (tied embeddings), save_pretrained sharded (index.json), bf16
  lora_tiny/             peft LoRA adapter (r=4, alpha=8, all-linear) for qwen2_tiny, random A and B
  golden.json            logits, losses, LoRA gradients, greedy generations

Every parameter is drawn from N(0, 0.1) (norm weights 1 + N(0, 0.1)) so biases and norms are
exercised. Run: python3 -m venv /work/venv-arch && /work/venv-arch/bin/pip install torch
transformers safetensors peft && /work/venv-arch/bin/python scripts/oracles/qwen2_parity.py
"""
import copy
import json
import os
import sys

import peft
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = sys.argv[1] if len(sys.argv) > 1 else "stages/model/tests/fixtures"
torch.manual_seed(1234)
torch.use_deterministic_algorithms(True)


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


PROMPTS = [
    [1, 17, 42, 99, 3, 250, 7],
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 200, 201, 202],
]

golden = {
    "oracle": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
    "prompts": PROMPTS,
}

# ---------------------------------------------------------------- Qwen2
qcfg = Qwen2Config(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attn_implementation="eager",
)
qwen = Qwen2ForCausalLM(qcfg).float().eval()
randomize(qwen)
qwen.save_pretrained(os.path.join(OUT, "qwen2_tiny"), safe_serialization=True)

g = {}
with torch.no_grad():
    g["logits"] = [flat(qwen(torch.tensor([p])).logits[0]) for p in PROMPTS]
    # right padding (training batches): positions 0..len, padded keys masked
    L = max(len(p) for p in PROMPTS)
    ids = torch.tensor([p + [0] * (L - len(p)) for p in PROMPTS])
    am = torch.tensor([[1] * len(p) + [0] * (L - len(p)) for p in PROMPTS])
    g["right_padded_logits"] = flat(qwen(ids, attention_mask=am).logits)
    # left padding (batched generation): position ids = cumsum(mask) - 1, as generate() does
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in PROMPTS])
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    g["left_padded_logits"] = flat(qwen(ids, attention_mask=am, position_ids=pos).logits)
    g["padded_len"] = L

    # SFT loss: prompt tokens masked with -100 (transformers shifts labels inside)
    labels = torch.tensor([p[:] for p in PROMPTS[1:]])
    labels[0, :5] = -100
    out = qwen(torch.tensor([PROMPTS[1]]), labels=labels)
    g["loss_labels"] = labels[0].tolist()
    g["loss"] = float(out.loss)
    # sum of completion-token log-probs (DPO's log pi(y|x))
    lp = torch.log_softmax(out.logits[0, :-1], -1)
    tgt = labels[0, 1:]
    m = tgt != -100
    g["seq_logprob"] = float(lp[m].gather(-1, tgt[m].unsqueeze(-1)).sum())

    # greedy generation, 12 new tokens, no eos
    gen = qwen.generate(
        torch.tensor([PROMPTS[0]]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    g["greedy"] = gen[0, len(PROMPTS[0]):].tolist()
golden["qwen2"] = g

# ---------------------------------------------------------------- LoRA on Qwen2
lcfg = peft.LoraConfig(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
pm = peft.get_peft_model(qwen, lcfg)
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.copy_(0.1 * torch.randn_like(p))
pm.save_pretrained(os.path.join(OUT, "lora_tiny"))
pm.train()
labels = torch.tensor([PROMPTS[1]])
labels[0, :5] = -100
out = pm(torch.tensor([PROMPTS[1]]), labels=labels)
out.loss.backward()
lg = {"loss": float(out.loss), "grads": {}}
for name, p in pm.named_parameters():
    if p.grad is not None:
        # names as in adapter_model.safetensors (peft strips the adapter name)
        key = name.replace(".default", "")
        lg["grads"][key] = flat(p.grad)
pm.eval()
with torch.no_grad():
    lg["logits"] = flat(pm(torch.tensor([PROMPTS[0]])).logits[0])
    merged = pm.merge_and_unload()
    lg["merged_logits"] = flat(merged(torch.tensor([PROMPTS[0]])).logits[0])
golden["lora"] = lg

# ---------------------------------------------------------------- Llama (tied, sharded, bf16 on disk)
lcfg2 = LlamaConfig(
    vocab_size=256,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attn_implementation="eager",
)
llama = LlamaForCausalLM(lcfg2).eval()
randomize(llama)
with torch.no_grad():  # weights exactly representable in bf16 (the rotary buffers stay f32)
    for p in llama.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))
copy.deepcopy(llama).to(torch.bfloat16).save_pretrained(
    os.path.join(OUT, "llama_tiny_sharded"), safe_serialization=True, max_shard_size="50KB"
)
with torch.no_grad():
    golden["llama"] = {
        "logits": [flat(llama(torch.tensor([p])).logits[0]) for p in PROMPTS],
        "greedy": llama.generate(
            torch.tensor([PROMPTS[1]]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(PROMPTS[1]):].tolist(),
    }

with open(os.path.join(OUT, "golden.json"), "w") as f:
    json.dump(golden, f)
print("wrote", OUT)
