//! Per-pair scores under evalscope's metric names, and their means.

use serde_json::{Map, Value};

use crate::bleu::bleu_1_to_4;
use crate::rouge::{rouge_scores, RougeScores};
use crate::tokenize::bleu_tokens;

/// The metric names, in the order evalscope's general_qa table lists them.
pub const QA_METRICS: [&str; 13] = [
    "bleu-1",
    "bleu-2",
    "bleu-3",
    "bleu-4",
    "rouge-1-r",
    "rouge-1-p",
    "rouge-1-f",
    "rouge-2-r",
    "rouge-2-p",
    "rouge-2-f",
    "rouge-l-r",
    "rouge-l-p",
    "rouge-l-f",
];

/// BLEU-1..4 and ROUGE of one (prediction, reference) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScores {
    pub bleu: [f64; 4],
    /// `None` where evalscope (before 1.12) leaves the pair out of ROUGE: an empty or
    /// whitespace-only side.
    pub rouge: Option<RougeScores>,
}

impl PairScores {
    /// `(name, value)` for every metric this pair has (ROUGE names absent when dropped).
    pub fn entries(&self) -> Vec<(&'static str, f64)> {
        let mut v: Vec<(&'static str, f64)> = (0..4).map(|k| (QA_METRICS[k], self.bleu[k])).collect();
        if let Some(r) = &self.rouge {
            for (k, s) in [r.rouge1, r.rouge2, r.rougel].iter().enumerate() {
                v.push((QA_METRICS[4 + 3 * k], s.r));
                v.push((QA_METRICS[5 + 3 * k], s.p));
                v.push((QA_METRICS[6 + 3 * k], s.f));
            }
        }
        v
    }

    /// The metrics as a JSON object under evalscope's lower-case keys.
    pub fn to_json(&self) -> Map<String, Value> {
        self.entries().into_iter().map(|(k, v)| (k.to_string(), Value::from(v))).collect()
    }
}

/// Score one pair exactly as evalscope's general_qa does.
pub fn score_pair(prediction: &str, reference: &str) -> PairScores {
    let bleu = bleu_1_to_4(&bleu_tokens(reference), &bleu_tokens(prediction));
    PairScores { bleu, rouge: rouge_scores(prediction, reference) }
}

/// Mean and count of each metric over pairs (a metric's count excludes pairs without it).
pub fn mean_scores(scores: &[PairScores]) -> Vec<(&'static str, usize, f64)> {
    QA_METRICS
        .iter()
        .map(|&name| {
            let vals: Vec<f64> = scores
                .iter()
                .filter_map(|s| s.entries().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v))
                .collect();
            let mean = if vals.is_empty() { 0.0 } else { vals.iter().sum::<f64>() / vals.len() as f64 };
            (name, vals.len(), mean)
        })
        .collect()
}
