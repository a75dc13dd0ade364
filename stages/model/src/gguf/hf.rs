//! llama.cpp tensor names and metadata -> Hugging Face names, layouts and `config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::names::{hf_name, rope_heads, unpermute_rope, BLOCK};
use super::{GgufError, GgufFile};
use crate::host::{HostTensor, HostTensors};
use crate::tokenizer::Tokenizer;
use crate::QMatrix;

/// A GGUF model in Hugging Face terms.
#[derive(Debug)]
pub struct GgufModel {
    /// HF `config.json` keys: architectures, model_type, hidden_size, intermediate_size,
    /// num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
    /// rope_theta, vocab_size, tie_word_embeddings, max_position_embeddings, bos/eos_token_id.
    pub config_json: Value,
    /// HF tensor names and row-major layouts, f32.
    pub tensors: HostTensors,
    /// The matrices kept in their quantised blocks ([`load_gguf_quantized`]; empty from
    /// [`load_gguf`]), under HF names and layouts; a name is in `tensors` or here, never both.
    pub quantized: BTreeMap<String, QMatrix>,
    /// Rebuilt from `tokenizer.ggml.*` (None when the file has no `gpt2`-model vocabulary).
    pub tokenizer: Option<Tokenizer>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// Read a `llama` or `qwen2` GGUF file: config, all tensors dequantised to f32 under HF names
/// (Q/K rows un-permuted for llama), tokenizer and chat template from metadata.
pub fn load_gguf(path: impl AsRef<Path>) -> Result<GgufModel, GgufError> {
    load_gguf_with(path.as_ref(), false)
}

/// [`load_gguf`], keeping every matrix stored in a quantised block format (Q8_0, Q4_0, Q4_1,
/// Q5_0, Q5_1, Q4_K, Q6_K) as its blocks in [`GgufModel::quantized`], read from the file's map
/// (llama's Q/K rows are un-permuted into their own buffer); F32/F16/BF16 tensors and vectors
/// are dequantised into [`GgufModel::tensors`] as before.
pub fn load_gguf_quantized(path: impl AsRef<Path>) -> Result<GgufModel, GgufError> {
    load_gguf_with(path.as_ref(), true)
}

fn load_gguf_with(path: &Path, keep_quantized: bool) -> Result<GgufModel, GgufError> {
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
    let mut quantized = BTreeMap::new();
    for info in f.tensors() {
        let Some(hf_name) = hf_name(&info.name) else {
            if info.name == "rope_freqs.weight" {
                continue; // llama-3 rope scaling factors; recomputed from config, not a weight
            }
            return Err(f.tensor_err(&info.name, "no Hugging Face counterpart for this llama.cpp tensor name"));
        };
        let rope = rope_heads(&hf_name, n_heads as usize, n_kv as usize).filter(|_| permute_qk);
        if keep_quantized {
            if let Some(mut q) = f.quant_matrix(info)? {
                if let Some(h) = rope {
                    // the un-permutation of row indices is the order to copy the rows in
                    let idx = HostTensor::new(vec![q.rows()], (0..q.rows()).map(|r| r as f32).collect());
                    let src = unpermute_rope(&idx, h).map_err(|m| f.tensor_err(&info.name, m))?;
                    let src: Vec<usize> = src.data.iter().map(|&r| r as usize).collect();
                    q = q.reorder_rows(&src).map_err(|m| f.tensor_err(&info.name, m))?;
                }
                quantized.insert(hf_name, q);
                continue;
            }
        }
        let mut t = f.dequantize(&info.name)?;
        if let Some(h) = rope {
            t = unpermute_rope(&t, h).map_err(|m| f.tensor_err(&info.name, m))?;
        }
        tensors.insert(hf_name, t);
    }

    let embed_shape = match (tensors.get("model.embed_tokens.weight"), quantized.get("model.embed_tokens.weight")) {
        (Some(t), _) => t.shape.clone(),
        (None, Some(q)) => q.shape(),
        (None, None) => return Err(f.tensor_err("token_embd.weight", "missing (the token embedding)")),
    };
    if embed_shape.len() != 2 || embed_shape[1] as u64 != hidden {
        return Err(f.tensor_err("token_embd.weight", format!("shape {embed_shape:?}, expected [vocab, {hidden}]")));
    }
    let vocab_size = embed_shape[0];
    let has = |name: &str| tensors.contains_key(name) || quantized.contains_key(name);
    check_layers(&f, &has, n_layers)?;
    let tied = !has("lm_head.weight");

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
    Ok(GgufModel { config_json: config, tensors, quantized, tokenizer, chat_template })
}

/// Every block must have its norms and projections (biases optional).
fn check_layers(f: &GgufFile, has: &dyn Fn(&str) -> bool, n_layers: u64) -> Result<(), GgufError> {
    for i in 0..n_layers {
        for b in &BLOCK {
            if !has(&format!("model.layers.{i}.{}.weight", b.hf)) {
                return Err(f.tensor_err(&format!("blk.{i}.{}.weight", b.gguf), "missing"));
            }
        }
    }
    if !has("model.norm.weight") {
        return Err(f.tensor_err("output_norm.weight", "missing"));
    }
    Ok(())
}
