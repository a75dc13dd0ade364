//! llama.cpp tensor names and metadata -> Hugging Face names, layouts and `config.json`.

use std::path::Path;

use serde_json::{json, Value};

use super::names::{hf_name, rope_heads, unpermute_rope, BLOCK};
use super::{GgufError, GgufFile};
use crate::host::HostTensors;
use crate::tokenizer::Tokenizer;

/// A GGUF model in Hugging Face terms.
#[derive(Debug)]
pub struct GgufModel {
    /// HF `config.json` keys: architectures, model_type, hidden_size, intermediate_size,
    /// num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
    /// rope_theta, vocab_size, tie_word_embeddings, max_position_embeddings, bos/eos_token_id.
    pub config_json: Value,
    /// HF tensor names and row-major layouts, f32.
    pub tensors: HostTensors,
    /// Rebuilt from `tokenizer.ggml.*` (None when the file has no `gpt2`-model vocabulary).
    pub tokenizer: Option<Tokenizer>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// Read a `llama` or `qwen2` GGUF file: config, all tensors dequantised to f32 under HF names
/// (Q/K rows un-permuted for llama), tokenizer and chat template from metadata.
pub fn load_gguf(path: impl AsRef<Path>) -> Result<GgufModel, GgufError> {
    let f = GgufFile::open(path)?;
    let arch = f.get_str("general.architecture")?.to_string();
    let (hf_arch, model_type, permute_qk) = match arch.as_str() {
        "llama" => ("LlamaForCausalLM", "llama", true),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2", false),
        other => {
            return Err(f.meta_err("general.architecture", format!("unsupported architecture {other:?} (llama, qwen2)")))
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = f.get_u64(&k("embedding_length"))?;
    let n_layers = f.get_u64(&k("block_count"))?;
    let n_heads = f.get_u64(&k("attention.head_count"))?;
    let n_kv = match f.get(&k("attention.head_count_kv")) {
        None => n_heads,
        Some(_) => f.get_u64(&k("attention.head_count_kv"))?,
    };
    if n_heads == 0 || n_kv == 0 || hidden % n_heads != 0 || n_heads % n_kv != 0 {
        return Err(f.meta_err(
            &k("attention.head_count"),
            format!("{n_heads} heads / {n_kv} KV heads do not divide hidden size {hidden}"),
        ));
    }
    let head_dim = match f.get(&k("attention.key_length")) {
        None => hidden / n_heads,
        Some(_) => f.get_u64(&k("attention.key_length"))?,
    };
    let ffn = f.get_u64(&k("feed_forward_length"))?;
    let eps = f.get_f64(&k("attention.layer_norm_rms_epsilon"))?;
    let rope_theta = match f.get(&k("rope.freq_base")) {
        None => 10000.0,
        Some(_) => f.get_f64(&k("rope.freq_base"))?,
    };
    let ctx = f.get_u64(&k("context_length"))?;

    let mut tensors = HostTensors::new();
    for info in f.tensors() {
        let Some(hf_name) = hf_name(&info.name) else {
            if info.name == "rope_freqs.weight" {
                continue; // llama-3 rope scaling factors; recomputed from config, not a weight
            }
            return Err(f.tensor_err(&info.name, "no Hugging Face counterpart for this llama.cpp tensor name"));
        };
        let mut t = f.dequantize(&info.name)?;
        if let Some(h) = rope_heads(&hf_name, n_heads as usize, n_kv as usize).filter(|_| permute_qk) {
            t = unpermute_rope(&t, h).map_err(|m| f.tensor_err(&info.name, m))?;
        }
        tensors.insert(hf_name, t);
    }

    let embed = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| f.tensor_err("token_embd.weight", "missing (the token embedding)"))?;
    if embed.shape.len() != 2 || embed.shape[1] as u64 != hidden {
        return Err(f.tensor_err("token_embd.weight", format!("shape {:?}, expected [vocab, {hidden}]", embed.shape)));
    }
    let vocab_size = embed.shape[0];
    check_layers(&f, &tensors, n_layers)?;
    let tied = !tensors.contains_key("lm_head.weight");

    let tokenizer = super::vocab::tokenizer_from_gguf(&f)?;
    if tokenizer.is_some() {
        // llama.cpp requires one embedding row per vocabulary entry (its converter pads the
        // vocabulary with `[PADi]` tokens to the embedding size).
        let n_tokens = f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map_or(0, |a| a.len());
        if n_tokens != vocab_size {
            let rel = if n_tokens < vocab_size { "smaller" } else { "larger" };
            return Err(f.tensor_err(
                "token_embd.weight",
                format!(
                    "{vocab_size} embedding rows but `tokenizer.ggml.tokens` has {n_tokens} tokens: the vocabulary is {rel} than the embedding"
                ),
            ));
        }
    }
    let id = |key: &str| f.get(key).and_then(|v| v.as_u64());
    let mut config = json!({
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "max_position_embeddings": ctx,
        "attention_bias": tensors.contains_key("model.layers.0.self_attn.q_proj.bias"),
        "torch_dtype": "float32",
    });
    if let Some(b) = id("tokenizer.ggml.bos_token_id") {
        config["bos_token_id"] = b.into();
    }
    if let Some(e) = id("tokenizer.ggml.eos_token_id") {
        config["eos_token_id"] = e.into();
    }
    let chat_template = match f.get("tokenizer.chat_template") {
        None => None,
        Some(_) => Some(f.get_str("tokenizer.chat_template")?.to_string()),
    };
    Ok(GgufModel { config_json: config, tensors, tokenizer, chat_template })
}

/// Every block must have its norms and projections (biases optional).
fn check_layers(f: &GgufFile, t: &HostTensors, n_layers: u64) -> Result<(), GgufError> {
    for i in 0..n_layers {
        for b in &BLOCK {
            if !t.contains_key(&format!("model.layers.{i}.{}.weight", b.hf)) {
                return Err(f.tensor_err(&format!("blk.{i}.{}.weight", b.gguf), "missing"));
            }
        }
    }
    if !t.contains_key("model.norm.weight") {
        return Err(f.tensor_err("output_norm.weight", "missing"));
    }
    Ok(())
}
