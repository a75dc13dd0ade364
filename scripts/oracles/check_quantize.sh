#!/usr/bin/env bash
# Run scripts/oracles/check_quantize.py in its own venv (PyPI gguf 0.19.0 + numpy) under target/.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/oracle-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q gguf==0.19.0 numpy
exec "$venv/bin/python" "$root/scripts/oracles/check_quantize.py" "$@"
