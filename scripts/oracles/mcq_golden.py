#!/usr/bin/env python3
"""Golden general_mcq prompts and answer extraction from evalscope 1.14.1's own
`evalscope/utils/multi_choices.py` (loaded from its file, evalscope's heavy package imports
stubbed): writes `stages/metrics/tests/fixtures/mcq_golden.json`, read by
`stages/metrics/tests/mcq.rs`.

    /work/venv-metrics/bin/python scripts/oracles/mcq_golden.py   (venv: see metrics_golden.py)
"""
import csv
import importlib.util
import json
import os
import random
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIX = os.path.join(ROOT, "stages", "metrics", "tests", "fixtures")


class _Choice:
    def __init__(self, value):
        self.value = value


class Choices(list):
    def __init__(self, items):
        super().__init__(_Choice(x) if isinstance(x, str) else x for x in items)


class Target:
    def __init__(self, t):
        self.t = t

    def compact(self):
        return "".join(self.t) if isinstance(self.t, list) else self.t


class _State:
    def __init__(self, completion, n):
        self.choices = list(range(n))
        self.output = types.SimpleNamespace(completion=completion)


def load_multi_choices():
    from importlib.metadata import version

    assert version("evalscope") == "1.14.1", version("evalscope")
    base = os.path.dirname(importlib.util.find_spec("evalscope").origin)
    for name in ["evalscope", "evalscope.api", "evalscope.api.evaluator"]:
        m = types.ModuleType(name)
        m.__path__ = []
        sys.modules[name] = m
    ev = sys.modules["evalscope.api.evaluator"]
    ev.Choices, ev.Target, ev.TaskState = Choices, Target, _State
    spec = importlib.util.spec_from_file_location("mc", os.path.join(base, "utils", "multi_choices.py"))
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    return mc


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        choices = []
        for k in "ABCDEFGHIJ":
            if k not in r:
                break
            choices.append(r[k])
        out.append({"question": r["question"], "choices": choices, "answer": r["answer"]})
    return out


def main():
    mc = load_multi_choices()
    tmpl = mc.MultipleChoiceTemplate.CHINESE_SINGLE_ANSWER_TEMPLATE
    val = read_rows(os.path.join(FIX, "mcq", "example_val.csv"))
    dev = read_rows(os.path.join(FIX, "mcq", "example_dev.csv"))
    prompts = []
    for shots in (0, 1, 2):
        for i, s in enumerate(val):
            if shots == 0:
                p = mc.prompt(s["question"], Choices(s["choices"]), tmpl)
            else:  # MultiChoiceAdapter.format_fewshot_template / sample_to_fewshot
                fs = "\n\n".join(mc.format_example(d["question"], Choices(d["choices"]), Target(d["answer"]))
                                 for d in dev[:shots])
                p = mc.prompt(s["question"], Choices(s["choices"]), mc.FEW_SHOT_TEMPLATE + tmpl, fewshot=fs)
            prompts.append({"row": i, "few_shot_num": shots, "prompt": p})

    fixed = ["答案：B", "答案: C", "答案：（D）", "答案：【A】", "答案：$\\boxed{B}$", "答案：\\boxed{\\text{C}}",
             "答案：[LETTER] 答案：A", "答案：E", "答案：AB", "答案：A和B", "答案：B, not C", "答案：B and C",
             "答案：b", "答案：**C**", "答案 ： C。", "我选C", "I think the answer is D.", "It is C, says Bob X",
             "", "no capitals here", "答案：", "答案：A\n答案：", "答案：1", "答案：(A, C)", "答案：A/B",
             "ＡＢＣ", "答案：Ｃ", "The answer: B", "Answer: B", "答案：C. 因为……", "选项A错误，B正确", "答案:D\n",
             "答案：\tB", "答案：A 或 B", "答案：A or B", "答案：X", "分析：A不对。答案：C", "ÀÉ", "答案：$B$"]
    rng = random.Random(7)
    pieces = ["答案", "：", ":", " ", "A", "B", "C", "D", "E", "x", "(", ")", "$", "**", "选", "\n", "and", "、", "，"]
    for _ in range(150):
        fixed.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))))
    extraction = []
    for c in fixed:
        for n in (2, 4):
            got = mc.parse_answers_zh(_State(c, n), completion=c)
            extraction.append({"completion": c, "n_choices": n, "answer": "".join(sorted(got)) or None})
    out = {"oracle": "evalscope 1.14.1 utils/multi_choices.py", "prompts": prompts, "extraction": extraction}
    with open(os.path.join(FIX, "mcq_golden.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(prompts)} prompts, {len(extraction)} extractions")


if __name__ == "__main__":
    main()
