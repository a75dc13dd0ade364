//! Framework-neutral weights on the host: what every loader (safetensors, GGUF) produces and every
//! model builder consumes. Names and layouts are Hugging Face transformers' (e.g.
//! `model.layers.0.self_attn.q_proj.weight`, row-major `[out, in]`).

use std::collections::BTreeMap;

/// One dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// HF tensor name -> tensor.
pub type HostTensors = BTreeMap<String, HostTensor>;
