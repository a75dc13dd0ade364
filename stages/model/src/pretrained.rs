//! One entry point for "a model on disk": a Hugging Face folder (`config.json`, safetensors,
//! `tokenizer.json`, `tokenizer_config.json`) or a `.gguf` file, with its tokenizer and chat
//! template, checked for agreement (every tokenizer id must have an embedding row).

use std::path::{Path, PathBuf};

use dfdx::prelude::*;

use crate::chat::{ChatError, ChatTemplate};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::GgufError;
use crate::qwen2::Qwen2;
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("{path}: no tokenizer (expected tokenizer.json beside config.json, or a GGUF vocabulary)")]
    NoTokenizer { path: PathBuf },
}

/// A loaded model with what is needed to talk to it.
#[derive(Debug)]
pub struct Pretrained<D: Device<f32>> {
    pub model: Qwen2<D>,
    pub tokenizer: Tokenizer,
    /// The model's chat template, when it has one.
    pub chat: Option<ChatTemplate>,
}

impl<D: Device<f32>> Pretrained<D> {
    /// Token ids that end a reply: the config's eos ids, the tokenizer's eos and `<|im_end|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.model.cfg.eos_token_id.clone();
        ids.extend(self.tokenizer.eos_id());
        ids.extend(self.tokenizer.im_end_id());
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Loads a HF folder or a `.gguf` file onto `dev`.
pub fn load_pretrained<D: Device<f32>>(path: &Path, dev: &D) -> Result<Pretrained<D>, LoadError> {
    let is_gguf = path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let (model, tokenizer, chat) = if is_gguf {
        let g = crate::gguf::load_gguf(path)?;
        let cfg = ModelConfig::from_hf_value(&g.config_json)?;
        let model = Qwen2::from_host(&cfg, &g.tensors, dev)?;
        let tok = g.tokenizer.ok_or_else(|| LoadError::NoTokenizer { path: path.to_path_buf() })?;
        let chat = match &g.chat_template {
            Some(src) => Some(ChatTemplate::new(src, tok.special_tokens().clone())?),
            None => None,
        };
        (model, tok, chat)
    } else {
        let model = Qwen2::load_hf(path, dev)?;
        let tj = path.join("tokenizer.json");
        if !tj.is_file() {
            return Err(LoadError::NoTokenizer { path: path.to_path_buf() });
        }
        let tok = Tokenizer::from_file(&tj)?;
        let chat = if tok.chat_template().is_some() { Some(ChatTemplate::from_tokenizer(&tok)?) } else { None };
        (model, tok, chat)
    };
    tokenizer.check_embedding_rows(model.cfg.vocab_size, "model.embed_tokens.weight")?;
    Ok(Pretrained { model, tokenizer, chat })
}
