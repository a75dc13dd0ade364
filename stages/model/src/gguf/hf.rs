//! llama.cpp tensor names and metadata -> Hugging Face names, layouts and `config.json`.

use std::path::Path;

use serde_json::{json, Value};

use super::{GgufError, GgufFile};
use crate::host::{HostTensor, HostTensors};
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
        if permute_qk {
            let heads = if hf_name.ends_with("q_proj.weight") || hf_name.ends_with("q_proj.bias") {
                Some(n_heads)
            } else if hf_name.ends_with("k_proj.weight") || hf_name.ends_with("k_proj.bias") {
                Some(n_kv)
            } else {
                None
            };
            if let Some(h) = heads {
                t = unpermute_rope(&t, h as usize).map_err(|m| f.tensor_err(&info.name, m))?;
            }
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
    const PARTS: [(&str, &str); 9] = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    for i in 0..n_layers {
        for (hf, gg) in PARTS {
            if !t.contains_key(&format!("model.layers.{i}.{hf}")) {
                return Err(f.tensor_err(&format!("blk.{i}.{gg}"), "missing"));
            }
        }
    }
    if !t.contains_key("model.norm.weight") {
        return Err(f.tensor_err("output_norm.weight", "missing"));
    }
    Ok(())
}

/// llama.cpp name -> HF name (None for names without a counterpart).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = part.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's `permute` of Q/K rows: `w.reshape(h, hd/2, 2, rest).swapaxes(1, 2)`.
/// Works on weights `[h*hd, d]` and biases `[h*hd]`.
pub fn unpermute_rope(t: &HostTensor, n_head: usize) -> Result<HostTensor, String> {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(format!("{rows} rows cannot be split into {n_head} heads of even size for RoPE un-permutation"));
    }
    let half = rows / n_head / 2;
    let mut out = vec![0f32; t.data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // source (h, i, j) in [h, half, 2] -> destination (h, j, i) in [h, 2, half]
                let src = (h * half + i) * 2 + j;
                let dst = (h * 2 + j) * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(HostTensor { shape: t.shape.clone(), data: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(hf_name("blk.12.attn_q.bias").as_deref(), Some("model.layers.12.self_attn.q_proj.bias"));
        assert_eq!(hf_name("blk.0.ffn_down.weight").as_deref(), Some("model.layers.0.mlp.down_proj.weight"));
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_qkv.weight"), None);
    }

    /// Permute as llama.cpp's converter does, then check we get the HF rows back.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (h, hd, d) = (3, 4, 2);
        let rows = h * hd;
        let hf: Vec<f32> = (0..rows * d).map(|x| x as f32).collect();
        // permute: reshape(h, 2, hd/2, d).swapaxes(1, 2): dst (h, i, j) <- src (h, j, i)
        let mut gg = vec![0f32; hf.len()];
        for hh in 0..h {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let dst = (hh * (hd / 2) + i) * 2 + j;
                    let src = (hh * 2 + j) * (hd / 2) + i;
                    gg[dst * d..dst * d + d].copy_from_slice(&hf[src * d..src * d + d]);
                }
            }
        }
        let back = unpermute_rope(&HostTensor::new(vec![rows, d], gg), h).unwrap();
        assert_eq!(back.data, hf);
        assert!(unpermute_rope(&HostTensor::new(vec![6, 1], vec![0.0; 6]), 2).is_err());
    }
}
