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
//! Known difference from evalscope: `word_tokenize` runs punkt sentence splitting first, whose
//! data no package ships offline; we tokenise with `NLTKWordTokenizer` directly (SPECS.md §3),
//! which differs only on a period inside a multi-sentence English string. ROUGE of an empty or
//! whitespace-only side is left out (evalscope < 1.12); evalscope >= 1.12 counts it as 0.

pub mod bleu;
mod error;
pub mod eval;
pub mod mcq;
pub mod qa;
pub mod report;
pub mod rouge;
mod score;
pub mod tokenize;

pub use error::DataError;
pub use rouge::{RougeScores, Rpf};
pub use score::{mean_scores, score_pair, PairScores, QA_METRICS};
