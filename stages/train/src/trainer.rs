//! The training loop: [`train`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dfdx::nn::tensor_collection::TensorCollection;
use dfdx::nn::ZeroGrads;
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::{epoch_batches, Batch, Dataset};
use crate::dist::{Communicator, SingleProcess};
use crate::metrics::{plot_loss_curve, write_jsonl, CurveMarks, EvalRecord, Record, TrainRecord};
use crate::objectives::LossOutput;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::params::{read_grads, read_params, write_params};
use crate::schedule::LrSchedule;
use crate::TrainError;

/// Where a forward pass sits in the run; models derive dropout masks from `seed` so that a
/// resumed run draws the same masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepInfo {
    /// The optimizer step (0-based) this micro-batch belongs to (for evaluation: the step after
    /// which it runs).
    pub step: u64,
    /// Micro-batch index within the step (evaluation: batch index).
    pub micro: usize,
    /// Training (dropout on) or evaluation.
    pub training: bool,
    /// A seed unique to `(run seed, step, micro, training)`.
    pub seed: u64,
}

/// A training objective: the loss of one batch for the model. Implemented by the stages
/// (causal LM, SFT, DPO, KTO); see the crate documentation for an example.
///
/// `model` is the trainable collection the trainer optimises (the whole model, or only the LoRA
/// adapters: then the objective owns or borrows the frozen base). `tape` is either an
/// `OwnedTape` carrying the step's accumulated gradients (training) or `NoneTape`
/// (evaluation): thread it into the forward pass, e.g. `input.put_tape(tape)`.
pub trait Objective<M, D: Device<f32>> {
    type Batch: Batch;
    /// The mean loss over `batch` (for token objectives: over its labelled tokens).
    fn loss<T: Tape<f32, D>>(
        &mut self,
        model: &M,
        batch: &Self::Batch,
        tape: T,
        info: &StepInfo,
    ) -> Result<LossOutput<D, T>, TrainError>;

    /// Per-element weight-decay flags for trainable tensors that pack several weights into one
    /// (`name -> flags`, `true` = decay); tensors not listed follow [`crate::optim::decays`].
    fn weight_decay_masks(&self, _model: &M) -> BTreeMap<String, Vec<bool>> {
        BTreeMap::new()
    }
}

/// What a [`Callbacks::control`] tells the loop between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop now, saving a checkpoint first (Ctrl-C); [`train`] returns `StopReason::Interrupted`.
    Interrupt,
    /// Stop now without saving anything, as a killed process would.
    Abort,
}

/// Hooks for progress reporting and cancellation (a stage maps them onto its `RunCtx`).
pub trait Callbacks {
    fn on_start(&mut self, _plan: &TrainPlan) {}
    /// After optimizer step `step` (1-based count of steps done) of `total`.
    fn on_step(&mut self, _step: u64, _total: u64) {}
    /// Every record as it is appended to the history (train windows and evaluations).
    fn on_record(&mut self, _record: &Record) {}
    fn on_message(&mut self, _message: &str) {}
    /// The run resumed from checkpoint `checkpoint` (a directory name) at step `step`.
    fn on_resume(&mut self, step: u64, checkpoint: &str) {
        self.on_message(&format!("resuming from step {step} ({checkpoint})"));
    }
    /// Asked before every step.
    fn control(&mut self, _next_step: u64) -> Control {
        Control::Continue
    }
}

/// Callbacks that do nothing.
pub struct NoCallbacks;
impl Callbacks for NoCallbacks {}

/// Sizes of the run, known before the first step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainPlan {
    pub train_examples: usize,
    pub eval_examples: usize,
    pub micro_batches_per_epoch: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    pub trainable_params: usize,
    pub seed: u64,
    /// The step a checkpoint put us at, when the run resumed.
    pub resumed_from: Option<u64>,
}

/// Where [`train`] writes.
#[derive(Debug, Clone)]
pub struct TrainPaths {
    /// Checkpoints (a stage's `ctx.scratch_dir()`): survives a killed run.
    pub checkpoints: PathBuf,
    /// `metrics.jsonl` and `loss_curve.png` go here (a stage output directory).
    pub report: PathBuf,
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Completed,
    EarlyStopped,
    Interrupted,
}

/// The running sums of the current logging window (part of the checkpoint so that a window
/// spanning a restart averages the same numbers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub steps: u64,
    pub loss_sum: f64,
    pub tokens: u64,
    pub metric_sums: BTreeMap<String, f64>,
    /// Steps that reported each metric (an objective may omit one for a batch, e.g. KTO's
    /// `rewards/rejected` for a batch without undesirable examples).
    #[serde(default)]
    pub metric_steps: BTreeMap<String, u64>,
}

/// Everything besides tensors that a checkpoint stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: u64,
    pub history: Vec<Record>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// Evaluations since the best one (early stopping).
    pub patience_counter: u32,
    pub window: Window,
    pub stop: Option<StopReason>,
    /// What the run was started with (config, data sizes, tensor names and shapes); a checkpoint
    /// with another fingerprint is not resumed from.
    pub fingerprint: serde_json::Value,
}

/// What [`train`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    pub plan: TrainPlan,
    pub stop: StopReason,
    pub global_step: u64,
    pub history: Vec<Record>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// The last training window's mean loss.
    pub final_train_loss: Option<f64>,
    pub metrics_path: PathBuf,
    pub loss_curve_path: PathBuf,
    /// Whether the PNG has text (a font was found).
    pub loss_curve_text: bool,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn step_seed(seed: u64, step: u64, micro: usize, training: bool) -> u64 {
    splitmix(splitmix(splitmix(seed) ^ step) ^ ((micro as u64) << 1 | u64::from(training)))
}

fn dev_err<E: std::fmt::Debug>(e: E) -> TrainError {
    TrainError::Device(format!("{e:?}"))
}

/// Run (or resume) training.
///
/// - `model`: the trainable tensors; updated in place. At the end it holds the best evaluated
///   parameters when `load_best_model_at_end` and an eval split exist, else the last ones.
/// - `train` / `eval`: the training data and the optional held-out split (the caller splits with
///   [`crate::data::split_indices`] or passes an `eval` input).
/// - `seed`: the run's seed (`cfg.seed` resolved against the recipe's).
///
/// If `paths.checkpoints` holds a checkpoint of the same run (same fingerprint), training resumes
/// from the newest one and continues exactly as the uninterrupted run would have.
///
/// One process: [`train_distributed`] with [`SingleProcess`].
#[allow(clippy::too_many_arguments)]
pub fn train<M, D, O, C>(
    cfg: &TrainConfig,
    seed: u64,
    dev: &D,
    model: &mut M,
    objective: &mut O,
    train: &dyn Dataset<Batch = O::Batch>,
    eval: Option<&dyn Dataset<Batch = O::Batch>>,
    paths: &TrainPaths,
    callbacks: &mut C,
) -> Result<TrainOutcome, TrainError>
where
    M: TensorCollection<f32, D>,
    D: Device<f32>,
    O: Objective<M, D>,
    C: Callbacks + ?Sized,
{
    train_distributed(cfg, seed, dev, model, objective, train, eval, paths, callbacks, &mut SingleProcess)
}

/// What a rank contributes before a step's backward: its Ctrl-C decision and its micro-batches'
/// loss weight (the step's weights are global, so every rank scales its losses alike).
#[derive(Clone, Serialize, Deserialize)]
struct PreStep {
    control: u8,
    weight: f64,
}

/// What a rank contributes after a step's backward (summed over the ranks in rank order).
#[derive(Clone, Default, Serialize, Deserialize)]
struct StepStats {
    loss: f64,
    tokens: u64,
    metrics: BTreeMap<String, (f64, f64)>,
}

/// Every rank's `mine`, in rank order (through JSON between processes).
fn gather<T: Clone + Serialize + for<'de> Deserialize<'de>>(
    comm: &mut dyn Communicator,
    mine: &T,
) -> Result<Vec<T>, TrainError> {
    if comm.world_size() == 1 {
        // No round trip: a single process keeps its exact numbers.
        return Ok(vec![mine.clone()]);
    }
    let bytes = serde_json::to_vec(mine).map_err(|e| TrainError::Dist(e.to_string()))?;
    comm.all_gather(&bytes)?
        .iter()
        .enumerate()
        .map(|(r, b)| {
            serde_json::from_slice(b).map_err(|e| TrainError::Dist(format!("rank {r} sent bad step figures: {e}")))
        })
        .collect()
}

/// Data-parallel training: every rank of `comm` calls this with the same arguments (the same data,
/// the same config, its own device).
///
/// - `cfg.gradient_accumulation_steps` counts the micro-batches of one optimizer step over **all**
///   ranks (the stages pass `per-device accumulation × world size`, so the global batch is
///   `per_device_train_batch_size × gradient_accumulation_steps × world_size`, as with
///   transformers' Trainer under DDP). Micro-batch `j` of a step (in the seeded epoch order) runs on
///   rank `j mod world_size`: the ranks read disjoint shards and together the same batches, with the
///   same loss weights and dropout seeds, as one process does — so the run equals a one-process
///   run with the same global batch, within float summation order.
/// - The step's gradients (all trained tensors as one flat buffer) are summed over the ranks before
///   clipping and the optimizer step; every rank then applies the same update.
/// - Rank 0 alone writes checkpoints (into `paths.checkpoints`, which every rank must see: a
///   resuming rank reads the newest checkpoint from there and the ranks check they agree on it);
///   after resuming, rank 0's parameters are broadcast. Evaluation runs on every rank (identical
///   results, so early stopping agrees). A Ctrl-C on any rank interrupts all of them.
#[allow(clippy::too_many_arguments)]
pub fn train_distributed<M, D, O, C>(
    cfg: &TrainConfig,
    seed: u64,
    dev: &D,
    model: &mut M,
    objective: &mut O,
    train: &dyn Dataset<Batch = O::Batch>,
    eval: Option<&dyn Dataset<Batch = O::Batch>>,
    paths: &TrainPaths,
    callbacks: &mut C,
    comm: &mut dyn Communicator,
) -> Result<TrainOutcome, TrainError>
where
    M: TensorCollection<f32, D>,
    D: Device<f32>,
    O: Objective<M, D>,
    C: Callbacks + ?Sized,
{
    cfg.validate()?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let eval = eval.filter(|e| !e.is_empty());
    let n = train.len();
    if n == 0 {
        return Err(TrainError::Data("the training split is empty".into()));
    }
    let bs = cfg.per_device_train_batch_size;
    let accum = cfg.gradient_accumulation_steps as u64;
    let lengths: Vec<usize> = (0..n).map(|i| train.example_len(i)).collect();
    let micro_per_epoch = n.div_ceil(bs) as u64;
    let steps_per_epoch = micro_per_epoch.div_ceil(accum);
    let total_steps = if cfg.max_steps > 0 {
        cfg.max_steps as u64
    } else {
        ((cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1)
    };
    let schedule = LrSchedule::from_config(cfg, total_steps);

    let initial = read_params(model)?;
    let shapes: Vec<(String, Vec<usize>)> = initial.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let fingerprint = serde_json::json!({
        "config": cfg,
        "seed": seed,
        "train_examples": n,
        "eval_examples": eval.map_or(0, |e| e.len()),
        "tensors": shapes,
    });
    let mut plan = TrainPlan {
        train_examples: n,
        eval_examples: eval.map_or(0, |e| e.len()),
        micro_batches_per_epoch: micro_per_epoch,
        steps_per_epoch,
        total_steps,
        warmup_steps: schedule.warmup_steps,
        trainable_params: initial.iter().map(|t| t.data.len()).sum(),
        seed,
        resumed_from: None,
    };
    drop(initial);

    let mut opt = AdamW::new(AdamWConfig::from_train_config(cfg));
    for (name, mask) in objective.weight_decay_masks(model) {
        opt.set_decay_mask(&name, mask);
    }
    let mut state = TrainerState {
        global_step: 0,
        history: Vec::new(),
        best_eval_loss: None,
        best_step: None,
        patience_counter: 0,
        window: Window::default(),
        stop: None,
        fingerprint: fingerprint.clone(),
    };

    // Resume from the newest readable checkpoint of this run.
    for (step, dir) in checkpoint::list(&paths.checkpoints, "checkpoint")?.into_iter().rev() {
        match checkpoint::load::<TrainerState>(&dir) {
            Ok(ck) if ck.state.fingerprint == fingerprint => {
                write_params(model, &ck.params)?;
                opt.load_state(ck.state.global_step, ck.optimizer)?;
                state = ck.state;
                plan.resumed_from = Some(state.global_step);
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                callbacks.on_resume(step, &name);
                break;
            }
            Ok(_) => {
                return Err(TrainError::Resume(format!(
                    "{} was written by a run with other settings or data; delete {} to start over",
                    dir.display(),
                    paths.checkpoints.display()
                )))
            }
            Err(e) => callbacks.on_message(&format!("skipping unreadable checkpoint {}: {e}", dir.display())),
        }
    }
    if world > 1 {
        // Every rank resumed from the same step, and starts from rank 0's parameters (as DDP).
        let steps = gather(comm, &state.global_step)?;
        if let Some((r, s)) = steps.iter().enumerate().find(|(_, s)| **s != steps[0]) {
            return Err(TrainError::Resume(format!(
                "rank {r} found a checkpoint at step {s}, rank 0 at step {}: every rank must see {}",
                steps[0],
                paths.checkpoints.display()
            )));
        }
        let mut bytes = if lead { to_bytes(&read_params(model)?) } else { Vec::new() };
        comm.broadcast(&mut bytes)?;
        if !lead {
            let mut params = read_params(model)?;
            from_bytes(&bytes, &mut params)?;
            write_params(model, &params)?;
        }
    }
    callbacks.on_start(&plan);

    let mut epoch_cache: Option<(u64, Vec<Vec<usize>>)> = None;
    let mut window_start = Instant::now();
    // Wall-clock checkpoints: a kill loses at most `save_interval_secs` of training.
    let mut last_save = Instant::now();
    let save_interval = std::time::Duration::from_secs(cfg.save_interval_secs);
    let mut stop = state.stop.unwrap_or(StopReason::Completed);
    while state.global_step < total_steps && state.stop.is_none() {
        let s = state.global_step;
        let epoch = s / steps_per_epoch;
        let u = s % steps_per_epoch;
        if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            epoch_cache = Some((epoch, epoch_batches(&lengths, bs, seed, epoch, cfg.group_by_length)));
        }
        let batches_of_epoch =
            &epoch_cache.as_ref().map(|c| &c.1).ok_or_else(|| TrainError::Data("no batches".into()))?;
        let lo = (u * accum) as usize;
        let hi = ((u + 1) * accum).min(micro_per_epoch) as usize;
        // This rank's share: micro-batches lo + rank, lo + rank + world, ... (their index in the
        // step picks the dropout seed, as in one process).
        let mine: Vec<usize> = (lo..hi).filter(|j| (j - lo) % world == rank).collect();
        let batches: Vec<O::Batch> =
            mine.iter().map(|&j| train.collate(&batches_of_epoch[j])).collect::<Result<_, _>>()?;
        let local_weight: f64 = batches.iter().map(Batch::loss_weight).sum();
        let control = match callbacks.control(state.global_step) {
            Control::Continue => 0u8,
            Control::Interrupt => 1,
            Control::Abort => 2,
        };
        let pre = gather(comm, &PreStep { control, weight: local_weight })?;
        match pre.iter().map(|p| p.control).max().unwrap_or(0) {
            0 => {}
            1 => {
                if lead {
                    save_checkpoint(model, &opt, &state, paths, cfg)?;
                }
                stop = StopReason::Interrupted;
                break;
            }
            _ => {
                stop = StopReason::Interrupted;
                break;
            }
        }
        let total_weight: f64 = pre.iter().map(|p| p.weight).sum();
        if total_weight.is_nan() || total_weight <= 0.0 {
            return Err(TrainError::Data(format!("step {}: the batch carries no loss (no labelled tokens)", s + 1)));
        }

        // The step's gradient, summed on the host over this rank's micro-batches. Each micro-batch
        // back-propagates into fresh buffers: threading one `Gradients` through the tapes of
        // several micro-batches lost all but the last one's (dfdx merges a tape's freshly zeroed
        // buffer for a trained tensor over the accumulated one; Qwen2 takes its trained slices
        // from `params.flat` on new tapes), so `gradient_accumulation_steps > 1` trained on the last
        // micro-batch only.
        let mut g: Option<Vec<crate::NamedTensor>> = None;
        let mut step_loss = 0.0f64;
        // name -> (Σ weight · value, Σ weight) over the micro-batches that report it.
        let mut step_metrics: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut tokens = 0u64;
        for (&j, b) in mine.iter().zip(&batches) {
            let i = j - lo;
            let anchor: Tensor<Rank0, f32, D> = dev.try_zeros().map_err(dev_err)?;
            let (_, tape) = anchor.traced(model.try_alloc_grads().map_err(dev_err)?).split_tape();
            let info = StepInfo { step: s, micro: i, training: true, seed: step_seed(seed, s, i, true) };
            let out = objective.loss(model, b, tape, &info)?;
            let w = b.loss_weight() / total_weight;
            let value = f64::from(out.loss.as_vec()[0]);
            if !value.is_finite() {
                return Err(TrainError::NonFinite(format!("loss is {value} at step {} (micro-batch {i})", s + 1)));
            }
            step_loss += w * value;
            for (k, v) in out.metrics {
                let e = step_metrics.entry(k).or_default();
                e.0 += w * v;
                e.1 += w;
            }
            tokens += b.num_tokens() as u64;
            let mut grads = out.loss.try_mul(w as f32).map_err(dev_err)?.try_backward().map_err(dev_err)?;
            let micro = read_grads(model, &mut grads)?;
            drop(grads);
            match &mut g {
                None => g = Some(micro),
                Some(acc) => {
                    for (a, m) in acc.iter_mut().zip(micro) {
                        a.data.iter_mut().zip(m.data).for_each(|(x, y)| *x += y);
                    }
                }
            }
        }
        // A rank without micro-batches in this step (the last step of an epoch) adds zeros.
        let mut g = match g {
            Some(g) => g,
            None => read_grads(model, &mut model.try_alloc_grads().map_err(dev_err)?)?,
        };
        if world > 1 {
            // One flat buffer of every trained tensor's gradient, summed over the ranks.
            let mut flat: Vec<f32> = Vec::with_capacity(g.iter().map(|t| t.data.len()).sum());
            g.iter().for_each(|t| flat.extend_from_slice(&t.data));
            comm.all_reduce_sum(&mut flat)?;
            let mut at = 0;
            for t in &mut g {
                let n = t.data.len();
                t.data.copy_from_slice(&flat[at..at + n]);
                at += n;
            }
            let stats = gather(comm, &StepStats { loss: step_loss, tokens, metrics: step_metrics })?;
            step_loss = stats.iter().map(|x| x.loss).sum();
            tokens = stats.iter().map(|x| x.tokens).sum();
            step_metrics = BTreeMap::new();
            for x in stats {
                for (k, (v, w)) in x.metrics {
                    let e = step_metrics.entry(k).or_default();
                    e.0 += v;
                    e.1 += w;
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut g, cfg.max_grad_norm);
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite(format!("gradient norm is {grad_norm} at step {}", s + 1)));
        }
        let lr = schedule.lr(s);
        opt.update(model, &g, lr)?;
        drop(g);
        state.global_step += 1;
        let step = state.global_step;
        let epoch_f = step as f64 / steps_per_epoch as f64;

        let w = &mut state.window;
        w.steps += 1;
        w.loss_sum += step_loss;
        w.tokens += tokens;
        for (k, (sum, weight)) in step_metrics {
            *w.metric_sums.entry(k.clone()).or_default() += sum / weight;
            *w.metric_steps.entry(k).or_default() += 1;
        }
        if step.is_multiple_of(cfg.logging_steps) || step == total_steps {
            let elapsed = window_start.elapsed().as_secs_f64();
            let rec = Record::Train(TrainRecord {
                step,
                epoch: epoch_f,
                loss: w.loss_sum / w.steps as f64,
                learning_rate: lr,
                grad_norm,
                tokens_per_second: if elapsed > 0.0 { w.tokens as f64 / elapsed } else { 0.0 },
                metrics: w
                    .metric_sums
                    .iter()
                    .map(|(k, v)| (k.clone(), v / w.metric_steps.get(k).copied().unwrap_or(w.steps).max(1) as f64))
                    .collect(),
            });
            state.window = Window::default();
            window_start = Instant::now();
            callbacks.on_record(&rec);
            state.history.push(rec);
        }
        callbacks.on_step(step, total_steps);

        if let Some(ev) = eval {
            if step.is_multiple_of(cfg.eval_every()) || step == total_steps {
                let (eval_loss, metrics) = evaluate(model, objective, ev, cfg.per_device_eval_batch_size, seed, step)?;
                let rec = Record::Eval(EvalRecord { step, epoch: epoch_f, eval_loss, metrics });
                callbacks.on_record(&rec);
                state.history.push(rec);
                if state.best_eval_loss.is_none_or(|b| eval_loss < b) {
                    state.best_eval_loss = Some(eval_loss);
                    state.best_step = Some(step);
                    state.patience_counter = 0;
                    if lead {
                        let params = read_params(model)?;
                        checkpoint::save(&paths.checkpoints, &format!("best-{step}"), &params, &[], &state)?;
                    }
                } else {
                    state.patience_counter += 1;
                    if cfg.early_stopping_patience.is_some_and(|p| state.patience_counter >= p) {
                        callbacks.on_message(&format!(
                            "early stopping at step {step}: no lower eval loss in {} evaluations",
                            state.patience_counter
                        ));
                        state.stop = Some(StopReason::EarlyStopped);
                    }
                }
            }
        }
        if let Some(reason) = state.stop {
            stop = reason;
        }
        let overdue = cfg.save_interval_secs > 0 && last_save.elapsed() >= save_interval;
        if lead && (step.is_multiple_of(cfg.save_steps) || step == total_steps || state.stop.is_some() || overdue) {
            save_checkpoint(model, &opt, &state, paths, cfg)?;
            last_save = Instant::now();
        }
    }

    // Only rank 0's model is kept (the others' outputs are discarded), so only it loads the best.
    if lead && stop != StopReason::Interrupted && cfg.load_best_model_at_end {
        if let Some(best) = state.best_step.filter(|&b| b != state.global_step) {
            let dir = paths.checkpoints.join(format!("best-{best}"));
            let ck = checkpoint::load::<TrainerState>(&dir)?;
            write_params(model, &ck.params)?;
            callbacks.on_message(&loaded_best_message(best, state.best_eval_loss));
        }
    }

    let metrics_path = paths.report.join("metrics.jsonl");
    let loss_curve_path = paths.report.join("loss_curve.png");
    write_jsonl(&metrics_path, &state.history)?;
    let marks = CurveMarks {
        best_step: state.best_step,
        early_stop: (stop == StopReason::EarlyStopped).then_some(state.global_step),
    };
    let loss_curve_text = plot_loss_curve(&loss_curve_path, &state.history, "training loss", marks)?;
    let final_train_loss = state.history.iter().rev().find_map(|r| match r {
        Record::Train(t) => Some(t.loss),
        Record::Eval(_) => None,
    });
    Ok(TrainOutcome {
        plan,
        stop,
        global_step: state.global_step,
        history: state.history,
        best_eval_loss: state.best_eval_loss,
        best_step: state.best_step,
        final_train_loss,
        metrics_path,
        loss_curve_path,
        loss_curve_text,
    })
}

fn to_bytes(tensors: &[crate::NamedTensor]) -> Vec<u8> {
    tensors.iter().flat_map(|t| t.data.iter().flat_map(|v| v.to_le_bytes())).collect()
}

fn from_bytes(bytes: &[u8], into: &mut [crate::NamedTensor]) -> Result<(), TrainError> {
    let want: usize = into.iter().map(|t| t.data.len() * 4).sum();
    if bytes.len() != want {
        return Err(TrainError::Dist(format!(
            "rank 0 broadcast {} bytes of parameters, this rank's model has {want}: the ranks train different models",
            bytes.len()
        )));
    }
    let mut it = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
    for t in into {
        t.data.iter_mut().for_each(|x| *x = it.next().expect("length checked"));
    }
    Ok(())
}

fn save_checkpoint<M: TensorCollection<f32, D>, D: Device<f32>>(
    model: &M,
    opt: &AdamW,
    state: &TrainerState,
    paths: &TrainPaths,
    cfg: &TrainConfig,
) -> Result<(), TrainError> {
    let params = read_params(model)?;
    let name = format!("checkpoint-{}", state.global_step);
    checkpoint::save(&paths.checkpoints, &name, &params, &opt.state_tensors(), state)?;
    if let Some(keep) = cfg.save_total_limit {
        checkpoint::rotate(&paths.checkpoints, keep)?;
    }
    checkpoint::prune_best(&paths.checkpoints, state.best_step)
}

/// Mean loss (weighted like training: by [`Batch::loss_weight`]) and metrics over `data`, in
/// order, without gradients.
pub fn evaluate<M, D, O>(
    model: &M,
    objective: &mut O,
    data: &dyn Dataset<Batch = O::Batch>,
    batch_size: usize,
    seed: u64,
    step: u64,
) -> Result<(f64, BTreeMap<String, f64>), TrainError>
where
    M: TensorCollection<f32, D>,
    D: Device<f32>,
    O: Objective<M, D>,
{
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut total = 0.0;
    let mut loss = 0.0;
    let mut metrics: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (i, chunk) in idx.chunks(batch_size.max(1)).enumerate() {
        let b = data.collate(chunk)?;
        let w = b.loss_weight();
        let info = StepInfo { step, micro: i, training: false, seed: step_seed(seed, step, i, false) };
        let out = objective.loss(model, &b, NoneTape, &info)?;
        loss += w * f64::from(out.loss.as_vec()[0]);
        for (k, v) in out.metrics {
            let e = metrics.entry(k).or_default();
            e.0 += w * v;
            e.1 += w;
        }
        total += w;
    }
    if total <= 0.0 {
        return Err(TrainError::Data("the evaluation split carries no loss".into()));
    }
    Ok((loss / total, metrics.into_iter().map(|(k, (sum, weight))| (k, sum / weight)).collect()))
}

/// Where [`train`] keeps the best checkpoint of step `step` (for callers that want its files).
pub fn best_checkpoint_dir(checkpoints: &Path, step: u64) -> PathBuf {
    checkpoints.join(format!("best-{step}"))
}

/// What is said when the best checkpoint replaces the last weights: the eval loss as a number
/// (it printed as `Some(5.4579…)` through `Debug`).
fn loaded_best_message(step: u64, eval_loss: Option<f64>) -> String {
    match eval_loss {
        Some(l) => format!("loaded the best checkpoint (step {step}, eval loss {l:.4})"),
        None => format!("loaded the best checkpoint (step {step})"),
    }
}

#[cfg(test)]
mod message_tests {
    use super::loaded_best_message;

    // Regression (issue 15, point 9): the early-stopping message printed `Some(5.4579…)`.
    #[test]
    fn best_checkpoint_message_prints_the_number() {
        insta::assert_snapshot!(loaded_best_message(40, Some(5.457_912_3)), @"loaded the best checkpoint (step 40, eval loss 5.4579)");
        assert_eq!(loaded_best_message(7, None), "loaded the best checkpoint (step 7)");
    }
}
