//! LoRA (peft semantics): which projections carry adapters ([`Proj`]), their hyper-parameters
//! ([`LoraConfig`], read from and written to peft's `adapter_config.json`), peft's tensor names,
//! and `lora_dropout`'s seeded masks.
//!
//! A projection with adapters computes `y = W x + b + (alpha/r) · B(A(dropout(x)))` with
//! `A: [r, in]`, `B: [out, r]`; dropout (inverted, `torch.nn.Dropout`'s) acts on the LoRA branch's
//! input in training forwards only, with masks drawn from the step's seed so a resumed run draws
//! the same ones. The base weight `W` stays frozen: its products record no weight gradient
//! ([`crate::kernels::frozen`]).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ModelError;

/// A linear projection of the decoder that LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    /// The module name transformers / peft use (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
    /// The decoder sub-module holding it (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }
    pub fn from_hf_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_name() == s)
    }
}

/// LoRA hyper-parameters (peft's `LoraConfig` subset).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub targets: Vec<Proj>,
    /// peft's `lora_dropout`: during training (see [`Qwen2::forward_train`]) the LoRA branch sees
    /// `dropout(x)`, `y = W x + b + (alpha/r) · B(A(dropout(x)))`; inference is unaffected.
    pub dropout: f32,
}

impl LoraConfig {
    /// `target_modules = all-linear`: q, k, v, o, gate, up, down (not the LM head).
    pub fn all_linear(r: usize, alpha: f32) -> Self {
        LoraConfig { r, alpha, targets: Proj::ALL.to_vec(), dropout: 0.0 }
    }
    /// Parses a target list: `["all-linear"]` or module names (`q_proj`, `v_proj`, ...).
    pub fn with_targets(r: usize, alpha: f32, names: &[String]) -> Result<Self, ModelError> {
        if names.iter().any(|n| n == "all-linear") {
            return Ok(Self::all_linear(r, alpha));
        }
        let mut targets = Vec::new();
        for n in names {
            let p = Proj::from_hf_name(n).ok_or_else(|| {
                ModelError::Lora(format!(
                    "unknown target module `{n}` (expected all-linear or q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                ))
            })?;
            if !targets.contains(&p) {
                targets.push(p);
            }
        }
        targets.sort();
        Ok(LoraConfig { r, alpha, targets, dropout: 0.0 })
    }
    pub fn scale(&self) -> f32 {
        self.alpha / self.r as f32
    }
    /// The same adapters with `lora_dropout = p` (0 ≤ p < 1).
    pub fn with_dropout(mut self, p: f32) -> Result<Self, ModelError> {
        if !(0.0..1.0).contains(&p) {
            return Err(ModelError::config("lora_dropout", format!("{p} is not in [0, 1)")));
        }
        self.dropout = p;
        Ok(self)
    }
    /// peft's `adapter_config.json`.
    pub fn to_peft_json(&self, base_model: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets.iter().map(|p| p.hf_name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_rslora": false,
            "use_dora": false,
        })
    }
    /// Reads peft's `adapter_config.json` (only plain LoRA is accepted).
    pub fn from_peft_json(v: &serde_json::Value) -> Result<Self, ModelError> {
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(t) = field("peft_type").and_then(|x| x.as_str()) {
            if t != "LORA" {
                return Err(ModelError::config("peft_type", format!("`{t}` is not supported (LORA only)")));
            }
        }
        for (k, bad) in [("use_rslora", true), ("use_dora", true)] {
            if field(k).and_then(|x| x.as_bool()) == Some(bad) {
                return Err(ModelError::config(k, "is not supported"));
            }
        }
        let r = field("r")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| ModelError::config("r", "missing in adapter_config.json"))? as usize;
        let alpha = field("lora_alpha")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| ModelError::config("lora_alpha", "missing in adapter_config.json"))?
            as f32;
        let names: Vec<String> = match field("target_modules") {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
            _ => return Err(ModelError::config("target_modules", "missing in adapter_config.json")),
        };
        if r == 0 {
            return Err(ModelError::config("r", "must be positive"));
        }
        let dropout = field("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
        Self::with_targets(r, alpha, &names)?.with_dropout(dropout)
    }
}

/// splitmix64 of `seed ^ salt`: independent seeds for the dropout masks of one forward.
pub(crate) fn mix_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Inverted-dropout mask of `len` elements: 0 with probability `p`, else `1 / (1 - p)` (what
/// `torch.nn.Dropout` multiplies by in training), drawn from ChaCha8 seeded with `seed`.
pub(crate) fn dropout_mask(len: usize, p: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - p);
    (0..len).map(|_| if rng.gen::<f32>() < p { 0.0 } else { keep }).collect()
}

/// peft's tensor names for the adapters of one projection.
pub fn peft_names(layer: usize, p: Proj) -> (String, String) {
    let base = format!("base_model.model.model.layers.{layer}.{}.{}", p.parent(), p.hf_name());
    (format!("{base}.lora_A.weight"), format!("{base}.lora_B.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_mask_is_inverted_dropout() {
        let m = dropout_mask(200_000, 0.25, 3);
        let zeros = m.iter().filter(|&&x| x == 0.0).count() as f64 / m.len() as f64;
        assert!((zeros - 0.25).abs() < 0.005, "{zeros}");
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        let mean = m.iter().map(|&x| x as f64).sum::<f64>() / m.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert_eq!(m, dropout_mask(200_000, 0.25, 3));
        assert_ne!(m, dropout_mask(200_000, 0.25, 4));
    }

    #[test]
    fn peft_json_round_trips_and_rejects_what_it_cannot_run() {
        let lc = LoraConfig::all_linear(8, 32.0).with_dropout(0.05).unwrap();
        assert_eq!(LoraConfig::from_peft_json(&lc.to_peft_json("base")).unwrap(), lc);
        assert!(LoraConfig::all_linear(8, 32.0).with_dropout(1.0).unwrap_err().to_string().contains("lora_dropout"));
        let mut j = lc.to_peft_json("base");
        j["use_dora"] = serde_json::json!(true);
        assert!(LoraConfig::from_peft_json(&j).unwrap_err().to_string().contains("use_dora"));
        let e = LoraConfig::with_targets(8, 16.0, &["qproj".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown target module `qproj`"), "{e}");
    }
}
