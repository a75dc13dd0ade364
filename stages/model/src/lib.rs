//! pipeline-model: the model core shared by the training, evaluation and export stages —
//! Qwen2 / Llama decoders on dfdx, Hugging Face checkpoint and GGUF loading, tokenizer and chat
//! template, LoRA, losses and generation.
//!
//! # Architecture ([`qwen2`])
//! One decoder for Qwen2 (q/k/v bias) and Llama (no bias), transformers semantics: RMSNorm, RoPE
//! (rotate-half, `rope_theta`), grouped-query attention, SwiGLU, optional tied embeddings.
//! One implementation, generic over its dimension types `S: `[`Dims`] ([`dims`]): the built-in
//! tiny preset is [`Qwen2`]`<D, `[`TinyDims`]`>` (hidden, SwiGLU, head and head-size dimensions are
//! dfdx `Const`s, so every matmul/reshape of the forward pass is shape-checked by the compiler),
//! checkpoints from disk are `Qwen2<D>` = `Qwen2<D, `[`RuntimeDims`]`>` (`usize`). Weights are
//! stored identically for both, so training, LoRA, generation and saving take any `S`, and
//! [`Qwen2::into_runtime`] is a free, lossless conversion. Generic over `D: Device<f32>` (CPU; CUDA with the `cuda` feature:
//! the parity tests run on the GPU with `PIPELINE_TEST_DEVICE=cuda`, and the GPU throughput bench
//! against transformers + peft is `scripts/gpu/run-on-device.sh`; see `scripts/gpu/README.md`).
//! Parity with transformers + peft (logits, padded batches, loss, LoRA gradients, greedy decoding)
//! is checked in `tests/model.rs` against `tests/fixtures/golden.json`
//! (`scripts/oracles/qwen2_parity.py`).
//!
//! # Loading and saving
//! - [`pretrained::load_pretrained`]`(path, &dev)` → [`pretrained::Pretrained`] `{ model, tokenizer, chat }`
//!   from a HF folder, a `.gguf` file, or a peft adapter folder merged into its base
//!   ([`pretrained::ModelSource`], [`pretrained::load_pretrained_with_base`]; tokenizer ids checked
//!   against the embedding rows).
//! - [`Qwen2::load_hf`], [`Qwen2::from_host`]`(&cfg, &HostTensors, &dev)`, [`Qwen2::random_host`].
//! - [`Qwen2::save_pretrained`] (`config.json` + `model.safetensors`, F32),
//!   [`Qwen2::save_adapter`] / [`Qwen2::load_peft_adapter`] (peft's `adapter_config.json` +
//!   `adapter_model.safetensors`), [`Qwen2::to_host`], [`Qwen2::lora_to_host`].
//! - Errors ([`ModelError`]) name the tensor or config field.
//!
//! # Layout
//! [`qwen2`] is the architecture (sub-layers in `qwen2/layers.rs`, weight binding, LoRA install
//! and saving in `qwen2/weights.rs`); every projection is one `linear::Linear` whose storage
//! (`params::Store`: trained view, frozen) is its backend; [`lora`] holds peft's LoRA config and
//! names; `kernels/` the products through frozen weights (no `dW`), the fused LM-head
//! cross-entropy and the CPU's batch-1 row dot products, each tested against a dfdx reference.
//!
//! # Training API
//! ```
//! use dfdx::optim::{Adam, AdamConfig};
//! use dfdx::prelude::*;
//! use pipeline_model::{Batch, LoraConfig, ModelConfig, Qwen2, Trainable};
//!
//! let dev = Cpu::default();
//! let cfg = ModelConfig::tiny(300);
//! let mut model = Qwen2::from_host(&cfg, &Qwen2::<Cpu>::random_host(&cfg, 0), &dev)?;
//! model.set_trainable(Trainable::Lora(LoraConfig::all_linear(8, 16.0)), 0)?; // or Trainable::Full
//! let mut opt = Adam::new(&model.params, AdamConfig { lr: 1e-4, ..Default::default() });
//! let batch = Batch::right_padded(&[vec![1, 2, 3, 4], vec![5, 6]], 0)?; // ids + padding mask
//! let targets = vec![2, 3, 4, 0, 6, 0, 0, 0];                           // next token per position
//! let needed = vec![true, true, true, false, true, false, false, false]; // which ones the loss uses
//! let (_, tape) = model.params.flat.trace(model.params.alloc_grads()).split_tape();
//! let logp = model.forward_logprobs(&batch, &targets, Some(&needed), tape, None)?; // [batch, seq]
//! let loss = logp.sum::<(), _>() * (-1.0 / 4.0);                      // mean NLL of 4 labels
//! let g = loss.backward();
//! opt.update(&mut model.params, &g).expect("update");
//! # Ok::<(), pipeline_model::ModelError>(())
//! ```
//! - `model.params` is a [`FlatParams`] — a dfdx `TensorCollection` holding exactly the trained
//!   weights (all LoRA A/B matrices, or every weight for `Trainable::Full`) in one flat vector;
//!   see [`params`] for why. Gradients reach only it (frozen weights get none, and their products
//!   do not even compute one).
//! - LoRA: `y = W x + b + (alpha/r)·B(A(dropout(x)))`, A ~ U(±1/√in) (peft's Kaiming-uniform),
//!   B = 0, `lora_dropout` on the branch's input in seeded training forwards only; targets
//!   [`Proj`] (`all-linear` = q,k,v,o,gate,up,down; [`LoraConfig::with_targets`]).
//!   [`Qwen2::set_adapters_enabled`]`(false)` gives the base model (DPO/KTO reference);
//!   [`Qwen2::merge_lora`] folds `W' = W + (alpha/r)·B·A`.
//! - [`Qwen2::forward_logprobs`]: `log p(target)` per position, what the training objectives use
//!   (fused LM head on the CPU when the head is frozen). Losses on full logits ([`loss`],
//!   transformers' shifted-label convention): [`loss::masked_cross_entropy`],
//!   [`loss::summed_cross_entropy`], [`loss::sequence_logprobs`].
//! - [`Qwen2::forward`] (no tape) and [`Qwen2::forward_with_tape`] for any tape.
//!
//! # Generation ([`generate()`])
//! KV-cached, batched (left-padded), greedy / temperature / top-k / top-p / repetition penalty,
//! stop ids and stop strings, `max_new_tokens`, per-row seeded sampling. [`Qwen2::forward_cached`]
//! with [`Qwen2::new_cache`] is the step function.
//!
//! # The tiny preset and its vocabulary
//! [`ModelConfig::tiny`]`(vocab)`: Qwen2, hidden 64, 2 layers, 4 heads / 2 KV heads (head_dim 16),
//! SwiGLU 176, tied embeddings, θ = 1e6. Its transformer blocks cost ~0.1 MFLOP per token, the LM
//! head `2·64·V`: with Qwen2.5's 151,936 rows the head is ~99% of the work (and the log-softmax
//! holds `tokens × 151,936` floats). Recommended: the real Qwen2.5 tokenizer with the embedding
//! restricted to the ids of the training corpus ([`vocab::VocabMap`], stored as
//! `vocab_map.json`), so `pipeline generate` still prints real text. Measured in
//! `benches/throughput.rs`; since the fused head ([`Qwen2::forward_logprobs`]) the LoRA step no
//! longer materialises `tokens × 151,936` logits (figures in `scripts/bench/README.md`).
//!
//! Decoding on the CPU (`benches/decode.rs`, tokens per CPU-second, 2 shared cores): a batch-1
//! KV-cached step with a weight of ≥ 131,072 elements (`x·Wᵀ`, one row, no tape) runs on a host
//! copy of the frozen weight (contiguous row dot products, AVX2 when present, large weights split
//! over the cores) instead of dfdx's gemm. SmolLM2-135M batch 1: release 8.6 → 8.5–10.1 (gemm is
//! already near this machine's memory bandwidth, ~5 GB/s for the 0.54 GB of f32 weights per
//! token); dev profile 3.5 → 6.9. The slow figure seen before (~1.2 tokens/s wall) came from the
//! dev profile, where dfdx's generic matmul is instantiated in this crate at opt-level 1
//! (`[profile.dev]`), and from wall time on a shared machine. The host copy is made on first use
//! and doubles the resident weights of a model used for CPU generation (SmolLM2: +0.54 GB);
//! training never makes it. Batch 8 stays on gemm (it is faster there: 38 tokens/CPU-s).
//! `PIPELINE_NO_HOST_MATMUL=1` turns the host path off (for comparisons).

pub mod batch;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod dims;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod host;
pub(crate) mod kernels;
pub(crate) mod linear;
pub mod lora;
pub mod loss;
pub mod params;
pub mod pretrained;
pub mod quant;
pub mod qwen2;
pub mod tokenizer;
pub mod vocab;

pub use batch::{Batch, KvCache};
pub use config::{Arch, ModelConfig};
pub use dims::{DimValues, Dims, RuntimeDims, TinyDims};
pub use error::ModelError;
pub use generate::{generate, generate_until, FinishReason, Generation, GenerationConfig};
pub use host::{HostTensor, HostTensors};
pub use kernels::profile;
pub use kernels::qblocks::{QFormat, QMatrix};
pub use lora::{LoraConfig, Proj};
pub use params::{FlatParams, FrozenDtype};

/// cuBLAS TF32 tensor-op math for the f32 products on `dev` (the `tf32 = true` training option;
/// off by default, as in PyTorch). Returns whether `dev` has it (a CUDA device); the CPU has no
/// TF32 and is left as it is.
pub fn set_tf32<D: dfdx::prelude::Device<f32>>(dev: &D, on: bool) -> bool {
    #[cfg(feature = "cuda")]
    if let Some(cuda) = (dev as &dyn std::any::Any).downcast_ref::<dfdx::tensor::Cuda>() {
        kernels::cuda::set_tf32(cuda, on);
        return true;
    }
    let _ = (dev, on);
    false
}
pub use qwen2::{Qwen2, Trainable, SEQ_CLS_HEAD};
