//! AdamW and global-norm gradient clipping, computed on the host in f32 in the order PyTorch's
//! single-tensor `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_` use, so that results
//! match them to the last bits (checked against torch.optim.AdamW itself in
//! `tests/train/golden.rs`, golden data from `scripts/oracles/train_golden.py`).
//!
//! Why not dfdx's `Adam` with `WeightDecay::Decoupled`: its moments live in a `Gradients` keyed
//! by tensor ids, which do not survive a process restart, so a checkpoint could not hold them.
//! Here the moments are named host vectors, written to `optimizer.safetensors` by
//! [`crate::checkpoint`]. The host round trip costs one copy of the trainable tensors per step:
//! nothing for LoRA adapters, acceptable for the small models full fine-tuning is used on here.

use std::collections::BTreeMap;

use dfdx::nn::tensor_collection::TensorCollection;
use dfdx::prelude::*;

use crate::config::TrainConfig;
use crate::params::{read_params, write_params, NamedTensor};
use crate::TrainError;

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_train_config(c: &TrainConfig) -> Self {
        AdamWConfig { beta1: c.adam_beta1, beta2: c.adam_beta2, eps: c.adam_epsilon, weight_decay: c.weight_decay }
    }
}

/// Whether a parameter gets weight decay. transformers' `Trainer.get_decay_parameter_names`
/// excludes biases and normalisation weights; it matches module names (`layernorm`, `rmsnorm`,
/// `norm`, `*_norm`), this matches the same words in the dotted parameter name.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let segments: Vec<&str> = lower.split('.').collect();
    let is_norm = segments
        .iter()
        .any(|s| *s == "norm" || s.ends_with("_norm") || s.contains("layernorm") || s.contains("rmsnorm"));
    !(lower.contains("bias") || is_norm)
}

#[derive(Debug, Clone, PartialEq)]
struct Moments {
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// AdamW with bias correction and decoupled weight decay.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    step: u64,
    state: BTreeMap<String, Moments>,
    /// Per-element decay flags overriding [`decays`] for tensors that pack several weights.
    decay_masks: BTreeMap<String, Vec<bool>>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, step: 0, state: BTreeMap::new(), decay_masks: BTreeMap::new() }
    }

    /// Decay only the elements of tensor `name` whose flag is `true` (e.g. a flat vector holding
    /// every weight of a model, where norms and biases must not decay).
    pub fn set_decay_mask(&mut self, name: &str, mask: Vec<bool>) {
        self.decay_masks.insert(name.to_string(), mask);
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of host tensors with learning rate `lr`; `grads[i]` belongs to `params[i]`.
    pub fn update_host(
        &mut self,
        params: &mut [NamedTensor],
        grads: &[NamedTensor],
        lr: f64,
    ) -> Result<(), TrainError> {
        if params.len() != grads.len() {
            return Err(TrainError::Device(format!("{} parameters but {} gradients", params.len(), grads.len())));
        }
        self.step += 1;
        let c = self.cfg;
        let step = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(step);
        let bias_correction2 = 1.0 - c.beta2.powi(step);
        let step_size = (lr / bias_correction1) as f32;
        let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
        let one_minus_beta1 = (1.0 - c.beta1) as f32;
        let beta2 = c.beta2 as f32;
        let one_minus_beta2 = (1.0 - c.beta2) as f32;
        let eps = c.eps as f32;
        for (p, g) in params.iter_mut().zip(grads) {
            if p.name != g.name || p.data.len() != g.data.len() {
                return Err(TrainError::Device(format!("gradient `{}` does not match parameter `{}`", g.name, p.name)));
            }
            let n = p.data.len();
            let m = self
                .state
                .entry(p.name.clone())
                .or_insert_with(|| Moments { exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n] });
            if m.exp_avg.len() != n {
                return Err(TrainError::Device(format!("optimizer state for `{}` has the wrong size", p.name)));
            }
            let factor = (1.0 - lr * c.weight_decay) as f32;
            let mask = self.decay_masks.get(&p.name);
            if mask.is_some_and(|m| m.len() != n) {
                return Err(TrainError::Device(format!("weight-decay mask of `{}` has the wrong size", p.name)));
            }
            let whole = decays(&p.name);
            for i in 0..n {
                let gi = g.data[i];
                // param.mul_(1 - lr * weight_decay)   (parameters without decay: not multiplied)
                let decay = mask.map_or(whole, |m| m[i]);
                let mut pi = if decay { p.data[i] * factor } else { p.data[i] };
                // exp_avg.lerp_(grad, 1 - beta1)   (weight < 0.5: self + w * (end - self))
                let ea = &mut m.exp_avg[i];
                *ea = if one_minus_beta1 < 0.5 {
                    *ea + one_minus_beta1 * (gi - *ea)
                } else {
                    gi - (gi - *ea) * (1.0 - one_minus_beta1)
                };
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                let es = &mut m.exp_avg_sq[i];
                *es = *es * beta2 + one_minus_beta2 * gi * gi;
                // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                let denom = es.sqrt() / bias_correction2_sqrt + eps;
                // param.addcdiv_(exp_avg, denom, value=-step_size)
                pi += -step_size * *ea / denom;
                p.data[i] = pi;
            }
        }
        Ok(())
    }

    /// Read the trainable tensors of `model`, apply one update, write them back in place.
    pub fn update<M: TensorCollection<f32, D>, D: Device<f32>>(
        &mut self,
        model: &mut M,
        grads: &[NamedTensor],
        lr: f64,
    ) -> Result<(), TrainError> {
        let mut params = read_params(model)?;
        self.update_host(&mut params, grads, lr)?;
        write_params(model, &params)
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`), flat.
    pub fn state_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::with_capacity(self.state.len() * 2);
        for (name, m) in &self.state {
            out.push(NamedTensor {
                name: format!("exp_avg.{name}"),
                shape: vec![m.exp_avg.len()],
                data: m.exp_avg.clone(),
            });
            out.push(NamedTensor {
                name: format!("exp_avg_sq.{name}"),
                shape: vec![m.exp_avg_sq.len()],
                data: m.exp_avg_sq.clone(),
            });
        }
        out
    }

    /// Restore the step count and moments written by [`AdamW::state_tensors`].
    pub fn load_state(&mut self, step: u64, tensors: Vec<NamedTensor>) -> Result<(), TrainError> {
        let mut avg = BTreeMap::new();
        let mut sq = BTreeMap::new();
        for t in tensors {
            if let Some(n) = t.name.strip_prefix("exp_avg_sq.") {
                sq.insert(n.to_string(), t.data);
            } else if let Some(n) = t.name.strip_prefix("exp_avg.") {
                avg.insert(n.to_string(), t.data);
            } else {
                return Err(TrainError::Checkpoint(format!("unexpected optimizer tensor `{}`", t.name)));
            }
        }
        let mut state = BTreeMap::new();
        for (name, exp_avg) in avg {
            let exp_avg_sq =
                sq.remove(&name).ok_or_else(|| TrainError::Checkpoint(format!("`exp_avg_sq.{name}` is missing")))?;
            if exp_avg_sq.len() != exp_avg.len() {
                return Err(TrainError::Checkpoint(format!("moments of `{name}` differ in size")));
            }
            state.insert(name, Moments { exp_avg, exp_avg_sq });
        }
        if let Some(name) = sq.keys().next() {
            return Err(TrainError::Checkpoint(format!("`exp_avg.{name}` is missing")));
        }
        self.step = step;
        self.state = state;
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_`: the global L2 norm over all gradients (returned, before
/// clipping); when `max_norm > 0` every gradient is multiplied by
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_grad_norm(grads: &mut [NamedTensor], max_norm: f64) -> f64 {
    let per_tensor: Vec<f64> =
        grads.iter().map(|g| g.data.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()).collect();
    let total = per_tensor.iter().map(|n| n * n).sum::<f64>().sqrt();
    if max_norm > 0.0 {
        let coef = ((max_norm / (total + 1e-6)) as f32).min(1.0);
        for g in grads.iter_mut() {
            for x in &mut g.data {
                *x *= coef;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_excludes_biases_and_norms() {
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays("layers.0.q_proj.lora_a"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(!decays("blocks.1.attn_norm.weight"));
        assert!(decays("normalizer_proj.weight"));
    }

    #[test]
    fn state_round_trips() {
        let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        let mut p = vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![1.0, 2.0] }];
        let g = vec![NamedTensor { name: "w".into(), shape: vec![2], data: vec![0.5, -0.5] }];
        opt.update_host(&mut p, &g, 0.1).unwrap();
        let mut other = AdamW::new(opt.cfg);
        other.load_state(opt.step_count(), opt.state_tensors()).unwrap();
        assert_eq!(other.step_count(), 1);
        assert_eq!(other, opt);
    }
}
