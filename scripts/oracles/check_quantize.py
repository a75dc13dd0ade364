#!/usr/bin/env python3
"""Check the GGUF files of pipeline's `export` / `quantize` stages with the PyPI `gguf` package
(llama.cpp's own reader, version printed).

  mkdir -p /tmp/qexport && PIPELINE_KEEP_EXPORT=/tmp/qexport \\
      cargo test -p pipeline-stages --lib export::tests
  scripts/oracles/check_quantize.sh /tmp/qexport      # makes target/oracle-venv (gguf, numpy)

For every `<TYPE>.gguf` beside `F32.gguf`:
- the metadata llama.cpp's qwen2 loader needs is present (`general.architecture`, `qwen2.*` sizes,
  `rope.freq_base`, `tokenizer.ggml.*` with tokens padded to the embedding rows, `general.file_type`,
  `general.quantization_version`), and every tensor has the shape of the F32 file's;
- Q8_0 and Q4_0 tensors are byte-identical to `gguf.quants.quantize` of the F32 file's tensor;
- every tensor (Q4_K, Q5_0, Q6_K, Q8_0, ... included) dequantised by `gguf.quants.dequantize` is
  within the type's error bound of the F32 values.
"""
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32}
# Largest |error| / (largest |x| of the 32..256-value block), a loose bound per type.
REL_BOUND = {T.F32: 0, T.F16: 1e-3, T.BF16: 8e-3, T.Q8_0: 1 / 127, T.Q6_K: 1 / 31 * 2, T.Q5_0: 1 / 15,
             T.Q4_0: 1 / 7, T.Q4_K: 1 / 7 * 2}
BLOCK = {T.Q8_0: 32, T.Q4_0: 32, T.Q5_0: 32, T.Q6_K: 16, T.Q4_K: 32}

REQUIRED = ["general.architecture", "general.file_type", "general.quantization_version", "qwen2.context_length",
            "qwen2.embedding_length", "qwen2.block_count", "qwen2.feed_forward_length",
            "qwen2.attention.head_count", "qwen2.attention.head_count_kv",
            "qwen2.attention.layer_norm_rms_epsilon", "qwen2.rope.freq_base", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]


def read(path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in r.tensors}


def main(folder):
    folder = Path(folder)
    _, ref = read(folder / "F32.gguf")
    ref = {k: np.asarray(t.data, dtype=np.float32) for k, t in ref.items()}
    checked = 0
    for path in sorted(folder.glob("*.gguf")):
        name = path.stem
        meta, tensors = read(path)
        for k in REQUIRED:
            assert k in meta, f"{path.name}: missing {k}"
        assert meta["general.architecture"] == "qwen2"
        assert meta["general.file_type"] == FILE_TYPE[name], (name, meta["general.file_type"])
        rows = tensors["token_embd.weight"].shape[1]
        assert len(meta["tokenizer.ggml.tokens"]) == rows == len(meta["tokenizer.ggml.token_type"])
        assert set(tensors) == set(ref), set(tensors) ^ set(ref)
        types = {}
        for tn, t in tensors.items():
            x = ref[tn]
            y = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            if t.tensor_type in (T.Q8_0, T.Q4_0):
                want = gguf.quants.quantize(x, t.tensor_type)
                assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), f"{name} {tn}: bytes differ"
            b = BLOCK.get(t.tensor_type, 1)
            xb = x.reshape(-1, b)
            scale = np.abs(xb).max(axis=1, keepdims=True)
            err = np.abs(y.reshape(-1, b) - xb)
            bound = REL_BOUND[t.tensor_type] * scale + 1e-6
            assert (err <= bound).all(), f"{name} {tn} ({t.tensor_type.name}): error {(err / (scale + 1e-12)).max()}"
            checked += 1
        print(f"ok {path.name}: {types}")
    print(f"gguf {version('gguf')}: {checked} tensors checked")


if __name__ == "__main__":
    main(sys.argv[1])
