//! Evaluation metrics and datasets equal to evalscope's "Native" backend (issue 6, SPECS.md §3).
//!
//! * [`score_pair`]: BLEU-1..4 and ROUGE-1/2/L (R, P, F) of one (prediction, reference) pair,
//!   equal to evalscope 1.14.1's `bleu_ngram_one_sample` and `compute_rouge_score_one_sample_zh`
//!   to 1e-6 (golden file `tests/fixtures/metrics_golden.jsonl`, written by
//!   `scripts/oracles/metrics_golden.py`). Tokenisers in [`tokenize`].
//! * [`mcq`]: general_mcq CSV loading, prompt (with few-shot), answer extraction, accuracy.
//! * [`qa`]: general_qa JSONL loading (both row layouts).
//! * [`report`]: the `Model | Dataset | Metric | Subset | Num | Score | Cat.0` table, its JSON and
//!   CSV forms, and the side-by-side comparison of two reports.
//!
//! Check values (evalscope 1.14.1; rows `spec-*` of the golden file):
//!
//! | prediction / reference | bleu-1..4 | rouge-1/2/l F |
//! |---|---|---|
//! | `我喜欢吃苹果，也喜欢吃香蕉。` / `我很喜欢吃苹果和香蕉。` | 0.6, 0.333333, 0.125, 2.2e-308 | 0.75, 0.4, 0.666667 |
//! | `我 喜欢\t吃\r\n苹果\n\n香蕉` / `我喜欢 吃苹果\n \n香蕉` | 0.8, 0.222222, ~0, ~0 | 1, 1, 1 (F = 0.999999995) |
//! | `１２３ＡＢＣ，价格是1,000元，50%的iPhone15和C++，π=3.14...` / `价格1,000元 50% iPhone15 C++ 3.14` | 0.375, 0.130435, 0.0909091, 0.047619 | 0.580645, 0.193548, 0.545455 |
//! | `Wait...... what?really!` / `wait...... what? really!` | 0.833333, 0.8, 0.75, 0.666667 | 0.666667, 0.5, 0.666667 |
//! | `'tis gonna be cannot wanna go` / `'Tis gonna be can not wanna go` | 0.9, 0.777778, 0.75, 0.714286 | 0.615385, 0.363636, 0.615385 |
//! | `B超检查结果正常` / `做B超检查` | 0.5, 0.333333, ~0, ~0 | 0.571429, 0.4, 0.571429 |
//! | `㐀〇ひらがな` / `㐀〇カタカナ` (not "Chinese") | 0, 0, 0, 0 | 0, 0, 0 |
//! | `""` or `"   "` / anything | 0, 0, 0, 0 | no ROUGE (evalscope 1.14.1: 0.0) |
//!
//! SPECS.md §3's check values are the first row (`spec-0000`); its P / R in the golden file:
//! rouge-1 0.75 / 0.75, rouge-2 0.375 / 0.428571, rouge-l 0.6 / 0.75. The whole golden file is
//! checked by `tests/parity.rs` (`cargo test -p pipeline-metrics --test parity`).
//!
//! jieba-rs 0.11 differs from python jieba 0.42.1 in two places, both corrected in [`tokenize`]:
//! its dictionary lacks `B超`, and its HMM fallback keeps `state-of-the-art` / `U.S` whole where
//! python splits on every `-`, `_` and on a `.` not followed by digits.
//!
//! Known difference from evalscope: `word_tokenize` runs punkt sentence splitting first, whose
//! data no package ships offline; we tokenise with `NLTKWordTokenizer` directly (SPECS.md §3),
//! which differs only on a period inside a multi-sentence English string. ROUGE of an empty or
//! whitespace-only side is left out (evalscope < 1.12); evalscope >= 1.12 counts it as 0.

pub mod bleu;
mod error;
pub mod eval;
pub mod mcq;
pub mod perplexity;
pub mod qa;
pub mod report;
pub mod rouge;
mod score;
pub mod tokenize;

pub use error::DataError;
pub use rouge::{RougeScores, Rpf};
pub use score::{mean_scores, score_pair, PairScores, QA_METRICS};
