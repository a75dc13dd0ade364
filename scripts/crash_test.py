#!/usr/bin/env python3
"""Crash test (SQLite's discipline): the headline recipe killed with SIGKILL at seeded random
moments spread over every stage, each kill followed by `cache verify` and a re-run.

    scripts/crash-test.sh [--kills 22] [--seed 1] [--save-interval 5]

1. A reference run of a copy of `recipes/qwen-self-cognition.toml` (and its data) in a fresh
   project gives each stage's key, output digests and duration.
2. Kill i targets stage s_i (every stage in turn, in a seeded order reshuffled each round, until
   --kills kills landed and every stage took one) at a seeded fraction of the stage's duration in
   the reference run (its own measured timing): s_i's cache entry is removed (so it, and only it, runs: its outputs are
   byte-identical, so early cutoff keeps everything downstream cached), `pipeline run` starts, and
   SIGKILL lands that long after s_i's `stage_started` event.
3. After each kill: `pipeline cache verify` must pass (nothing corrupt committed); the re-run must
   complete; no temp files may remain (`tmp/`, `.*.tmp`, `.tmp-checkpoint-*`); every stage's output
   digests must equal the reference run's (except training `metrics`, which hold throughput); a stage that finished before the kill must not re-run
   (a lost stage); a training stage killed after its first checkpoint must resume from its newest
   checkpoint ("resuming <stage> from step N").

Training stages get `save_interval_secs = --save-interval` through `[pipeline.defaults.<kind>]`
in both the reference and the crash project (so the tiny stages, which run for seconds, take
wall-clock checkpoints that a kill can land after).

Prints each stage's reference duration, the kills per stage, and the counts: kills, resumes (expected / seen), corrupt entries, lost stages, digest
mismatches, temp files left. Exit status 0 only when every check held.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINING = ("pretrain", "sft", "align")


def make_project(root: Path, save_interval: int) -> Path:
    root.mkdir(parents=True)
    recipe = (REPO / "recipes/qwen-self-cognition.toml").read_text()
    if save_interval > 0:
        recipe += "".join(
            f"\n[pipeline.defaults.{k}]\nsave_interval_secs = {save_interval}\n" for k in TRAINING
        )
    (root / "r.toml").write_text(recipe)
    shutil.copytree(REPO / "recipes/data", root / "data")
    return root


def events(stdout: str):
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def run(bin_: str, project: Path, *args, check=True):
    p = subprocess.run(
        [bin_, "--log-format", "json", "run", "r.toml", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("PIPELINE_CACHE_DIR", "RUST_LOG")},
    )
    if check and p.returncode != 0:
        sys.exit(f"run failed ({p.returncode}) in {project}:\n{p.stderr[-3000:]}")
    return p.returncode, events(p.stdout), p.stderr


# Outputs that hold wall-clock figures (training throughput in metrics.jsonl and its plot), so
# they differ between any two runs; no stage reads them. Every other output must be bit-identical.
TIMED_OUTPUTS = {"metrics"}


def stage_results(evs):
    """stage -> (status, key, outputs) from the final per-stage events.

    An evaluate stage's `report` artifact holds its TensorBoard event file (wall time in the name
    and the records) and the seconds it took, so it differs between any two runs of the stage; no
    stage reads it. It is compared by its scores (the report's rows) instead of its digest."""
    res = {}
    for e in evs:
        if e.get("event") in ("stage_finished", "stage_cached"):
            outs = {k: v for k, v in e["outputs"].items() if k not in TIMED_OUTPUTS}
            if e.get("kind") == "evaluate" and "report" in outs:
                rows = (e.get("report") or {}).get("rows")
                outs["report"] = json.dumps(rows, sort_keys=True)
            res[e["stage"]] = (e["status"], e["key"], outs)
    return res


def temp_files(cache: Path):
    found = []
    tmp = cache / "v1/tmp"
    if tmp.is_dir():
        found += [str(p) for p in tmp.iterdir()]
    for p in cache.rglob("*"):
        n = p.name
        if (n.startswith(".") and n.endswith(".tmp")) or n.startswith(".tmp-"):
            found.append(str(p))
    return found


def latest_checkpoint(scratch: Path):
    best = None
    if scratch.is_dir():
        for p in scratch.rglob("checkpoint-*"):
            m = re.fullmatch(r"checkpoint-(\d+)", p.name)
            if m and (p / "trainer_state.json").is_file():
                best = max(best or 0, int(m.group(1)))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / "target/debug/pipeline"))
    ap.add_argument("--kills", type=int, default=22)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save-interval", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the temp projects")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="pipeline-crash-"))
    ref = make_project(work / "ref", a.save_interval)

    t0 = time.time()
    _, evs, _ = run(a.bin, ref)
    reference = stage_results(evs)
    durations = {e["stage"]: e["duration_ms"] / 1000 for e in evs if e.get("event") == "stage_finished"}
    kinds = {e["stage"]: e["kind"] for e in evs if "kind" in e}
    print(f"reference run: {len(reference)} stages in {time.time() - t0:.0f}s: "
          + ", ".join(f"{s} {durations.get(s, 0):.2f}s" for s in reference), flush=True)
    # The crash project is a copy of the reference project, cache included: a copied project must
    # stay fully cached (issue 14, defect 5), so this run must not run anything.
    crash = work / "crash"
    shutil.copytree(ref, crash, symlinks=True)
    _, evs, _ = run(a.bin, crash)
    ran = [e["stage"] for e in evs if e.get("event") == "stage_finished"]
    print(f"copied project: {len(reference) - len(ran)} of {len(reference)} stages cached"
          f"{' (ran: ' + ', '.join(ran) + ')' if ran else ''}", flush=True)

    stages = list(reference)
    # Kill attempts go through every stage in turn (a seeded order, reshuffled each round) until
    # --kills kills landed and every stage took at least one; a run can finish before its kill
    # lands (the stage ran faster than in the reference), so at most four times as many attempts.
    def attempts():
        n = 0
        while n < 4 * max(a.kills, len(stages)):
            s = stages[:]
            rng.shuffle(s)
            for st in s:
                n += 1
                yield n, st

    cache = crash / ".pipeline"
    counts = dict(kills=0, missed=0, resumes_expected=0, resumes_seen=0, corrupt=0, lost=0,
                  mismatches=0, temp_files=0, failed_reruns=0)
    per_stage = {s: 0 for s in stages}
    for i, stage in attempts():
        if counts["kills"] >= a.kills and all(per_stage.values()):
            break
        key = reference[stage][1]
        (cache / f"v1/entries/{key}.json").unlink(missing_ok=True)
        # The kill time is drawn from the reference run's own duration of the stage: training
        # stages late enough that a wall-clock checkpoint may exist (0.3-0.9 of the stage), others
        # anywhere in it (0.02-0.9).
        lo = 0.3 if kinds.get(stage) in TRAINING else 0.02
        delay = rng.uniform(lo, 0.9) * durations.get(stage, 1.0)
        proc = subprocess.Popen(
            [a.bin, "--log-format", "json", "run", "r.toml"], cwd=crash,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        seen = []
        started = threading.Event()

        def reader():
            for line in proc.stdout:
                if line.startswith("{"):
                    try:
                        e = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    seen.append(e)
                    if e.get("event") == "stage_started" and e.get("stage") == stage:
                        started.set()

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        started.wait(timeout=600)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        th.join(timeout=5)
        if killed:
            counts["kills"] += 1
            per_stage[stage] += 1
        else:
            counts["missed"] += 1
            # the stage ran faster than in the reference run (the machine's load changed): later
            # kills of it are drawn from the duration it just took
            took = next((e["duration_ms"] / 1000 for e in seen
                         if e.get("event") == "stage_finished" and e.get("stage") == stage), None)
            if took:
                durations[stage] = took
        finished_before = {e["stage"] for e in seen if e.get("event") == "stage_finished"}
        ckpt = latest_checkpoint(cache / "v1/scratch" / key) if kinds.get(stage) in TRAINING else None

        v = subprocess.run([a.bin, "cache", "verify", "r.toml"], cwd=crash, capture_output=True, text=True)
        if v.returncode != 0:
            counts["corrupt"] += sum(1 for l in v.stdout.splitlines() if l.startswith(("corrupt", "missing", "unreadable")))
            print(f"  cache verify after kill {i}:\n{v.stdout}", flush=True)
        code, evs2, err = run(a.bin, crash, check=False)
        if code != 0:
            counts["failed_reruns"] += 1
            print(f"  re-run after kill {i} failed ({code}): {err[-2000:]}", flush=True)
            continue
        after = stage_results(evs2)
        lost = [s for s in finished_before if after.get(s, ("",))[0] == "ran"]
        counts["lost"] += len(lost)
        bad = [s for s in reference if after.get(s, (None, None, None))[2] != reference[s][2]]
        counts["mismatches"] += len(bad)
        left = temp_files(cache)
        counts["temp_files"] += len(left)
        msgs = [e.get("message", "") for e in evs2 if e.get("event") == "message" and e.get("stage") == stage]
        resumed = next((m for m in msgs if m.startswith(f"resuming {stage} from step ")), None)
        if ckpt is not None and killed:
            counts["resumes_expected"] += 1
            if resumed and resumed.startswith(f"resuming {stage} from step {ckpt} "):
                counts["resumes_seen"] += 1
            else:
                print(f"  {stage}: killed after checkpoint-{ckpt}, re-run said {resumed!r}", flush=True)
        print(
            f"kill {i:2}: {stage:<9} +{delay:5.1f}s {'killed' if killed else 'finished first'}"
            f"{f', checkpoint {ckpt}' if ckpt else ''}{', ' + resumed if resumed else ''}"
            f"{', LOST ' + ','.join(lost) if lost else ''}{', MISMATCH ' + ','.join(bad) if bad else ''}"
            f"{', TEMP ' + ' '.join(left) if left else ''}",
            flush=True,
        )
    print("kills per stage: " + ", ".join(f"{s} {n}" for s, n in per_stage.items()))
    print(
        "crash test: {kills} kills ({missed} runs finished before their kill), resumes {resumes_seen}/"
        "{resumes_expected}, {corrupt} corrupt entries, {lost} lost stages, {mismatches} digest "
        "mismatches, {temp_files} temp files left, {failed_reruns} failed re-runs".format(**counts)
    )
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    ok = (counts["corrupt"] == counts["lost"] == counts["mismatches"] == counts["temp_files"]
          == counts["failed_reruns"] == 0 and counts["resumes_seen"] == counts["resumes_expected"]
          and counts["kills"] >= min(20, a.kills) and all(per_stage.values()))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
