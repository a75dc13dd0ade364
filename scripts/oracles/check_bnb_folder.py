#!/usr/bin/env python3
"""Heavy check: transformers + bitsandbytes / hqq (CPU) load pipeline's quantised HF folders.

  mkdir -p /tmp/qexport && PIPELINE_KEEP_EXPORT=/tmp/qexport \\
      cargo test -p pipeline-stages --lib quantize_bnb_and_eetq_folders
  scripts/oracles/check_bnb_folder.sh /tmp/qexport   # target/bnb-oracle-venv + transformers

For each `bnb-nf4`, `bnb-fp4`, `bnb-int8` folder (and the HQQ ones, `bnb-hqq4`, `bnb-hqq3`):
`AutoModelForCausalLM.from_pretrained` loads it with no missing or unexpected keys and its layers
are bitsandbytes' `Linear4bit` / `Linear8bitLt` (hqq's `HQQLinear`, whose dequantised weights
equal the ones our layout defines: hqq reads our bit packing as we wrote it);
the codes bitsandbytes holds after loading are the file's bytes (not re-quantised), so the
weights it dequantises are the ones pipeline's loader computes (tests/quant.rs shows that
dequantisation bit-identical with bitsandbytes'); and the quantised model's logits are close to
those of the unquantised transformers model built from those dequantised weights (4-bit:
transformers multiplies with the dequantised weight; int8: the CPU matmul also quantises the
activations, hence the looser bound).
"""
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from transformers import AutoConfig, AutoModelForCausalLM


def dequantized_state(model):
    from hqq.core.quantize import HQQLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, HQQLinear):
            out[name + ".weight"] = mod.dequantize().float()
        if isinstance(mod, bnb.nn.Linear4bit):
            out[name + ".weight"] = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            out[name + ".weight"] = F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB).float()
    return out


def hqq_from_file(st, p):
    """The weight as pipeline's reader computes it from the stored tensors (its own unpacking:
    4 bits two row halves per byte, high first; 3 bits ten row tenths per int32, highest first),
    to compare with what hqq dequantises from the same file."""
    nbits, g = int(st[p + "nbits"]), int(st[p + "group_size"])
    w = st[p + "W_q"]
    if nbits == 4:
        codes = torch.cat([(w >> 4) & 15, w & 15])
    elif nbits == 3:
        codes = torch.cat([(w >> (27 - 3 * i)) & 7 for i in range(10)])[:g]
    else:
        codes = w
    shape = tuple(int(d) for d in st[p + "shape"])
    return ((codes.float() - st[p + "zero"]) * st[p + "scale"]).reshape(shape)


def main(folder):
    folder = Path(folder)
    print(f"transformers {version('transformers')}, bitsandbytes {version('bitsandbytes')}, torch {version('torch')}")
    checked = 0
    from hqq.core.quantize import HQQLinear

    for kind, cls, tol in [("nf4", bnb.nn.Linear4bit, 1e-3), ("fp4", bnb.nn.Linear4bit, 1e-3),
                           ("int8", bnb.nn.Linear8bitLt, 0.1), ("hqq4", HQQLinear, 1e-3), ("hqq3", HQQLinear, 1e-3)]:
        d = folder / f"bnb-{kind}"
        if not d.is_dir():
            print(f"{d}: missing, skipped")
            continue
        q, info = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (kind, info)
        layers = [m for m in q.modules() if isinstance(m, cls)]
        assert len(layers) == 7 * q.config.num_hidden_layers, (kind, len(layers))
        from safetensors.torch import load_file
        stored = load_file(d / "model.safetensors")
        for name, mod in q.named_modules():
            if isinstance(mod, cls) and cls is not HQQLinear:
                assert torch.equal(mod.weight.data.reshape(-1).view(torch.uint8),
                                   stored[name + ".weight"].reshape(-1).view(torch.uint8)), f"{kind}: {name} re-quantised"
        deq = dequantized_state(q)
        if cls is HQQLinear:
            for name, mod in q.named_modules():
                if isinstance(mod, HQQLinear):
                    same = torch.equal(deq[name + ".weight"], hqq_from_file(stored, name + "."))
                    assert same, f"{kind}: {name}: hqq reads other values than we wrote"
        cfg = AutoConfig.from_pretrained(d)
        del cfg.quantization_config
        ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        sd = {k: v.float() for k, v in q.state_dict().items() if k in ref.state_dict() and k not in deq}
        sd.update(deq)
        missing, unexpected = ref.load_state_dict(sd, strict=False)
        assert not [m for m in missing if not m.endswith("rotary_emb.inv_freq")], missing
        ids = torch.tensor([[151644, 872, 198, 15191, 525, 498, 30, 151645, 198, 151644, 77091, 198]])
        with torch.no_grad():
            a = q(ids).logits.float()
            b = ref(ids).logits.float()
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)
        assert err < tol, f"{kind}: logits differ by {err} (relative to the largest)"
        print(f"{kind}: loads as {cls.__name__} x{len(layers)}; logits vs dequantised f32 model: {err:.2e} (bound {tol})")
        checked += 1
    assert checked, "no folder checked"
    print(f"OK: {checked} folders")


if __name__ == "__main__":
    main(sys.argv[1])
