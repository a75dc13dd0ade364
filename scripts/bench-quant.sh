#!/usr/bin/env bash
# Quantised CPU inference, measured: SmolLM2-135M-Instruct as F32 / Q8_0 / Q4_0 / Q4_K_M GGUF files
# (made from the Q4_1 asset by our `export` and `quantize` stages), each decoded greedily by
# `pipeline generate` (the quantised kernels, stages/model/src/kernels/quant.rs) and by llama.cpp
# (llama-cpp-python 0.3.36, built from the sdist into target/test-assets/llama-venv on first use,
# ~8+ minutes on 2 cores) with the same thread count, one after the other in one call. Prints decode
# tokens/s and peak RSS per file (scripts/bench/quant_bench.py says how each is measured).
#
#   scripts/bench-quant.sh            # python3 scripts/fetch_assets.py smollm2 first
# env: THREADS (2), TOKENS (128), NO_LLAMA=1 (ours only), DEQUANTIZED=1 (also time the f32 path,
#      PIPELINE_DEQUANTIZE_GGUF=1), PIPELINE_BIN (a binary to measure instead of building
#      target/debug/pipeline, e.g. a copy of the one before a change)
set -euo pipefail
cd "$(dirname "$0")/.."
asset=target/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf
[ -e "$asset" ] || { echo "no model at $asset (python3 scripts/fetch_assets.py smollm2)" >&2; exit 2; }
threads=${THREADS:-2}
out=target/bench-quant
mkdir -p "$out"

llama_py=
if [ "${NO_LLAMA:-0}" != 1 ]; then
    venv=target/test-assets/llama-venv
    if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
        command -v cmake >/dev/null || { echo "llama-cpp-python builds llama.cpp: apt-get install -y cmake" >&2; exit 2; }
        python3 -m venv "$venv"
        # a native build dies with "Illegal instruction" on these machines (ASSETS.md)
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
            nice -n 10 "$venv/bin/pip" install --quiet --disable-pip-version-check "llama-cpp-python==0.3.36"
    fi
    llama_py=$venv/bin/python
fi

if [ -n "${PIPELINE_BIN:-}" ]; then
    bin=$PIPELINE_BIN
else
    cargo build --quiet   # the dev profile is optimised (Cargo.toml); shares the test build
    bin=target/debug/pipeline
fi

# The files, by our own stages: one recipe (and cache) per file, so each cache holds one .gguf
# (content-hashed: a second run rebuilds nothing).
files=()
for s in f32 q8_0 q4_0 q4_k_m; do
    dir=$out/$s
    mkdir -p "$dir"
    case $s in
        f32) stage='kind = "export"
params = { model = "'"$(pwd)/$asset"'", format = ["gguf"], dtype = "float32", gguf_type = "F32" }' ;;
        *) stage='kind = "quantize"
params = { model = "'"$(pwd)/$asset"'", quant_method = "gguf", gguf_type = "'"${s^^}"'" }' ;;
    esac
    printf '[pipeline]\nname = "bench-quant-%s"\nseed = 0\n\n[stages.%s]\n%s\n' "$s" "$s" "$stage" >"$dir/recipe.toml"
    "$bin" run "$dir/recipe.toml" --cache-dir "$dir/cache" >/dev/null
    f=$(find "$dir/cache" -name '*.gguf' -type f | head -1)
    [ -n "$f" ] || { echo "no .gguf written for $s" >&2; exit 1; }
    ln -sf "$(realpath "$f")" "$out/SmolLM2-135M-Instruct.$s.gguf"
    files+=("$out/SmolLM2-135M-Instruct.$s.gguf")
done
files+=("$asset")

echo "## SmolLM2-135M-Instruct, $threads threads, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load $(cut -d' ' -f1-3 /proc/loadavg)"
args=(--pipeline "$bin" --threads "$threads" --tokens "${TOKENS:-128}")
[ -n "$llama_py" ] && args+=(--llama-python "$llama_py")
[ "${DEQUANTIZED:-0}" = 1 ] && args+=(--dequantized)
python3 scripts/bench/quant_bench.py "${args[@]}" "${files[@]}"
