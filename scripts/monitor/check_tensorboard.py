"""Read pipeline's TensorBoard event files with TensorBoard's own reader and check every value.

Usage: check_tensorboard.py RUN_DIR EVENTS_JSONL
  RUN_DIR       the project folder a `pipeline --log-format json run r.toml` ran in
  EVENTS_JSONL  that run's stdout (one JSON event per line)

For every training stage (pretrain, sft, align) it loads the run's log directory
`.pipeline/runs/<name>/tensorboard/<stage>` with
`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` and checks that the
scalars are exactly the stage's metrics.jsonl (in the artifact `metrics/`): one scalar per figure
and step under transformers' Trainer tags (train/loss, train/learning_rate, train/grad_norm,
train/tokens_per_second, train/epoch, train/<objective figure>, eval/loss, eval/<figure>), each
value equal to the JSONL number rounded to float32 (TensorBoard's `simple_value` is a float), and
that the `hparams` text holds the stage's params. For evaluate stages, the scalars
`<dataset>/<subset>/<metric>` equal report.json's scores. Exits non-zero on the first mismatch.
"""

import json
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load(path):
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def f32(x):
    return float(np.float32(x))


def expect_scalars(acc, want, where):
    tags = acc.Tags()
    got_tags = set(tags["scalars"])
    if got_tags != set(want):
        sys.exit(f"{where}: scalar tags {sorted(got_tags)} != {sorted(want)}")
    n = 0
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        exp = [(step, f32(v)) for step, v in points]
        if got != exp:
            sys.exit(f"{where}: {tag}: {got} != {exp}")
        n += len(exp)
    return n


def main():
    run_dir, events_path = sys.argv[1], sys.argv[2]
    events = [json.loads(l) for l in open(events_path) if l.strip()]
    finished = [e for e in events if e["event"] in ("stage_finished", "stage_cached")]
    name = None
    for e in events:
        if e.get("event") == "run_finished":
            name = os.path.basename(e["tensorboard"])  # .../runs/<name>/tensorboard
            logdir = os.path.join(run_dir, e["tensorboard"])
    if name is None:
        sys.exit("no run_finished event with a tensorboard directory")
    art = lambda digest: os.path.join(run_dir, ".pipeline/v1/artifacts", digest)
    checked = 0
    for e in finished:
        stage, kind = e["stage"], e["kind"]
        where = f"{stage} ({kind})"
        if kind in ("pretrain", "sft", "align"):
            want = {}
            for line in open(os.path.join(art(e["outputs"]["metrics"]), "metrics.jsonl")):
                r = json.loads(line)
                if r["type"] == "train":
                    figures = {k: r[k] for k in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch")}
                    figures.update(r.get("metrics", {}))
                    prefix = "train/"
                else:
                    figures = {"loss": r["eval_loss"], **r.get("metrics", {})}
                    prefix = "eval/"
                for k, v in figures.items():
                    want.setdefault(prefix + k, []).append((r["step"], v))
            acc = load(os.path.join(logdir, stage))
            n = expect_scalars(acc, want, where)
            text = acc.Tensors("hparams")[0].tensor_proto.string_val[0].decode()
            if "learning_rate" not in text or stage not in text:
                sys.exit(f"{where}: hparams text lacks the params: {text!r}")
            # The artifact's own copy reads the same.
            expect_scalars(load(os.path.join(art(e["outputs"]["metrics"]), "tensorboard")), want, where + " artifact")
            print(f"{where}: {n} scalars under {len(want)} tags equal metrics.jsonl; hparams text ok")
            if kind == "align" and "train/rewards/chosen" not in want:
                sys.exit(f"{where}: no DPO rewards/* figures")
            checked += 1
        elif kind == "evaluate":
            report = json.load(open(os.path.join(art(e["outputs"]["report"]), "report.json")))
            want = {f"{r['dataset']}/{r['subset']}/{r['metric']}": [(0, r["score"])] for r in report["rows"]}
            n = expect_scalars(load(os.path.join(logdir, stage)), want, where)
            print(f"{where}: {n} scalars equal report.json")
            checked += 1
    if checked == 0:
        sys.exit("no training or evaluate stage checked")
    print(f"ok: {checked} stages read back by TensorBoard's EventAccumulator")


if __name__ == "__main__":
    main()
