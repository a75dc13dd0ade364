#!/usr/bin/env bash
# Proof that report.html renders offline in a real browser: runs recipes/tiny-train-eval.toml in a
# scratch folder, opens its report.html in headless Chromium (Debian's `chromium`, installed
# through apt when missing) with every host name unresolvable, and checks that
#  - the console logged no message (a control page with a script error must log one, so the
#    check is known to see errors),
#  - the rendered DOM shows every stage of the run (a section and a DAG node per stage) and a
#    loss chart, and references nothing outside the file;
# then saves a screenshot (default target/test-assets/report.png; first argument overrides).
# Not part of `cargo test` (installing Chromium is not cheap).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
shot="${1:-$repo/target/test-assets/report.png}"
mkdir -p "$(dirname "$shot")"
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
bin="${PIPELINE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --bin pipeline
  bin="$repo/target/debug/pipeline"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp recipes/tiny-train-eval.toml "$work/r.toml"
mkdir -p "$work/data"
cp -r recipes/data/self-cognition "$work/data/"
(cd "$work" && "$bin" --log-format json run r.toml > events.jsonl)
page="$work/.pipeline/runs/tiny-train-eval/report.html"
[ -f "$page" ] || { echo "no report at $page"; exit 1; }

chrome() { # chrome OUT_PREFIX URL [extra flags...]: DOM on OUT.dom, log on OUT.log
  local out=$1 url=$2; shift 2
  chromium --headless=new --no-sandbox --disable-gpu --no-first-run --user-data-dir="$work/profile" \
    --host-resolver-rules="MAP * ~NOTFOUND" --enable-logging=stderr --v=0 "$@" --dump-dom "$url" \
    > "$out.dom" 2> "$out.log" || true
}
console() { grep -E 'CONSOLE|Uncaught|Failed to load resource' "$1" || true; }

# The control: a page whose script fails must show up in the log.
printf '<!DOCTYPE html><html><body><script>console.error("control error"); no_such_function();</script></body></html>' > "$work/control.html"
chrome "$work/control" "file://$work/control.html"
if [ -z "$(console "$work/control.log")" ]; then
  echo "the console check sees nothing on a failing control page; cannot trust it"; cat "$work/control.log"; exit 1
fi

chrome "$work/report" "file://$page"
errors=$(console "$work/report.log")
if [ -n "$errors" ]; then echo "console messages on report.html:"; echo "$errors"; exit 1; fi
python3 - "$work/events.jsonl" "$work/report.dom" <<'PY'
import json, re, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
stages = [e["stage"] for e in events if e.get("event", "").startswith("stage_") and e["event"] != "stage_started"]
dom = open(sys.argv[2]).read()
assert stages, "no stages in the run"
for s in stages:
    assert f'id="stage-{s}"' in dom, f"section of {s} missing"
    assert f'data-stage="{s}"' in dom, f"DAG node of {s} missing"
assert 'id="loss-chart"' in dom and 'id="dag-svg"' in dom
external = re.findall(r'(?:src|href)="(?:https?:)?//[^"]*"', dom)
assert not external, f"references outside the file: {external}"
print(f"report.html: {len(stages)} stages shown ({', '.join(stages)}), no console messages, nothing external")
PY
chromium --headless=new --no-sandbox --disable-gpu --no-first-run --user-data-dir="$work/profile" \
  --host-resolver-rules="MAP * ~NOTFOUND" --hide-scrollbars --window-size=1280,2600 \
  --screenshot="$shot" "file://$page" 2>/dev/null
[ -s "$shot" ] && echo "screenshot: $shot"
