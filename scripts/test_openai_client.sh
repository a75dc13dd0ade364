#!/usr/bin/env bash
# The official `openai` Python client against `pipeline serve`: makes a venv from PyPI (pinned
# version) in target/test-assets/, then runs the `openai_python_client` test of tests/serve.rs,
# which builds a tiny model, starts the server on 127.0.0.1 (an ephemeral port) with an API key
# and runs scripts/openai_client_check.py against it (models.list, chat non-stream and stream,
# logprobs, completions, a 401 with a bad key, a 400 with a bad request, a 404 model).
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.51.0
venv=target/test-assets/openai-venv
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
fi
PIPELINE_OPENAI_PYTHON="$PWD/$venv/bin/python" cargo test --test serve -- --ignored --exact openai_python_client --nocapture
