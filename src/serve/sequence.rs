//! One sequence being generated: its own KV cache, sampling generator and text. The engine runs
//! its prompt in chunks ([`Prefill`]), then steps it one token at a time: [`Sequence::sample`]
//! picks the token, [`Sequence::advance`] runs the pending tokens of several sequences through the
//! model in one batched forward. Alone, with the prompt in one chunk, a step is exactly one
//! iteration of `pipeline_model::generate`'s loop for a batch of one (same `forward_cached` calls,
//! same `sample_next`, same stop rules), so greedy output equals `pipeline generate`'s.
//!
//! Text is released incrementally: [`Detokenizer`] decodes only the new tokens (with a short
//! lookback) and holds back an incomplete UTF-8 character, and [`TextTracker`] looks for stop
//! strings only in the new text (plus the tail a stop string could start in) and holds back any
//! tail that could still become one. What has been sent is always a prefix of the final text, and
//! a step costs the same at the 10th token as at the 1000th. The non-streamed content is the same
//! deltas joined, so the two agree by construction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dfdx::prelude::Device;
use pipeline_model::generate::sample_next;
use pipeline_model::{Batch, FinishReason, GenerationConfig, KvCache, ModelError, Qwen2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::codec::{Detokenizer, TextCodec};

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
    /// Unique for the server's lifetime (names the sequence's row in a [`DecodeBatch`]).
    id: u64,
    prompt: Arc<Vec<u32>>,
    tokens: Vec<u32>,
    /// Its KV cache, unless it is a row of a [`DecodeBatch`]'s stacked cache.
    cache: KvCache<D>,
    /// The next position's logits.
    logits: Vec<f32>,
    rng: ChaCha8Rng,
    sampling: Arc<Sampling>,
    detok: Detokenizer,
    text: TextTracker,
    pub finished: bool,
    /// Sampled, not yet run through the model (see [`Self::advance`]).
    pending: Option<u32>,
}

/// The next [`Sequence`]'s id.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A request's prompt on its way through the model, a chunk at a time ([`Prefill::run`]), so the
/// engine can interleave a long prompt (or many new ones) with the decoding steps of the running
/// sequences instead of stalling them (vLLM's chunked prefill). The chunks append to one KV cache;
/// causal attention makes the result the same as one forward over the whole prompt.
pub struct Prefill<D: Device<f32>> {
    prompt: Arc<Vec<u32>>,
    sampling: Arc<Sampling>,
    n: usize,
    cache: KvCache<D>,
    /// Prompt tokens already in the cache.
    done: usize,
}

impl<D: Device<f32>> Prefill<D> {
    /// A prefill of `prompt` for `n` choices; nothing runs yet.
    pub fn new(model: &Qwen2<D>, prompt: Arc<Vec<u32>>, sampling: Arc<Sampling>, n: usize) -> Self {
        Prefill { prompt, sampling, n, cache: model.new_cache(), done: 0 }
    }

    /// Prompt tokens not yet run through the model.
    pub fn remaining(&self) -> usize {
        self.prompt.len() - self.done
    }

    /// Runs the next (at most) `budget` prompt tokens through `model`; once the whole prompt is
    /// in, returns the `n` sequences sharing its KV cache (copied on write). Choice `i` samples
    /// with seed `seed + i`, so choice 0 is what `pipeline generate` gives.
    pub fn run(&mut self, model: &Qwen2<D>, budget: usize) -> Result<Option<Vec<Sequence<D>>>, ModelError> {
        let end = self.done.saturating_add(budget.max(1)).min(self.prompt.len());
        let chunk = self.prompt[self.done..end].to_vec();
        let len = chunk.len();
        let logits = model
            .forward_cached(&Batch::new(chunk, 1, len)?, &mut self.cache)?
            .pop()
            .ok_or_else(|| ModelError::Batch("no logits".into()))?;
        self.done = end;
        if self.done < self.prompt.len() {
            return Ok(None);
        }
        let sampling = &self.sampling;
        Ok(Some(
            (0..self.n)
                .map(|i| Sequence {
                    id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                    prompt: self.prompt.clone(),
                    tokens: Vec::new(),
                    cache: self.cache.clone(),
                    logits: logits.clone(),
                    rng: ChaCha8Rng::seed_from_u64(sampling.gen.seed.wrapping_add(i as u64)),
                    detok: Detokenizer::default(),
                    text: TextTracker::new(sampling.gen.stop_strings.clone()),
                    sampling: sampling.clone(),
                    finished: false,
                    pending: None,
                })
                .collect(),
        ))
    }
}

impl<D: Device<f32>> Sequence<D> {
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
        self.detok.step(codec, body);
        let mut finish = if is_stop_id || self.text.find_stop(self.detok.text()).is_some() {
            Some(FinishReason::Stop)
        } else {
            None
        };
        let total = self.prompt.len() + self.tokens.len();
        if finish.is_none() && (self.tokens.len() >= s.gen.max_new_tokens || total >= codec.context_len) {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() {
            self.detok.flush(codec, body);
        }
        let text = self.text.update(self.detok.text(), finish.is_some());
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

/// The sequences one model decodes together, their KV caches kept stacked between steps:
/// [`Sequence::advance`] stacks and splits the caches at every step, which copies every cache
/// twice per token. Here the stacked cache is reused while the batch's members stay the same; a
/// member that finishes (or whose client left) keeps its row, fed a dummy token, until a new
/// sequence joins or a quarter of the rows are such, and then the batch is rebuilt (its rows
/// given back to their sequences, the current members stacked). A row's results are those of
/// [`Sequence::advance`]: the same stacked forward, with each row's own positions and mask.
pub struct DecodeBatch<D: Device<f32>> {
    cache: Option<KvCache<D>>,
    /// Each row's sequence (`None`: gone; its row runs until the next rebuild).
    rows: Vec<Option<u64>>,
    /// What [`KvCache::stack`] returned.
    pads: Vec<usize>,
}

impl<D: Device<f32>> Default for DecodeBatch<D> {
    fn default() -> Self {
        DecodeBatch { cache: None, rows: Vec::new(), pads: Vec::new() }
    }
}

impl<D: Device<f32>> DecodeBatch<D> {
    /// Gives every row's cache back to its sequence among `seqs` (rows of sequences that are gone
    /// are dropped) and empties the batch.
    pub fn unstack(&mut self, seqs: &mut [&mut Sequence<D>]) -> Result<(), ModelError> {
        let Some(cache) = self.cache.take() else { return Ok(()) };
        let rows = std::mem::take(&mut self.rows);
        let mut back: HashMap<u64, KvCache<D>> =
            rows.into_iter().zip(cache.split(&self.pads)?).filter_map(|(id, c)| Some((id?, c))).collect();
        for s in seqs.iter_mut() {
            if let Some(c) = back.remove(&s.id) {
                s.cache = c;
            }
        }
        Ok(())
    }

    /// Runs the pending token of every sequence in `seqs` (all of `model`, each with a pending
    /// token) through the model in one forward over the stacked cache, rebuilding it first when
    /// the members changed (see the type's docs).
    pub fn advance(&mut self, model: &Qwen2<D>, seqs: &mut [&mut Sequence<D>]) -> Result<(), ModelError> {
        let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
        if seqs.iter().any(|s| s.pending.is_none()) {
            return Err(ModelError::Batch("a sequence without a pending token in a decoding batch".into()));
        }
        // rows of sequences that have gone (finished, cancelled) are kept, not given back
        let kept: std::collections::HashSet<u64> = ids.iter().copied().collect();
        for r in self.rows.iter_mut() {
            if r.is_some_and(|id| !kept.contains(&id)) {
                *r = None;
            }
        }
        let live: Vec<u64> = self.rows.iter().flatten().copied().collect();
        let gone = self.rows.len() - live.len();
        if self.cache.is_none() || live != ids || gone * 4 > self.rows.len() {
            self.unstack(seqs)?;
            let caches: Vec<KvCache<D>> =
                seqs.iter_mut().map(|s| std::mem::replace(&mut s.cache, model.new_cache())).collect();
            let (cache, pads) = KvCache::stack(caches)?;
            self.cache = Some(cache);
            self.rows = ids.iter().map(|&id| Some(id)).collect();
            self.pads = pads;
        }
        let mut by_id: HashMap<u64, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let tokens: Vec<u32> = self
            .rows
            .iter()
            .map(|r| r.and_then(|id| by_id.get(&id)).map_or(0, |&i| seqs[i].pending.unwrap_or(0)))
            .collect();
        let cache = self.cache.as_mut().expect("stacked above");
        let logits = match model.forward_cached(&Batch::new(tokens, self.rows.len(), 1)?, cache) {
            Ok(l) => l,
            Err(e) => {
                // the cache may hold part of the step: its sequences fail with it
                *self = DecodeBatch::default();
                return Err(e);
            }
        };
        for (row, l) in self.rows.iter().zip(logits) {
            if let Some(i) = row.and_then(|id| by_id.remove(&id)) {
                seqs[i].logits = l;
                seqs[i].pending = None;
            }
        }
        Ok(())
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

/// Releases a growing text (each call's text extends the previous one's) so that what was sent is
/// always a prefix of the final text, cut before the first stop string. Stop strings are searched
/// for only in what is new since the last call, plus the tail of the old text one could start in.
#[derive(Debug, Clone, Default)]
pub struct TextTracker {
    stops: Vec<String>,
    /// The longest stop string's length in bytes.
    longest: usize,
    /// Bytes released so far.
    sent: usize,
    /// Bytes of the text searched for stop strings.
    searched: usize,
    /// Where the first stop string starts, once one is found.
    cut: Option<usize>,
}

impl TextTracker {
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        TextTracker { stops, longest, ..TextTracker::default() }
    }

    /// Where the earliest stop string in `text` starts, if any. An occurrence that starts before
    /// `searched - (longest - 1)` would have ended inside the text searched before, so only the
    /// rest is searched.
    pub fn find_stop(&mut self, text: &str) -> Option<usize> {
        if self.cut.is_none() && text.len() > self.searched && self.longest > 0 {
            let mut from = self.searched.saturating_sub(self.longest - 1);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            let tail = &text[from..];
            self.cut = self.stops.iter().filter_map(|s| tail.find(s.as_str())).min().map(|i| from + i);
        }
        self.searched = self.searched.max(text.len());
        self.cut
    }

    /// The new text to send, given the whole text so far; `last` releases everything (cut before
    /// the first stop string).
    pub fn update(&mut self, text: &str, last: bool) -> String {
        let cut = self.find_stop(text);
        let mut end = cut.unwrap_or(text.len());
        if !last && cut.is_none() {
            let head = &text[..end];
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
        if end <= self.sent {
            return String::new();
        }
        let delta = text[self.sent..end].to_string();
        self.sent = end;
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deltas for a growing text and what they join to.
    fn run(stops: &[&str], texts: &[&str]) -> (Vec<String>, String) {
        let mut t = TextTracker::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for (i, full) in texts.iter().enumerate() {
            out.push(t.update(full, i + 1 == texts.len()));
        }
        let all = out.concat();
        (out, all)
    }

    #[test]
    fn deltas_join_to_the_final_text() {
        let (d, all) = run(&[], &["He", "Hello", "Hello wo", "Hello world"]);
        assert_eq!(d, ["He", "llo", " wo", "rld"]);
        assert_eq!(all, "Hello world");
    }

    #[test]
    fn a_possible_stop_prefix_is_held_until_it_cannot_be_one() {
        let (d, all) = run(&["END"], &["ab E", "ab EN", "ab ENx", "ab ENx!"]);
        assert_eq!(d, ["ab ", "", "ENx", "!"]);
        assert_eq!(all, "ab ENx!");
        let (d, all) = run(&["END"], &["ab E", "ab EN", "ab END and more"]);
        assert_eq!(d, ["ab ", "", ""]);
        assert_eq!(all, "ab ");
        assert_eq!(TextTracker::new(vec!["END".into()]).find_stop("xENDy"), Some(1));
    }

    #[test]
    fn the_earliest_stop_string_cuts() {
        let (_, all) = run(&["b", "zz"], &["azzb"]);
        assert_eq!(all, "a");
    }

    /// A stop string that arrives over several steps (and characters of several bytes) is found
    /// where it starts, though each step searches only the new text and the tail before it.
    #[test]
    fn a_stop_string_spanning_steps_is_found_where_it_starts() {
        let (d, all) = run(&["<|末尾|>"], &["你好 <", "你好 <|末", "你好 <|末尾", "你好 <|末尾|", "你好 <|末尾|> x"]);
        assert_eq!(all, "你好 ");
        assert_eq!(d.concat(), "你好 ");
        let mut t = TextTracker::new(vec!["cdef".into(), "zz".into()]);
        assert_eq!(t.find_stop("abc"), None);
        assert_eq!(t.find_stop("abcde"), None);
        assert_eq!(t.find_stop("abcdefzz"), Some(2), "the earlier of two stops in the new text");
        // once found, later text does not move the cut
        assert_eq!(t.find_stop("abcdefzz zz"), Some(2));
        let mut t = TextTracker::new(vec!["zz".into()]);
        assert_eq!(t.find_stop("az"), None);
        assert_eq!(t.find_stop("azz"), Some(1));
    }

    /// Greedy decoding through a persistent [`DecodeBatch`] — a member leaving (its row kept,
    /// then the batch rebuilt), another joining late — gives each sequence the tokens it gets
    /// decoded alone.
    #[test]
    fn a_decode_batch_steps_each_sequence_as_alone() {
        use dfdx::prelude::Cpu;
        // untied: with a random head tied to the embedding, greedy decoding repeats the last token
        let mut cfg = pipeline_model::ModelConfig::tiny(256);
        cfg.tie_word_embeddings = false;
        let model = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 4), &Cpu::default()).unwrap();
        let codec = TextCodec::qwen25_for_tests();
        let sampling = Arc::new(Sampling {
            gen: GenerationConfig { max_new_tokens: 1000, ..GenerationConfig::default() },
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        });
        let prompts: Vec<Arc<Vec<u32>>> =
            [&[5u32, 9, 77][..], &[100, 3, 4, 5, 6, 7, 8], &[42], &[200, 201, 1, 2, 3], &[7, 7, 9]]
                .iter()
                .map(|p| Arc::new(p.to_vec()))
                .collect();
        let start = |p: &Arc<Vec<u32>>| {
            let mut pre = Prefill::new(&model, p.clone(), sampling.clone(), 1);
            pre.run(&model, usize::MAX).unwrap().unwrap().pop().unwrap()
        };
        let steps = 14;
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut s = start(p);
                for _ in 0..steps {
                    s.sample(&codec);
                    Sequence::advance(&model, &mut [&mut s]).unwrap();
                }
                s.tokens
            })
            .collect();
        assert!(alone.iter().any(|t| t.iter().collect::<std::collections::HashSet<_>>().len() > 3), "{alone:?}");
        let mut seqs: Vec<Sequence<Cpu>> = prompts.iter().map(start).collect();
        let mut batch = DecodeBatch::default();
        // 1 leaves after 4 steps (its row stays), 3 joins at step 6 (a rebuild), 2 and 4 leave
        // after 10 and 12 steps (a row kept, then half the rows gone: a rebuild)
        let active = |step: usize, i: usize| match i {
            1 => step < 4,
            3 => step >= 6,
            2 => step < 10,
            4 => step < 12,
            _ => true,
        };
        let mut made = vec![0usize; seqs.len()];
        for step in 0..steps + 6 {
            let mut on: Vec<&mut Sequence<Cpu>> = Vec::new();
            for (i, s) in seqs.iter_mut().enumerate() {
                if active(step, i) && made[i] < steps {
                    s.sample(&codec);
                    made[i] += 1;
                    on.push(s);
                }
            }
            if on.len() > 1 {
                batch.advance(&model, &mut on).unwrap();
                let gone = batch.rows.iter().filter(|r| r.is_none()).count();
                let want = match step {
                    4 | 5 | 10 | 11 => (4, 1),
                    _ => (on.len(), 0),
                };
                assert_eq!((batch.rows.len(), gone), want, "step {step}");
            } else {
                batch.unstack(&mut on).unwrap();
                if let [one] = &mut on[..] {
                    Sequence::advance(&model, &mut [&mut **one]).unwrap();
                }
            }
        }
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(s.tokens, alone[i][..made[i]], "sequence {i}");
        }
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
