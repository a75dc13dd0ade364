"""A bounded loopback load bench for an OpenAI-compatible server (ours, or any other on the same
machine): for each concurrency level, a fixed number of streamed chat requests, then requests/s,
output tokens/s, p50/p99 time to first token and inter-token latency, and the server's peak RSS.
It stops by itself and only talks to 127.0.0.1.

    python3 scripts/bench_serve.py --port 8000 --pid $(pgrep -n pipeline) [--levels 1,4,16] [--requests 32]

Needs the `openai` package (scripts/test_openai_client.sh makes a venv with it:
target/test-assets/openai-venv/bin/python). Each streamed chunk carries one token for our server,
so a chunk is counted as a token; usage (include_usage) gives the exact count for tokens/s.
"""

import argparse
import asyncio
import statistics
import time

from openai import AsyncOpenAI


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def peak_rss_mib(pid):
    if not pid:
        return float("nan")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def one(client, model, prompt, max_tokens, ttfts, itls, tokens):
    t0 = time.perf_counter()
    last = None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage, chunks = None, 0
    async for chunk in stream:
        now = time.perf_counter()
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.completion_tokens
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        chunks += 1
        if last is None:
            ttfts.append(now - t0)
        else:
            itls.append(now - last)
        last = now
    # a server without include_usage (llama-cpp-python's): one token per content chunk
    tokens.append(usage if usage is not None else chunks)


async def level(client, model, concurrency, requests, max_tokens):
    ttfts, itls, tokens = [], [], []
    queue = asyncio.Queue()
    prompts = ["Who are you?", "你是谁？", "What can you do?", "Tell me about yourself."]
    for i in range(requests):
        queue.put_nowait(prompts[i % len(prompts)])

    async def worker():
        while not queue.empty():
            p = queue.get_nowait()
            await one(client, model, p, max_tokens, ttfts, itls, tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "clients": concurrency,
        "requests": requests,
        "req/s": requests / wall,
        "out tok/s": sum(tokens) / wall,
        "ttft p50 ms": pct(ttfts, 50) * 1e3,
        "ttft p99 ms": pct(ttfts, 99) * 1e3,
        "itl p50 ms": pct(itls, 50) * 1e3,
        "itl p99 ms": pct(itls, 99) * 1e3,
    }


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--pid", type=int, default=0, help="the server's pid (for its peak RSS)")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default="EMPTY")
    a = ap.parse_args()
    client = AsyncOpenAI(api_key=a.api_key, base_url=f"http://127.0.0.1:{a.port}/v1", timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    rows = [await level(client, model, int(c), a.requests, a.max_tokens) for c in a.levels.split(",")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    print(f"server peak RSS: {peak_rss_mib(a.pid):.0f} MiB")
    if len(rows) > 1:
        print(f"output tokens/s at {rows[-1]['clients']} clients / 1 client: {rows[-1]['out tok/s'] / rows[0]['out tok/s']:.2f}x")
    await client.close()


asyncio.run(main())
