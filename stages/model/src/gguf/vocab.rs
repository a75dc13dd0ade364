//! A HF `tokenizers` tokenizer rebuilt from GGUF `tokenizer.ggml.*` metadata (`gpt2` model:
//! byte-level BPE).
//!
//! `tokenizer.ggml.tokens` become the BPE vocabulary (ids = positions; UNUSED (5) padding entries
//! are left out, as in the HF tokenizer they were padded from), `tokenizer.ggml.merges`
//! ("a b") the merge ranks, tokens typed CONTROL (3) become special added tokens and USER_DEFINED
//! (4) non-special added tokens, as llama.cpp's converter derived them from HF's added tokens.
//! `tokenizer.ggml.pre` picks the pre-tokenizer of the HF tokenizer the file was converted from:
//!
//! | `pre` | HF pre-tokenizer |
//! |---|---|
//! | `qwen2` | NFC + Qwen2 split regex + ByteLevel |
//! | `llama-bpe` | Llama-3 split regex + ByteLevel |
//! | `smollm`, `starcoder`, `refact` | Digits(individual) + ByteLevel(GPT-2 regex) |
//! | `gpt-2` | ByteLevel(GPT-2 regex) |
//!
//! Checked against llama.cpp's tokenizer test vectors (`ggml-vocab-*.gguf.inp/.out`) and the
//! SmolLM2 GGUF (heavy tests).

use std::collections::HashSet;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Map, Value};

use super::{GgufError, GgufFile};
use crate::tokenizer::{SpecialTokens, Tokenizer};

pub(crate) const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub(crate) const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Build the tokenizer a GGUF file describes. `Ok(None)` when the file has no
/// `tokenizer.ggml.model`; an error naming the field when it is present but unusable.
pub fn tokenizer_from_gguf(f: &GgufFile) -> Result<Option<Tokenizer>, GgufError> {
    let Some(model) = f.get("tokenizer.ggml.model") else { return Ok(None) };
    let model = model.as_str().ok_or_else(|| f.meta_err("tokenizer.ggml.model", "expected a string"))?;
    if model != "gpt2" {
        return Err(
            f.meta_err("tokenizer.ggml.model", format!("{model:?} is not supported (only \"gpt2\" byte-level BPE)"))
        );
    }
    // borrowed from the metadata: a copy of ~100k strings is megabytes of heap for nothing
    let strings = |key: &str| -> Result<Vec<&str>, GgufError> {
        let arr = f
            .get(key)
            .ok_or_else(|| f.meta_err(key, "missing"))?
            .as_array()
            .ok_or_else(|| f.meta_err(key, "expected an array"))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| v.as_str().ok_or_else(|| f.meta_err(key, format!("item {i} is not a string"))))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match f.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let key = "tokenizer.ggml.token_type";
            let arr = v.as_array().ok_or_else(|| f.meta_err(key, "expected an array"))?;
            if arr.len() != tokens.len() {
                return Err(f.meta_err(key, format!("{} types for {} tokens", arr.len(), tokens.len())));
            }
            arr.iter()
                .map(|v| v.as_i64().ok_or_else(|| f.meta_err(key, "expected integers")))
                .collect::<Result<_, _>>()?
        }
    };
    for (i, m) in merges.iter().enumerate() {
        if m.split(' ').count() != 2 {
            return Err(
                f.meta_err("tokenizer.ggml.merges", format!("merge {i} {m:?} is not two tokens separated by a space"))
            );
        }
    }

    let pre_key = "tokenizer.ggml.pre";
    let pre = f.get(pre_key).and_then(|v| v.as_str()).unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    // Llama-3's tokenizer.json sets `ignore_merges` (a pre-token found whole in the vocabulary is
    // kept), and so does llama.cpp for this pre-tokenizer.
    let ignore_merges = matches!(pre, "llama-bpe" | "llama3");
    let (normalizer, pre_tokenizer) = match pre {
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
        ),
        "llama-bpe" | "llama3" => {
            (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}))
        }
        "smollm" | "starcoder" | "refact" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        "gpt-2" | "gpt2" => (Value::Null, byte_level(true)),
        other => {
            return Err(f.meta_err(
                pre_key,
                format!(
                    "pre-tokenizer {other:?} is not supported (qwen2, llama-bpe, smollm, starcoder, refact, gpt-2)"
                ),
            ))
        }
    };

    let mut vocab = Vec::with_capacity(tokens.len());
    let mut seen = HashSet::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == 5 {
            continue; // UNUSED: llama.cpp's `[PADi]` fillers up to the embedding size, not in HF's vocabulary
        }
        // Duplicates keep the first id, as HF's vocab.json would.
        if seen.insert(tok) {
            vocab.push((tok, id));
        }
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == 3,
            }));
        }
    }
    let id_key = |key: &str| f.get(key).and_then(|v| v.as_u64()).map(|i| i as usize);
    let tok_of = |key: &str| -> Result<Option<String>, GgufError> {
        match id_key(key) {
            None => Ok(None),
            Some(i) => tokens
                .get(i)
                .map(|t| Some(t.to_string()))
                .ok_or_else(|| f.meta_err(key, format!("id {i} is outside the {}-token vocabulary", tokens.len()))),
        }
    };
    let bos = tok_of("tokenizer.ggml.bos_token_id")?;
    let eos = tok_of("tokenizer.ggml.eos_token_id")?;
    let pad = tok_of("tokenizer.ggml.padding_token_id")?;
    let unk = tok_of("tokenizer.ggml.unknown_token_id")?;
    let add_bos = f.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
    let post_processor = match (&bos, add_bos) {
        (Some(b), true) => {
            let mut specials = Map::new();
            specials.insert(b.clone(), json!({"id": b, "ids": [id_key("tokenizer.ggml.bos_token_id")], "tokens": [b]}));
            json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": specials,
            })
        }
        _ => byte_level(false),
    };
    drop(seen);
    // Serialised straight from borrowed strings: a `serde_json::Value` of the vocabulary and
    // merges would be tens of megabytes of small allocations that stay in the heap afterwards.
    let json = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: added,
        normalizer,
        pre_tokenizer,
        post_processor,
        decoder: byte_level(false),
        model: BpeJson {
            ty: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: "",
            end_of_word_suffix: "",
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges,
            vocab: VocabJson(vocab),
            merges,
        },
    };
    let bytes = serde_json::to_vec(&json)
        .map_err(|e| GgufError::Tokenizer { path: f.path().to_path_buf(), msg: e.to_string() })?;
    drop(json);
    let chat_template = f.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
    let special = SpecialTokens { bos, eos, pad, unk, chat_template };
    Tokenizer::from_json_bytes(&bytes, special)
        .map(Some)
        .map_err(|e| GgufError::Tokenizer { path: f.path().to_path_buf(), msg: e.to_string() })
}

/// A `tokenizer.json` (the fields [`tokenizer_from_gguf`] sets), serialised from borrowed data.
#[derive(serde::Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeJson<'a>,
}

#[derive(serde::Serialize)]
struct BpeJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: &'static str,
    end_of_word_suffix: &'static str,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabJson<'a>,
    merges: Vec<&'a str>,
}

/// `{"token": id, ...}` from (token, id) pairs without duplicate tokens.
struct VocabJson<'a>(Vec<(&'a str, usize)>);

impl Serialize for VocabJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (tok, id) in &self.0 {
            m.serialize_entry(tok, id)?;
        }
        m.end()
    }
}
