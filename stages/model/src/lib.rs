//! Model core shared by training, evaluation and export stages.

pub mod chat;
pub mod gguf;
pub mod host;
pub mod tokenizer;
