//! The trainable parameters of a model as one dfdx [`TensorCollection`].
//!
//! dfdx 0.13's `TensorCollection::iter_tensors` is a static function: it must enumerate a fixed set
//! of tensor fields without seeing the value, which rules out a runtime number of layers (and the
//! crate only builds `TensorOptions` for compile-time shapes). So every trainable weight of a model
//! (the LoRA adapters, or all weights for full fine-tuning) lives in ONE flat f32 vector, and the
//! forward pass slices its views out of it (slice backward accumulates into the one gradient
//! buffer). Optimisers (`dfdx::optim::{Adam, Sgd, RMSprop}`), `ZeroGrads::alloc_grads`,
//! `NumParams` and gradient clipping then work on [`FlatParams`] unchanged.
//!
//! Each weight of a model is a [`Param`]: its name, shape and [`Store`] (frozen, or a view into
//! the flat vector).

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use dfdx::nn::tensor_collection::{ModuleVisitor, TensorCollection, TensorOptions};
use dfdx::prelude::*;

use crate::kernels::qblocks::QMatrix;

/// All trainable weights of a model, concatenated (see the module docs).
#[derive(Debug, Clone)]
pub struct FlatParams<E: Dtype, D: Storage<E>> {
    pub flat: Tensor<(usize,), E, D>,
}

/// `TensorOptions` for a runtime-shaped tensor. dfdx 0.13 marks the struct `#[non_exhaustive]`
/// and only offers constructors for compile-time shapes, but every field is public; the options
/// are only read by visitors (optimisers, gradient allocation), never used to build a tensor here.
fn runtime_options<E: Dtype, D: Device<E>>() -> TensorOptions<(usize,), E, D> {
    fn no_reset<E: Dtype, D: Device<E>>(_: &mut Tensor<(usize,), E, D>) -> Result<(), D::Err> {
        Ok(())
    }
    let mut o = MaybeUninit::<TensorOptions<(usize,), E, D>>::uninit();
    let p = o.as_mut_ptr();
    // SAFETY: dfdx 0.13.0's TensorOptions has exactly these three public fields (pinned version);
    // each is written once through a raw field pointer before `assume_init`.
    unsafe {
        std::ptr::addr_of_mut!((*p).do_gradient_update).write(true);
        std::ptr::addr_of_mut!((*p).reset).write(no_reset::<E, D>);
        std::ptr::addr_of_mut!((*p).shape).write((0,));
        o.assume_init()
    }
}

impl<E: Dtype, D: Device<E>> TensorCollection<E, D> for FlatParams<E, D> {
    type To<E2: Dtype, D2: Device<E2>> = FlatParams<E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(visitor: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(Self::tensor("flat", |s| &s.flat, |s| &mut s.flat, runtime_options()), |flat| FlatParams {
            flat,
        })
    }
}

/// A frozen weight held as bf16 on a CUDA device ([`crate::kernels::cuda::Bf16Weight`]).
#[cfg(feature = "cuda")]
pub(crate) use crate::kernels::cuda::Bf16Weight;

/// Without the `cuda` feature no weight is ever bf16: the type has no values, so the
/// [`Store::FrozenBf16`] arms compile everywhere and cannot run on the CPU.
#[cfg(not(feature = "cuda"))]
#[derive(Debug, Clone)]
pub(crate) enum Bf16Weight {}

/// The precision frozen base weights are held in on the device (training's `torch_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrozenDtype {
    /// f32 (the CPU always, and CUDA when asked for `float32`).
    F32,
    /// bf16 matrices (projections, embedding, LM head) on a CUDA device, products on tensor cores
    /// with f32 accumulation; norms, biases and LoRA adapters stay f32.
    Bf16,
}

impl<D: Device<f32>> Param<D> {
    /// The frozen values as an f32 device vector on `dev` (a bf16 or quantised weight is widened
    /// into a new buffer); `None` for a trained weight.
    pub fn frozen_f32(&self, dev: &D) -> Option<Tensor<(usize,), f32, D>> {
        match &self.store {
            Store::Frozen(t) => Some(t.clone()),
            Store::FrozenBf16(w) => Some(bf16_to_f32::<D>(w)),
            Store::Quant(q) => Some(dev.tensor_from_vec(q.dequantize(), (q.rows() * q.cols(),))),
            Store::Flat(_) => None,
        }
    }
}

/// `w` widened to f32 on its device, as a tensor of `D` (which is the CUDA device: only it holds
/// bf16 weights). Out of memory panics, as dfdx's own infallible ops do.
#[cfg(feature = "cuda")]
pub(crate) fn bf16_to_f32<D: Device<f32>>(w: &Bf16Weight) -> Tensor<(usize,), f32, D> {
    let t = w.to_f32().unwrap_or_else(|e| panic!("widening a bf16 weight: {e}"));
    crate::kernels::cast(t).expect("bf16 weights live on the CUDA device")
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn bf16_to_f32<D: Device<f32>>(w: &Bf16Weight) -> Tensor<(usize,), f32, D> {
    match *w {}
}

/// `w`'s values on the host as f32.
#[cfg(feature = "cuda")]
pub(crate) fn bf16_to_host(w: &Bf16Weight) -> Vec<f32> {
    w.to_host().unwrap_or_else(|e| panic!("reading a bf16 weight: {e}"))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn bf16_to_host(w: &Bf16Weight) -> Vec<f32> {
    match *w {}
}

/// Where one weight lives: frozen on the device, or a view into the model's [`FlatParams`].
#[derive(Debug, Clone)]
pub(crate) enum Store<D: Storage<f32>> {
    /// Not trained: products through it record no gradient for it ([`crate::kernels::frozen`]).
    Frozen(Tensor<(usize,), f32, D>),
    /// Not trained, held as bf16 on a CUDA device (`torch_dtype = "bfloat16"`); never built
    /// without the `cuda` feature (the payload type has no values there).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    FrozenBf16(Bf16Weight),
    /// Not trained, held as GGUF blocks on the host ([`QMatrix`]: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    /// Q4_K, Q6_K) for CPU inference: products run on the blocks
    /// ([`crate::kernels::quant`]), an embedding lookup dequantises the rows it reads, and a
    /// path that needs f32 values (a taped product, training, merging) dequantises a copy.
    Quant(Arc<QMatrix>),
    /// Trained: `numel` values at this offset of [`FlatParams::flat`].
    Flat(usize),
}

/// One named weight of a model (its Hugging Face or peft tensor name and shape) and its storage.
#[derive(Debug, Clone)]
pub(crate) struct Param<D: Storage<f32>> {
    pub name: String,
    pub shape: Vec<usize>,
    pub store: Store<D>,
    /// Host copy of a frozen weight for the CPU kernels (batch-1 decoding, the fused LM-head
    /// cross-entropy), made on first use and dropped whenever `store` changes ([`Param::set_store`]).
    host: HostCopy,
}

/// See [`Param::host`].
#[derive(Debug, Clone, Default)]
struct HostCopy(OnceLock<Arc<Vec<f32>>>);

impl<D: Storage<f32>> Param<D> {
    pub fn new(name: String, shape: Vec<usize>, store: Store<D>) -> Self {
        Param { name, shape, store, host: HostCopy::default() }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn set_store(&mut self, store: Store<D>) {
        self.store = store;
        self.host = HostCopy::default();
    }
    /// The frozen values on the host (copied once), or `None` for a trained weight.
    pub fn frozen_host(&self) -> Option<&Arc<Vec<f32>>>
    where
        D: Device<f32>,
    {
        match &self.store {
            Store::Frozen(t) => Some(self.host.0.get_or_init(|| Arc::new(t.as_vec()))),
            Store::FrozenBf16(w) => Some(self.host.0.get_or_init(|| Arc::new(bf16_to_host(w)))),
            Store::Quant(q) => Some(self.host.0.get_or_init(|| Arc::new(q.dequantize()))),
            Store::Flat(_) => None,
        }
    }
    /// Whether the host copy exists (tests check which path a product took).
    #[cfg(test)]
    pub fn has_host_copy(&self) -> bool {
        self.host.0.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfdx::optim::{Sgd, SgdConfig};

    #[test]
    fn adam_updates_the_flat_vector() {
        let dev = Cpu::default();
        let mut p = FlatParams { flat: dev.tensor_from_vec(vec![1.0f32, -2.0, 3.0], (3,)) };
        assert_eq!(p.num_trainable_params(), 3);
        let mut opt = Sgd::new(&p, SgdConfig { lr: 0.5, momentum: None, weight_decay: None });
        let grads = p.alloc_grads();
        let loss = p.flat.trace(grads).square().sum();
        let g = loss.backward();
        opt.update(&mut p, &g).unwrap();
        // d/dx x^2 = 2x; x - 0.5 * 2x = 0
        assert_eq!(p.flat.as_vec(), vec![0.0, 0.0, 0.0]);
    }
}
