#!/usr/bin/env python3
"""Golden Q4_K quantisation: llama.cpp's own `quantize_row_q4_K_ref` (C) on fixed inputs.

The PyPI `gguf` package cannot quantise K-types, so the oracle is ggml-quants.c from the pinned
llama-cpp-python 0.3.36 sdist (downloaded and sha256-checked by scripts/fetch_assets.py), compiled
with `gcc -O2 -ffp-contract=off` (no FMA contraction: the IEEE single-precision semantics our Rust
port follows) plus four stubs for symbols the reference quantisers never call. The bytes are also
dequantised with the `gguf` package as a sanity check.

Writes stages/model/tests/fixtures/gguf/quant_k.golden.json.
Run: /path/to/venv/bin/python scripts/oracles/q4k_golden.py   (needs gcc, pip install gguf numpy)
"""
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fetch_assets  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "stages" / "model" / "tests" / "fixtures" / "gguf"
MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void quantize_row_q4_K_ref(const float * x, void * y, int64_t k);
int main(void) {
    int64_t n; if (fread(&n, 8, 1, stdin) != 1) return 1;
    float *x = malloc(n * 4); if (fread(x, 4, n, stdin) != (size_t)n) return 1;
    unsigned char *y = malloc(n / 256 * 144);
    quantize_row_q4_K_ref(x, y, n);
    fwrite(y, 1, n / 256 * 144, stdout);
    return 0;
}
"""
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
size_t ggml_row_size(int type, int64_t ne) { abort(); }
const char * ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { abort(); }
"""


def build(tmp):
    with tarfile.open(fetch_assets.fetch("llama-cpp-python")) as sdist:
        members = [m for m in sdist.getmembers()
                   if m.name.startswith("llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/")
                   and (m.name.endswith(".h") or m.name.endswith("ggml-quants.c"))]
        sdist.extractall(tmp, members=members, filter="data")
    g = Path(tmp) / "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml"
    (Path(tmp) / "main.c").write_text(MAIN)
    (Path(tmp) / "stubs.c").write_text(STUBS)
    exe = Path(tmp) / "q4k"
    subprocess.run(["gcc", "-O2", "-ffp-contract=off", f"-I{g}/include", f"-I{g}/src", f"-I{g}/src/ggml-cpu",
                    str(g / "src/ggml-quants.c"), str(Path(tmp) / "main.c"), str(Path(tmp) / "stubs.c"),
                    "-lm", "-o", str(exe)], check=True)
    return exe


def main():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, size=(8, 256)).astype(np.float32)
    x[1] = 0.0                                   # all zero
    x[2] = np.abs(x[2]) + 1.0                    # all positive (min clamps to 0)
    x[3] = -np.abs(x[3])                         # all negative
    x[4] *= 1000.0
    x[5, :128] = 0.0                             # zero sub-blocks next to non-zero ones
    x[6] = np.linspace(-1, 1, 256, dtype=np.float32)
    x[7, ::3] = 0.5                              # repeated values
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        out = subprocess.run([str(exe)], input=struct.pack("<q", x.size) + x.tobytes(),
                             capture_output=True, check=True).stdout
    deq = gguf.quants.dequantize(np.frombuffer(out, np.uint8).reshape(8, -1), gguf.GGMLQuantizationType.Q4_K)
    err = np.abs(deq - x).max(axis=1) / np.maximum(np.abs(x).max(axis=1), 1e-9)
    assert (err < 0.2).all(), err
    doc = {"oracle": "llama.cpp ggml-quants.c quantize_row_q4_K_ref (llama-cpp-python 0.3.36 sdist, gcc -O2 -ffp-contract=off)",
           "shape": list(x.shape), "input": [float(v) for v in x.reshape(-1)], "bytes_hex": {"Q4_K": out.hex()}}
    (OUT / "quant_k.golden.json").write_text(json.dumps(doc) + "\n")
    print(f"wrote {OUT / 'quant_k.golden.json'}; max relative error per row {err.round(3).tolist()}")


if __name__ == "__main__":
    main()
