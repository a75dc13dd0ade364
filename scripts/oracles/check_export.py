#!/usr/bin/env python3
"""Check GGUF files exported by pipeline-model with the PyPI `gguf` package (llama.cpp's reader).

  mkdir -p /tmp/export && PIPELINE_KEEP_EXPORT=/tmp/export \\
      cargo test -p pipeline-model --test io gguf_export_round_trips_tiny_models
  python scripts/oracles/check_export.py /tmp/export/llama.gguf stages/model/tests/fixtures/gguf/tiny_llama.gguf

The exported file must hold the same tensors (dequantised values equal) and metadata values as the
original fixture; key order and tensor order may differ.
"""
import sys

import numpy as np
import gguf


def load(path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}
    return meta, tensors


a_meta, a_t = load(sys.argv[1])
b_meta, b_t = load(sys.argv[2])
assert a_t.keys() == b_t.keys(), set(a_t) ^ set(b_t)
for k in a_t:
    assert np.array_equal(a_t[k], b_t[k]), k
for k in b_meta:
    if k in a_meta:
        same = a_meta[k] == b_meta[k] or (isinstance(a_meta[k], float) and np.isclose(a_meta[k], b_meta[k]))
        assert same, (k, str(a_meta[k])[:200], str(b_meta[k])[:200])
print(f"ok: {len(a_t)} tensors equal; metadata keys only in the original: {sorted(set(b_meta) - set(a_meta))}")
