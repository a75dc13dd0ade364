#!/usr/bin/env bash
# Continuous batching, measured: the same `pipeline serve` binary on the same model, decoding each
# sequence on its own (`--max-batch-size 1`, what the server did before batching) and batched (the
# default), each under scripts/bench_serve.py's load (1, 4, 16 concurrent streamed chats), one after
# the other in one call. Loopback only; stops by itself.
#
#   scripts/bench-serve.sh [MODEL]   # default: target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf
#                                    # (python3 scripts/fetch_assets.py smollm2)
# env: LEVELS (1,4,16), REQUESTS (32), MAX_TOKENS (64), PORT (8123)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -e "$model" ] || { echo "no model at $model (python3 scripts/fetch_assets.py smollm2)" >&2; exit 2; }
port=${PORT:-8123}
venv=target/test-assets/openai-venv
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==3.51.0"
fi
cargo build --quiet   # the dev profile is optimised (Cargo.toml); shares the test build
for batch in 1 default; do
    args=(serve --model "$model" --port "$port" --max-num-seqs 16)
    [ "$batch" = default ] || args+=(--max-batch-size "$batch")
    target/debug/pipeline "${args[@]}" >/dev/null 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 0.2
    done
    echo "## --max-batch-size $batch ($(nproc) cores, $(basename "$model"))"
    "$venv/bin/python" scripts/bench_serve.py --port "$port" --pid "$pid" --levels "${LEVELS:-1,4,16}" \
        --requests "${REQUESTS:-32}" --max-tokens "${MAX_TOKENS:-64}"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    trap - EXIT
done
