//! One sequence being generated: its own KV cache, sampling generator and text, stepped one token
//! at a time by the engine: [`Sequence::sample`] picks the token, [`Sequence::advance`] runs the
//! pending tokens of several sequences through the model in one batched forward. Alone, a step is
//! exactly one iteration of `pipeline_model::generate`'s loop for a batch of one (same
//! `forward_cached` calls, same `sample_next`, same stop rules), so greedy output equals
//! `pipeline generate`'s.
//!
//! Text is released incrementally ([`TextTracker`]): what has been sent is always a prefix of the
//! final text, holding back an incomplete UTF-8 character (a trailing U+FFFD) and any tail that
//! could still become a stop string. The non-streamed content is the same deltas joined, so the
//! two agree by construction.

use std::sync::Arc;

use dfdx::prelude::Device;
use pipeline_model::generate::sample_next;
use pipeline_model::{Batch, FinishReason, GenerationConfig, KvCache, ModelError, Qwen2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::codec::TextCodec;

/// Sampling settings of one request (validated by the handlers).
#[derive(Debug, Clone)]
pub struct Sampling {
    /// `max_new_tokens`, temperature, top-k/p, repetition penalty, stop ids and strings, seed.
    pub gen: GenerationConfig,
    /// OpenAI's penalties on the generated tokens: `logit -= presence·[count > 0] + frequency·count`.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The text this token added to the content (tokens join to the content).
    pub text: String,
    pub logprob: f32,
    /// `(token text, logprob)`, most likely first.
    pub top: Vec<(String, f32)>,
}

/// What one step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Text released by this step (may be empty).
    pub text: String,
    /// With logprobs on: the sampled token (none for a stop token, which is not in the content).
    pub logprob: Option<TokenLogprob>,
    /// Set on the last step.
    pub finish: Option<FinishReason>,
}

pub struct Sequence<D: Device<f32>> {
    prompt: Arc<Vec<u32>>,
    tokens: Vec<u32>,
    cache: KvCache<D>,
    /// The next position's logits.
    logits: Vec<f32>,
    rng: ChaCha8Rng,
    sampling: Arc<Sampling>,
    text: TextTracker,
    pub finished: bool,
    /// Sampled, not yet run through the model (see [`Self::advance`]).
    pending: Option<u32>,
}

impl<D: Device<f32>> Sequence<D> {
    /// Runs the prompt through `model` and returns `n` sequences sharing its KV cache (copied on
    /// write); choice `i` samples with seed `seed + i`, so choice 0 is what `pipeline generate`
    /// gives.
    pub fn prefill(
        model: &Qwen2<D>,
        prompt: Arc<Vec<u32>>,
        sampling: Arc<Sampling>,
        n: usize,
    ) -> Result<Vec<Self>, ModelError> {
        let mut cache = model.new_cache();
        let logits = model
            .forward_cached(&Batch::new(prompt.to_vec(), 1, prompt.len())?, &mut cache)?
            .pop()
            .ok_or_else(|| ModelError::Batch("no logits".into()))?;
        Ok((0..n)
            .map(|i| Sequence {
                prompt: prompt.clone(),
                tokens: Vec::new(),
                cache: cache.clone(),
                logits: logits.clone(),
                rng: ChaCha8Rng::seed_from_u64(sampling.gen.seed.wrapping_add(i as u64)),
                text: TextTracker::new(sampling.gen.stop_strings.clone()),
                sampling: sampling.clone(),
                finished: false,
                pending: None,
            })
            .collect())
    }

    /// Tokens generated so far (a stop token included).
    pub fn generated(&self) -> usize {
        self.tokens.len()
    }

    /// Samples one token and updates the text; unless that finished the sequence, the token waits
    /// in [`Self::pending`] for [`Self::advance`] to run it through the model.
    pub fn sample(&mut self, codec: &TextCodec) -> Step {
        let s = &*self.sampling;
        let mut logits = std::mem::take(&mut self.logits);
        let top = s.logprobs.map(|k| top_logprobs(&logits, k));
        self.apply_penalties(&mut logits);
        let mut hist = Vec::with_capacity(self.prompt.len() + self.tokens.len());
        hist.extend_from_slice(&self.prompt);
        hist.extend_from_slice(&self.tokens);
        let t = sample_next(&mut logits, &hist, &s.gen, &mut self.rng);
        self.tokens.push(t);
        let is_stop_id = codec.stop_ids.contains(&t) || s.gen.stop_token_ids.contains(&t);
        let body = if is_stop_id { &self.tokens[..self.tokens.len() - 1] } else { &self.tokens[..] };
        let full = codec.decode(body);
        let mut finish = if is_stop_id || self.text.has_stop(&full) { Some(FinishReason::Stop) } else { None };
        let total = self.prompt.len() + self.tokens.len();
        if finish.is_none() && (self.tokens.len() >= s.gen.max_new_tokens || total >= codec.context_len) {
            finish = Some(FinishReason::Length);
        }
        let text = self.text.update(&full, finish.is_some());
        let logprob = match top {
            Some((lp, alts)) if !is_stop_id => Some(TokenLogprob {
                text: text.clone(),
                logprob: lp[t as usize],
                top: alts.into_iter().map(|(id, l)| (codec.decode(&[id]), l)).collect(),
            }),
            _ => None,
        };
        if finish.is_none() {
            self.pending = Some(t);
        } else {
            self.finished = true;
        }
        Step { text, logprob, finish }
    }

    /// The sampled token that still has to run through the model.
    pub fn pending(&self) -> Option<u32> {
        self.pending
    }

    /// Runs the pending token of every sequence in `seqs` (all of `model`) through the model in
    /// one forward: their caches are stacked into one batch (left-padded to the longest), stepped
    /// once, and split back — so N sequences read the weights once per token instead of N times.
    /// A batch of one is exactly `pipeline generate`'s step.
    pub fn advance(model: &Qwen2<D>, seqs: &mut [&mut Sequence<D>]) -> Result<(), ModelError> {
        let tokens: Vec<u32> = seqs.iter().filter_map(|s| s.pending).collect();
        if tokens.len() != seqs.len() {
            return Err(ModelError::Batch("a sequence without a pending token in a decoding batch".into()));
        }
        if let [one] = seqs {
            let mut next = model.forward_cached(&Batch::new(tokens, 1, 1)?, &mut one.cache)?;
            one.logits = next.pop().ok_or_else(|| ModelError::Batch("no logits".into()))?;
            one.pending = None;
            return Ok(());
        }
        let caches: Vec<KvCache<D>> =
            seqs.iter_mut().map(|s| std::mem::replace(&mut s.cache, model.new_cache())).collect();
        let (mut cache, pads) = KvCache::stack(caches)?;
        let logits = model.forward_cached(&Batch::new(tokens.clone(), tokens.len(), 1)?, &mut cache)?;
        for ((s, c), l) in seqs.iter_mut().zip(cache.split(&pads)?).zip(logits) {
            s.cache = c;
            s.logits = l;
            s.pending = None;
        }
        Ok(())
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let s = &*self.sampling;
        if s.presence_penalty == 0.0 && s.frequency_penalty == 0.0 {
            return;
        }
        let mut counts: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        for &t in &self.tokens {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= s.presence_penalty + s.frequency_penalty * c as f32;
            }
        }
    }
}

/// `log_softmax(logits)` and the `k` most likely ids with their log-probabilities (ties: lower id).
pub fn top_logprobs(logits: &[f32], k: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lz = max + z.ln() as f32;
    let lp: Vec<f32> = logits.iter().map(|&l| (l - lz).min(0.0)).collect();
    let mut ids: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(ids.len());
    if k > 0 {
        ids.select_nth_unstable_by(k - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    }
    ids.truncate(k);
    ids.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    let top = ids.into_iter().map(|i| (i, lp[i as usize])).collect();
    (lp, top)
}

/// Releases a growing text so that what was sent is always a prefix of the final text.
#[derive(Debug, Clone, Default)]
pub struct TextTracker {
    stops: Vec<String>,
    sent: String,
}

impl TextTracker {
    pub fn new(stops: Vec<String>) -> Self {
        TextTracker { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), sent: String::new() }
    }

    /// Whether `full` contains a stop string.
    pub fn has_stop(&self, full: &str) -> bool {
        self.stops.iter().any(|s| full.contains(s.as_str()))
    }

    /// Everything sent so far.
    #[cfg(test)]
    pub fn sent(&self) -> &str {
        &self.sent
    }

    /// The new text to send, given the whole text decoded so far; `last` releases everything (cut
    /// before the first stop string).
    pub fn update(&mut self, full: &str, last: bool) -> String {
        let cut = self.stops.iter().filter_map(|s| full.find(s.as_str())).min().unwrap_or(full.len());
        let mut end = cut;
        if !last {
            let head = &full[..end];
            end = head.trim_end_matches('\u{FFFD}').len();
            let head = &full[..end];
            // the longest tail of `head` that is a proper prefix of a stop string
            let hold = self
                .stops
                .iter()
                .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
                .filter(|p| head.ends_with(p))
                .map(str::len)
                .max()
                .unwrap_or(0);
            end -= hold;
        }
        let target = &full[..end];
        if target.len() <= self.sent.len() || !target.starts_with(self.sent.as_str()) {
            return String::new();
        }
        let delta = target[self.sent.len()..].to_string();
        self.sent.push_str(&delta);
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], texts: &[&str]) -> (Vec<String>, String) {
        let mut t = TextTracker::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for (i, full) in texts.iter().enumerate() {
            out.push(t.update(full, i + 1 == texts.len()));
        }
        (out, t.sent().to_string())
    }

    #[test]
    fn deltas_join_to_the_final_text() {
        let (d, all) = run(&[], &["He", "Hello", "Hello wo", "Hello world"]);
        assert_eq!(d, ["He", "llo", " wo", "rld"]);
        assert_eq!(all, "Hello world");
    }

    #[test]
    fn an_incomplete_character_is_held_back() {
        let (d, _) = run(&[], &["a\u{FFFD}", "a你", "a你好"]);
        assert_eq!(d, ["a", "你", "好"]);
    }

    #[test]
    fn a_possible_stop_prefix_is_held_until_it_cannot_be_one() {
        let (d, all) = run(&["END"], &["ab E", "ab EN", "ab ENx", "ab ENx!"]);
        assert_eq!(d, ["ab ", "", "ENx", "!"]);
        assert_eq!(all, "ab ENx!");
        let (d, all) = run(&["END"], &["ab E", "ab EN", "ab END and more"]);
        assert_eq!(d, ["ab ", "", ""]);
        assert_eq!(all, "ab ");
        assert!(TextTracker::new(vec!["END".into()]).has_stop("xENDy"));
    }

    #[test]
    fn the_earliest_stop_string_cuts() {
        let (_, all) = run(&["b", "zz"], &["azzb"]);
        assert_eq!(all, "a");
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let (lp, top) = top_logprobs(&[1.0, 3.0, 2.0, 3.0], 3);
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(lp.iter().all(|&l| l <= 0.0));
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        assert_eq!(top_logprobs(&[0.0, 1.0], 0).1, []);
    }
}
