//! The engine: one thread that owns the model (the base and one copy per LoRA adapter, sharing the
//! base's frozen weights) and schedules sequences, fed by a channel — llama.cpp server's slots,
//! vLLM's scheduler in miniature.
//!
//! Scheduling is iteration-level: each turn of the loop takes new requests off the channel, admits
//! waiting ones while fewer than `max_running` sequences run (a request with `n` choices is `n`
//! sequences sharing one prefill), advances every decoding sequence by one token, whatever model
//! or adapter it uses, and then runs at most `prefill_tokens` prompt tokens of the admitted
//! requests still being prefilled (in chunks, oldest first: [`Prefill`]) — vLLM's chunked
//! prefill. A request therefore never waits for another to finish, a burst of new prompts delays
//! the running sequences by one chunk per token rather than by all the prompts, and requests to
//! different adapters decode in the same iteration, each through its own adapter. Each sequence
//! has its own KV cache and sampling generator ([`Sequence`]).
//!
//! A sequence is dropped at once when its client has gone (its event receiver is closed: the HTTP
//! connection dropped the response), when its request's deadline passes, or when the model fails
//! on it (a panic included: it fails that request, not the engine). Requests past the queue limit
//! are refused at [`EngineHandle::submit`] (HTTP 429).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use dfdx::prelude::Device;
use pipeline_model::{FinishReason, Qwen2};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::codec::TextCodec;
use super::sequence::{DecodeBatch, Prefill, Sampling, Sequence, TokenLogprob};

/// Scheduler limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Sequences decoded side by side (a request with `n` choices takes `n`).
    pub max_running: usize,
    /// Requests that may wait for a free slot; more are refused.
    pub max_queue: usize,
    /// Sequences of one model decoded in one batched forward (1: each on its own).
    pub max_batch: usize,
    /// Prompt tokens prefilled per iteration, besides the decoding steps (a longer prompt is
    /// run in chunks over several iterations).
    pub prefill_tokens: usize,
}

/// One generation request, already tokenised and validated.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Which model: 0 the base, `i` the `i`-th adapter.
    pub model: usize,
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// Choices (each its own sequence).
    pub n: usize,
    /// The request fails with [`Failure::Timeout`] when still running then.
    pub deadline: Option<Instant>,
}

/// What the engine tells a request's receiver.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Choice `choice` produced a token; `text` is what it added to the content (maybe empty).
    Token { choice: usize, text: String, logprob: Option<TokenLogprob> },
    /// Choice `choice` is complete after `completion_tokens` tokens.
    Finished { choice: usize, reason: FinishReason, completion_tokens: usize },
    /// The request ended early; no further events follow.
    Failed(Failure),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("the request ran longer than the server's request timeout ({}s, --request-timeout)", .0.as_secs())]
    Timeout(Duration),
    #[error("the model failed on this request: {0}")]
    Model(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {waiting} requests are already waiting (--max-queue {limit}); retry later")]
    QueueFull { waiting: usize, limit: usize },
    #[error("the engine has stopped")]
    Stopped,
}

struct Job {
    req: GenRequest,
    tx: UnboundedSender<Event>,
    submitted: Instant,
}

/// The handlers' side of the engine (cheap to clone).
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    counts: Arc<Counts>,
    limits: EngineLimits,
}

#[derive(Default)]
struct Counts {
    /// Submitted, not yet admitted.
    waiting: AtomicUsize,
    /// Sequences running.
    running: AtomicUsize,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver cancels
    /// the request (its sequences are freed before the next token).
    pub fn submit(&self, req: GenRequest) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let free = self.limits.max_running.saturating_sub(self.counts.running.load(Ordering::Relaxed));
        let waiting = self.counts.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.limits.max_queue + free {
            self.counts.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { waiting, limit: self.limits.max_queue });
        }
        let (tx, rx) = unbounded_channel();
        if self.tx.send(Job { req, tx, submitted: Instant::now() }).is_err() {
            self.counts.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
    }

    pub fn waiting(&self) -> usize {
        self.counts.waiting.load(Ordering::Relaxed)
    }
    pub fn running(&self) -> usize {
        self.counts.running.load(Ordering::Relaxed)
    }
    pub fn limits(&self) -> EngineLimits {
        self.limits
    }
}

/// Starts the engine thread. `models[0]` is the base, the others its adapters. The thread ends
/// when every [`EngineHandle`] is dropped and no request is left.
pub fn spawn<D: Device<f32> + Send + 'static>(
    models: Vec<Qwen2<D>>,
    codec: Arc<TextCodec>,
    limits: EngineLimits,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let counts = Arc::new(Counts::default());
    let batches = models.iter().map(|_| DecodeBatch::default()).collect();
    let mut engine =
        Engine { models, codec, limits, counts: counts.clone(), waiting: VecDeque::new(), groups: Vec::new(), batches };
    std::thread::Builder::new().name("pipeline-engine".into()).spawn(move || engine.run(rx))?;
    Ok(EngineHandle { tx, counts, limits })
}

/// The sequences of one request.
struct Group<D: Device<f32>> {
    model: usize,
    tx: UnboundedSender<Event>,
    /// While the prompt is being run through the model (`seqs` is empty until it is done).
    prefill: Option<Prefill<D>>,
    /// The request's `n` choices (the prefilling request's are counted in `n`).
    n: usize,
    seqs: Vec<Sequence<D>>,
    deadline: Option<Instant>,
    submitted: Instant,
    /// When each choice produced its last token (inter-token latency).
    last_token: Vec<Option<Instant>>,
}

struct Engine<D: Device<f32>> {
    models: Vec<Qwen2<D>>,
    codec: Arc<TextCodec>,
    limits: EngineLimits,
    counts: Arc<Counts>,
    waiting: VecDeque<Job>,
    groups: Vec<Group<D>>,
    /// Per model, the stacked caches of its decoding sequences.
    batches: Vec<DecodeBatch<D>>,
}

/// A panic's message (the model code asserts on shapes it was promised).
fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl<D: Device<f32>> Engine<D> {
    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        loop {
            if self.groups.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.admit();
            self.step_all();
            self.publish();
        }
    }

    /// Sequences admitted and not finished (a prefilling request's choices included).
    fn running_seqs(&self) -> usize {
        self.groups
            .iter()
            .map(|g| if g.prefill.is_some() { g.n } else { g.seqs.iter().filter(|s| !s.finished).count() })
            .sum()
    }

    fn publish(&self) {
        let running = self.running_seqs();
        self.counts.running.store(running, Ordering::Relaxed);
        metrics::gauge!("pipeline_running_sequences").set(running as f64);
        metrics::gauge!("pipeline_queue_depth").set(self.counts.waiting.load(Ordering::Relaxed) as f64);
    }

    fn admit(&mut self) {
        // a client that left while its request waited frees its place in the queue at once
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.tx.is_closed());
        self.counts.waiting.fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        let mut running = self.running_seqs();
        while let Some(job) = self.waiting.front() {
            // a request larger than the whole budget still runs, alone
            if running > 0 && running + job.req.n > self.limits.max_running {
                break;
            }
            let job = self.waiting.pop_front().expect("front");
            self.counts.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.req.deadline.is_some_and(|d| Instant::now() >= d) {
                let _ = job.tx.send(Event::Failed(Failure::Timeout(job.req.deadline.unwrap() - job.submitted)));
                continue;
            }
            let Job { req, tx, submitted } = job;
            let Some(model) = self.models.get(req.model) else {
                let _ = tx.send(Event::Failed(Failure::Model(format!("no model #{}", req.model))));
                continue;
            };
            metrics::counter!("pipeline_prompt_tokens_total").increment(req.prompt.len() as u64);
            let (prompt, sampling) = (Arc::new(req.prompt), Arc::new(req.sampling));
            running += req.n;
            self.groups.push(Group {
                model: req.model,
                tx,
                prefill: Some(Prefill::new(model, prompt, sampling, req.n)),
                n: req.n,
                last_token: vec![None; req.n],
                seqs: Vec::new(),
                deadline: req.deadline,
                submitted,
            });
        }
    }

    /// One iteration: every decoding sequence samples a token (its events go out at once), the
    /// sampled tokens of each model's sequences run through that model in one batched forward
    /// ([`DecodeBatch::advance`]; more than `max_batch` sequences: [`Sequence::advance`] on
    /// `max_batch` rows at a time), and then up to
    /// `prefill_tokens` prompt tokens of the requests being prefilled run, oldest request first;
    /// a request whose prompt is complete decodes from the next iteration on.
    fn step_all(&mut self) {
        let now = Instant::now();
        let (codec, counts) = (&*self.codec, &*self.counts);
        self.groups.retain_mut(|g| {
            if g.tx.is_closed() {
                return false;
            }
            if let Some(d) = g.deadline.filter(|&d| now >= d) {
                let _ = g.tx.send(Event::Failed(Failure::Timeout(d - g.submitted)));
                return false;
            }
            for (choice, seq) in g.seqs.iter_mut().enumerate() {
                if seq.finished {
                    continue;
                }
                let step = match std::panic::catch_unwind(AssertUnwindSafe(|| seq.sample(codec))) {
                    Ok(step) => step,
                    Err(p) => {
                        let _ = g.tx.send(Event::Failed(Failure::Model(panic_message(p))));
                        return false;
                    }
                };
                let t = Instant::now();
                match g.last_token[choice] {
                    None if choice == 0 => {
                        metrics::histogram!("pipeline_time_to_first_token_seconds")
                            .record((t - g.submitted).as_secs_f64());
                    }
                    None => {}
                    Some(prev) => {
                        metrics::histogram!("pipeline_inter_token_latency_seconds").record((t - prev).as_secs_f64());
                    }
                }
                g.last_token[choice] = Some(t);
                metrics::counter!("pipeline_generation_tokens_total").increment(1);
                if !step.text.is_empty() || step.logprob.is_some() {
                    let _ = g.tx.send(Event::Token { choice, text: step.text, logprob: step.logprob });
                }
                if let Some(reason) = step.finish {
                    // counted out before the client hears of it (a client that reads /health or
                    // /metrics after its last event sees the sequence gone)
                    let left = counts
                        .running
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| Some(r.saturating_sub(1)))
                        .map_or(0, |r| r.saturating_sub(1));
                    metrics::gauge!("pipeline_running_sequences").set(left as f64);
                    let _ = g.tx.send(Event::Finished { choice, reason, completion_tokens: seq.generated() });
                }
            }
            g.prefill.is_some() || g.seqs.iter().any(|s| !s.finished)
        });
        // The batched forwards, per model; a failure fails the requests of that batch only. When
        // a model's sequences fit in one batch, their stacked caches persist between steps
        // ([`DecodeBatch`]); otherwise (one sequence, or more than `max_batch`) each chunk is
        // stacked for the step ([`Sequence::advance`]).
        let mut failed: Vec<(usize, String)> = Vec::new();
        let max_batch = self.limits.max_batch.max(1);
        for m in 0..self.models.len() {
            let model = &self.models[m];
            let mut batch: Vec<(usize, &mut Sequence<D>)> = Vec::new();
            for (gi, g) in self.groups.iter_mut().enumerate().filter(|(_, g)| g.model == m) {
                batch.extend(g.seqs.iter_mut().filter(|s| s.pending().is_some()).map(|s| (gi, s)));
            }
            let decode = &mut self.batches[m];
            if batch.is_empty() {
                *decode = DecodeBatch::default();
                continue;
            }
            let groups: Vec<usize> = batch.iter().map(|(gi, _)| *gi).collect();
            let mut seqs: Vec<&mut Sequence<D>> = batch.iter_mut().map(|(_, s)| &mut **s).collect();
            if seqs.len() > 1 && seqs.len() <= max_batch {
                let err = match std::panic::catch_unwind(AssertUnwindSafe(|| decode.advance(model, &mut seqs))) {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(p) => panic_message(p),
                };
                *decode = DecodeBatch::default();
                failed.extend(groups.into_iter().map(|gi| (gi, err.clone())));
                continue;
            }
            if let Err(e) = decode.unstack(&mut seqs) {
                *decode = DecodeBatch::default();
                failed.extend(groups.into_iter().map(|gi| (gi, e.to_string())));
                continue;
            }
            for (chunk, groups) in seqs.chunks_mut(max_batch).zip(groups.chunks(max_batch)) {
                let err = match std::panic::catch_unwind(AssertUnwindSafe(|| Sequence::advance(model, chunk))) {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(p) => panic_message(p),
                };
                failed.extend(groups.iter().map(|&gi| (gi, err.clone())));
            }
        }
        // Chunked prefill, within the iteration's token budget.
        let mut budget = self.limits.prefill_tokens.max(1);
        for (gi, g) in self.groups.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            let Some(p) = g.prefill.as_mut() else { continue };
            let model = &self.models[g.model];
            let take = p.remaining().min(budget);
            budget -= take;
            match std::panic::catch_unwind(AssertUnwindSafe(|| p.run(model, take))) {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(seqs))) => {
                    g.seqs = seqs;
                    g.prefill = None;
                }
                Ok(Err(e)) => failed.push((gi, e.to_string())),
                Err(p) => failed.push((gi, panic_message(p))),
            }
        }
        if !failed.is_empty() {
            let mut gi = 0;
            self.groups.retain(|g| {
                let keep = match failed.iter().find(|(i, _)| *i == gi) {
                    Some((_, msg)) => {
                        let _ = g.tx.send(Event::Failed(Failure::Model(msg.clone())));
                        false
                    }
                    None => true,
                };
                gi += 1;
                keep
            });
        }
    }
}
