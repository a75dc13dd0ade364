"""Decode speed and peak RSS of GGUF files: `pipeline generate` (our binary) and llama.cpp
(llama-cpp-python), each run in its own process, one after the other, on the same cores.

    python quant_bench.py --pipeline target/debug/pipeline --threads 2 FILE.gguf ...

Decode tokens/s, both sides: the time between the first and the last streamed chunk of one greedy
chat completion of the same prompt (`pipeline generate --stream`; llama-cpp-python's
`create_chat_completion(stream=True)`), so loading and the prompt are left out. Peak RSS: the
child's maximum resident set (/usr/bin/time -v). Run by scripts/bench-quant.sh.
"""

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "Write a long story about a dragon who learns to bake bread."


def run(cmd, env=None):
    """(wall seconds, stdout, stderr) of one child process; exits on failure."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode(errors='replace')}")
    return wall, out.decode(), err.decode()


def timed(cmd, env=None):
    """`run` under /usr/bin/time -v: (wall, peak RSS bytes, stdout)."""
    wall, out, err = run(["/usr/bin/time", "-v", *cmd], env)
    rss = next(int(l.split(":")[1]) * 1024 for l in err.splitlines() if "Maximum resident set size" in l)
    return wall, rss, out


def ours(binary, path, n, threads, extra_env):
    """One streamed greedy generation (`generate --stream` flushes each token): decode tokens/s
    from the first to the last streamed chunk, as for llama.cpp; peak RSS via /usr/bin/time."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), **extra_env)
    cmd = ["/usr/bin/time", "-v", binary, "generate", "--stream", "--model", path, "--prompt", PROMPT,
           "--max-tokens", str(n)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    stamps = []
    while True:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        if chunk.strip():
            stamps.append(time.perf_counter())
    err = p.stderr.read().decode()
    if p.wait() != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    rss = next(int(l.split(":")[1]) * 1024 for l in err.splitlines() if "Maximum resident set size" in l)
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return tps, rss, len(stamps)


def llama_child(path, n, threads):
    """In a child process: one greedy streamed completion; prints JSON."""
    import resource

    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    load = time.perf_counter() - t0
    msgs = [{"role": "user", "content": PROMPT}]
    stamps = []
    for chunk in llm.create_chat_completion(msgs, max_tokens=n, temperature=0.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tps": tps, "rss": rss, "tokens": len(stamps), "load_s": load}))


def llama(python, path, n, threads):
    _, rss, out = timed([python, __file__, "--llama-child", path, "--tokens", str(n), "--threads", str(threads)])
    r = json.loads(out.strip().splitlines()[-1])
    return r["tps"], rss, r["tokens"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--pipeline")
    ap.add_argument("--llama-python", help="a python with llama_cpp installed (omit: ours only)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-child")
    ap.add_argument("--dequantized", action="store_true", help="also time PIPELINE_DEQUANTIZE_GGUF=1")
    a = ap.parse_args()
    if a.llama_child:
        return llama_child(a.llama_child, a.tokens, a.threads)
    print(f"| file | MiB | ours tok/s | ours peak RSS MiB | RSS / file | llama.cpp tok/s | llama.cpp peak RSS MiB | ours / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for f in a.files:
        mib = os.path.getsize(f) / 2**20
        tps, rss, _ = ours(a.pipeline, f, a.tokens, a.threads, {})
        row = [os.path.basename(f), f"{mib:.0f}", f"{tps:.1f}", f"{rss / 2**20:.0f}", f"{rss / 2**20 / mib:.2f}"]
        if a.llama_python:
            ltps, lrss, _ = llama(a.llama_python, f, a.tokens, a.threads)
            row += [f"{ltps:.1f}", f"{lrss / 2**20:.0f}", f"{tps / ltps:.2f}"]
        else:
            row += ["-", "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
        if a.dequantized:
            tps, rss, _ = ours(a.pipeline, f, a.tokens, a.threads, {"PIPELINE_DEQUANTIZE_GGUF": "1"})
            print(f"| {os.path.basename(f)} (PIPELINE_DEQUANTIZE_GGUF=1) | {mib:.0f} | {tps:.1f} | {rss / 2**20:.0f} | {rss / 2**20 / mib:.2f} | | | |", flush=True)


if __name__ == "__main__":
    main()
