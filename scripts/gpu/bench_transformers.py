#!/usr/bin/env python3
"""Transformers (+ peft) baseline for `stages/model/benches/throughput.rs` on the same GPU.

Times, for random-weight models with SmolLM2-135M's, Qwen2.5-0.5B's (and, asked for by name with
`--models Qwen2.5-7B` and loaded from `--weights`, Qwen2.5-7B's) dimensions and the same
shapes as the Rust bench: forward tokens/s on [batch, seq]; one LoRA SFT step (r=8, alpha=16,
all linear layers, no dropout; forward + backward + Adam update) tokens/s; peak GPU memory during the
LoRA steps (nvidia-smi sampled during the steps, as the Rust bench does) and torch's peak allocation; greedy
generation tokens/s from a 16-token prompt, batch 1 and 8. Precisions: f32 (what the Rust
code runs), bf16 (f32 weights, bf16 autocast) and bf16base (base weights in bf16, LoRA adapters
f32 as peft keeps them, bf16 autocast: ms-swift's `--torch_dtype bfloat16`). One warm-up, then
`--reps` timed repetitions; the loss of every step is printed. `--weights DIR` loads
DIR/<model name> (written by the Rust bench with PIPELINE_BENCH_SAVE=DIR) instead of a random
init, so both sides start from identical weights and data. `--gc` turns on transformers' gradient
checkpointing (non-reentrant), as the seed's 7B configuration does.

Output lines: bench<TAB>impl<TAB>model<TAB>metric<TAB>value<TAB>unit (see scripts/gpu/table.py).
"""
import argparse
import contextlib
import gc
import subprocess
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def smollm2_135m_shape():
    return LlamaForCausalLM, LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def qwen25_05b_shape():
    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, max_position_embeddings=32768,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def qwen25_7b_shape():
    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, max_position_embeddings=32768,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def mfu(c, seq, tokens_per_s):
    """Percent of one H200's 989 dense bf16 TFLOPS at 6N + 6*L*seq*q_dim FLOPs per token (the
    Rust bench's `mfu`: N = every matrix a token multiplies through, LM head included)."""
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, q, kv = c.hidden_size, c.num_attention_heads * hd, c.num_key_value_heads * hd
    layer = h * q * 2 + h * kv * 2 + 3 * h * c.intermediate_size
    n = c.num_hidden_layers * layer + h * c.vocab_size
    return 100.0 * tokens_per_s * (6.0 * n + 6 * c.num_hidden_layers * seq * q) / 989e12


def gpu_mem_used_mib():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return float(out.strip())
    except Exception:  # noqa: BLE001 - a missing figure, not a failure
        return None


class MemSampler:
    """Largest nvidia-smi reading while running (sampled on a thread, as the Rust bench does)."""

    def __enter__(self):
        import threading
        self.peak, self._stop = 0.0, threading.Event()

        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, gpu_mem_used_mib() or 0.0)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def report(impl, model, metric, value, unit):
    digits = 4 if unit == "nats" else 1
    print(f"bench\t{impl}\t{model}\t{metric}\t{value:.{digits}f}\t{unit}", flush=True)


def bench(impl, name, make, args, autocast, bf16_base=False):
    torch.manual_seed(0)
    cls, cfg = make()
    cfg._attn_implementation = "sdpa"
    if args.weights:
        import os
        model = cls.from_pretrained(os.path.join(args.weights, name), attn_implementation="sdpa",
                                    dtype=torch.bfloat16 if bf16_base else torch.float32)
    else:
        model = cls(cfg)
        if bf16_base:
            model = model.to(torch.bfloat16)
    model = model.to("cuda").eval()
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    b, s, reps = args.batch, args.seq, args.reps
    ids = (torch.arange(b * s, device="cuda") * 7919 % cfg.vocab_size).reshape(b, s)

    with torch.no_grad(), ctx():
        model(ids).logits.float().sum().item()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            model(ids).logits  # logits stay on the device, as in the Rust bench
        torch.cuda.synchronize()
    report(impl, name, f"forward [{b}x{s}]", reps * b * s / (time.perf_counter() - t), "tokens/s")
    torch.cuda.empty_cache()  # the forward's cached logits do not count against the LoRA steps
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    from peft import LoraConfig, get_peft_model
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, lcfg)
    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with ctx():
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    report(impl, name, f"loss step 1 [{b}x{s}]", step(), "nats")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with MemSampler() as mem:
        t = time.perf_counter()
        losses = [step() for _ in range(reps)]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    for k, loss in enumerate(losses):
        report(impl, name, f"loss step {k + 2} [{b}x{s}]", loss, "nats")
    report(impl, name, f"LoRA SFT step [{b}x{s}]", reps * b * s / dt, "tokens/s")
    report(impl, name, f"MFU [{b}x{s}] (6N + attention, of 989 TFLOPS)", mfu(cfg, s, reps * b * s / dt), "%")
    report(impl, name, "GPU memory peak in LoRA steps (nvidia-smi)", mem.peak, "MiB")
    report(impl, name, "torch peak allocated in LoRA steps", torch.cuda.max_memory_allocated() / 2**20, "MiB")
    model = pm.unload()
    model.eval()
    del opt, pm

    if args.gen == 0:  # --gen 0: no generation rows
        del model
        gc.collect()
        torch.cuda.empty_cache()
        return
    prompt = (torch.arange(1, 17, device="cuda") * 31 % cfg.vocab_size).reshape(1, 16)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), ctx():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, min_new_tokens=2, **kw)
        for rows in (1, 8):
            p = prompt.repeat(rows, 1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.gen,
                                 min_new_tokens=args.gen, **kw)
            torch.cuda.synchronize()
            n = (out.shape[1] - 16) * rows
            report(impl, name, f"generate batch {rows} ({n} tokens)", n / (time.perf_counter() - t), "tokens/s")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--precisions", default="f32,bf16", help="comma list of f32, bf16 (autocast), bf16base")
    ap.add_argument("--models", default="", help="comma list of model-name prefixes (default: all)")
    ap.add_argument("--weights", default="", help="folder of <model name>/ checkpoints to load")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing in the LoRA steps")
    args = ap.parse_args()
    # f32 means f32: no TF32 matmuls (the Rust code runs plain f32 cuBLAS)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers
    try:
        import peft
        pv = peft.__version__
    except ImportError:
        pv = "missing"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {pv}, "
          f"device {torch.cuda.get_device_name(0)}", flush=True)
    for prec in args.precisions.split(","):
        for name, make in (("SmolLM2-135M-shape", smollm2_135m_shape), ("Qwen2.5-0.5B-shape", qwen25_05b_shape),
                           ("Qwen2.5-7B-shape", qwen25_7b_shape)):
            asked = args.models and any(name.startswith(m) for m in args.models.split(","))
            if (args.models and not asked) or (name.startswith("Qwen2.5-7B") and not asked):
                continue
            bench(f"transformers-{prec}", name, make, args, autocast=prec in ("bf16", "bf16base"),
                  bf16_base=prec == "bf16base")


if __name__ == "__main__":
    main()
