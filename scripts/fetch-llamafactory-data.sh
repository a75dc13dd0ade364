#!/usr/bin/env bash
# Fetch LLaMA-Factory's demo datasets (ASSETS.md) by pinned version and sha256, for the heavy
# `collect` test. Nothing is committed: the files stay in the cache directory.
#
#   scripts/fetch-llamafactory-data.sh [CACHE_DIR]   (default: target/llamafactory-data)
#   PIPELINE_LLAMAFACTORY_DATA=<CACHE_DIR>/data cargo test -p pipeline-stages --test data -- --ignored real_datasets
set -euo pipefail
VERSION=0.9.5
SHA256=1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f
CACHE=${1:-"$(cd "$(dirname "$0")/.." && pwd)/target/llamafactory-data"}
mkdir -p "$CACHE"
SDIST="$CACHE/llamafactory-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  python3 -m pip download --no-deps --no-binary :all: "llamafactory==$VERSION" -d "$CACHE" >&2
fi
echo "$SHA256  $SDIST" | sha256sum -c - >&2
mkdir -p "$CACHE/data"
for f in alpaca_en_demo.json alpaca_zh_demo.json dpo_en_demo.json dpo_zh_demo.json kto_en_demo.json identity.json; do
  tar xzf "$SDIST" -O "llamafactory-$VERSION/data/$f" > "$CACHE/data/$f"
done
echo "$CACHE/data"
