//! Learning-rate schedules with linear warmup, as transformers' `get_scheduler` builds them.
//!
//! The rate used by optimizer update `s` (0-based) is `learning_rate * lambda(s)`, exactly as a
//! PyTorch `LambdaLR` stepped after each `optimizer.step()` gives it: with warmup the first update
//! runs at rate 0.

use crate::config::{SchedulerType, TrainConfig};

/// A schedule over `total_steps` optimizer updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: SchedulerType,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// transformers' `TrainingArguments.get_warmup_steps`: `warmup_steps` if > 0, else
    /// `ceil(total * warmup_ratio)`.
    pub fn from_config(cfg: &TrainConfig, total_steps: u64) -> Self {
        let warmup_steps =
            if cfg.warmup_steps > 0 { cfg.warmup_steps } else { (total_steps as f64 * cfg.warmup_ratio).ceil() as u64 };
        LrSchedule { kind: cfg.lr_scheduler_type, peak_lr: cfg.learning_rate, warmup_steps, total_steps }
    }

    /// The multiplier `lambda(step)` of the peak rate.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, n) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let warm = |s: f64| s / w.max(1.0);
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if s < w {
                    warm(s)
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if s < w {
                    warm(s)
                } else {
                    ((n - s) / (n - w).max(1.0)).max(0.0)
                }
            }
            SchedulerType::Cosine => {
                if s < w {
                    warm(s)
                } else {
                    let progress = (s - w) / (n - w).max(1.0);
                    // num_cycles = 0.5: half a cosine.
                    (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
        }
    }

    /// The learning rate of update `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.peak_lr * self.factor(step)
    }
}
