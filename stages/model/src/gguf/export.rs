//! Hugging Face model -> GGUF (the inverse of [`super::load_gguf`]), for the export stage.
//!
//! Metadata as llama.cpp's `convert_hf_to_gguf.py` writes it for `llama` / `qwen2`
//! (`{arch}.block_count`, `.embedding_length`, ..., `tokenizer.ggml.*`), tensors under llama.cpp
//! names, llama Q/K rows permuted for interleaved RoPE, the vocabulary padded with UNUSED
//! `[PADi]` tokens to the embedding rows. 1-D tensors (norms, biases) stay F32; a matrix whose
//! row length is not a multiple of the chosen type's block falls back to F16, then F32.

use std::path::Path;

use serde_json::Value;

use super::names::{gguf_name, permute_rope, rope_heads};
use super::{GgmlType, GgufError, GgufValue, GgufWriter};
use crate::host::HostTensors;
use crate::tokenizer::Tokenizer;

const QWEN2_REGEX: &str = super::vocab::QWEN2_REGEX;
const LLAMA3_REGEX: &str = super::vocab::LLAMA3_REGEX;

fn err(key: &str, msg: impl Into<String>) -> GgufError {
    GgufError::Metadata { path: "<export>".into(), key: key.to_string(), msg: msg.into() }
}

fn cfg_u64(c: &Value, k: &str) -> Result<u64, GgufError> {
    c.get(k).and_then(Value::as_u64).ok_or_else(|| err(k, "config.json: missing or not an integer"))
}
fn cfg_f64(c: &Value, k: &str) -> Result<f64, GgufError> {
    c.get(k).and_then(Value::as_f64).ok_or_else(|| err(k, "config.json: missing or not a number"))
}

/// Build a GGUF file from an HF `config.json`, tensors and (optionally) tokenizer and chat template.
/// `ty` picks the type of each 2-D tensor by HF name.
pub fn export_gguf(
    config: &Value,
    tensors: &HostTensors,
    tokenizer: Option<&Tokenizer>,
    chat_template: Option<&str>,
    ty: impl Fn(&str) -> GgmlType,
) -> Result<GgufWriter, GgufError> {
    let arch = config.get("model_type").and_then(Value::as_str).unwrap_or_default();
    if arch != "llama" && arch != "qwen2" {
        return Err(err("model_type", format!("{arch:?} cannot be exported (llama, qwen2)")));
    }
    let heads = cfg_u64(config, "num_attention_heads")?;
    let kv = config.get("num_key_value_heads").and_then(Value::as_u64).unwrap_or(heads);
    let mut w = GgufWriter::new();
    let s = |v: &str| GgufValue::String(v.to_string());
    let k = |x: &str| format!("{arch}.{x}");
    w.add_metadata("general.architecture", s(arch));
    w.add_metadata(k("block_count"), GgufValue::U32(cfg_u64(config, "num_hidden_layers")? as u32));
    let ctx = config.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096);
    w.add_metadata(k("context_length"), GgufValue::U32(ctx as u32));
    w.add_metadata(k("embedding_length"), GgufValue::U32(cfg_u64(config, "hidden_size")? as u32));
    w.add_metadata(k("feed_forward_length"), GgufValue::U32(cfg_u64(config, "intermediate_size")? as u32));
    w.add_metadata(k("attention.head_count"), GgufValue::U32(heads as u32));
    w.add_metadata(k("attention.head_count_kv"), GgufValue::U32(kv as u32));
    w.add_metadata(
        k("rope.freq_base"),
        GgufValue::F32(config.get("rope_theta").and_then(Value::as_f64).unwrap_or(10000.0) as f32),
    );
    w.add_metadata(k("attention.layer_norm_rms_epsilon"), GgufValue::F32(cfg_f64(config, "rms_norm_eps")? as f32));

    let embed =
        tensors.get("model.embed_tokens.weight").ok_or_else(|| err("model.embed_tokens.weight", "missing tensor"))?;
    let rows = embed.shape[0];
    if let Some(tok) = tokenizer {
        add_tokenizer_metadata(&mut w, tok, rows)?;
    }
    if let Some(t) = chat_template.or(tokenizer.and_then(Tokenizer::chat_template)) {
        w.add_metadata("tokenizer.chat_template", s(t));
    }

    for (name, t) in tensors {
        let g = gguf_name(name).ok_or_else(|| GgufError::Tensor {
            path: "<export>".into(),
            tensor: name.clone(),
            msg: "no llama.cpp counterpart for this tensor".into(),
        })?;
        let terr = |msg: String| GgufError::Tensor { path: "<export>".into(), tensor: name.clone(), msg };
        let t = match rope_heads(name, heads as usize, kv as usize).filter(|_| arch == "llama") {
            Some(h) => permute_rope(t, h).map_err(terr)?,
            None => t.clone(),
        };
        let mut chosen = if t.shape.len() < 2 { GgmlType::F32 } else { ty(name) };
        let inner = *t.shape.last().unwrap_or(&0);
        for fallback in [GgmlType::F16, GgmlType::F32] {
            if inner % chosen.block().0 != 0 {
                chosen = fallback;
            }
        }
        w.add_tensor(&g, &t.shape, &t.data, chosen)?;
    }
    Ok(w)
}

/// `tokenizer.ggml.*` from a byte-level BPE `tokenizer.json`, the vocabulary padded to `rows`.
pub fn add_tokenizer_metadata(w: &mut GgufWriter, tok: &Tokenizer, rows: usize) -> Result<(), GgufError> {
    let key = "tokenizer.ggml.model";
    let json: Value = serde_json::from_str(&tok.inner().to_string(false).map_err(|e| err(key, e.to_string()))?)
        .map_err(|e| err(key, e.to_string()))?;
    if json["model"]["type"] != "BPE" {
        return Err(err(key, "only byte-level BPE tokenizers can be exported"));
    }
    let pre_json = json["pre_tokenizer"].to_string();
    let pre = if pre_json.contains(&serde_json::to_string(QWEN2_REGEX).unwrap_or_default()) {
        "qwen2"
    } else if pre_json.contains(&serde_json::to_string(LLAMA3_REGEX).unwrap_or_default()) {
        "llama-bpe"
    } else if pre_json.contains("\"Digits\"") && pre_json.contains("\"ByteLevel\"") {
        "smollm"
    } else if json["pre_tokenizer"]["type"] == "ByteLevel" {
        "gpt-2"
    } else {
        return Err(err("tokenizer.ggml.pre", "pre-tokenizer not recognised (qwen2, llama-bpe, smollm, gpt-2)"));
    };
    let max_id = tok.max_id_exclusive();
    if max_id > rows {
        return Err(err("tokenizer.ggml.tokens", format!("{max_id} tokens but only {rows} embedding rows")));
    }
    let mut tokens = Vec::with_capacity(rows);
    let mut types = Vec::with_capacity(rows);
    let added: std::collections::HashMap<u64, bool> = json["added_tokens"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| Some((t["id"].as_u64()?, t["special"].as_bool()?))).collect())
        .unwrap_or_default();
    for id in 0..rows {
        match tok.id_to_token(id as u32) {
            Some(t) => {
                tokens.push(GgufValue::String(t));
                types.push(GgufValue::I32(match added.get(&(id as u64)) {
                    Some(true) => 3,
                    Some(false) => 4,
                    None => 1,
                }));
            }
            None => {
                tokens.push(GgufValue::String(format!("[PAD{id}]")));
                types.push(GgufValue::I32(5));
            }
        }
    }
    let merges: Vec<GgufValue> = json["model"]["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                    _ => None,
                })
                .map(GgufValue::String)
                .collect()
        })
        .unwrap_or_default();
    w.add_metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    w.add_metadata("tokenizer.ggml.pre", GgufValue::String(pre.into()));
    w.add_metadata("tokenizer.ggml.tokens", GgufValue::Array(tokens));
    w.add_metadata("tokenizer.ggml.token_type", GgufValue::Array(types));
    w.add_metadata("tokenizer.ggml.merges", GgufValue::Array(merges));
    for (k, id) in [
        ("tokenizer.ggml.bos_token_id", tok.bos_id()),
        ("tokenizer.ggml.eos_token_id", tok.eos_id()),
        ("tokenizer.ggml.padding_token_id", tok.special_tokens().pad.as_deref().and_then(|p| tok.token_to_id(p))),
    ] {
        if let Some(id) = id {
            w.add_metadata(k, GgufValue::U32(id));
        }
    }
    w.add_metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
    Ok(())
}

/// [`export_gguf`] and write atomically to `path`.
pub fn write_gguf(
    path: impl AsRef<Path>,
    config: &Value,
    tensors: &HostTensors,
    tokenizer: Option<&Tokenizer>,
    chat_template: Option<&str>,
    ty: impl Fn(&str) -> GgmlType,
) -> Result<(), GgufError> {
    export_gguf(config, tensors, tokenizer, chat_template, ty)?.write(path)
}
