#!/usr/bin/env python3
"""Tabulates `bench<TAB>impl<TAB>model<TAB>metric<TAB>value<TAB>unit` lines (from the Rust bench
and scripts/gpu/bench_transformers.py) as a Markdown table: one row per model and metric, one
column per implementation. Usage: table.py LOG..."""
import sys

rows, impls = {}, []
for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        f = line.rstrip("\n").split("\t")
        if len(f) != 6 or f[0] != "bench":
            continue
        _, impl, model, metric, value, unit = f
        if impl not in impls:
            impls.append(impl)
        rows.setdefault((model, metric, unit), {})[impl] = value
print("| model | metric | unit | " + " | ".join(impls) + " |")
print("|---|---|---|" + "---|" * len(impls))
for (model, metric, unit), v in rows.items():
    print(f"| {model} | {metric} | {unit} | " + " | ".join(v.get(i, "–") for i in impls) + " |")
