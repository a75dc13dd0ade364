//! [`TrainConfig`]: the training hyper-parameters, named as ms-swift / transformers'
//! `TrainingArguments` name them so that a recipe reads like the `swift sft` command line.

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

/// Training hyper-parameters. Every field has a default; unknown keys are an error.
///
/// Defaults follow ms-swift's `swift sft` where it has one (`weight_decay = 0.1`,
/// `adam_beta2 = 0.95`, `split_ratio = 0.01`...). Differences from transformers, on purpose:
/// `group_by_length` defaults to `true` (padding is expensive on a CPU), and `seed` defaults to the
/// recipe's seed (the stage fills it in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Passes over the training split (fractions allowed); ignored when `max_steps > 0`.
    pub num_train_epochs: f64,
    /// Total optimizer steps; `-1` (or any value <= 0) means "from `num_train_epochs`".
    pub max_steps: i64,
    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Examples per evaluation batch.
    pub per_device_eval_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Warmup length as a fraction of the total steps (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    /// Warmup length in steps; wins over `warmup_ratio` when > 0.
    pub warmup_steps: u64,
    pub lr_scheduler_type: SchedulerType,
    /// Decoupled (AdamW) weight decay; biases and norm weights are excluded (see [`crate::optim`]).
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global L2 norm of the gradients to this value; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Longest sequence in tokens; longer examples are truncated (packing block size for pretrain).
    pub max_length: usize,
    /// Log the averaged training loss, lr, grad norm and tokens/s every this many steps.
    pub logging_steps: u64,
    /// Evaluate every this many steps (default: `save_steps`). Evaluation also runs at the end.
    pub eval_steps: Option<u64>,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_steps: u64,
    /// Keep at most this many `checkpoint-*` directories (the best one is kept apart).
    pub save_total_limit: Option<usize>,
    /// Fraction of the training data held out for evaluation when no `eval` input is given.
    #[serde(alias = "split_dataset_ratio")]
    pub split_ratio: f64,
    /// Stop after this many evaluations without a lower eval loss.
    pub early_stopping_patience: Option<u32>,
    /// Put the parameters of the lowest-eval-loss checkpoint back at the end.
    pub load_best_model_at_end: bool,
    /// Batch examples of similar length together (transformers' `LengthGroupedSampler`).
    pub group_by_length: bool,
    /// Data order, split, dropout and init seed; `None` = the recipe's seed.
    pub seed: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            learning_rate: 1e-4,
            num_train_epochs: 1.0,
            max_steps: -1,
            per_device_train_batch_size: 1,
            per_device_eval_batch_size: 1,
            gradient_accumulation_steps: 1,
            warmup_ratio: 0.05,
            warmup_steps: 0,
            lr_scheduler_type: SchedulerType::Cosine,
            weight_decay: 0.1,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            max_length: 2048,
            logging_steps: 5,
            eval_steps: None,
            save_steps: 500,
            save_total_limit: None,
            split_ratio: 0.01,
            early_stopping_patience: None,
            load_best_model_at_end: true,
            group_by_length: true,
            seed: None,
        }
    }
}

/// Every key [`TrainConfig`] accepts (aliases included), for stages that split one `params`
/// table between their own config and this one (see [`TrainConfig::split_params`]).
pub const TRAIN_CONFIG_KEYS: &[&str] = &[
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "warmup_steps",
    "lr_scheduler_type",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "max_length",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "split_ratio",
    "split_dataset_ratio",
    "early_stopping_patience",
    "load_best_model_at_end",
    "group_by_length",
    "seed",
];

impl TrainConfig {
    /// Check ranges; the message names the field.
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

    /// Split a stage's `params` table into the training keys (parsed as a [`TrainConfig`] and
    /// validated) and the rest, for the stage's own strict config. Serde's unknown-key message for
    /// the rest lists only the stage's keys, so callers should append [`TRAIN_CONFIG_KEYS`] to it.
    pub fn split_params(params: &toml::Table) -> Result<(TrainConfig, toml::Table), TrainError> {
        let (train, rest): (toml::Table, toml::Table) =
            params.clone().into_iter().partition(|(k, _)| TRAIN_CONFIG_KEYS.contains(&k.as_str()));
        let cfg: TrainConfig =
            toml::Value::Table(train).try_into().map_err(|e: toml::de::Error| TrainError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok((cfg, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_keys_are_rejected() {
        TrainConfig::default().validate().unwrap();
        let err = serde_json::from_str::<TrainConfig>(r#"{"learning_rat": 1e-4}"#).unwrap_err().to_string();
        assert!(err.contains("learning_rat") && err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn split_dataset_ratio_is_an_alias() {
        let c: TrainConfig =
            serde_json::from_str(r#"{"split_dataset_ratio": 0.2, "lr_scheduler_type": "linear"}"#).unwrap();
        assert_eq!(c.split_ratio, 0.2);
        assert_eq!(c.lr_scheduler_type, SchedulerType::Linear);
    }

    #[test]
    fn validate_names_the_field() {
        let c = TrainConfig { gradient_accumulation_steps: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("gradient_accumulation_steps"));
        let c = TrainConfig { adam_beta2: 1.0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("adam_beta2"));
    }

    #[test]
    fn every_field_is_listed_in_the_keys() {
        let v = serde_json::to_value(TrainConfig::default()).unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(TRAIN_CONFIG_KEYS.contains(&k.as_str()), "{k} missing from TRAIN_CONFIG_KEYS");
        }
    }

    #[test]
    fn split_params_separates_train_keys() {
        let m: toml::Table = toml::from_str("learning_rate = 2e-4\nlora_rank = 8").unwrap();
        let (cfg, rest) = TrainConfig::split_params(&m).unwrap();
        assert_eq!(cfg.learning_rate, 2e-4);
        assert_eq!(rest.len(), 1);
        assert!(rest.contains_key("lora_rank"));
    }
}
