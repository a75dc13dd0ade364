//! Model core shared by training, evaluation and export stages.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod host;
pub mod loss;
pub mod params;
pub mod qwen2;

pub use config::{Arch, ModelConfig};
pub use error::ModelError;
pub use generate::{generate, FinishReason, Generation, GenerationConfig};
pub use host::{HostTensor, HostTensors};
pub use params::FlatParams;
pub use qwen2::{Batch, KvCache, LoraConfig, Proj, Qwen2, Trainable};
