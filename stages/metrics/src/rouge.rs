//! rouge-chinese 1.0.3's `Rouge().get_scores(hyp, ref, ignore_empty=True)` as evalscope's
//! `compute_rouge_score_one_sample_zh` calls it: Chinese text is jieba-cut and space-joined first,
//! sentences are cut on `?。！？` / six dots / two `…`, ROUGE-1/2 count distinct n-grams, ROUGE-L is
//! the LCS of the whole token lists, F = 2PR/(P+R+1e-8).

use std::collections::HashSet;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::tokenize::{is_chinese, jieba_cut, py_rstrip, py_split};

/// Recall, precision and F of one ROUGE variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rpf {
    pub r: f64,
    pub p: f64,
    pub f: f64,
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RougeScores {
    pub rouge1: Rpf,
    pub rouge2: Rpf,
    pub rougel: Rpf,
}

fn cut_sent_rules() -> &'static [Regex; 4] {
    static RULES: OnceLock<[Regex; 4]> = OnceLock::new();
    RULES.get_or_init(|| {
        [r"([。！？?])([^”’])", r"(\.{6})([^”’])", r"(…{2})([^”’])", r"([。！？?][”’])([^，。！？?])"]
            .map(|p| Regex::new(p).expect("static regex"))
    })
}

/// rouge-chinese's `cut_sent`: newline-separated sentences.
fn cut_sent(para: &str) -> Vec<String> {
    let mut s = para.to_string();
    for re in cut_sent_rules() {
        s = re.replace_all(&s, "${1}\n${2}").into_owned();
    }
    py_rstrip(&s).split('\n').map(str::to_string).collect()
}

/// The word list rouge-chinese scores (`_split_into_words` of the normalised sentences), or
/// `None` when it has no sentence (it then raises and evalscope skips the pair).
fn rouge_words(text: &str) -> Option<Vec<String>> {
    let sentences: Vec<String> = cut_sent(text)
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| py_split(&s).collect::<Vec<_>>().join(" "))
        .collect();
    if sentences.is_empty() {
        return None;
    }
    Some(sentences.iter().flat_map(|s| s.split(' ').map(str::to_string)).collect())
}

/// What evalscope hands rouge-chinese: the jieba tokens joined by spaces for Chinese text, the
/// raw string otherwise.
pub fn rouge_input(text: &str) -> String {
    if is_chinese(text) {
        jieba_cut(text).join(" ")
    } else {
        text.to_string()
    }
}

fn f_score(p: f64, r: f64) -> f64 {
    2.0 * ((p * r) / (p + r + 1e-8))
}

fn rouge_n(hyp: &[String], refr: &[String], n: usize) -> Rpf {
    let grams = |w: &'_ [String]| -> HashSet<Vec<String>> {
        if w.len() < n {
            HashSet::new()
        } else {
            w.windows(n).map(<[String]>::to_vec).collect()
        }
    };
    let (h, r) = (grams(hyp), grams(refr));
    let overlap = h.intersection(&r).count() as f64;
    let p = if h.is_empty() { 0.0 } else { overlap / h.len() as f64 };
    let rec = if r.is_empty() { 0.0 } else { overlap / r.len() as f64 };
    Rpf { r: rec, p, f: f_score(p, rec) }
}

fn lcs_len(x: &[String], y: &[String]) -> usize {
    let mut prev = vec![0usize; y.len() + 1];
    let mut cur = vec![0usize; y.len() + 1];
    for xi in x {
        for (j, yj) in y.iter().enumerate() {
            cur[j + 1] = if xi == yj { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[y.len()]
}

/// ROUGE of one (prediction, reference) pair, or `None` where evalscope drops the pair (an empty
/// side, or one with no sentence such as whitespace only).
pub fn rouge_scores(prediction: &str, reference: &str) -> Option<RougeScores> {
    let (p, r) = (rouge_input(prediction), rouge_input(reference));
    if p.is_empty() || r.is_empty() {
        return None;
    }
    let hyp = rouge_words(&p)?;
    let refr = rouge_words(&r)?;
    let l = lcs_len(&refr, &hyp) as f64;
    let (rl, pl) = (l / refr.len() as f64, l / hyp.len() as f64);
    Some(RougeScores {
        rouge1: rouge_n(&hyp, &refr, 1),
        rouge2: rouge_n(&hyp, &refr, 2),
        rougel: Rpf { r: rl, p: pl, f: f_score(pl, rl) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_check_values() {
        let s = rouge_scores("我喜欢吃苹果，也喜欢吃香蕉。", "我很喜欢吃苹果和香蕉。").unwrap();
        assert!((s.rouge1.p - 0.75).abs() < 1e-12 && (s.rouge1.r - 0.75).abs() < 1e-12);
        assert!((s.rouge2.p - 0.375).abs() < 1e-12 && (s.rouge2.r - 3.0 / 7.0).abs() < 1e-12);
        assert!((s.rougel.p - 0.6).abs() < 1e-12 && (s.rougel.r - 0.75).abs() < 1e-12);
    }

    #[test]
    fn whitespace_only_line_is_an_empty_token() {
        assert_eq!(rouge_words("a\n \nb").unwrap(), ["a", "", "b"]);
        assert!(rouge_scores("  ", "x").is_none());
        assert!(rouge_scores("", "x").is_none());
    }
}
