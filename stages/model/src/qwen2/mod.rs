//! Qwen2 / Llama decoder-only transformer on dfdx, generic over the device `D` and the dimension
//! types `S: Dims` (compile-time for the built-in preset, runtime for checkpoints; see [`crate::dims`]).
//!
//! Follows transformers' `modeling_qwen2.py` (Qwen2 technical report, arXiv:2407.10671) and
//! `modeling_llama.py`: token embedding → N × [`DecoderLayer`] (RMSNorm → grouped-query
//! self-attention with rotary position embeddings (rotate-half convention, θ = `rope_theta`), q/k/v
//! bias for Qwen2 → residual → RMSNorm → SwiGLU MLP (`down(silu(gate(x)) * up(x))`) → residual) →
//! RMSNorm → LM head (optionally tied to the embedding). The sub-layers live in [`layers`], bound
//! by their Hugging Face names; every projection is one [`crate::linear::Linear`] whose storage is
//! its backend (dense trained, frozen, LoRA on top), so this file never sees how a weight is stored.
//! LoRA (peft semantics, [`crate::lora`]): `y = W x + b + (alpha/r) · B(A(dropout(x)))`, dropout in
//! training forwards only.
//!
//! Positions are `cumsum(attention_mask) - 1` per row (what transformers' `generate` uses), so left
//! padding works for batched generation; for unpadded or right-padded rows this is `0..len`.
//!
//! # Dimensions
//! There is one implementation of the architecture: [`Qwen2<D, S>`]. Every activation of the
//! forward pass is typed with `S`'s dimension types (`[tokens, S::Hidden]`,
//! `[batch, S::KvHeads, len, S::HeadDim]`, ...); the batch, sequence and vocabulary axes are
//! `usize`. `Qwen2<D>` (= `Qwen2<D, RuntimeDims>`) is what checkpoints from disk load into;
//! `Qwen2<D, TinyDims>` is the built-in preset, checked at construction against the config.
//! Parameters are stored as flat `(usize,)` device vectors for every `S` (the trainable ones in one
//! [`FlatParams`], which dfdx's optimisers need to be a fixed tensor collection), and each weight is
//! viewed with its typed shape when used. So training, LoRA, generation, saving and loading work
//! unchanged for every `S`, and [`Qwen2::into_runtime`] / [`Qwen2::into_dims`] convert without
//! copying a weight; the logits (`[batch, seq, vocab]`, all `usize`) have the same type either way.
//!
//! # The LM head and the loss
//! [`Qwen2::forward_logprobs`] returns `log p(target)` per token. With a frozen head on the CPU
//! (LoRA, inference) it runs the fused, chunked head + log-softmax ([`crate::kernels::fused_ce`]):
//! the `[tokens × vocab]` logits never exist whole and no head gradient is computed; otherwise
//! (a trained head, other devices) it is the reference `log_softmax(h·Wᵀ)` + select. On CUDA the
//! fused head runs over an f32 or a bf16 head ([`Qwen2::set_frozen_dtype`]).

mod layers;
mod weights;

use std::path::Path;

use dfdx::prelude::*;

use crate::batch::{Batch, KvCache, Positions};
use crate::checkpoint;
use crate::config::ModelConfig;
use crate::dims::{DimValues, Dims, RuntimeDims};
use crate::error::ModelError;
use crate::host::HostTensors;
use crate::kernels;
use crate::linear::{Ctx, Rows};
use crate::lora::LoraConfig;
use crate::params::{FlatParams, Param, Store};
use layers::{AttnMask, DecoderLayer, HostStep, LayerCache, RmsNorm, Step};
pub use weights::{guess_arch, SEQ_CLS_HEAD};

type T2<D, T> = Tensor<(usize, usize), f32, D, T>;
type T3<D, T> = Tensor<(usize, usize, usize), f32, D, T>;

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// Nothing (inference).
    None,
    /// The LoRA adapters alone.
    Lora(LoraConfig),
    /// Every weight (full fine-tuning).
    Full,
}

/// The decoder (see the module docs): `Qwen2<D>` has runtime dimensions, `Qwen2<D, TinyDims>`
/// the built-in preset's at compile time.
#[derive(Debug, Clone)]
pub struct Qwen2<D: Device<f32>, S: Dims = RuntimeDims> {
    pub cfg: ModelConfig,
    /// `cfg`'s dimensions typed by `S` (checked against `cfg` at construction).
    dims: DimValues<S>,
    dev: D,
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    embed_tokens: Param<D>,
    /// `model.layers.{i}`.
    layers: Vec<DecoderLayer<D>>,
    /// `model.norm`.
    norm: RmsNorm<D>,
    /// `lm_head.weight`, `[vocab, hidden]` (`None`: tied to `embed_tokens`).
    lm_head: Option<Param<D>>,
    lora: Option<LoraConfig>,
    adapters_enabled: bool,
    trainable: Trainable,
    /// The trained weights (see [`FlatParams`]); hand this to a dfdx optimiser.
    pub params: FlatParams<f32, D>,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation matrix.
    rot: Tensor<(S::HeadDim, S::HeadDim), f32, D>,
    /// Recompute each decoder layer in the backward ([`Qwen2::set_gradient_checkpointing`]).
    checkpointing: bool,
    /// Run attention as the fused CUDA kernel where it applies ([`Qwen2::set_flash_attention`]).
    flash_attention: bool,
    /// Run each SwiGLU MLP as one fused bf16 op where it applies ([`Qwen2::set_fused_mlp`]).
    fused_mlp: bool,
}

/// `rotate_half` as a matrix: `x @ R` = `cat(-x[half..], x[..half])`.
fn rot_matrix<D: Device<f32>, H: Dim>(dev: &D, hd: H) -> Tensor<(H, H), f32, D> {
    let n = hd.size();
    let mut rot = vec![0f32; n * n];
    let half = n / 2;
    for j in 0..half {
        // out[j] = -x[j + half]; out[j + half] = x[j]; out = x @ R, R[row][col]
        rot[(j + half) * n + j] = -1.0;
        rot[j * n + j + half] = 1.0;
    }
    dev.tensor_from_vec(rot, (hd, hd))
}

/// Constructors of the runtime-dimension model (`Qwen2::from_host(..)` infers `S = RuntimeDims`;
/// Rust does not apply a default type parameter during inference, so the generic constructors
/// have their own names: [`Qwen2::from_host_with_dims`], [`Qwen2::load_hf_with_dims`]).
impl<D: Device<f32>> Qwen2<D> {
    /// Builds the model from HF-named host tensors, checking every name and shape against the
    /// config. Extra tensors are an error, except rotary `inv_freq` buffers and a tied `lm_head`.
    pub fn from_host(cfg: &ModelConfig, tensors: &HostTensors, dev: &D) -> Result<Self, ModelError> {
        Self::from_host_with_dims(cfg, tensors, dev)
    }

    /// [`Qwen2::from_host`] with some matrices kept in quantised GGUF blocks
    /// ([`Qwen2::from_host_quantized_with_dims`]).
    pub fn from_host_quantized(
        cfg: &ModelConfig,
        tensors: &HostTensors,
        quantized: &std::collections::BTreeMap<String, crate::QMatrix>,
        dev: &D,
    ) -> Result<Self, ModelError> {
        Self::from_host_quantized_with_dims(cfg, tensors, quantized, dev)
    }

    /// Reads a Hugging Face checkpoint folder (see [`checkpoint::load_hf_folder`]).
    pub fn load_hf(dir: &Path, dev: &D) -> Result<Self, ModelError> {
        Self::load_hf_with_dims(dir, dev)
    }
}

impl<D: Device<f32>, S: Dims> Qwen2<D, S> {
    /// [`Qwen2::load_hf`] with dimension types `S` (the config is checked against `S`).
    pub fn load_hf_with_dims(dir: &Path, dev: &D) -> Result<Self, ModelError> {
        let ck = checkpoint::load_hf_folder(dir)?;
        Self::from_host_with_dims(&ck.config, &ck.tensors, dev)
    }

    /// The same model with other dimension types, checked against the config (an error names the
    /// field). Lossless and cheap: weights, adapters, the trainable vector and the adapter switch
    /// move over as they are (no weight is copied), so `Qwen2<D, TinyDims>` → `Qwen2<D>` → back
    /// gives bit-identical outputs.
    pub fn into_dims<S2: Dims>(self) -> Result<Qwen2<D, S2>, ModelError> {
        let dims = DimValues::<S2>::from_config(&self.cfg)?;
        let rot = rot_matrix(&self.dev, dims.head_dim);
        Ok(Qwen2 {
            cfg: self.cfg,
            dims,
            dev: self.dev,
            embed_tokens: self.embed_tokens,
            layers: self.layers,
            norm: self.norm,
            lm_head: self.lm_head,
            lora: self.lora,
            adapters_enabled: self.adapters_enabled,
            trainable: self.trainable,
            params: self.params,
            rot,
            checkpointing: self.checkpointing,
            flash_attention: self.flash_attention,
            fused_mlp: self.fused_mlp,
        })
    }

    /// The runtime-dimension model ([`RuntimeDims`] accepts every config, so this cannot fail):
    /// the boundary to code that takes `Qwen2<D>` only.
    pub fn into_runtime(self) -> Qwen2<D> {
        self.into_dims::<RuntimeDims>().expect("RuntimeDims accepts every config")
    }

    /// The dimension values typed by `S`.
    pub fn dims(&self) -> &DimValues<S> {
        &self.dims
    }
    pub fn device(&self) -> &D {
        &self.dev
    }
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }
    pub fn trainable(&self) -> &Trainable {
        &self.trainable
    }

    /// Gradient checkpointing (`gradient_checkpointing = true`): taped forwards keep only each
    /// decoder layer's input and recompute the layer in the backward (one more forward per step,
    /// a layer's activations instead of every layer's). Gradients are unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }
    /// `attn_impl`: with `true` (the default) attention runs as the fused memory-efficient CUDA
    /// kernel ([`crate::kernels`]' `attention`) whenever it applies — a bf16 base on CUDA, head
    /// dimension 64 or 128, no KV cache; `false` keeps dfdx's f32 ops everywhere (`eager`).
    pub fn set_flash_attention(&mut self, on: bool) {
        self.flash_attention = on;
    }
    /// Whether the fused attention kernel runs in this model's forwards (see
    /// [`Self::set_flash_attention`]).
    pub fn flash_attention(&self) -> bool {
        self.flash_attention
            && cfg!(feature = "cuda")
            && self.frozen_dtype() == crate::params::FrozenDtype::Bf16
            && matches!(self.dims.head_dim.size(), 64 | 128)
    }
    /// With `true` (the default) each decoder layer's SwiGLU MLP over a bf16 base on CUDA runs as
    /// one fused op whose `[tokens, intermediate]` activations and their gradients are bf16, as
    /// under PyTorch's bf16 autocast (`crate::kernels`' `mlp`); `false` runs its three projections
    /// and the gate one by one with f32 activations (the reference the parity tests compare with).
    pub fn set_fused_mlp(&mut self, on: bool) {
        self.fused_mlp = on;
    }
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing
    }

    // ---------------------------------------------------------------- forward

    /// The key mask for the fused CUDA attention kernel, when this forward runs it: no KV cache,
    /// a CUDA device, a supported head dimension and [`Self::flash_attention`]. `None`: dfdx's
    /// attention with a dense `[batch, seq, past + seq]` mask.
    #[cfg(feature = "cuda")]
    fn fused_attention_mask(&self, batch: &Batch, past: usize, no_cache: bool) -> Option<AttnMask<D>> {
        let on = past == 0
            && no_cache
            && kernels::is_cuda::<D>()
            && !kernels::reference_only()
            && kernels::attention::supported(self.dims.head_dim.size())
            && self.flash_attention();
        on.then(|| AttnMask::Keys(std::sync::Arc::new(batch.mask.clone())))
    }
    #[cfg(not(feature = "cuda"))]
    fn fused_attention_mask(&self, _batch: &Batch, _past: usize, _no_cache: bool) -> Option<AttnMask<D>> {
        None
    }

    fn ctx(&self, dropout_seed: Option<u64>) -> Ctx<'_, D> {
        Ctx {
            dev: &self.dev,
            flat: &self.params.flat,
            lora: self.lora.as_ref().filter(|_| self.adapters_enabled),
            dropout_seed,
            fused_mlp: self.fused_mlp,
        }
    }

    /// The LM head's weight (`lm_head`, or the embedding when tied).
    fn head_weight(&self) -> &Param<D> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Core forward: the final hidden states `[tokens, hidden]` of every token.
    /// `dropout`: a training forward's seed for the LoRA dropout masks (`None`: no dropout).
    fn hidden<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        mut cache: Option<&mut KvCache<D, S>>,
        tape: T,
        dropout: Option<u64>,
    ) -> Result<Rows<S::Hidden, D, T>, ModelError> {
        let cfg = &self.cfg;
        let (b, s) = (batch.batch, batch.seq);
        let n = b * s;
        for (pos, &id) in batch.ids.iter().enumerate() {
            if id as usize >= cfg.vocab_size {
                return Err(ModelError::TokenOutOfRange { id, pos, vocab: cfg.vocab_size });
            }
        }
        let host_cache = cache.as_deref().is_some_and(|c| c.host.is_some());
        if host_cache && T::OWNS_TAPE {
            return Err(ModelError::Batch("a host KV cache serves forwards without gradients only".into()));
        }
        let pos = Positions::new(batch, cache.as_deref_mut(), cfg.num_hidden_layers)?;
        let hd = self.dims.head_dim;
        let hds = hd.size();
        let half = hds / 2;
        let mut cos = vec![0f32; n * hds];
        let mut sin = vec![0f32; n * hds];
        let inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hds as f64)).collect();
        for (k, &p) in pos.ids.iter().enumerate() {
            for (i, &inv) in inv_freq.iter().enumerate() {
                let (sn, cs) = (p as f64 * inv).sin_cos();
                cos[k * hds + i] = cs as f32;
                cos[k * hds + i + half] = cs as f32;
                sin[k * hds + i] = sn as f32;
                sin[k * hds + i + half] = sn as f32;
            }
        }
        let mask = match self.fused_attention_mask(batch, pos.past, cache.is_none()) {
            Some(keys) => keys,
            None if host_cache => AttnMask::Host(std::sync::Arc::new(HostStep {
                key_mask: pos.key_mask.clone(),
                cos: cos.clone(),
                sin: sin.clone(),
            })),
            None => AttnMask::Dense(self.dev.tensor_from_vec(pos.dense_mask(), (b, s, pos.past + s))),
        };
        let step = Step {
            dims: self.dims,
            cos: self.dev.tensor_from_vec(cos, (n, hd)),
            sin: self.dev.tensor_from_vec(sin, (n, hd)),
            rot: &self.rot,
            mask,
            batch: b,
            seq: s,
            past: pos.past,
        };
        kernels::profile::record(&self.dev, "rope tables, mask (host)");
        let ctx = self.ctx(dropout);
        let ids: Tensor<(usize,), usize, D> =
            self.dev.tensor_from_vec(batch.ids.iter().map(|&i| i as usize).collect(), (n,));
        let (v, h) = (cfg.vocab_size, self.dims.hidden);
        let mut x: Rows<S::Hidden, D, T> = match &self.embed_tokens.store {
            // a frozen table joins no tape: its gather records no [vocab, hidden] gradient
            Store::Frozen(_) => {
                ctx.fetch2::<usize, S::Hidden, NoneTape>(&self.embed_tokens, v, h).gather(ids).put_tape(tape)
            }
            #[cfg(feature = "cuda")]
            Store::FrozenBf16(w) => {
                let rows: Vec<usize> = batch.ids.iter().map(|&i| i as usize).collect();
                kernels::frozen::gather_bf16::<S::Hidden, D>(w, &rows, h)
                    .map_err(|e| ModelError::Kernel(e.to_string()))?
                    .put_tape(tape)
            }
            #[cfg(not(feature = "cuda"))]
            Store::FrozenBf16(w) => match *w {},
            // a quantised table stays quantised: only the rows looked up are dequantised
            Store::Quant(q) => {
                let mut rows = Vec::with_capacity(n * h.size());
                for &id in &batch.ids {
                    rows.extend(q.dequantize_row(id as usize));
                }
                self.dev.tensor_from_vec(rows, (n, h)).put_tape(tape)
            }
            Store::Flat(_) => {
                let (x, t0) = ctx.fetch2::<usize, S::Hidden, T>(&self.embed_tokens, v, h).gather(ids).split_tape();
                x.put_tape(t0.merge(tape))
            }
        };
        for (li, layer) in self.layers.iter().enumerate() {
            if self.checkpointing && T::OWNS_TAPE && cache.is_none() {
                x = layer.forward_checkpointed(&ctx, &step, x);
                continue;
            }
            let slot = cache.as_deref_mut().map(|c| match &mut c.host {
                Some(h) => LayerCache::Host(&mut h[li]),
                None => LayerCache::Dense(&mut c.layers[li]),
            });
            x = layer.forward(&ctx, &step, x, slot);
        }
        Ok(self.norm.forward(&ctx, x))
    }

    fn head<T: Tape<f32, D> + Merge<T>>(&self, hs: Rows<S::Hidden, D, T>) -> T2<D, T> {
        self.ctx(None).matmul_wt(hs, self.head_weight(), self.cfg.vocab_size)
    }

    /// Logits `[batch, seq, vocab]` with whatever tape `tape` is (`NoneTape` for inference).
    pub fn forward_with_tape<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        tape: T,
    ) -> Result<T3<D, T>, ModelError> {
        self.forward_train(batch, tape, None)
    }

    /// Logits of a training forward: with `dropout_seed`, the LoRA branches apply the adapters'
    /// `lora_dropout` with masks drawn from that seed (one per layer and projection), so a step
    /// replayed with the same seed (a resumed run) draws the same masks. `None`: no dropout.
    pub fn forward_train<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        tape: T,
        dropout_seed: Option<u64>,
    ) -> Result<T3<D, T>, ModelError> {
        let hs = self.hidden(batch, None, tape, dropout_seed)?;
        let logits = kernels::profile::mark(self.head(hs), "lm_head");
        Ok(logits.reshape_like(&(batch.batch, batch.seq, self.cfg.vocab_size)))
    }

    /// The final hidden states (after the last RMSNorm) of every position, `[batch * seq,
    /// hidden]` row-major, on tape `tape`: what a head on top of the decoder reads
    /// (transformers' `Qwen2Model` output; sequence classification and embeddings pool it).
    /// `dropout_seed` as in [`Self::forward_train`].
    pub fn forward_hidden<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        tape: T,
        dropout_seed: Option<u64>,
    ) -> Result<T2<D, T>, ModelError> {
        let hs = self.hidden(batch, None, tape, dropout_seed)?;
        Ok(hs.reshape_like(&(batch.batch * batch.seq, self.cfg.hidden_size)))
    }

    /// `log p(targets[t])` at every position `[batch, seq]`, what the training objectives consume
    /// (`targets` are next-token ids, one per input position). Positions whose `needed` flag is
    /// false (prompt or padding tokens a loss masks out) are 0 and get no gradient; `None`: all.
    /// With a frozen head on the CPU this is the fused, chunked head + log-softmax (module docs);
    /// the result equals the reference path within float rounding.
    pub fn forward_logprobs<T: Tape<f32, D> + Merge<T>>(
        &self,
        batch: &Batch,
        targets: &[usize],
        needed: Option<&[bool]>,
        tape: T,
        dropout_seed: Option<u64>,
    ) -> Result<T2<D, T>, ModelError> {
        let (b, s, v) = (batch.batch, batch.seq, self.cfg.vocab_size);
        if targets.len() != b * s || needed.is_some_and(|m| m.len() != b * s) {
            return Err(ModelError::Batch(format!(
                "{} targets and {} flags for [batch {b}, seq {s}]",
                targets.len(),
                needed.map_or(b * s, <[bool]>::len)
            )));
        }
        if let Some(pos) = targets.iter().position(|&t| t >= v) {
            return Err(ModelError::TokenOutOfRange { id: targets[pos] as u32, pos, vocab: v });
        }
        let all = vec![true; b * s];
        let needed = needed.unwrap_or(&all);
        let hs = self.hidden(batch, None, tape, dropout_seed)?;
        let head = self.head_weight();
        let lp = match &head.store {
            Store::Frozen(_) if kernels::is_cpu::<D>() && !kernels::reference_only() => {
                kernels::fused_ce::target_logprobs(hs, head.frozen_host().expect("frozen"), targets, needed)
            }
            #[cfg(feature = "cuda")]
            Store::Frozen(w) if kernels::is_cuda::<D>() && !kernels::reference_only() => {
                kernels::fused_ce::target_logprobs_cuda(hs, kernels::fused_ce::CudaHead::F32(w), targets, needed)
                    .map_err(|e| ModelError::Kernel(format!("fused LM head: {e}")))?
            }
            #[cfg(feature = "cuda")]
            Store::FrozenBf16(w) if !kernels::reference_only() => {
                kernels::fused_ce::target_logprobs_cuda(hs, kernels::fused_ce::CudaHead::Bf16(w), targets, needed)
                    .map_err(|e| ModelError::Kernel(format!("fused LM head (bf16): {e}")))?
            }
            _ => {
                let idx = self.dev.tensor_from_vec(targets.to_vec(), (b * s,));
                let keep = self.dev.tensor_from_vec(needed.iter().map(|&k| f32::from(u8::from(k))).collect(), (b * s,));
                self.head(hs).log_softmax::<Axis<1>>().select(idx) * keep
            }
        };
        Ok(kernels::profile::mark(lp, "lm_head + log-softmax").reshape_like(&(b, s)))
    }

    /// Inference logits `[batch, seq, vocab]`.
    pub fn forward(&self, batch: &Batch) -> Result<T3<D, NoneTape>, ModelError> {
        self.forward_with_tape(batch, NoneTape)
    }

    /// Training logits: gradients (from `self.params.alloc_grads()`) flow to [`Self::params`] only.
    pub fn forward_traced(
        &self,
        batch: &Batch,
        grads: Gradients<f32, D>,
    ) -> Result<T3<D, OwnedTape<f32, D>>, ModelError> {
        let (_, tape) = self.params.flat.trace(grads).split_tape();
        self.forward_with_tape(batch, tape)
    }

    /// A fresh, empty KV cache: on the CPU the host layout its attention reads in place
    /// ([`KvCache`]), unless `PIPELINE_REFERENCE_KERNELS=1` (dfdx's ops throughout).
    pub fn new_cache(&self) -> KvCache<D, S> {
        KvCache::empty(self.cfg.num_hidden_layers, kernels::is_cpu::<D>() && !kernels::reference_only())
    }

    /// A fresh cache in the tensor layout, whatever the device: decoding with it runs dfdx's
    /// attention ops (what the host attention is tested against).
    #[cfg(test)]
    pub(crate) fn new_dense_cache(&self) -> KvCache<D, S> {
        KvCache::empty(self.cfg.num_hidden_layers, false)
    }

    /// Incremental decoding step: appends `batch` to `cache` and returns the logits of each row's
    /// last position, `[batch][vocab]` on the host.
    ///
    /// On the CPU the step runs on a thread of rayon's pool (the caller waits): its many small
    /// parallel products then split from a pool thread, which costs a few atomics, instead of each
    /// being injected into the pool from outside and waited for on a condition variable, with the
    /// pool's idle workers spinning beside the caller's serial work between them.
    pub fn forward_cached(&self, batch: &Batch, cache: &mut KvCache<D, S>) -> Result<Vec<Vec<f32>>, ModelError> {
        if kernels::is_cpu::<D>() && rayon::current_thread_index().is_none() {
            let model: &dyn std::any::Any = self;
            let slot: &mut dyn std::any::Any = cache;
            if let (Some(m), Some(c)) = (model.downcast_ref::<Qwen2<Cpu, S>>(), slot.downcast_mut::<KvCache<Cpu, S>>())
            {
                return rayon::scope(|_| m.forward_cached_here(batch, c));
            }
        }
        self.forward_cached_here(batch, cache)
    }

    /// [`Self::forward_cached`] on the calling thread.
    fn forward_cached_here(&self, batch: &Batch, cache: &mut KvCache<D, S>) -> Result<Vec<Vec<f32>>, ModelError> {
        let hs = self.hidden(batch, Some(cache), NoneTape, None)?;
        let (b, s) = (batch.batch, batch.seq);
        let last: Tensor<(usize,), usize, D> = self.dev.tensor_from_vec((0..b).map(|r| r * s + s - 1).collect(), (b,));
        let logits = self.head(hs.gather(last));
        let v = self.cfg.vocab_size;
        let flat = logits.as_vec();
        Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests;
