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
use crate::vocab::VocabMap;

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
    /// A restricted vocabulary (`vocab_map.json` beside `config.json`): model id `i` is tokenizer
    /// id `vocab.ids[i]`. `None`: model ids are tokenizer ids.
    pub vocab: Option<VocabMap>,
}

impl<D: Device<f32>> Pretrained<D> {
    /// Token ids that end a reply: the config's eos ids, the tokenizer's eos and `<|im_end|>`.
    /// Model ids (see [`Pretrained::to_model_ids`]).
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.model.cfg.eos_token_id.clone();
        let tok: Vec<u32> = self.tokenizer.eos_id().into_iter().chain(self.tokenizer.im_end_id()).collect();
        match &self.vocab {
            Some(v) => ids.extend(tok.iter().filter_map(|&t| v.model_id(t))),
            None => ids.extend(tok),
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl<D: Device<f32>> Pretrained<D> {
    /// Tokenizer ids -> model ids (identity without a vocabulary map; ids outside the map become
    /// model id 0, the map's first required token).
    pub fn to_model_ids(&self, tokenizer_ids: &[u32]) -> Vec<u32> {
        match &self.vocab {
            Some(v) => v.to_model(tokenizer_ids, 0),
            None => tokenizer_ids.to_vec(),
        }
    }

    /// Model ids -> text through the tokenizer (special tokens skipped).
    pub fn decode_model_ids(&self, model_ids: &[u32]) -> Result<String, LoadError> {
        let ids = match &self.vocab {
            Some(v) => v.to_tokenizer(model_ids)?,
            None => model_ids.to_vec(),
        };
        Ok(self.tokenizer.decode(&ids, true)?)
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
    let map_path = if is_gguf { None } else { Some(path.join("vocab_map.json")) };
    let vocab = match map_path.filter(|p| p.is_file()) {
        Some(p) => {
            let v = VocabMap::load(&p)?;
            if v.len() != model.cfg.vocab_size {
                return Err(ModelError::config(
                    "vocab_size",
                    format!("{}: {} ids but the embedding has {} rows", p.display(), v.len(), model.cfg.vocab_size),
                )
                .into());
            }
            let max = tokenizer.max_id_exclusive() as u32;
            if let Some(bad) = v.to_tokenizer(&(0..v.len() as u32).collect::<Vec<_>>())?.into_iter().find(|&t| t >= max)
            {
                return Err(ModelError::config(
                    "tokenizer_ids",
                    format!("{}: id {bad} is not in the tokenizer", p.display()),
                )
                .into());
            }
            Some(v)
        }
        None => {
            tokenizer.check_embedding_rows(model.cfg.vocab_size, "model.embed_tokens.weight")?;
            None
        }
    };
    Ok(Pretrained { model, tokenizer, chat, vocab })
}
