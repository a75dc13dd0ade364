//! The training loop shared by the `pretrain`, `sft` and `align` stages: AdamW, learning-rate
//! schedules, gradient accumulation and clipping, length-grouped batching, evaluation, early
//! stopping, checkpoints with exact resume, and the objectives of SPECS.md §4 (masked
//! cross-entropy, DPO, KTO). Generic over dfdx: it knows nothing about transformers.
//!
//! # The contract
//!
//! - **What is trained** is any dfdx [`TensorCollection<f32, D>`](dfdx::nn::tensor_collection::TensorCollection):
//!   a whole model (full fine-tuning, pretraining) or only the LoRA adapters. The tensors whose
//!   `TensorOptions::do_gradient_update` is set are the ones optimised and checkpointed.
//! - **A step** is an [`Objective`]: `loss(&model, &batch, tape, &StepInfo) -> LossOutput`
//!   returning the *mean* loss of the batch as a scalar tensor on the given tape, plus named
//!   figures to log. The tape is an `OwnedTape` carrying the step's gradients so far (training)
//!   or `NoneTape` (evaluation), so one implementation, generic over the tape, serves both.
//! - **Data** is a [`Dataset`]: examples with a length (for length grouping) that collate into a
//!   [`Batch`] with a loss weight. Micro-batch losses are combined as
//!   `Σ_i loss_i · weight_i / Σ_i weight_i` over the accumulation window, so a step's loss is the
//!   token-level mean over all its micro-batches (weights = labelled tokens), or the example mean
//!   for DPO/KTO (weights = examples). [`TokenDataset`] / [`LmBatch`] are the causal-LM ones.
//! - [`train`] runs the loop, writes checkpoints into `TrainPaths::checkpoints` (a stage's scratch
//!   directory) and `metrics.jsonl` + `loss_curve.png` into `TrainPaths::report`, and reports
//!   through [`Callbacks`].
//!
//! A bigram language model (an embedding and a linear head, every weight trained) with the
//! causal-LM loss on its labelled tokens, trained for a few steps:
//!
//! ```
//! use dfdx::prelude::*;
//! use pipeline_train::{
//!     masked_mean_nll, token_logprobs, train, LmBatch, LossOutput, NoCallbacks, Objective, StepInfo, StopReason,
//!     TokenDataset, TokenExample, TrainConfig, TrainError, TrainPaths,
//! };
//!
//! const VOCAB: usize = 16;
//! type Model = <(Embedding<VOCAB, 8>, Linear<8, VOCAB>) as BuildOnDevice<Cpu, f32>>::Built;
//!
//! /// Next-token cross-entropy, averaged over the labelled tokens of the batch.
//! struct CausalLm;
//!
//! impl Objective<Model, Cpu> for CausalLm {
//!     type Batch = LmBatch;
//!     fn loss<T: Tape<f32, Cpu>>(
//!         &mut self,
//!         model: &Model,
//!         b: &LmBatch,
//!         tape: T,
//!         _info: &StepInfo,
//!     ) -> Result<LossOutput<Cpu, T>, TrainError> {
//!         let ids = model.0.weight.device().tensor_from_vec(b.input_ids.clone(), (b.batch, b.seq));
//!         // (batch, seq, VOCAB) with the vocabulary as a runtime dimension, as `token_logprobs` takes it.
//!         let logits = model.forward(ids.put_tape(tape)).reshape_like(&(b.batch, b.seq, VOCAB));
//!         let logprobs = token_logprobs(logits, &b.targets)?;
//!         Ok(LossOutput { loss: masked_mean_nll(logprobs, &b.loss_mask)?, metrics: vec![] })
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Cpu::seed_from_u64(0);
//! let mut model = dev.build_module::<(Embedding<VOCAB, 8>, Linear<8, VOCAB>), f32>();
//! // Every token of `1 2 3 ... 15` is a target; pad id 0, at most 64 tokens.
//! let data = TokenDataset::new(vec![TokenExample::all_targets((1..16).collect()); 4], 0, 64)?;
//! let cfg = TrainConfig { learning_rate: 1e-2, max_steps: 4, split_ratio: 0.0, ..Default::default() };
//! let dir = tempfile::tempdir()?;
//! let paths = TrainPaths { checkpoints: dir.path().join("checkpoints"), report: dir.path().join("report") };
//! let outcome = train(&cfg, 7, &dev, &mut model, &mut CausalLm, &data, None, &paths, &mut NoCallbacks)?;
//! assert_eq!((outcome.stop, outcome.global_step), (StopReason::Completed, 4));
//! assert!(paths.report.join("metrics.jsonl").is_file() && paths.checkpoints.join("checkpoint-4").is_dir());
//! # Ok(())
//! # }
//! ```
//!
//! # The real model and the stages
//!
//! - [`lm`]: [`lm::TrainModel`] wraps pipeline-model's `Qwen2` (its `FlatParams`, i.e. all weights
//!   or the LoRA adapters per `Qwen2::set_trainable`, are what is trained, named `params.flat`);
//!   [`lm::CausalLmObjective`] (pretrain, SFT on [`TokenDataset`]), [`lm::DpoObjective`] on
//!   [`lm::PairDataset`], [`lm::KtoObjective`] on [`lm::KtoDataset`], with the reference
//!   log-probs precomputed once by [`lm::precompute_dpo_reference`] /
//!   [`lm::precompute_kto_reference`] (adapters disabled for LoRA, initial weights otherwise).
//! - [`cls`]: ms-swift's other `sft` tasks on the same model — sequence classification
//!   ([`cls::HeadModel`]: a `score` head trained beside the decoder's trainable tensors,
//!   [`cls::SeqClsObjective`], checked against transformers' `Qwen2ForSequenceClassification`
//!   in `tests/train/cls.rs`) and embeddings ([`cls::EmbeddingObjective`]: last / mean pooling,
//!   the `cosine_similarity` loss, [`cls::spearman`] on the eval split).
//! - The stages (pipeline-stages' `training.rs`) own everything that touches the engine: they map
//!   [`Callbacks`] onto their run context (progress, metrics, Ctrl-C → checkpoint and
//!   `Cancelled`), put the checkpoints in their scratch directory, and parse their `[params]`
//!   into their own struct that embeds the training arguments of [`with_train_args!`] (this crate
//!   does not depend on the engine).
//!
//! # Exactness
//!
//! - AdamW and clipping follow PyTorch's operation order in f32 ([`optim`]); schedules follow
//!   transformers' formulas ([`schedule`]); both are checked against golden values from
//!   `scripts/oracles/train_golden.py` in `tests/train/golden.rs`.
//! - Determinism on CPU: the data order is a pure function of `(seed, epoch)`, per-micro-batch
//!   seeds ([`StepInfo::seed`]) are a pure function of `(seed, step, micro)`, and a checkpoint
//!   holds the parameters, both Adam moments, the step, the open logging window and the history.
//!   A run killed after its checkpoint at step k and restarted produces bit-identical losses,
//!   learning rates and gradient norms to an uninterrupted run (`tests/train/training_loop.rs`, and on the real Qwen2 in `tests/train/qwen.rs`).
//!
//! # Differences from transformers' Trainer (on purpose)
//!
//! - Steps per epoch = `ceil(ceil(n / batch) / accumulation)`: the last step of an epoch uses the
//!   remaining micro-batches rather than dropping them.
//! - Gradients are accumulated in f32 and clipped on the host; a step whose loss or gradient norm
//!   is not finite is an error, not a skipped step.

pub mod checkpoint;
pub mod cls;
pub mod config;
pub mod data;
pub mod dist;
pub mod lm;
pub mod metrics;
pub mod objectives;
pub mod optim;
pub mod params;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

use std::path::PathBuf;

pub use config::{AttnImpl, SchedulerType, TorchDtype, TrainConfig};
pub use data::{pack_documents, split_indices, Batch, Dataset, LmBatch, Subset, TokenDataset, TokenExample};
pub use metrics::{CurveMarks, EvalRecord, Record, TrainRecord};
pub use objectives::{
    dpo_loss, kto_kl_baseline, kto_loss, masked_mean_nll, rotate_by_one, sequence_logprobs, token_logprobs, DpoConfig,
    KtoConfig, LossOutput,
};
pub use optim::{AdamW, AdamWConfig};
pub use params::NamedTensor;
pub use schedule::LrSchedule;
pub use trainer::{
    evaluate, train, train_distributed, Callbacks, Control, NoCallbacks, Objective, StepInfo, StopReason, TrainOutcome,
    TrainPaths, TrainPlan,
};

impl From<dist::DistError> for TrainError {
    fn from(e: dist::DistError) -> Self {
        TrainError::Dist(e.to_string())
    }
}

/// Everything that can go wrong in training. Messages name the file, tensor, field or step.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A training parameter is out of range.
    #[error("invalid training params: {0}")]
    Config(String),
    /// The data cannot be trained on (empty split, example without targets...).
    #[error("training data: {0}")]
    Data(String),
    /// Tensors of unexpected shapes reached an objective.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The device (dfdx) reported an error.
    #[error("device error: {0}")]
    Device(String),
    /// A loss or gradient norm became NaN or infinite.
    #[error("training diverged: {0}")]
    NonFinite(String),
    /// A checkpoint is unreadable or does not fit the model.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A checkpoint exists but belongs to another run.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// Writing the metrics or the loss curve failed.
    #[error("training report: {0}")]
    Report(String),
    /// Communication between the ranks of a data-parallel run failed.
    #[error("data-parallel training: {0}")]
    Dist(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}
