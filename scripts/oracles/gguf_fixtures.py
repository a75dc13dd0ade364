#!/usr/bin/env python3
"""Generate the GGUF test fixtures of pipeline-model and their golden values.

Oracle: the PyPI `gguf` package (llama.cpp's Python reader/writer), version printed into the
golden files. Writes stages/model/tests/fixtures/gguf/:

  types.gguf / types.golden.json     one tensor per ggml type we read (F32, F16, BF16, Q8_0, Q4_0,
                                     Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) + one of each metadata type;
                                     golden = gguf.quants.dequantize of what GGUFReader reads back.
  tiny_llama.gguf, tiny_qwen2.gguf   2-layer models (mixed tensor types, gpt2 BPE vocabulary in the
  + *.golden.json                    metadata, chat template); golden = HF-named tensors (llama Q/K
                                     un-permuted) and config.
  unsupported_type.gguf              a Q2_K tensor (a type we refuse).

Run: /path/to/venv/bin/python scripts/oracles/gguf_fixtures.py   (pip install gguf numpy transformers)
Quantised blocks of K-types are random bytes with finite f16 scales (gguf-py cannot quantise them).
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

OUT = Path(__file__).resolve().parents[2] / "stages" / "model" / "tests" / "fixtures" / "gguf"
rng = np.random.default_rng(20261128)
GGUF_VERSION = __import__("importlib.metadata").metadata.version("gguf")


def quantized(x, qtype):
    """Bytes of x (float32, HF row-major) stored as qtype."""
    if qtype == T.F32:
        return x.astype(np.float32)
    if qtype in (T.Q4_K, T.Q6_K, T.Q2_K):
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = x.size // block_size
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.05, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
        if qtype == T.Q4_K:  # d, dmin first
            raw[:, 0:4] = scales.reshape(n_blocks, 4)
        elif qtype == T.Q6_K:  # d last
            raw[:, -2:] = scales.reshape(n_blocks, 4)[:, :2]
        else:  # Q2_K: d, dmin last
            raw[:, -4:] = scales.reshape(n_blocks, 4)
        return raw.reshape(*x.shape[:-1], x.shape[-1] // block_size * type_size)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def add(writer, name, x, qtype):
    data = quantized(x, qtype)
    if qtype == T.F32:
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=qtype)


def read_back(path):
    """What the oracle reader makes of every tensor: HF-shaped float32."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        vals = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        out[t.name] = (t.tensor_type.name, vals)
    return r, out


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def summary(a):
    flat = a.reshape(-1)
    idx = np.linspace(0, flat.size - 1, num=min(32, flat.size)).astype(int)
    return {"shape": list(a.shape), "sha256_f32le": digest(a),
            "sample_index": idx.tolist(), "sample": [float(flat[i]) for i in idx]}


def types_fixture():
    path = OUT / "types.gguf"
    w = gguf.GGUFWriter(str(path), "test")
    w.add_uint8("m.u8", 200)
    w.add_int8("m.i8", -5)
    w.add_uint16("m.u16", 60000)
    w.add_int16("m.i16", -30000)
    w.add_uint32("m.u32", 4000000000)
    w.add_int32("m.i32", -2000000000)
    w.add_float32("m.f32", 0.1)
    w.add_bool("m.bool", True)
    w.add_string("m.str", "héllo 世界")
    w.add_array("m.arr_str", ["a", "bb", ""])
    w.add_array("m.arr_i32", [1, -2, 3])
    w.add_uint64("m.u64", 2**63 + 5)
    w.add_int64("m.i64", -(2**40))
    w.add_float64("m.f64", 1e-300)
    for qt in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q6_K]:
        x = rng.normal(0, 1, size=(3, 256)).astype(np.float32)
        x[0, :32] *= 100  # a block with a large range
        add(w, f"t.{qt.name}", x, qt)
    add(w, "t.F32_3d", rng.normal(size=(2, 3, 32)).astype(np.float32), T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r, tensors = read_back(str(path))
    golden = {
        "oracle": f"gguf {GGUF_VERSION} (GGUFReader + gguf.quants.dequantize)",
        "tensors": {n: {"type": ty, "shape": list(v.shape), "values": [float(x) for x in v.reshape(-1)]}
                    for n, (ty, v) in tensors.items()},
        "metadata": {k: jsonable(f.contents()) for k, f in r.fields.items() if k.startswith("m.")},
    }
    (OUT / "types.golden.json").write_text(json.dumps(golden) + "\n")


def jsonable(v):
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


CORPUS = ("hello world, the model says hello to the world. 12345 tokens; the the the "
          "what is the capital of France? Paris is the capital of France.")


def tiny_vocab():
    """Specials (control), 256 byte tokens, a user-defined token, 40 BPE merges learnt on CORPUS."""
    b2u = bytes_to_unicode()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [b2u[b] for b in range(256)]
    types = [3] * 3 + [1] * 256
    words = [[b2u[b] for b in w.encode()] for w in CORPUS.replace(" ", " Ġ").split(" ")]
    words = [[c for c in w] for w in (("".join(w)) for w in words)]
    merges = []
    for _ in range(40):
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(1)
        new = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new.append(out)
        words = new
    tokens.append("<tool_call>")
    types.append(4)
    return tokens, types, merges


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """SPECS.md §5: GGUF -> HF."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(arch, bad_vocab=None):
    hidden, heads, kv, ffn, layers = 64, 4, 2, 256, 2
    hd = hidden // heads
    tokens, types, merges = tiny_vocab()
    vocab_rows = len(tokens) + 5  # padded embedding, as Qwen2.5 does
    path = OUT / f"tiny_{arch}.gguf"
    if bad_vocab is None:
        # llama.cpp's converter pads the vocabulary to the embedding rows with UNUSED [PAD<id>] tokens.
        pads = vocab_rows - len(tokens)
        tokens, types = tokens + [f"[PAD{len(tokens) + i}]" for i in range(pads)], types + [5] * pads
    elif bad_vocab == "small":  # vocabulary smaller than the embedding (unpadded): refused
        layers, path = 1, OUT / "bad_vocab_small.gguf"
    else:  # vocabulary larger than the embedding: refused
        vocab_rows, layers, path = len(tokens) - 10, 1, OUT / "bad_vocab_large.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6 if arch == "qwen2" else 1e-5)
    w.add_rope_freq_base(1000000.0 if arch == "qwen2" else 100000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    hf = {}  # expected HF tensors where exact (F32 storage)
    def t(name, shape, qtype, hf_name, perm_heads=None):
        x = rng.normal(0, 0.5, size=shape).astype(np.float32)
        stored = permute(x, perm_heads) if perm_heads else x
        add(w, name, stored, qtype)
        if qtype == T.F32:
            hf[hf_name] = x
    t("token_embd.weight", (vocab_rows, hidden), T.Q8_0, "model.embed_tokens.weight")
    for i in range(layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        perm = arch == "llama"
        t(p + "attn_norm.weight", (hidden,), T.F32, h + "input_layernorm.weight")
        t(p + "attn_q.weight", (hidden, hidden), T.F32 if i == 0 else T.Q4_0, h + "self_attn.q_proj.weight", heads if perm else None)
        t(p + "attn_k.weight", (kv * hd, hidden), T.F32 if i == 0 else T.Q4_1, h + "self_attn.k_proj.weight", kv if perm else None)
        t(p + "attn_v.weight", (kv * hd, hidden), T.F16, h + "self_attn.v_proj.weight")
        if arch == "qwen2":
            t(p + "attn_q.bias", (hidden,), T.F32, h + "self_attn.q_proj.bias")
            t(p + "attn_k.bias", (kv * hd,), T.F32, h + "self_attn.k_proj.bias")
            t(p + "attn_v.bias", (kv * hd,), T.F32, h + "self_attn.v_proj.bias")
        t(p + "attn_output.weight", (hidden, hidden), T.BF16, h + "self_attn.o_proj.weight")
        t(p + "ffn_norm.weight", (hidden,), T.F32, h + "post_attention_layernorm.weight")
        t(p + "ffn_gate.weight", (ffn, hidden), T.Q5_0 if i == 0 else T.Q5_1, h + "mlp.gate_proj.weight")
        t(p + "ffn_up.weight", (ffn, hidden), T.Q8_0, h + "mlp.up_proj.weight")
        t(p + "ffn_down.weight", (hidden, ffn), T.Q4_K if i == 0 else T.Q6_K, h + "mlp.down_proj.weight")
    t("output_norm.weight", (hidden,), T.F32, "model.norm.weight")
    if arch == "qwen2":
        t("output.weight", (vocab_rows, hidden), T.Q8_0, "lm_head.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if bad_vocab:
        return

    _, tensors = read_back(str(path))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    golden_t = {}
    for name, (ty, v) in tensors.items():
        if name in names:
            hn = names[name]
        else:
            _, i, part, suffix = name.split(".")
            hn = f"model.layers.{i}.{parts[part]}.{suffix}"
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            v = unpermute(v, heads if ".attn_q." in name else kv)
        if hn in hf:
            assert np.array_equal(hf[hn], v), hn  # F32 round trip: un-permute recovers HF exactly
        golden_t[hn] = dict(summary(v), gguf_type=ty)
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "rms_norm_eps": 1e-6 if arch == "qwen2" else 1e-5,
        "rope_theta": 1000000.0 if arch == "qwen2" else 100000.0, "vocab_size": vocab_rows,
        "tie_word_embeddings": arch != "qwen2", "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    golden = {"oracle": f"gguf {GGUF_VERSION} (GGUFReader + gguf.quants.dequantize; Q/K un-permuted per SPECS.md)",
              "config": config, "tensors": golden_t, "chat_template": CHATML,
              "vocab": {"tokens": len(tokens), "merges": len(merges), "embedding_rows": vocab_rows}}
    (OUT / f"tiny_{arch}.golden.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")


def smollm2_golden():
    """Summaries of every tensor of the real SmolLM2 GGUF (heavy test), if it has been fetched."""
    import os
    root = Path(__file__).resolve().parents[2]
    src = Path(os.environ.get("PIPELINE_TEST_ASSETS", root / "target" / "test-assets")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not src.exists():
        print(f"skipping SmolLM2 golden: {src} missing (scripts/fetch_assets.py smollm2)", file=sys.stderr)
        return
    r, tensors = read_back(str(src))
    heads = int(r.fields["llama.attention.head_count"].contents())
    kv = int(r.fields["llama.attention.head_count_kv"].contents())
    golden = {}
    for name, (ty, v) in tensors.items():
        if ".attn_q." in name or ".attn_k." in name:
            v = unpermute(v, heads if ".attn_q." in name else kv)
        golden[name] = dict(summary(v), gguf_type=ty)
    doc = {"oracle": f"gguf {GGUF_VERSION} (GGUFReader + gguf.quants.dequantize; Q/K un-permuted per SPECS.md)",
           "file_sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "tensors": golden}
    (OUT / "smollm2.golden.json").write_text(json.dumps(doc) + "\n")


def quant_golden():
    """gguf.quants.quantize bytes of fixed inputs (the writer's oracle)."""
    x = rng.normal(0, 1, size=(6, 64)).astype(np.float32)
    x[1] = 0.0                                  # all-zero blocks
    x[2, :32] = np.arange(32) * 0.5 - 8         # exact halves (rounding ties)
    x[3] *= 1000
    x[4, :32] = -np.abs(x[4, :32])              # largest |x| negative
    x[5, 5] = 70000.0                           # overflows f16 in F16
    out = {"oracle": f"gguf {GGUF_VERSION} gguf.quants.quantize", "shape": list(x.shape),
           "input": [float(v) for v in x.reshape(-1)], "bytes_hex": {}}
    for qt in [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]:
        out["bytes_hex"][qt.name] = gguf.quants.quantize(x, qt).tobytes().hex()
    (OUT / "quant.golden.json").write_text(json.dumps(out) + "\n")


def unsupported_fixture():
    w = gguf.GGUFWriter(str(OUT / "unsupported_type.gguf"), "test")
    add(w, "blk.0.attn_q.weight", np.zeros((2, 256), np.float32), T.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    types_fixture()
    tiny_model("llama")
    tiny_model("qwen2")
    unsupported_fixture()
    quant_golden()
    tiny_model("llama", bad_vocab="small")
    tiny_model("llama", bad_vocab="large")
    smollm2_golden()
    print(f"wrote {OUT}", file=sys.stderr)
