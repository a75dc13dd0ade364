//! [`TrainConfig`]: the training hyper-parameters, named as ms-swift / transformers'
//! `TrainingArguments` name them so that a recipe reads like the `swift sft` command line.
//!
//! The fields are defined once, in [`with_train_args!`](crate::with_train_args): [`TrainConfig`]
//! is built from that list by [`params_group!`](crate::params_group), and so is every training
//! stage's `[params]` struct (pipeline-stages' `training::stage_params!`), which puts these keys
//! beside the stage's own in one strict serde struct, so that a misspelt key in a recipe is an
//! error that lists every key the stage knows.

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Learning-rate schedule after warmup (transformers' `lr_scheduler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    /// Half a cosine from the peak down to 0 (`get_cosine_schedule_with_warmup`, `num_cycles = 0.5`).
    #[default]
    Cosine,
    /// Straight line from the peak down to 0 (`get_linear_schedule_with_warmup`).
    Linear,
    /// The peak rate throughout; warmup is ignored (`get_constant_schedule`).
    Constant,
    /// Linear warmup, then the peak rate (`get_constant_schedule_with_warmup`).
    ConstantWithWarmup,
}

/// The precision frozen base weights are held in (ms-swift's `--torch_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TorchDtype {
    /// f32 weights (the only precision on the CPU).
    Float32,
    /// bf16 frozen base matrices on CUDA, products on tensor cores with f32 accumulation; LoRA
    /// adapters, gradients and optimiser state stay f32 (peft's mixed precision).
    Bfloat16,
}

/// How attention is computed (ms-swift's `--attn_impl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnImpl {
    /// The fused memory-efficient causal attention kernel (FlashAttention-2's algorithm, bf16
    /// tensor cores) wherever it applies: CUDA with a bf16 base and head dimension 64 or 128;
    /// elsewhere `eager`.
    #[serde(alias = "flash_attention_2")]
    FlashAttn,
    /// Scores and softmax as separate f32 tensor ops (exact f32 attention, more memory).
    Eager,
}

/// The one definition of the training arguments: `with_train_args!({ path::to::m } tokens...)`
/// expands to `path::to::m! { tokens... [ fields ] }`, each field written
/// `#[attributes] name: Type = default,` (types and defaults are `$crate` paths, so they resolve
/// in any crate). [`params_group!`](crate::params_group) turns the list into [`TrainConfig`];
/// pipeline-stages' `stage_params!` merges it into a stage's params struct.
///
/// Defaults follow ms-swift's `swift sft` where it has one (`weight_decay = 0.1`,
/// `adam_beta2 = 0.95`, `split_ratio = 0.01`...). Differences from transformers, on purpose:
/// `group_by_length` defaults to `true` (padding is expensive on a CPU), and `seed` defaults to the
/// recipe's seed (the stage fills it in).
#[macro_export]
macro_rules! with_train_args {
    ({ $($callback:tt)* } $($args:tt)*) => {
        $($callback)*! { $($args)* [
            /// Peak learning rate.
            learning_rate: f64 = 1e-4,
            /// Passes over the training split (fractions allowed); ignored when `max_steps > 0`.
            num_train_epochs: f64 = 1.0,
            /// Total optimizer steps; `-1` (or any value <= 0) means "from `num_train_epochs`".
            max_steps: i64 = -1,
            /// Examples per micro-batch.
            per_device_train_batch_size: usize = 1,
            /// Examples per evaluation batch.
            per_device_eval_batch_size: usize = 1,
            /// Micro-batches per optimizer step.
            gradient_accumulation_steps: usize = 1,
            /// Warmup length as a fraction of the total steps (used when `warmup_steps` is 0).
            warmup_ratio: f64 = 0.05,
            /// Warmup length in steps; wins over `warmup_ratio` when > 0.
            warmup_steps: u64 = 0,
            /// Learning-rate schedule after warmup.
            lr_scheduler_type: $crate::SchedulerType = $crate::SchedulerType::Cosine,
            /// Decoupled (AdamW) weight decay; biases and norm weights are excluded (see `optim`).
            weight_decay: f64 = 0.1,
            adam_beta1: f64 = 0.9,
            adam_beta2: f64 = 0.95,
            adam_epsilon: f64 = 1e-8,
            /// Clip the global L2 norm of the gradients to this value; 0 disables clipping.
            max_grad_norm: f64 = 1.0,
            /// Longest sequence in tokens; longer examples are truncated (packing block size for pretrain).
            max_length: usize = 2048,
            /// Log the averaged training loss, lr, grad norm and tokens/s every this many steps.
            logging_steps: u64 = 5,
            /// Evaluate every this many steps (default: `save_steps`). Evaluation also runs at the end.
            eval_steps: ::core::option::Option<u64> = ::core::option::Option::None,
            /// Save a checkpoint every this many steps (and at the end).
            save_steps: u64 = 500,
            /// Also save a checkpoint once this many seconds of training passed since the last
            /// one, so that a killed run loses at most about this much (0: by steps only). Not
            /// part of checkpoint fingerprints: changing it does not stop a run from resuming.
            #[serde(skip_serializing)]
            save_interval_secs: u64 = 60,
            /// Keep at most this many `checkpoint-*` directories (the best one is kept apart).
            save_total_limit: ::core::option::Option<usize> = ::core::option::Option::None,
            /// Fraction of the training data held out for evaluation when no `eval` input is given.
            #[serde(alias = "split_dataset_ratio")]
            split_ratio: f64 = 0.01,
            /// Stop after this many evaluations without a lower eval loss.
            early_stopping_patience: ::core::option::Option<u32> = ::core::option::Option::None,
            /// Put the parameters of the lowest-eval-loss checkpoint back at the end.
            load_best_model_at_end: bool = true,
            /// Batch examples of similar length together (transformers' `LengthGroupedSampler`).
            group_by_length: bool = true,
            /// Data order, split, dropout and init seed; `None` = the recipe's seed.
            seed: ::core::option::Option<u64> = ::core::option::Option::None,
            /// TF32 tensor-op math for the f32 products on CUDA (transformers' `tf32`); off by
            /// default, as in PyTorch. No effect on the CPU. Serialised only when on, so reports and
            /// checkpoint fingerprints of runs without it are unchanged.
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            tf32: bool = false,
            /// Precision of the frozen base weights on CUDA (ms-swift's `torch_dtype`): `"bfloat16"`
            /// or `"float32"`. Unset: bf16 for a checkpoint loaded from disk on CUDA, f32 otherwise
            /// (the built-in preset, the CPU). Serialised only when set, so reports and checkpoint
            /// fingerprints of runs without it are unchanged.
            #[serde(skip_serializing_if = "Option::is_none")]
            torch_dtype: ::core::option::Option<$crate::TorchDtype> = ::core::option::Option::None,
            /// Recompute each decoder layer in the backward instead of keeping its activations
            /// (transformers' `gradient_checkpointing`): less memory, one more forward per step.
            /// Serialised only when on.
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            gradient_checkpointing: bool = false,
            /// Attention implementation (ms-swift's `attn_impl`): `"flash_attn"` or `"eager"`.
            /// Unset: `flash_attn` where it applies (CUDA, bf16 base), `eager` otherwise.
            /// Serialised only when set.
            #[serde(skip_serializing_if = "Option::is_none")]
            attn_impl: ::core::option::Option<$crate::AttnImpl> = ::core::option::Option::None,
        ] }
    };
}

/// A plain struct from a field list in the [`with_train_args!`](crate::with_train_args) form:
/// every field `pub`, `Debug + Clone + PartialEq + Serialize` (the field attributes may be
/// `#[serde(...)]` ones, which serde reads when the same list builds a stage's wire struct), and a
/// `Default` made of the listed defaults. The calling crate must depend on `serde`.
#[macro_export]
macro_rules! params_group {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident
        [ $( $(#[$field_meta:meta])* $field:ident : $ty:ty = $default:expr ),* $(,)? ]
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize)]
        $vis struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl ::core::default::Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }
    };
}

crate::with_train_args! {
    { crate::params_group }
    /// Training hyper-parameters (their meaning and defaults: [`with_train_args!`](crate::with_train_args)).
    /// Ranges are checked by [`TrainConfig::validate`].
    pub struct TrainConfig
}

impl TrainConfig {
    /// Check ranges; the message names the field.
    /// Check every field's range, before anything runs (the stages call it at plan time).
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, msg: &str| Err(TrainError::Config(format!("`{field}` {msg}")));
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", "must be a positive number");
        }
        if self.max_steps <= 0 && !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0) {
            return bad("num_train_epochs", "must be > 0 when `max_steps` is not set");
        }
        if self.per_device_train_batch_size == 0 {
            return bad("per_device_train_batch_size", "must be at least 1");
        }
        if self.per_device_eval_batch_size == 0 {
            return bad("per_device_eval_batch_size", "must be at least 1");
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1]");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be >= 0");
        }
        if !(0.0..1.0).contains(&self.adam_beta1) {
            return bad("adam_beta1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("adam_beta2", "must be in [0, 1)");
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            return bad("adam_epsilon", "must be > 0");
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad("max_grad_norm", "must be >= 0 (0 disables clipping)");
        }
        if self.max_length < 2 {
            return bad("max_length", "must be at least 2 tokens");
        }
        // Regression (issue 14, defect 6): absurd sizes overflowed a multiply (a panic) or asked
        // for terabytes; they are refused here, with the size they imply.
        for (field, v) in [
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
            if v > MAX_BATCH {
                return bad(field, &format!("{v} is absurd: at most {MAX_BATCH}"));
            }
        }
        if self.max_length > MAX_LENGTH {
            return bad("max_length", &format!("{} tokens is absurd: at most {MAX_LENGTH}", self.max_length));
        }
        let tokens = self.per_device_train_batch_size.max(self.per_device_eval_batch_size) * self.max_length;
        if tokens > MAX_BATCH_TOKENS {
            return bad(
                "per_device_train_batch_size",
                &format!(
                    "{} examples x max_length {} = {tokens} tokens a micro-batch need at least {:.1} GB for the \
                     token ids and logits of even a 1000-token vocabulary; at most {MAX_BATCH_TOKENS} tokens",
                    self.per_device_train_batch_size.max(self.per_device_eval_batch_size),
                    self.max_length,
                    tokens as f64 * 4.0 * 1000.0 / 1e9
                ),
            );
        }
        if !(self.num_train_epochs.is_finite() && self.num_train_epochs <= 1e6) {
            return bad("num_train_epochs", "must be a finite number of at most 1000000");
        }
        if self.max_steps > MAX_STEPS {
            return bad("max_steps", &format!("{} is absurd: at most {MAX_STEPS}", self.max_steps));
        }
        if self.logging_steps == 0 {
            return bad("logging_steps", "must be at least 1");
        }
        if self.save_steps == 0 {
            return bad("save_steps", "must be at least 1");
        }
        if self.eval_steps == Some(0) {
            return bad("eval_steps", "must be at least 1");
        }
        if self.save_total_limit == Some(0) {
            return bad("save_total_limit", "must be at least 1 (leave it out to keep every checkpoint)");
        }
        if !(0.0..1.0).contains(&self.split_ratio) {
            return bad("split_ratio", "must be in [0, 1)");
        }
        if self.early_stopping_patience == Some(0) {
            return bad("early_stopping_patience", "must be at least 1");
        }
        Ok(())
    }

    /// Steps between evaluations.
    pub fn eval_every(&self) -> u64 {
        self.eval_steps.unwrap_or(self.save_steps)
    }

    /// The effective seed (`seed`, else `fallback`: the recipe's seed).
    pub fn seed_or(&self, fallback: u64) -> u64 {
        self.seed.unwrap_or(fallback)
    }
}

/// Bounds on sizes (issue 14, defect 6): far beyond any real run, small enough that products of
/// them never overflow.
const MAX_BATCH: usize = 1 << 16;
const MAX_LENGTH: usize = 1 << 20;
const MAX_BATCH_TOKENS: usize = 1 << 24;
const MAX_STEPS: i64 = 1 << 40;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        TrainConfig::default().validate().unwrap();
    }

    /// The field names, their order and the defaults, as a checkpoint's fingerprint serialises
    /// them (a change here stops interrupted runs from resuming, and changes what recipes mean).
    #[test]
    fn defaults_and_names_are_the_swift_ones() {
        let json = serde_json::to_string(&TrainConfig::default()).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"learning_rate":0.0001,"num_train_epochs":1.0,"max_steps":-1,"per_device_train_batch_size":1,"#,
                r#""per_device_eval_batch_size":1,"gradient_accumulation_steps":1,"warmup_ratio":0.05,"#,
                r#""warmup_steps":0,"lr_scheduler_type":"cosine","weight_decay":0.1,"adam_beta1":0.9,"#,
                r#""adam_beta2":0.95,"adam_epsilon":1e-8,"max_grad_norm":1.0,"max_length":2048,"logging_steps":5,"#,
                r#""eval_steps":null,"save_steps":500,"save_total_limit":null,"split_ratio":0.01,"#,
                r#""early_stopping_patience":null,"load_best_model_at_end":true,"group_by_length":true,"seed":null}"#
            )
        );
    }

    /// Regression (issue 14, defect 6): `per_device_train_batch_size = 1000000000000000000`
    /// panicked on a multiply overflow; absurd sizes are a config error naming the field and the
    /// size they imply.
    #[test]
    fn absurd_sizes_are_refused_with_the_estimate() {
        let c = TrainConfig { per_device_train_batch_size: 1_000_000_000_000_000_000, ..Default::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`per_device_train_batch_size` 1000000000000000000 is absurd: at most 65536"), "{e}");
        let c = TrainConfig { per_device_train_batch_size: 60_000, max_length: 4096, ..Default::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("60000 examples x max_length 4096 = 245760000 tokens"), "{e}");
        assert!(e.contains("983.0 GB"), "{e}");
        let c = TrainConfig { max_length: usize::MAX, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("`max_length`"));
        let c = TrainConfig { max_steps: i64::MAX, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("`max_steps`"));
    }

    #[test]
    fn validate_names_the_field() {
        let c = TrainConfig { gradient_accumulation_steps: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("gradient_accumulation_steps"));
        let c = TrainConfig { adam_beta2: 1.0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("adam_beta2"));
    }
}
