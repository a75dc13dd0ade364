#!/usr/bin/env bash
# Continuous batching, measured: the same `pipeline serve` binary on the same model, decoding each
# sequence on its own (`--max-batch-size 1`, what the server did before batching) and batched (the
# default), each under scripts/bench_serve.py's load (1, 4, 16 concurrent streamed chats), one after
# the other in one call; optionally another build of the server (BASELINE_BIN, e.g. the binary of
# an earlier commit, batched) and llama.cpp's OpenAI server (llama-cpp-python[server]) on the same
# GGUF and cores, in the same call. Loopback only; stops by itself.
#
#   scripts/bench-serve.sh [MODEL]   # default: target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf
#                                    # (python3 scripts/fetch_assets.py smollm2)
# env: LEVELS (1,4,16), REQUESTS (32), MAX_TOKENS (64), PORT (8123),
#      BASELINE_BIN (another pipeline binary, run first), MODES (1,default: the --max-batch-size
#      runs of target/debug/pipeline),
#      LLAMA_VENV (a venv with llama-cpp-python, built as the quantize issue describes; default
#      /work/llama-venv when present, `none` to skip): its server's pure-Python extras (pinned
#      below) go in target/test-assets/llama-server-venv, which sees that venv's packages.
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

wait_up() {
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "the server on port $port did not come up" >&2
    return 1
}
bench() {   # label pid
    echo "## $1 ($(nproc) cores, $(basename "$model"))"
    "$venv/bin/python" scripts/bench_serve.py --port "$port" --pid "$2" --levels "${LEVELS:-1,4,16}" \
        --requests "${REQUESTS:-32}" --max-tokens "${MAX_TOKENS:-64}"
}
run_server() {   # label command...
    local label=$1
    shift
    "$@" >/dev/null 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    wait_up
    bench "$label" "$pid"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    trap - EXIT
}

if [ -n "${BASELINE_BIN:-}" ]; then
    run_server "baseline $BASELINE_BIN, batched" "$BASELINE_BIN" serve --model "$model" --port "$port" --max-num-seqs 16
fi
IFS=, read -r -a modes <<< "${MODES:-1,default}"
for batch in "${modes[@]}"; do
    args=(serve --model "$model" --port "$port" --max-num-seqs 16)
    [ "$batch" = default ] || args+=(--max-batch-size "$batch")
    run_server "--max-batch-size $batch" target/debug/pipeline "${args[@]}"
done

llama=${LLAMA_VENV:-/work/llama-venv}
if [ "$llama" != none ] && [ -x "$llama/bin/python" ] && "$llama/bin/python" -c "import llama_cpp" 2>/dev/null; then
    lsv=target/test-assets/llama-server-venv
    if ! "$lsv/bin/python" -c "import llama_cpp.server.app" 2>/dev/null; then
        python3 -m venv "$lsv"
        "$lsv/bin/pip" install --quiet --disable-pip-version-check "uvicorn==0.32.1" "fastapi==0.115.6" \
            "pydantic-settings==2.7.1" "sse-starlette==2.2.1" "starlette-context==0.3.6" "PyYAML==6.0.2"
        site=$("$llama/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        echo "$site" > "$("$lsv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-llama-venv.pth"
    fi
    version=$("$lsv/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)")
    # (its default, --interrupt_requests True, aborts the running stream whenever another request
    # arrives: concurrent clients would get empty completions)
    run_server "llama-cpp-python $version server (n_threads $(nproc), one request at a time)" \
        "$lsv/bin/python" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" \
        --n_threads "$(nproc)" --interrupt_requests False
else
    echo "## llama.cpp's server skipped: no llama-cpp-python at ${llama} (LLAMA_VENV)"
fi
