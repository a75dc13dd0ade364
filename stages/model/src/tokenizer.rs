//! Tokenizer: Hugging Face `tokenizers` (pure-Rust build) on a `tokenizer.json`, plus the special
//! tokens and chat template of its `tokenizer_config.json`.
//!
//! API:
//! - [`Tokenizer::from_file`] — a `tokenizer.json`; a `tokenizer_config.json` beside it supplies
//!   the special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`) and `chat_template`.
//! - [`Tokenizer::qwen25`] — the Qwen2.5 tokenizer embedded in the binary
//!   (`assets/qwen2.5/`, prepared by `scripts/fetch_qwen25_tokenizer.sh`): 151,643 BPE tokens and
//!   22 added tokens (ids 151643..=151664), eos `<|im_end|>`, pad `<|endoftext|>`, no bos.
//! - [`Tokenizer::encode`] / [`Tokenizer::encode_with_offsets`] / [`Tokenizer::decode`];
//!   [`Tokenizer::eos_id`], [`Tokenizer::pad_id`], [`Tokenizer::bos_id`],
//!   [`Tokenizer::im_start_id`], [`Tokenizer::im_end_id`], [`Tokenizer::vocab_size`] (BPE vocabulary
//!   plus added tokens), [`Tokenizer::check_embedding_rows`].
//! - GGUF files: [`crate::gguf::tokenizer_from_gguf`] builds one from `tokenizer.ggml.*` metadata.
//!
//! Verified on llama.cpp's Qwen2 tokenizer test vectors (`tests/fixtures/tokenizer/`: 46 text/ids
//! pairs, i.e. 47 `__ggml_vocab_test__`-separated pieces with an empty last one).

use std::path::{Path, PathBuf};

use serde_json::Value;

static QWEN25_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/qwen2.5/tokenizer.json");
pub(crate) static QWEN25_TOKENIZER_CONFIG: &[u8] = include_bytes!("../assets/qwen2.5/tokenizer_config.json");

/// Tokenizer errors, naming the file or the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: invalid tokenizer: {msg}")]
    Load { what: String, msg: String },
    #[error("{what}: field `{field}`: {msg}")]
    Config { what: String, field: String, msg: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error(
        "tokenizer has {vocab} tokens but the embedding `{tensor}` has only {rows} rows (token ids would be out of range)"
    )]
    VocabLargerThanEmbedding { vocab: usize, rows: usize, tensor: String },
}

/// Byte range `[start, end)` of each token in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// Special tokens and template (from `tokenizer_config.json` or GGUF metadata), as token strings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    pub chat_template: Option<String>,
}

/// A loaded tokenizer with its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).field("special", &self.special).finish()
    }
}

impl Tokenizer {
    /// Load a `tokenizer.json`; reads `tokenizer_config.json` from the same directory if present.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let read = |p: &Path| {
            pipeline_cache::checked::read(p).map_err(|source| TokenizerError::Io { path: p.to_path_buf(), source })
        };
        let json = read(path)?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let cfg = if cfg_path.is_file() { Some(read(&cfg_path)?) } else { None };
        Self::from_bytes(&json, cfg.as_deref(), &path.display().to_string())
    }

    /// The Qwen2.5 tokenizer shipped in `assets/qwen2.5/` (parsed once per process, then cloned).
    pub fn qwen25() -> Result<Self, TokenizerError> {
        static CACHE: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        if let Some(t) = CACHE.get() {
            return Ok(t.clone());
        }
        let t = Self::from_bytes(QWEN25_TOKENIZER_JSON, Some(QWEN25_TOKENIZER_CONFIG), "embedded Qwen2.5 tokenizer")?;
        Ok(CACHE.get_or_init(|| t).clone())
    }

    /// Write the embedded Qwen2.5 `tokenizer.json` and `tokenizer_config.json` into `dir` (what a
    /// model folder of the tiny preset carries, so that [`crate::pretrained::load_pretrained`] and
    /// transformers read it).
    pub fn write_qwen25_files(dir: &Path) -> Result<(), crate::ModelError> {
        crate::checkpoint::write_atomic(&dir.join("tokenizer.json"), QWEN25_TOKENIZER_JSON)?;
        crate::checkpoint::write_atomic(&dir.join("tokenizer_config.json"), QWEN25_TOKENIZER_CONFIG)
    }

    /// Write this tokenizer as `tokenizer.json` and a `tokenizer_config.json` (special tokens, chat
    /// template, `model_max_length`) into `dir`: what a model folder needs when its tokenizer came
    /// from somewhere other than a folder (a `.gguf` file's metadata).
    pub fn write_hf_files(&self, dir: &Path, model_max_length: usize) -> Result<(), crate::ModelError> {
        let json = self
            .inner()
            .to_string(false)
            .map_err(|e| crate::ModelError::config("tokenizer", format!("cannot serialise tokenizer.json: {e}")))?;
        crate::checkpoint::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let s = self.special_tokens();
        let mut v = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
            "add_bos_token": false,
            "eos_token": s.eos,
            "bos_token": s.bos,
            "pad_token": s.pad.clone().or(s.eos.clone()),
        });
        if let Some(t) = self.chat_template() {
            v["chat_template"] = t.into();
        }
        crate::checkpoint::write_atomic(
            &dir.join("tokenizer_config.json"),
            &serde_json::to_vec_pretty(&v).expect("json of strings"),
        )
    }

    /// `tokenizer.json` bytes and optional `tokenizer_config.json` bytes; `what` names the source
    /// in errors.
    pub fn from_bytes(json: &[u8], config: Option<&[u8]>, what: &str) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| TokenizerError::Load { what: what.to_string(), msg: e.to_string() })?;
        let special = match config {
            None => SpecialTokens::default(),
            Some(bytes) => parse_tokenizer_config(bytes, &format!("{what} (tokenizer_config.json)"))?,
        };
        Self::new(inner, special, what)
    }

    /// A tokenizer from generated `tokenizer.json` bytes (used by the GGUF loader).
    pub fn from_json_bytes(json: &[u8], special: SpecialTokens) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| TokenizerError::Load { what: "generated tokenizer".into(), msg: e.to_string() })?;
        Self::new(inner, special, "generated tokenizer")
    }

    fn new(inner: tokenizers::Tokenizer, special: SpecialTokens, what: &str) -> Result<Self, TokenizerError> {
        for (field, tok) in [("bos_token", &special.bos), ("eos_token", &special.eos), ("pad_token", &special.pad)] {
            if let Some(t) = tok {
                if inner.token_to_id(t).is_none() {
                    return Err(TokenizerError::Config {
                        what: what.to_string(),
                        field: field.to_string(),
                        msg: format!("token {t:?} is not in the vocabulary"),
                    });
                }
            }
        }
        Ok(Tokenizer { inner, special })
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids and each token's byte range in `text` (no special tokens added).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets), TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// BPE vocabulary plus added tokens (Qwen2.5: 151,665; its models pad the embedding to 151,936).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Highest token id + 1 (what an embedding must cover).
    pub fn max_id_exclusive(&self) -> usize {
        self.inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1)
    }

    /// Error unless an embedding of `rows` rows covers every token id. Larger embeddings are
    /// fine (Qwen2.5 pads to 151,936 rows).
    pub fn check_embedding_rows(&self, rows: usize, tensor: &str) -> Result<(), TokenizerError> {
        let vocab = self.max_id_exclusive();
        if vocab > rows {
            return Err(TokenizerError::VocabLargerThanEmbedding { vocab, rows, tensor: tensor.to_string() });
        }
        Ok(())
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.special.eos.as_deref()
    }
    pub fn bos_token(&self) -> Option<&str> {
        self.special.bos.as_deref()
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos.as_deref().and_then(|t| self.token_to_id(t))
    }
    /// The pad token, or the eos token when none is declared.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad.as_deref().and_then(|t| self.token_to_id(t)).or_else(|| self.eos_id())
    }
    pub fn im_start_id(&self) -> Option<u32> {
        self.token_to_id("<|im_start|>")
    }
    pub fn im_end_id(&self) -> Option<u32> {
        self.token_to_id("<|im_end|>")
    }
    /// The `chat_template` from `tokenizer_config.json` or GGUF metadata.
    pub fn chat_template(&self) -> Option<&str> {
        self.special.chat_template.as_deref()
    }
    /// The underlying HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `tokenizer_config.json`: special tokens are strings or `{"content": ...}` objects (AddedToken).
pub(crate) fn parse_tokenizer_config(bytes: &[u8], what: &str) -> Result<SpecialTokens, TokenizerError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| TokenizerError::Load { what: what.to_string(), msg: e.to_string() })?;
    let field = |name: &str| -> Result<Option<String>, TokenizerError> {
        match v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Object(o)) => match o.get("content") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(TokenizerError::Config {
                    what: what.to_string(),
                    field: name.to_string(),
                    msg: "object without a string `content`".into(),
                }),
            },
            Some(_) => Err(TokenizerError::Config {
                what: what.to_string(),
                field: name.to_string(),
                msg: "expected a string, an object or null".into(),
            }),
        }
    };
    let chat_template = match v.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        // A list of named templates: take "default".
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        Some(_) => {
            return Err(TokenizerError::Config {
                what: what.to_string(),
                field: "chat_template".into(),
                msg: "expected a string or a list of {name, template}".into(),
            })
        }
    };
    Ok(SpecialTokens {
        bos: field("bos_token")?,
        eos: field("eos_token")?,
        pad: field("pad_token")?,
        unk: field("unk_token")?,
        chat_template,
    })
}
