//! One entry point for "a model on disk": a Hugging Face folder (`config.json`, safetensors,
//! `tokenizer.json`, `tokenizer_config.json`), a `.gguf` file, or a peft LoRA adapter folder
//! (`adapter_config.json` + `adapter_model.safetensors`, no full weights) on top of its base
//! model — with its tokenizer and chat template, checked for agreement (every tokenizer id must
//! have an embedding row).
//!
//! # Adapter folders
//! [`ModelSource::resolve`] decides what a path holds. For an adapter, the base model is the
//! explicit one when given (the `evaluate` stage's `base_model` param, `--base` on the command
//! line), else `base_model_name_or_path` of `adapter_config.json`: an absolute path, or a path
//! relative to the adapter folder (a model hub id cannot be fetched: give the base explicitly).
//! The base may itself be an adapter folder (a chain, at most [`MAX_ADAPTER_CHAIN`] deep). Loading
//! applies the adapter by merging it into the base weights, `W' = W + (alpha/r)·B·A` — exactly
//! what the training stages do when they write their merged `model` folder, so an adapter and the
//! merged folder written beside it give identical logits. The tokenizer, chat template,
//! `vocab_map.json` and other side files come from the base ([`ModelSource::find_file`] looks in
//! the adapter folder first).

use std::path::{Path, PathBuf};

use dfdx::prelude::*;

use crate::chat::{ChatError, ChatTemplate};
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::GgufError;
use crate::params::FrozenDtype;
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
    /// `base_model_name_or_path` of an adapter is absent, null, or names no local model.
    #[error("{config}: `base_model_name_or_path` {msg}; give the base model explicitly (the evaluate stage's `base_model` param, `--base` on the command line)")]
    AdapterBase { config: PathBuf, msg: String },
    #[error("base model `{path}` given for adapter {adapter} does not exist")]
    BaseMissing { path: PathBuf, adapter: PathBuf },
    #[error("{path}: a base model was given, but this is not a peft adapter folder (adapter_config.json without model.safetensors)")]
    NotAnAdapter { path: PathBuf },
    #[error("{path}: adapters stacked more than {MAX_ADAPTER_CHAIN} deep (does an adapter name itself as its base?)")]
    AdapterChain { path: PathBuf },
    #[error("adapter {dir}: {source}")]
    Adapter {
        dir: PathBuf,
        #[source]
        source: ModelError,
    },
}

/// How many adapters may be stacked (an adapter whose base is another adapter folder).
pub const MAX_ADAPTER_CHAIN: usize = 8;

/// What a model path holds, with an adapter's base resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face folder with full weights.
    Folder(PathBuf),
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A peft LoRA adapter folder and the model it applies to.
    Adapter { dir: PathBuf, base: Box<ModelSource> },
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A folder holding `adapter_config.json` and no full weights (`model.safetensors` or its index).
pub fn is_adapter_dir(path: &Path) -> bool {
    path.is_dir()
        && path.join("adapter_config.json").is_file()
        && !path.join("model.safetensors").exists()
        && !path.join("model.safetensors.index.json").exists()
}

/// The base model an adapter folder names: `base_model_name_or_path` of its
/// `adapter_config.json`, resolved against the folder when relative. Errors name the key, the
/// value and the path tried.
pub fn adapter_base(dir: &Path) -> Result<PathBuf, LoadError> {
    let config = dir.join("adapter_config.json");
    let text = pipeline_cache::checked::read_to_string(&config)
        .map_err(|e| ModelError::Io { path: config.clone(), source: e })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: config.clone(), source })?;
    let value = match v.get("base_model_name_or_path") {
        None => return Err(LoadError::AdapterBase { config, msg: "is missing".into() }),
        Some(serde_json::Value::Null) => return Err(LoadError::AdapterBase { config, msg: "is null".into() }),
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => return Err(LoadError::AdapterBase { config, msg: format!("is {other}, not a path") }),
    };
    let path = dir.join(&value);
    if !path.exists() {
        return Err(LoadError::AdapterBase {
            config,
            msg: format!(
                "= \"{value}\": no model folder or .gguf file at {} (a relative path is resolved against the adapter folder; a model hub id cannot be downloaded)",
                path.display()
            ),
        });
    }
    Ok(path)
}

impl ModelSource {
    /// What `path` holds. `base` overrides an adapter's `base_model_name_or_path` (an error when
    /// `path` is not an adapter folder).
    pub fn resolve(path: &Path, base: Option<&Path>) -> Result<Self, LoadError> {
        Self::resolve_at(path, base, 0)
    }

    fn resolve_at(path: &Path, base: Option<&Path>, depth: usize) -> Result<Self, LoadError> {
        if !is_adapter_dir(path) {
            if base.is_some() {
                return Err(LoadError::NotAnAdapter { path: path.to_path_buf() });
            }
            return Ok(if is_gguf(path) {
                ModelSource::Gguf(path.to_path_buf())
            } else {
                ModelSource::Folder(path.to_path_buf())
            });
        }
        if depth >= MAX_ADAPTER_CHAIN {
            return Err(LoadError::AdapterChain { path: path.to_path_buf() });
        }
        let base_path = match base {
            Some(b) if !b.exists() => {
                return Err(LoadError::BaseMissing { path: b.to_path_buf(), adapter: path.to_path_buf() })
            }
            Some(b) => b.to_path_buf(),
            None => adapter_base(path)?,
        };
        let base = Self::resolve_at(&base_path, None, depth + 1)?;
        Ok(ModelSource::Adapter { dir: path.to_path_buf(), base: Box::new(base) })
    }

    /// The path given: the folder, the `.gguf` file or the adapter folder.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Folder(p) | ModelSource::Gguf(p) => p,
            ModelSource::Adapter { dir, .. } => dir,
        }
    }

    /// The full model at the bottom of an adapter chain (the source itself otherwise).
    pub fn root(&self) -> &ModelSource {
        match self {
            ModelSource::Adapter { base, .. } => base.root(),
            other => other,
        }
    }

    /// A side file (`chat_defaults.json`, `tokenizer.json`, `vocab_map.json`, ...): in the model
    /// folder; for an adapter in the adapter folder first, then down its base chain; never for a
    /// `.gguf` file.
    pub fn find_file(&self, name: &str) -> Option<PathBuf> {
        match self {
            ModelSource::Folder(dir) => Some(dir.join(name)).filter(|p| p.is_file()),
            ModelSource::Gguf(_) => None,
            ModelSource::Adapter { dir, base } => {
                Some(dir.join(name)).filter(|p| p.is_file()).or_else(|| base.find_file(name))
            }
        }
    }

    /// Loads the model onto `dev` with every weight in f32 (a quantised `.gguf` is dequantised:
    /// what training and conversion need); an adapter is merged into its base.
    pub fn load<D: Device<f32>>(&self, dev: &D) -> Result<Pretrained<D>, LoadError> {
        self.load_with(dev, false, FrozenDtype::F32)
    }

    /// [`ModelSource::load`] for training with the frozen base in `dtype`: a HF folder's matrices
    /// go to a CUDA device as bf16 straight from the file ([`Qwen2::load_hf_with_dtype`]), so a
    /// 7B base never needs its 30 GB f32 copy on the card or the host; an adapter is merged into
    /// that base. Elsewhere (the CPU, a `.gguf`) as [`ModelSource::load`].
    pub fn load_for_training<D: Device<f32>>(&self, dev: &D, dtype: FrozenDtype) -> Result<Pretrained<D>, LoadError> {
        self.load_with(dev, false, dtype)
    }

    /// [`ModelSource::load`] for inference (generate, chat, eval, serve): on the CPU the matrices
    /// of a quantised `.gguf` stay in their blocks and run on the quantised kernels, so resident
    /// memory is about the file's size ([`crate::params::Store::Quant`]). F32/F16/BF16 tensors
    /// load as before. `PIPELINE_DEQUANTIZE_GGUF=1` dequantises as [`ModelSource::load`] does
    /// (for comparisons). On a CUDA device a HF folder whose `config.json` says `torch_dtype =
    /// "bfloat16"` keeps its matrices in bf16, as transformers' `torch_dtype="auto"` and vLLM load
    /// it (no 30 GB f32 copy of a 7B model). An adapter's merged projections take its base's
    /// precision (f32, or bf16 for such a base on CUDA).
    pub fn load_for_inference<D: Device<f32>>(&self, dev: &D) -> Result<Pretrained<D>, LoadError> {
        let keep = crate::kernels::is_cpu::<D>() && !dequantize_forced();
        let dtype =
            if crate::kernels::is_cuda::<D>() && self.stored_bf16() { FrozenDtype::Bf16 } else { FrozenDtype::F32 };
        self.load_with(dev, keep, dtype)
    }

    /// Whether the weights (an adapter's base's) are a HF folder stored in bf16.
    fn stored_bf16(&self) -> bool {
        match self {
            ModelSource::Folder(p) => std::fs::read(p.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["torch_dtype"] == "bfloat16" || v["dtype"] == "bfloat16"),
            ModelSource::Gguf(_) => false,
            ModelSource::Adapter { base, .. } => base.stored_bf16(),
        }
    }

    fn load_with<D: Device<f32>>(
        &self,
        dev: &D,
        keep_quantized: bool,
        dtype: FrozenDtype,
    ) -> Result<Pretrained<D>, LoadError> {
        match self {
            ModelSource::Folder(p) | ModelSource::Gguf(p) => load_checkpoint(p, dev, keep_quantized, dtype),
            ModelSource::Adapter { dir, base } => {
                let mut p = base.load_with(dev, keep_quantized, dtype)?;
                let err = |source| LoadError::Adapter { dir: dir.clone(), source };
                p.model.load_peft_adapter(dir).map_err(err)?;
                p.model.merge_lora().map_err(err)?;
                Ok(p)
            }
        }
    }
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
    /// Tokenizer ids -> model ids (identity without a vocabulary map; ids outside the map are
    /// re-encoded as byte-level base tokens, see [`VocabMap::encode`]).
    pub fn to_model_ids(&self, tokenizer_ids: &[u32]) -> Vec<u32> {
        self.to_model_ids_counted(tokenizer_ids).ids
    }

    /// [`Pretrained::to_model_ids`], counting the tokens outside the map (0 without one).
    pub fn to_model_ids_counted(&self, tokenizer_ids: &[u32]) -> crate::vocab::Encoded {
        match &self.vocab {
            Some(v) => v.encode(&self.tokenizer, tokenizer_ids, 0),
            None => crate::vocab::Encoded { ids: tokenizer_ids.to_vec(), outside: 0 },
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

/// Loads a HF folder, a `.gguf` file or a peft adapter folder (on the base its
/// `adapter_config.json` names) onto `dev`.
pub fn load_pretrained<D: Device<f32>>(path: &Path, dev: &D) -> Result<Pretrained<D>, LoadError> {
    ModelSource::resolve(path, None)?.load(dev)
}

/// [`load_pretrained`] for inference ([`ModelSource::load_for_inference`]: a quantised `.gguf`
/// stays quantised on the CPU).
pub fn load_for_inference<D: Device<f32>>(path: &Path, dev: &D) -> Result<Pretrained<D>, LoadError> {
    ModelSource::resolve(path, None)?.load_for_inference(dev)
}

/// [`load_pretrained`] with an explicit base model for an adapter folder (`None`: the one
/// `adapter_config.json` names).
pub fn load_pretrained_with_base<D: Device<f32>>(
    path: &Path,
    base: Option<&Path>,
    dev: &D,
) -> Result<Pretrained<D>, LoadError> {
    ModelSource::resolve(path, base)?.load(dev)
}

/// `PIPELINE_DEQUANTIZE_GGUF=1`: [`ModelSource::load_for_inference`] dequantises as training does.
fn dequantize_forced() -> bool {
    std::env::var("PIPELINE_DEQUANTIZE_GGUF").is_ok_and(|v| v == "1")
}

/// A HF folder (its matrices in `dtype`) or a `.gguf` file (its quantised matrices kept as blocks
/// with `keep_quantized`).
fn load_checkpoint<D: Device<f32>>(
    path: &Path,
    dev: &D,
    keep_quantized: bool,
    dtype: FrozenDtype,
) -> Result<Pretrained<D>, LoadError> {
    let is_gguf = is_gguf(path);
    let (model, tokenizer, chat) = if is_gguf {
        let g = if keep_quantized { crate::gguf::load_gguf_quantized(path)? } else { crate::gguf::load_gguf(path)? };
        let cfg = ModelConfig::from_hf_value(&g.config_json)?;
        let model = Qwen2::from_host_quantized(&cfg, &g.tensors, &g.quantized, dev)?;
        let tok = g.tokenizer.ok_or_else(|| LoadError::NoTokenizer { path: path.to_path_buf() })?;
        let chat = match &g.chat_template {
            Some(src) => Some(ChatTemplate::new(src, tok.special_tokens().clone())?),
            None => None,
        };
        (model, tok, chat)
    } else {
        let model = Qwen2::load_hf_with_dtype(path, dev, dtype)?;
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
    crate::host::release_free_heap();
    Ok(Pretrained { model, tokenizer, chat, vocab })
}
