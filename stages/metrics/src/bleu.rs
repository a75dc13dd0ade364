//! nltk's `sentence_bleu` with one-hot weights, as evalscope's `bleu_ngram_one_sample` calls it:
//! `bleu-n` is the brevity penalty times the clipped precision of n-grams of length n alone.

use std::collections::HashMap;

/// `(numerator, denominator)` of nltk's `modified_precision` for order `n` (one reference).
fn modified_precision<S: AsRef<str>>(reference: &[S], hypothesis: &[S], n: usize) -> (usize, usize) {
    if hypothesis.len() < n {
        return (0, 1);
    }
    let mut counts: HashMap<Vec<&str>, (usize, usize)> = HashMap::new();
    for w in hypothesis.windows(n) {
        counts.entry(w.iter().map(AsRef::as_ref).collect()).or_default().0 += 1;
    }
    if reference.len() >= n {
        for w in reference.windows(n) {
            let key: Vec<&str> = w.iter().map(AsRef::as_ref).collect();
            if let Some(e) = counts.get_mut(&key) {
                e.1 += 1;
            }
        }
    }
    let numerator = counts.values().map(|&(h, r)| h.min(r)).sum();
    let total: usize = counts.values().map(|&(h, _)| h).sum();
    (numerator, total.max(1))
}

/// nltk's `brevity_penalty(closest_ref_len, hyp_len)`.
fn brevity_penalty(r: usize, c: usize) -> f64 {
    if c > r {
        1.0
    } else if c == 0 {
        0.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    }
}

/// `[bleu-1, bleu-2, bleu-3, bleu-4]` of a tokenised hypothesis against one tokenised reference,
/// no smoothing (nltk `method0`: a zero count becomes `f64::MIN_POSITIVE`, so the score is
/// `BP × ~2.2e-308`; no matching unigram at all gives exactly 0).
pub fn bleu_1_to_4<S: AsRef<str>>(reference: &[S], hypothesis: &[S]) -> [f64; 4] {
    let p: Vec<(usize, usize)> = (1..=4).map(|n| modified_precision(reference, hypothesis, n)).collect();
    if p[0].0 == 0 {
        return [0.0; 4];
    }
    let bp = brevity_penalty(reference.len(), hypothesis.len());
    let mut out = [0.0; 4];
    for (k, &(num, den)) in p.iter().enumerate() {
        let pn = if num == 0 { f64::MIN_POSITIVE } else { num as f64 / den as f64 };
        // nltk: bp * exp(fsum(w_i * log(p_i))) with one weight 1 and the others 0.
        out[k] = bp * pn.ln().exp();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_check_values() {
        let h = ["我", "喜欢", "吃", "苹果", "，", "也", "喜欢", "吃", "香蕉", "。"];
        let r = ["我", "很", "喜欢", "吃", "苹果", "和", "香蕉", "。"];
        let b = bleu_1_to_4(&r, &h);
        assert!((b[0] - 0.6).abs() < 1e-12 && (b[1] - 1.0 / 3.0).abs() < 1e-12 && (b[2] - 0.125).abs() < 1e-12);
        assert!(b[3] > 0.0 && b[3] < 1e-300);
    }

    #[test]
    fn empty_hypothesis_and_no_unigram_match_are_zero() {
        assert_eq!(bleu_1_to_4::<&str>(&["a"], &[]), [0.0; 4]);
        assert_eq!(bleu_1_to_4(&["a"], &["b"]), [0.0; 4]);
    }
}
