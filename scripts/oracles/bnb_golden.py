#!/usr/bin/env python3
"""Golden values for pipeline's bitsandbytes / HQQ / EETQ quantisers
(stages/model/src/quant/), from the reference packages on the CPU.

  scripts/oracles/bnb_golden.sh        # makes target/bnb-oracle-venv, writes the golden file

Writes stages/model/tests/fixtures/quant/golden.json. The inputs are not stored: both sides make
them from the same integer generator (`inputs` below = `test_input` in stages/model/tests/quant.rs),
so every value is exact in f32. Per case: the codes (hex), the block statistics, and the sha256 of
the dequantised f32 values (little-endian bytes) with their first 16 values.

- bitsandbytes `quantize_4bit` / `dequantize_4bit` (nf4, fp4; blocksize 64; with and without
  `compress_statistics`, i.e. double quantisation: absmax minus its mean, 8-bit blockwise over 256
  with `create_dynamic_map()`), the packed `QuantState.as_dict(packed=True)` JSON, and
  `int8_vectorwise_quant` of the float16 weight (what `Int8Params` stores: `weight` + `SCB`).
- hqq `Quantizer.quantize(..., optimize=True)` (nbits 8/4/3/2, group 64, axis 0, `round_zero` for 4 bits as `BaseQuantizeConfig`; hqq's
  `optimize_weights_proximal` defaults) and its dequantised values.
"""
import hashlib
import json
import struct
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F

MASK = (1 << 64) - 1


def inputs(rows, cols, seed):
    """rows x cols f32: a 64-bit LCG, 4 uniforms of 24 bits summed (about normal), times a
    per-row power of two; row 3's first 64 values are 0 and value [1][5] is 7.5 (an outlier)."""
    s = seed & MASK
    out = np.zeros((rows, cols), dtype=np.float32)
    for r in range(rows):
        scale = np.float32(2.0 ** ((r % 5) - 3))
        for c in range(cols):
            acc = np.float32(0.0)
            for _ in range(4):
                s = (s * 6364136223846793005 + 1442695040888963407) & MASK
                acc = np.float32(acc + np.float32((s >> 40) / 16777216.0))
            out[r, c] = np.float32((acc - np.float32(2.0)) * scale)
    if rows > 3 and cols >= 64:
        out[3, :64] = 0.0
    if rows > 1 and cols > 5:
        out[1, 5] = 7.5
    return torch.from_numpy(out)


def f32_digest(t):
    a = t.detach().to(torch.float32).contiguous().numpy().astype("<f4")
    return {"sha256": hashlib.sha256(a.tobytes()).hexdigest(), "head": [float(x) for x in a.reshape(-1)[:16]]}


def floats(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1)]


def bnb_4bit(x, quant_type, double):
    packed, st = F.quantize_4bit(x, blocksize=64, compress_statistics=double, quant_type=quant_type)
    deq = F.dequantize_4bit(packed, st)
    d = st.as_dict(packed=True)
    case = {
        "packed": bytes(packed.reshape(-1).tolist()).hex(),
        "packed_shape": list(packed.shape),
        "quant_map": floats(d["quant_map"]),
        "quant_state_json": bytes(d[f"quant_state.bitsandbytes__{quant_type}"].tolist()).decode(),
        "dequantized": f32_digest(deq),
    }
    if double:
        case["absmax_codes"] = bytes(d["absmax"].tolist()).hex()
        case["nested_absmax"] = floats(d["nested_absmax"])
        case["nested_quant_map"] = floats(d["nested_quant_map"])
        case["nested_offset"] = float(st.offset)
    else:
        case["absmax"] = floats(d["absmax"])
    return case


def bnb_int8(x):
    cb, scb, _ = F.int8_vectorwise_quant(x.to(torch.float16))
    deq = F.int8_vectorwise_dequant(cb, scb)
    return {
        "weight": bytes((cb.reshape(-1).to(torch.int16) & 0xFF).to(torch.uint8).tolist()).hex(),
        "scb": floats(scb),
        "dequantized": f32_digest(deq),
    }


def hqq_case(x, nbits):
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(
        x, nbits=nbits, group_size=64, optimize=True, round_zero=(nbits == 4), axis=0, bitpack=False,
        compute_dtype=torch.float32, device="cpu",
    )
    deq = Quantizer.dequantize(w_q, meta)
    return {
        "codes": bytes(w_q.reshape(-1).to(torch.uint8).tolist()).hex(),
        "codes_shape": list(w_q.shape),
        "scale": floats(meta["scale"]),
        "zero": floats(meta["zero"]),
        "dequantized": f32_digest(deq),
        "dequantized_values": floats(deq),
    }


def main(out):
    torch.manual_seed(0)
    big = inputs(40, 448, 1)
    odd = inputs(7, 65, 2)
    golden = {
        "oracle": {"bitsandbytes": version("bitsandbytes"), "torch": version("torch"), "hqq": version("hqq")},
        "inputs": {"big": [40, 448, 1], "odd": [7, 65, 2]},
        "dynamic_map": floats(F.create_dynamic_map()),
        "bnb4": {},
        "int8": {"big": bnb_int8(big), "odd": bnb_int8(odd)},
        "hqq": {},
    }
    for name, x in [("big", big), ("odd", odd)]:
        for qt in ["nf4", "fp4"]:
            for dq in [False, True]:
                golden["bnb4"][f"{name}/{qt}/{'dq' if dq else 'plain'}"] = bnb_4bit(x, qt, dq)
    small = inputs(8, 128, 3)
    for nbits in [8, 4, 3, 2]:
        golden["hqq"][str(nbits)] = hqq_case(small.clone(), nbits)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {out} (bitsandbytes {version('bitsandbytes')}, hqq {version('hqq')}, torch {version('torch')})")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else root / "stages/model/tests/fixtures/quant/golden.json")
