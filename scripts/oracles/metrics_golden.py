#!/usr/bin/env python3
"""Golden BLEU/ROUGE values from evalscope's own metric functions (issue 6).

Writes `stages/metrics/tests/fixtures/metrics_golden.jsonl`: one row per generated
(prediction, reference) pair with evalscope's `bleu_ngram_one_sample` and
`compute_rouge_score_one_sample_zh` results, plus the BLEU token lists (jieba / NLTK) so a
tokeniser mismatch is visible directly. The Rust test `stages/metrics/tests/parity.rs` compares
every metric of every pair to 1e-6.

Oracle setup (versions pinned; evalscope without its heavy dependencies, only its metric modules
are loaded, straight from their files):

    python3 -m venv /work/venv-metrics
    /work/venv-metrics/bin/pip install jieba==0.42.1 rouge-chinese==1.0.3 nltk==3.10.4 \
        numpy editdistance
    /work/venv-metrics/bin/pip install --no-deps evalscope==1.14.1
    /work/venv-metrics/bin/python scripts/oracles/metrics_golden.py            # write golden
    /work/venv-metrics/bin/python scripts/oracles/metrics_golden.py --bench    # time evalscope

Deviation kept on purpose: evalscope's `word_tokenize` first runs punkt sentence splitting, whose
data no package ships offline; we call `NLTKWordTokenizer().tokenize` (word_tokenize with
`preserve_line=True`), as SPECS.md §3 says. The two differ only on a period inside a
multi-sentence English string.

evalscope 1.14.1 scores ROUGE 0.0 for a pair rouge-chinese refuses (empty or whitespace-only
side); the golden row records `rouge_dropped: true` for those, and pipeline leaves the ROUGE
keys out (the pre-1.12 rule, SPECS.md §3).
"""
import argparse
import importlib.util
import json
import os
import random
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "stages", "metrics", "tests", "fixtures", "metrics_golden.jsonl")
PINNED = {"evalscope": "1.14.1", "jieba": "0.42.1", "rouge-chinese": "1.0.3", "nltk": "3.10.4"}


def load_evalscope_metrics():
    """Load evalscope/metrics/utils/{functions,rouge}.py without evalscope's package __init__
    (which imports transformers, pydantic, ...)."""
    import logging

    spec = importlib.util.find_spec("evalscope")
    base = os.path.dirname(spec.origin)
    for name in ["evalscope", "evalscope.metrics", "evalscope.metrics.utils",
                 "evalscope.metrics.utils.bundled_rouge_score", "evalscope.utils"]:
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    scorer = types.ModuleType("evalscope.metrics.utils.bundled_rouge_score.rouge_scorer")
    sys.modules[scorer.__name__] = scorer
    sys.modules["evalscope.metrics.utils.bundled_rouge_score"].rouge_scorer = scorer
    logger_mod = types.ModuleType("evalscope.utils.logger")
    logger_mod.get_logger = lambda: logging.getLogger("evalscope")
    sys.modules[logger_mod.__name__] = logger_mod

    def load(rel, name):
        s = importlib.util.spec_from_file_location(name, os.path.join(base, rel))
        m = importlib.util.module_from_spec(s)
        s.loader.exec_module(m)
        return m

    functions = load("metrics/utils/functions.py", "evalscope.metrics.utils.functions")
    rouge = load("metrics/utils/rouge.py", "evalscope.metrics.utils.rouge")
    return functions, rouge


def patch_word_tokenize():
    import nltk
    from nltk.tokenize import NLTKWordTokenizer

    tok = NLTKWordTokenizer()
    nltk.word_tokenize = lambda text, *a, **k: tok.tokenize(text)
    return nltk.word_tokenize


ZH_WORDS = ["我", "喜欢", "吃", "苹果", "香蕉", "今天", "天气", "很好", "我们", "一起", "去", "公园", "散步",
            "人工智能", "模型", "训练", "数据", "评估", "结果", "非常", "重要", "的", "了", "是", "在", "中国",
            "北京", "上海", "学习", "机器", "语言", "大", "小", "研究", "问题", "答案", "因为", "所以", "但是",
            "氨基酸", "蛋白质", "代谢", "终产物", "尿素", "肝脏", "细胞", "B超", "检查", "医院"]
ZH_PUNCT = ["，", "。", "！", "？", "、", "；", "：", "“", "”", "‘", "’", "（", "）", "《", "》", "……", "——"]
EN_WORDS = ["the", "The", "model", "is", "a", "language", "learns", "from", "data", "quickly", "cat", "sat",
            "on", "mat", "I", "don't", "can't", "won't", "it's", "they're", "we'll", "you've", "Paris",
            "capital", "of", "France", "iPhone15", "C++", "50%", "3.14", "1,000", "$3.88", "e-mail",
            "state-of-the-art", "U.S.", "Dr.", "etc.", "gonna", "wanna", "cannot", "'tis", "hello", "world",
            "GPU", "2024", "#1", "@user", "x*y", "a--b", "(see", "above)", "[note]", "{x}", "<tag>", "..."]
EN_PUNCT = [",", ".", "!", "?", ";", ":", "'", '"', "(", ")", "-", "...", "--", "*", "`", "``", "''", "“", "”",
            "‘", "’", "«", "»", "–", "—"]
OTHER = ["😀", "👍🏽", "👨‍👩‍👧", "❤️", "Ｈｅｌｌｏ", "１２３", "ＡＢＣ", "㐀", "〇", "ひらがな", "カタカナ", "한국어",
         "Привет", "naïve", "café", "\u00a0", "\u3000", "\t", "\n", "\r\n", "  ", "\x1c", "é"]


def zh_sentence(rng, n):
    out = []
    for _ in range(n):
        out.append(rng.choice(ZH_WORDS))
        if rng.random() < 0.15:
            out.append(rng.choice(ZH_PUNCT))
    if rng.random() < 0.7:
        out.append(rng.choice(["。", "！", "？", "?", "……", "。”"]))
    return "".join(out)


def en_sentence(rng, n):
    out = []
    for _ in range(n):
        out.append(rng.choice(EN_WORDS))
        if rng.random() < 0.15:
            out.append(rng.choice(EN_PUNCT))
    s = " ".join(out)
    if rng.random() < 0.6:
        s += rng.choice([".", "!", "?", "...", ".\"", ".)", "'"])
    return s


def mutate(rng, text):
    """A plausible prediction for a reference: drop, repeat, swap or insert tokens."""
    if not text:
        return text
    chars = list(text)
    ops = rng.randint(1, 4)
    for _ in range(ops):
        r = rng.random()
        i = rng.randrange(len(chars)) if chars else 0
        if r < 0.3 and chars:
            del chars[i:i + rng.randint(1, 4)]
        elif r < 0.55:
            chars[i:i] = list(rng.choice(ZH_WORDS + EN_WORDS))
        elif r < 0.8 and chars:
            j = min(len(chars), i + rng.randint(1, 6))
            chars[i:i] = chars[i:j]
        else:
            chars[i:i] = list(rng.choice(ZH_PUNCT + EN_PUNCT + OTHER))
    return "".join(chars)


def generate_pairs(seed=20261128):
    rng = random.Random(seed)
    pairs = []

    def add(kind, pred, ref):
        pairs.append({"id": f"{kind}-{len(pairs):04d}", "kind": kind, "prediction": pred, "reference": ref})

    # Fixed cases: SPECS.md §3 check values and the quirks it lists.
    add("spec", "我喜欢吃苹果，也喜欢吃香蕉。", "我很喜欢吃苹果和香蕉。")
    add("spec", "The cat sat on the mat.", "The cat sat on the mat.")
    add("spec", "", "参考答案")
    add("spec", "   ", "reference text")
    add("spec", "答案", "")
    add("spec", "", "")
    add("spec", "我 喜欢\t吃\r\n苹果\n\n香蕉", "我喜欢 吃苹果\n \n香蕉")
    add("spec", "１２３ＡＢＣ，价格是1,000元，50%的iPhone15和C++，π=3.14...", "价格1,000元 50% iPhone15 C++ 3.14")
    add("spec", "I don't know what 'quoted' “curly” means -- or *this*...", "I do not know what \"quoted\" means — or this.")
    add("spec", "表情😀👍🏽👨‍👩‍👧❤️很好", "表情😀很好❤️")
    add("spec", "㐀〇ひらがな", "㐀〇カタカナ")
    add("spec", "你好？世界！Hello? World! ......好的……嗯。”对", "你好？世界！Hello? World! ......好的……嗯。”对")
    add("spec", "Wait...... what?really!", "wait...... what? really!")
    add("spec", "B超检查结果正常", "做B超检查")
    add("spec", "the the the the the", "the cat the")
    add("spec", "我我我我我我", "我是我")
    add("spec", "'tis gonna be cannot wanna go", "'Tis gonna be can not wanna go")
    add("spec", "a,b c:d e:1 f,2 end,", "a, b c: d end:")
    add("spec", "\x1c分隔\x1d符\u00a0空格\u3000全角", "分隔符 空格 全角")
    for _ in range(40):
        ref = zh_sentence(rng, rng.randint(3, 20))
        add("zh", mutate(rng, ref), ref)
    for _ in range(40):
        ref = en_sentence(rng, rng.randint(3, 25))
        add("en", mutate(rng, ref), ref)
    for _ in range(40):
        parts = [zh_sentence(rng, rng.randint(1, 6)) if rng.random() < 0.5 else en_sentence(rng, rng.randint(1, 6))
                 for _ in range(rng.randint(2, 4))]
        ref = rng.choice(["", " ", "\n"]).join(parts)
        add("mixed", mutate(rng, ref), ref)
    for _ in range(30):
        pool = ZH_PUNCT + EN_PUNCT + OTHER
        ref = "".join(rng.choice(pool + ZH_WORDS[:5] + EN_WORDS[:5]) for _ in range(rng.randint(3, 15)))
        add("punct", mutate(rng, ref), ref)
    for _ in range(20):
        ref = zh_sentence(rng, 5) if rng.random() < 0.5 else en_sentence(rng, 5)
        if rng.random() < 0.5:
            add("empty", rng.choice(["", " ", "\n", "\t \n"]), ref)
        else:
            add("empty", ref, rng.choice(["", "  "]))
    for _ in range(15):
        if rng.random() < 0.5:
            ref = "".join(zh_sentence(rng, rng.randint(10, 30)) for _ in range(rng.randint(10, 20)))
        else:
            ref = " ".join(en_sentence(rng, rng.randint(10, 30)) for _ in range(rng.randint(10, 20)))
        add("long", mutate(rng, ref), ref)
    for _ in range(30):
        w = rng.choice(ZH_WORDS + EN_WORDS)
        sep = "" if any("\u4e00" <= c <= "\u9fa5" for c in w) else " "
        ref = sep.join([w] * rng.randint(1, 8) + [rng.choice(ZH_WORDS + EN_WORDS)])
        pred = sep.join([w] * rng.randint(1, 12))
        add("repeat", pred, ref)
    for _ in range(40):
        ref = zh_sentence(rng, rng.randint(2, 10)) + "".join(rng.choice(OTHER) for _ in range(3)) + \
            en_sentence(rng, rng.randint(2, 6))
        add("unicode", mutate(rng, ref), ref)
    for _ in range(60):
        ref = rng.choice([zh_sentence, en_sentence])(rng, rng.randint(4, 14))
        add("para", rng.choice([zh_sentence, en_sentence])(rng, rng.randint(4, 14)), ref)
    return pairs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true", help="time evalscope's functions on the golden pairs")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import jieba
    import nltk
    import rouge_chinese
    from importlib.metadata import version

    for pkg, want in PINNED.items():
        got = version(pkg)
        if got != want:
            sys.exit(f"{pkg} {got} installed; the golden file is pinned to {want}")
    jieba.setLogLevel(60)
    jieba.initialize()
    word_tokenize = patch_word_tokenize()
    functions, rouge = load_evalscope_metrics()
    from rouge_chinese import Rouge

    pairs = generate_pairs()
    if args.bench:
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            for p in pairs:
                functions.bleu_ngram_one_sample(p["prediction"], p["reference"])
                rouge.compute_rouge_score_one_sample_zh([p["prediction"]], [p["reference"]])
        dt = time.perf_counter() - t0
        n = len(pairs) * args.repeat
        print(json.dumps({"oracle": "evalscope 1.14.1 bleu_ngram_one_sample + compute_rouge_score_one_sample_zh",
                          "pairs": n, "seconds": dt, "pairs_per_s": n / dt}))
        return

    def is_zh(s):
        return any("\u4e00" <= c <= "\u9fa5" for c in s)

    def bleu_tokens(s):
        return list(jieba.cut(s)) if is_zh(s) else word_tokenize(s)

    rows = []
    for p in pairs:
        pred, ref = p["prediction"], p["reference"]
        row = dict(p)
        row["pred_tokens"] = bleu_tokens(pred)
        row["ref_tokens"] = bleu_tokens(ref)
        row.update(functions.bleu_ngram_one_sample(pred, ref))
        scores = rouge.compute_rouge_score_one_sample_zh([pred], [ref])
        # Did rouge-chinese refuse the pair (evalscope then reports 0.0)?
        pj = " ".join(jieba.cut(pred)) if is_zh(pred) else pred
        rj = " ".join(jieba.cut(ref)) if is_zh(ref) else ref
        try:
            Rouge().get_scores(pj, rj, ignore_empty=True)
            dropped = False
        except Exception:
            dropped = True
        row["rouge_dropped"] = dropped
        for k, v in scores.items():  # 'Rouge-1-R' -> 'rouge-1-r'
            row[k.lower()] = v
        rows.append(row)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w", encoding="utf-8") as f:
        f.write(json.dumps({"oracle": PINNED, "note": "header row; see scripts/oracles/metrics_golden.py"},
                           ensure_ascii=False) + "\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {len(rows)} pairs to {OUT}")


if __name__ == "__main__":
    main()
