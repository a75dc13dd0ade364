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

/// Hands the heap's free pages back to the kernel (glibc's `malloc_trim`; a no-op elsewhere).
///
/// Loading a model makes many short-lived small allocations (a GGUF file's parsed metadata, the
/// generated `tokenizer.json` and its parse) that sit between long-lived ones, so `free` keeps
/// their pages: tens of megabytes of resident memory nothing uses, which the loaders give back
/// with this once a model is built.
pub(crate) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free heap memory to the system; it takes the allocator's
    // own locks and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
