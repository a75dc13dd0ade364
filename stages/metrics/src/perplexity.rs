//! Perplexity of held-out plain text, as llama.cpp's `perplexity` tool measures it (the figure of
//! its quantisation scoreboard), through any [`Predictor`].
//!
//! The text of each `{subset}.txt` in the folder is tokenised whole (no chat template, no special
//! tokens) and cut into `⌊tokens / n_ctx⌋` consecutive windows of `n_ctx` tokens (a tail shorter
//! than a window is left out). Each window is one forward pass from an empty context; when the
//! tokenizer adds a BOS token, the window's first token is replaced by it. The first half of each
//! window is context only: the tokens at positions `n_ctx/2 + 1 .. n_ctx` are scored, each
//! predicted from all the window's tokens before it, so every scored token sees at least `n_ctx/2`
//! tokens of context. Perplexity = `exp(mean negative log-likelihood)` over the scored tokens of
//! all windows of a subset. Like llama.cpp, a text needs at least `2 · n_ctx` tokens.

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::eval::{EvalError, Predictor, RunOptions};
use crate::report::ReportRow;
use crate::DataError;

/// One scored window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub subset: String,
    /// Index of the window in its text.
    pub window: usize,
    /// Its token range in the tokenised text.
    pub start: usize,
    pub end: usize,
    /// Tokens scored (`n_ctx - 1 - n_ctx/2`).
    pub scored: usize,
    /// Their summed negative log-likelihood (nats).
    pub nll: f64,
}

/// The `{subset}.txt` files of a folder, sorted.
pub fn list_text_subsets(dir: &Path) -> Result<Vec<String>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::new(dir, None, e))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".txt")).map(str::to_string))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(DataError::new(dir, None, "no `{subset}.txt` file in this text folder"));
    }
    Ok(names)
}

/// The windows of a text of `n_tokens` tokens (module docs).
pub fn windows(n_tokens: usize, n_ctx: usize) -> Vec<Range<usize>> {
    (0..n_tokens / n_ctx.max(1)).map(|i| i * n_ctx..(i + 1) * n_ctx).collect()
}

/// Position from which a window's next-token predictions are scored: logits at positions
/// `first .. n_ctx - 1` (predicting tokens `first + 1 .. n_ctx`).
pub fn first_scored(n_ctx: usize) -> usize {
    n_ctx / 2
}

/// The perplexity of each selected subset of `dir` (one `perplexity` row each, `num` = scored
/// tokens) and one record per window. `opts.limit` caps the windows per subset.
pub fn run_perplexity(
    dir: &Path,
    n_ctx: usize,
    opts: RunOptions<'_>,
    predictor: &mut dyn Predictor,
) -> Result<(Vec<ReportRow>, Vec<WindowRecord>), EvalError> {
    if n_ctx < 4 {
        return Err(EvalError::Predict(format!("n_ctx = {n_ctx}: a window needs at least 4 tokens")));
    }
    let all = list_text_subsets(dir)?;
    let subsets = if opts.subsets.is_empty() {
        all
    } else {
        for w in &opts.subsets {
            if !all.contains(w) {
                return Err(DataError::new(dir, None, format!("no subset `{w}` (found: {})", all.join(", "))).into());
            }
        }
        opts.subsets.clone()
    };
    let mut texts = Vec::new();
    for s in &subsets {
        let path = dir.join(format!("{s}.txt"));
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::new(&path, None, e))?;
        let (ids, bos) = predictor.text_tokens(&text).map_err(|e| EvalError::Predict(e.to_string()))?;
        if ids.len() < 2 * n_ctx {
            return Err(DataError::new(
                &path,
                None,
                format!(
                    "{} tokens: perplexity with n_ctx = {n_ctx} needs at least {} (2 · n_ctx, as llama.cpp's perplexity)",
                    ids.len(),
                    2 * n_ctx
                ),
            )
            .into());
        }
        let mut w = windows(ids.len(), n_ctx);
        if let Some(l) = opts.limit {
            w.truncate(l);
        }
        texts.push((s.clone(), ids, bos, w));
    }
    let total: usize = texts.iter().map(|t| t.3.len()).sum();
    let model = predictor.name();
    let first = first_scored(n_ctx);
    let (mut rows, mut records, mut done) = (Vec::new(), Vec::new(), 0);
    for (subset, ids, bos, wins) in &texts {
        let (mut nll, mut scored) = (0f64, 0usize);
        for (i, r) in wins.iter().enumerate() {
            let mut window = ids[r.clone()].to_vec();
            if let Some(b) = bos {
                window[0] = *b;
            }
            let lp = predictor.next_token_logprobs(&window, first).map_err(|e| EvalError::Predict(e.to_string()))?;
            if lp.len() != n_ctx - 1 - first {
                return Err(EvalError::Predict(format!(
                    "{} log-probabilities for {} scored positions",
                    lp.len(),
                    n_ctx - 1 - first
                )));
            }
            let w_nll = -lp.iter().sum::<f64>();
            nll += w_nll;
            scored += lp.len();
            records.push(WindowRecord {
                subset: subset.clone(),
                window: i,
                start: r.start,
                end: r.end,
                scored: lp.len(),
                nll: w_nll,
            });
            done += 1;
            if !(opts.progress)(done, total) {
                return Err(EvalError::Cancelled);
            }
        }
        rows.push(ReportRow {
            model: model.clone(),
            dataset: "text".into(),
            metric: "perplexity".into(),
            subset: subset.clone(),
            num: scored,
            score: (nll / scored as f64).exp(),
            cat0: "default".into(),
        });
    }
    Ok((rows, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{PredictError, Prompt};

    /// Tokens are the text's bytes; every next token has probability 1/2 except after byte `b'a'`
    /// (probability 1/4), so the expected perplexity is known in closed form.
    struct Bytes {
        bos: Option<u32>,
        seen: Vec<Vec<u32>>,
    }
    impl Predictor for Bytes {
        fn name(&self) -> String {
            "bytes".into()
        }
        fn generate(&mut self, _: &[Prompt]) -> Result<Vec<String>, PredictError> {
            Err("no generation".into())
        }
        fn loglik(&mut self, _: &Prompt, _: &[String]) -> Result<Vec<f64>, PredictError> {
            Err("no loglik".into())
        }
        fn text_tokens(&mut self, text: &str) -> Result<(Vec<u32>, Option<u32>), PredictError> {
            Ok((text.bytes().map(u32::from).collect(), self.bos))
        }
        fn next_token_logprobs(&mut self, ids: &[u32], from: usize) -> Result<Vec<f64>, PredictError> {
            self.seen.push(ids.to_vec());
            Ok((from..ids.len() - 1).map(|i| if ids[i] == b'a' as u32 { 0.25f64.ln() } else { 0.5f64.ln() }).collect())
        }
    }

    #[test]
    fn windows_score_their_second_half_like_llama_cpp() {
        assert_eq!(windows(10, 4), [0..4, 4..8]);
        assert_eq!(first_scored(512), 256);
        let tmp = tempfile::tempdir().unwrap();
        // 20 bytes, n_ctx 8: windows 0..8 and 8..16, positions 4..7 scored in each (3 tokens)
        std::fs::write(tmp.path().join("t.txt"), "xxxxaxxxxxxxxaxxyyyy").unwrap();
        std::fs::write(tmp.path().join("short.txt"), "abc").unwrap();
        let mut p = Bytes { bos: Some(1), seen: Vec::new() };
        let mut progress = |_: usize, _: usize| true;
        let opts = RunOptions { subsets: vec!["t".into()], limit: None, batch_size: 1, progress: &mut progress };
        let (rows, recs) = run_perplexity(tmp.path(), 8, opts, &mut p).unwrap();
        // window 0 scores the logits at positions 4 ('a'), 5, 6; window 1 at 12, 13 ('a'), 14
        let nll = -(2.0 * 0.25f64.ln() + 4.0 * 0.5f64.ln());
        assert_eq!((rows[0].metric.as_str(), rows[0].num), ("perplexity", 6));
        assert!((rows[0].score - (nll / 6.0).exp()).abs() < 1e-12, "{}", rows[0].score);
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[1].start, recs[1].end, recs[1].scored), (8, 16, 3));
        assert_eq!(p.seen[0][0], 1, "a window starts with the BOS token");
        assert_eq!(&p.seen[1][1..], "xxxxxaxx".as_bytes().iter().skip(1).map(|&b| b as u32).collect::<Vec<_>>());

        let mut progress = |_: usize, _: usize| true;
        let opts = RunOptions { subsets: vec!["short".into()], limit: None, batch_size: 1, progress: &mut progress };
        let err = run_perplexity(tmp.path(), 8, opts, &mut p).unwrap_err().to_string();
        assert!(err.contains("3 tokens") && err.contains("at least 16"), "{err}");
    }
}
