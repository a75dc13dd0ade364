"""The peer of `benches/throughput.rs`'s CPU LoRA step: transformers + peft on the same shapes.

Tiny Qwen2 (hidden 64, 2 layers, 4 heads / 2 KV heads of 16, SwiGLU 176, tied embeddings) over the
full Qwen2.5 vocabulary (151,936), random weights; LoRA r=8, alpha 16 on all linear layers; one
step = forward with labels (next-token cross-entropy), backward, AdamW update, on [B x S] tokens.
Prints `bench<TAB>peft<TAB>...` rows like the Rust bench. Run by scripts/bench-lora-cpu.sh.
"""
import os
import sys
import time

import torch
import transformers
import peft


def main():
    batch, seq, reps = (int(x) for x in sys.argv[1:4])
    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=151_936, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_theta=1e6, max_position_embeddings=4096,
    )
    model = transformers.Qwen2ForCausalLM(cfg).float()
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = (torch.arange(batch * seq) * 7919 % cfg.vocab_size).reshape(batch, seq)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(reps):
        step()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    tag = os.environ.get("BENCH_TAG", "")
    name = f"bench\tpeft\ttiny (vocab 151936)\tLoRA SFT step [{batch}x{seq}]{tag}"
    print(f"{name}\t{reps * batch * seq / wall:.1f}\ttokens/s")
    print(f"{name}\t{reps * batch * seq / cpu:.1f}\ttokens per CPU-second")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {threads} threads", file=sys.stderr)


if __name__ == "__main__":
    main()
