#!/usr/bin/env bash
# Copies dfdx 0.13.0 from cargo's registry into target/patched/, applies scripts/gpu/dfdx-0.13.0.diff
# and writes target/patched/cargo-config.toml, which points cargo's [patch.crates-io] at the copy.
# The CUDA build then runs e.g.
#   cargo --config target/patched/cargo-config.toml build --release --features cuda
# (scripts/gpu/cargo-cuda.sh does this and keeps Cargo.lock as committed). The CPU build and the
# README's two commands use stock dfdx; only code behind the `cuda` feature needs the patch.
# Why each hunk exists: scripts/gpu/README.md, "The dfdx patch".
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/dfdx-0.13.0 2>/dev/null | head -1 || true)"
if [ -z "$src" ]; then
  (cd "$root" && cargo fetch -q)
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/dfdx-0.13.0 | head -1)"
fi
dst="$root/target/patched/dfdx-0.13.0"
rm -rf "$dst"
mkdir -p "$(dirname "$dst")"
cp -r "$src" "$dst"
# dfdx's sources use CRLF line endings; the copy is converted to LF, as the diff is stored
find "$dst/src" -name '*.rs' -exec sed -i 's/\r$//' {} +
(cd "$dst" && patch -p1 --quiet < "$root/scripts/gpu/dfdx-0.13.0.diff")
printf '[patch.crates-io]\ndfdx = { path = "%s" }\n' "$dst" > "$root/target/patched/cargo-config.toml"
echo "$root/target/patched/cargo-config.toml"
