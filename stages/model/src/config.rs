//! Model configuration: the subset of a Hugging Face `config.json` that a Qwen2 / Llama decoder
//! needs, read leniently (unknown keys ignored, as transformers does), plus the built-in presets.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Which transformers architecture the weights follow. Both use the same block; Qwen2 has biases on
/// the q/k/v projections, Llama (by default) none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Qwen2,
    Llama,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
        }
    }
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// The dimensions of the built-in tiny preset ([`ModelConfig::tiny`]), one definition shared by
/// the runtime config and the compile-time [`crate::dims::TinyDims`].
pub mod tiny {
    pub const HIDDEN: usize = 64;
    pub const INTERMEDIATE: usize = 176;
    pub const LAYERS: usize = 2;
    pub const HEADS: usize = 4;
    pub const KV_HEADS: usize = 2;
    pub const HEAD_DIM: usize = 16;
    /// `HEADS * HEAD_DIM`, rows of `q_proj`.
    pub const Q_DIM: usize = HEADS * HEAD_DIM;
    /// `KV_HEADS * HEAD_DIM`, rows of `k_proj` / `v_proj`.
    pub const KV_DIM: usize = KV_HEADS * HEAD_DIM;
}

/// Validated decoder configuration (runtime dimensions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2: true; Llama: `attention_bias`, default false).
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
}

/// `config.json` as transformers writes it (lenient: unknown keys are ignored).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `{"rope_theta": .., "rope_type": "default"}` here.
    rope_parameters: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
}

fn ids(v: &Option<serde_json::Value>, field: &str) -> Result<Vec<u32>, ModelError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).ok_or_else(|| ModelError::config(field, "expected a token id"))
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| ModelError::config(field, "expected token ids")))
            .collect(),
        Some(_) => Err(ModelError::config(field, "expected a token id or a list of them")),
    }
}

impl ModelConfig {
    /// Parses and validates a transformers `config.json` text.
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::config("config.json", e.to_string()))?;
        Self::from_raw(raw)
    }

    /// Reads and validates `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ModelError> {
        let text = pipeline_cache::checked::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })?;
        Self::from_raw(raw)
    }

    /// Validates a parsed `config.json` value.
    pub fn from_hf_value(v: &serde_json::Value) -> Result<Self, ModelError> {
        let raw: HfConfig =
            serde_json::from_value(v.clone()).map_err(|e| ModelError::config("config.json", e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: HfConfig) -> Result<Self, ModelError> {
        let model_type = raw.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            "" => match raw.architectures.as_ref().and_then(|a| a.first()).map(String::as_str) {
                Some("Qwen2ForCausalLM") => Arch::Qwen2,
                Some("LlamaForCausalLM") => Arch::Llama,
                _ => return Err(ModelError::config("model_type", "missing (expected \"qwen2\" or \"llama\")")),
            },
            other => {
                return Err(ModelError::config(
                    "model_type",
                    format!("`{other}` is not supported (expected \"qwen2\" or \"llama\")"),
                ))
            }
        };
        fn req(v: Option<usize>, field: &str) -> Result<usize, ModelError> {
            match v {
                Some(0) => Err(ModelError::config(field, "must be positive")),
                Some(x) => Ok(x),
                None => Err(ModelError::config(field, "missing")),
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(ModelError::config("hidden_act", format!("`{act}` is not supported (only silu)")));
            }
        }
        if let Some(rs) = &raw.rope_scaling {
            if !rs.is_null() {
                return Err(ModelError::config("rope_scaling", "RoPE scaling is not supported"));
            }
        }
        let mut rope_theta = raw.rope_theta;
        if let Some(rp) = raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            match rp.get("rope_type").and_then(|t| t.as_str()) {
                None | Some("default") => {}
                Some(t) => {
                    return Err(ModelError::config(
                        "rope_parameters.rope_type",
                        format!("`{t}` is not supported (only default RoPE)"),
                    ))
                }
            }
            if let Some(t) = rp.get("rope_theta").and_then(|t| t.as_f64()) {
                rope_theta = Some(t);
            }
        }
        if raw.use_sliding_window == Some(true) {
            return Err(ModelError::config("use_sliding_window", "sliding-window attention is not supported"));
        }
        let hidden_size = req(raw.hidden_size, "hidden_size")?;
        let heads = req(raw.num_attention_heads, "num_attention_heads")?;
        let kv = req(raw.num_key_value_heads.or(Some(heads)), "num_key_value_heads")?;
        if heads % kv != 0 {
            return Err(ModelError::config(
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(h) => req(Some(h), "head_dim")?,
            None => {
                if hidden_size % heads != 0 {
                    return Err(ModelError::config(
                        "num_attention_heads",
                        format!("{heads} does not divide hidden_size = {hidden_size}"),
                    ));
                }
                hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config("head_dim", "must be even for rotary embeddings"));
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: req(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: req(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: req(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: match arch {
                Arch::Qwen2 => true,
                Arch::Llama => raw.attention_bias.unwrap_or(false),
            },
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32768),
            bos_token_id: ids(&raw.bos_token_id, "bos_token_id")?.first().copied(),
            eos_token_id: ids(&raw.eos_token_id, "eos_token_id")?,
        };
        Ok(cfg)
    }

    /// The `config.json` transformers reads back for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let m = v.as_object_mut().expect("object");
        if self.arch == Arch::Llama {
            m.insert("attention_bias".into(), self.attention_bias.into());
            m.insert("mlp_bias".into(), false.into());
        } else {
            m.insert("use_sliding_window".into(), false.into());
        }
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_id.as_slice() {
            [] => {}
            [e] => {
                m.insert("eos_token_id".into(), (*e).into());
            }
            es => {
                m.insert("eos_token_id".into(), es.to_vec().into());
            }
        }
        v
    }

    /// SmolLM2-135M-Instruct's architecture (Llama, from its GGUF metadata): for random-weight
    /// models of that shape in benchmarks and CPU-vs-CUDA checks.
    pub fn smollm2_135m_shape() -> Self {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 49_152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            tie_word_embeddings: true,
            attention_bias: false,
            max_position_embeddings: 8192,
            bos_token_id: None,
            eos_token_id: vec![],
        }
    }

    /// The built-in tiny Qwen2 used by the default recipe: 2 layers, hidden 64, 4 query heads /
    /// 2 KV heads of 16, SwiGLU 176, tied embeddings, θ = 1e6 (Qwen2.5's). `vocab_size` is the
    /// model's (possibly remapped) vocabulary; see the crate docs for why it should be small.
    ///
    /// Its dimensions are the [`tiny`] constants, which [`crate::dims::TinyDims`] also fixes at
    /// compile time.
    pub fn tiny(vocab_size: usize) -> Self {
        ModelConfig {
            arch: Arch::Qwen2,
            vocab_size,
            hidden_size: tiny::HIDDEN,
            intermediate_size: tiny::INTERMEDIATE,
            num_hidden_layers: tiny::LAYERS,
            num_attention_heads: tiny::HEADS,
            num_key_value_heads: tiny::KV_HEADS,
            head_dim: tiny::HEAD_DIM,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            tie_word_embeddings: true,
            attention_bias: true,
            max_position_embeddings: 2048,
            bos_token_id: None,
            eos_token_id: vec![],
        }
    }

    /// Rows of the query projection (`num_attention_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    /// Rows of the key/value projections (`num_key_value_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Errors when a tokenizer's ids would not fit the embedding.
    pub fn check_tokenizer_vocab(&self, tokenizer_vocab: usize) -> Result<(), ModelError> {
        if tokenizer_vocab > self.vocab_size {
            return Err(ModelError::VocabMismatch { tokenizer: tokenizer_vocab, embedding: self.vocab_size });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_hf_json() {
        let mut c = ModelConfig::tiny(300);
        c.eos_token_id = vec![2, 3];
        let back = ModelConfig::from_hf_value(&c.to_hf_json()).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut v = ModelConfig::tiny(300).to_hf_json();
        v["num_key_value_heads"] = 3.into();
        let e = ModelConfig::from_hf_value(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut v = ModelConfig::tiny(300).to_hf_json();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_hf_value(&v).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let mut v = ModelConfig::tiny(300).to_hf_json();
        v["model_type"] = "gpt2".into();
        let e = ModelConfig::from_hf_value(&v).unwrap_err().to_string();
        assert!(e.contains("model_type"), "{e}");
    }
}
