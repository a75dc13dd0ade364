//! Errors of the model crate. Every message names the file, tensor or config field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A CUDA kernel of this crate failed (NVRTC compile error, out of device memory, driver error).
    #[error("CUDA kernels: {0}")]
    Kernel(String),
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?} (from config field `{field}`)")]
    ShapeMismatch { name: String, got: Vec<usize>, expected: Vec<usize>, field: String },
    #[error("tensor `{name}` has dtype {dtype}, only F32, F16 and BF16 are supported")]
    Dtype { name: String, dtype: String },
    #[error("tensor `{name}` is not used by a {arch} model (check the config's `model_type` / `attention_bias`)")]
    UnexpectedTensor { name: String, arch: String },
    #[error(
        "the tokenizer has {tokenizer} tokens but `vocab_size` (rows of `model.embed_tokens.weight`) is {embedding}: token ids would fall outside the embedding"
    )]
    VocabMismatch { tokenizer: usize, embedding: usize },
    #[error("token id {id} at position {pos} is outside the vocabulary of {vocab} (config field `vocab_size`)")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },
    #[error("batch: {0}")]
    Batch(String),
    #[error("LoRA: {0}")]
    Lora(String),
    /// The logits are NaN or infinite: the weights hold such values.
    #[error("the model's logits are {0} (its weights hold NaN or infinite values); nothing can be generated")]
    NonFinite(&'static str),
    /// Generation stopped on Ctrl-C / SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
    pub(crate) fn config(field: &str, msg: impl Into<String>) -> Self {
        ModelError::Config { field: field.to_string(), msg: msg.into() }
    }
}
