//! KV-cached incremental decoding with transformers' sampling semantics: repetition penalty
//! (CTRL: divide positive logits, multiply negative ones, over prompt + generated ids), then
//! temperature, top-k, top-p (smallest set of most likely tokens whose mass reaches `top_p`).
//! `temperature == 0` is greedy. Each row has its own ChaCha8 generator seeded with `seed`, so a
//! prompt's sample does not depend on the other rows of the batch. Batches are left-padded.

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::batch::Batch;
use crate::dims::Dims;
use crate::error::ModelError;
use crate::qwen2::Qwen2;

/// Turns generated ids into text (for stop strings and [`Generation::text`]).
pub type Decoder<'a> = &'a dyn Fn(&[u32]) -> String;

/// Decoding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    /// Generation ends after any of these ids (it is kept in `tokens`, not in `text`).
    pub stop_token_ids: Vec<u32>,
    /// Generation ends when the decoded text contains one of these (text is cut before it).
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token id or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Decoded text, stop token/string removed (when a decoder was given).
    pub text: Option<String>,
    pub finish: FinishReason,
}

/// Picks the next token from one row's logits (modified in place).
pub fn sample_next(logits: &mut [f32], history: &[u32], cfg: &GenerationConfig, rng: &mut ChaCha8Rng) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l < 0.0 { *l * cfg.repetition_penalty } else { *l / cfg.repetition_penalty };
            }
        }
    }
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / cfg.temperature)).collect();
    // descending by logit, ties by lower id
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cfg.top_k > 0 && cfg.top_k < cand.len() {
        cand.truncate(cfg.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let z: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u: f32 = rng.gen();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates a continuation of every prompt (batched, left-padded, KV-cached). `decode` turns ids
/// into text; it is needed for stop strings and fills [`Generation::text`].
pub fn generate<D: Device<f32>, S: Dims>(
    model: &Qwen2<D, S>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    decode: Option<Decoder<'_>>,
) -> Result<Vec<Generation>, ModelError> {
    generate_until(model, prompts, cfg, decode, &|| false)
}

/// [`generate`], asking `interrupted` before every decoding step: when it says `true` (Ctrl-C),
/// generation stops with [`ModelError::Interrupted`] within one token's time. A prompt plus
/// `max_new_tokens` longer than the model's context is refused before anything runs.
pub fn generate_until<D: Device<f32>, S: Dims>(
    model: &Qwen2<D, S>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    decode: Option<Decoder<'_>>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Vec<Generation>, ModelError> {
    let context = model.cfg.max_position_embeddings;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest.checked_add(cfg.max_new_tokens).is_none_or(|n| n > context) {
        return Err(ModelError::config(
            "max_new_tokens",
            format!(
                "{} new tokens after a prompt of {longest} exceed the model's context of {context} tokens",
                cfg.max_new_tokens
            ),
        ));
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(ModelError::Batch(format!("prompt {i} is empty")));
    }
    if !cfg.stop_strings.is_empty() && decode.is_none() {
        return Err(ModelError::Batch("stop strings need a decoder".into()));
    }
    let b = prompts.len();
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * len);
    let mut mask = Vec::with_capacity(b * len);
    for p in prompts {
        ids.extend(std::iter::repeat_n(0, len - p.len()));
        mask.extend(std::iter::repeat_n(false, len - p.len()));
        ids.extend_from_slice(p);
        mask.extend(std::iter::repeat_n(true, p.len()));
    }
    let mut cache = model.new_cache();
    let mut rngs: Vec<ChaCha8Rng> = (0..b).map(|_| ChaCha8Rng::seed_from_u64(cfg.seed)).collect();
    let mut out: Vec<Generation> =
        (0..b).map(|_| Generation { tokens: Vec::new(), text: None, finish: FinishReason::Length }).collect();
    let mut done = vec![false; b];
    let mut logits = if cfg.max_new_tokens > 0 {
        model.forward_cached(&Batch::with_mask(ids, mask, b, len)?, &mut cache)?
    } else {
        Vec::new()
    };
    for step in 0..cfg.max_new_tokens {
        if interrupted() {
            return Err(ModelError::Interrupted);
        }
        let mut next = vec![0u32; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            // Regression (issue 14, defect 9): NaN weights gave NaN logits, argmax picked id 0 and
            // an empty string came out with success.
            if logits[r].iter().any(|l| l.is_nan()) {
                return Err(ModelError::NonFinite("NaN"));
            }
            let mut hist = prompts[r].clone();
            hist.extend_from_slice(&out[r].tokens);
            let t = sample_next(&mut logits[r], &hist, cfg, &mut rngs[r]);
            next[r] = t;
            out[r].tokens.push(t);
            if cfg.stop_token_ids.contains(&t) {
                done[r] = true;
                out[r].finish = FinishReason::Stop;
            } else if !cfg.stop_strings.is_empty() {
                let text = decode.expect("checked")(&out[r].tokens);
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    done[r] = true;
                    out[r].finish = FinishReason::Stop;
                }
            }
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let mask: Vec<bool> = done.iter().map(|d| !d).collect();
        logits = model.forward_cached(&Batch::with_mask(next, mask, b, 1)?, &mut cache)?;
    }
    if let Some(dec) = decode {
        for g in &mut out {
            let mut toks = g.tokens.as_slice();
            if let Some(last) = toks.last() {
                if g.finish == FinishReason::Stop && cfg.stop_token_ids.contains(last) {
                    toks = &toks[..toks.len() - 1];
                }
            }
            let mut text = dec(toks);
            if let Some(cut) = cfg.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
            g.text = Some(text);
        }
    }
    Ok(out)
}
