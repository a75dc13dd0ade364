//! One linear layer, `y = x Wᵀ + b (+ (alpha/r)·B(A(dropout(x))))`, whose weight storage is its
//! backend, so the architecture ([`crate::qwen2`]) never sees how a weight is stored:
//!
//! | [`Store`] of `W` | product | gradient |
//! |---|---|---|
//! | `Flat` (trained: full fine-tuning) | dfdx's matmul on a view of the trained vector | `dW` and `dx` |
//! | `Frozen` (inference, LoRA's base) | [`kernels::frozen::matmul_wt`]; CPU batch-1 without a tape: [`kernels::host_matmul`] | `dx` only, never `dW` |
//! | `FrozenBf16` (CUDA, `torch_dtype = "bfloat16"`) | [`kernels::frozen::matmul_wt_bf16`]: bf16 tensor-core GEMM, f32 accumulate | `dx` only (f32) |
//! | `Quant` (a quantised `.gguf` on the CPU: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K blocks, [`kernels::qblocks`]) | without a tape: [`kernels::quant`], activations quantised to int8 blocks, block-wise int8 dot products (AVX2 at run time, portable fallback); taped: a dequantised copy through `frozen::matmul_wt` | `dx` only |
//!
//! LoRA adapters ([`Adapter`]) sit on top of any of them, in f32 (peft's mixed precision).

use dfdx::prelude::*;

use crate::kernels::{self, host_matmul, quant};
use crate::lora::{dropout_mask, mix_seed, LoraConfig};
use crate::params::{Param, Store};

pub(crate) type T1<D, T> = Tensor<(usize,), f32, D, T>;
/// `[tokens, X]` activations.
pub(crate) type Rows<X, D, T> = Tensor<(usize, X), f32, D, T>;

/// What a forward needs besides the layer itself: the device, the trained vector that `Flat`
/// weights view, and the LoRA settings (`None` when adapters are absent or switched off).
pub(crate) struct Ctx<'a, D: Device<f32>> {
    pub dev: &'a D,
    pub flat: &'a T1<D, NoneTape>,
    pub lora: Option<&'a LoraConfig>,
    /// A training forward's seed for the LoRA dropout masks (`None`: no dropout).
    pub dropout_seed: Option<u64>,
    /// Run a SwiGLU MLP over a bf16 base as one fused op where it applies
    /// ([`crate::Qwen2::set_fused_mlp`]).
    pub fused_mlp: bool,
}

impl<D: Device<f32>> Ctx<'_, D> {
    /// A weight's values as a flat tensor on tape `T` (frozen weights join the tape only as
    /// constants: no op gives them a gradient unless the caller multiplies through them).
    pub fn fetch<T: Tape<f32, D>>(&self, p: &Param<D>) -> T1<D, T> {
        match &p.store {
            Store::Frozen(t) => t.retaped::<T>(),
            Store::FrozenBf16(w) => crate::params::bf16_to_f32::<D>(w).retaped::<T>(),
            Store::Quant(q) => self.dev.tensor_from_vec(q.dequantize(), (p.numel(),)).retaped::<T>(),
            Store::Flat(off) => self.flat.retaped::<T>().slice((*off..*off + p.numel(),)),
        }
    }

    /// A matrix `[o, i]` with typed dimensions (its shape was checked against the config, and the
    /// config against the dimension types, when the model was built).
    pub fn fetch2<O: Dim, I: Dim, T: Tape<f32, D>>(&self, p: &Param<D>, o: O, i: I) -> Tensor<(O, I), f32, D, T> {
        debug_assert_eq!(p.shape, [o.size(), i.size()], "{}", p.name);
        self.fetch::<T>(p).reshape_like(&(o, i))
    }

    /// `x Wᵀ` for a weight `W: [out, in]` on the backend its [`Store`] selects (module docs).
    pub fn matmul_wt<I: Dim, O: Dim, T: Tape<f32, D> + Merge<T>>(
        &self,
        x: Rows<I, D, T>,
        p: &Param<D>,
        out: O,
    ) -> Rows<O, D, T> {
        let (n, inp) = *x.shape();
        match &p.store {
            Store::Frozen(t) => {
                if !T::OWNS_TAPE
                    && n <= host_matmul::HOST_MATMUL_MAX_ROWS
                    && p.numel() >= host_matmul::HOST_MATMUL_MIN_WEIGHT
                    && kernels::is_cpu::<D>()
                    && host_matmul::host_matmul_on()
                {
                    let w = p.frozen_host().expect("frozen");
                    let y = host_matmul::host_matmul_wt(&x.as_vec(), n, w, out.size());
                    // no tape is recorded (`!OWNS_TAPE`): the result starts a fresh one of type T
                    return self.dev.tensor_from_vec(y, (n, out)).retaped::<T>();
                }
                kernels::frozen::matmul_wt(x, t.clone().reshape_like(&(out, inp)))
            }
            Store::FrozenBf16(w) => kernels::frozen::matmul_wt_bf16(x, w, out),
            Store::Quant(q) if !T::OWNS_TAPE && kernels::is_cpu::<D>() => {
                let y = quant::quant_matmul_wt(&x.as_vec(), n, q);
                self.dev.tensor_from_vec(y, (n, out)).retaped::<T>()
            }
            // a taped product (or another device) multiplies through a dequantised copy
            Store::Quant(q) => {
                let w = self.dev.tensor_from_vec(q.dequantize(), (out, inp));
                kernels::frozen::matmul_wt(x, w)
            }
            Store::Flat(_) => {
                let w = self.fetch2::<O, I, T>(p, out, inp);
                x.matmul(w.permute::<(I, O), Axes2<1, 0>>())
            }
        }
    }
}

/// LoRA adapters of one projection: `A: [r, in]`, `B: [out, r]` (peft's names).
#[derive(Debug, Clone)]
pub(crate) struct Adapter<D: Storage<f32>> {
    pub a: Param<D>,
    pub b: Param<D>,
}

/// A linear layer bound to its Hugging Face tensors (`<name>.weight`, optional `<name>.bias`).
#[derive(Debug, Clone)]
pub(crate) struct Linear<D: Storage<f32>> {
    pub weight: Param<D>,
    pub bias: Option<Param<D>>,
    pub lora: Option<Adapter<D>>,
    /// Distinguishes this layer's dropout masks from the others' in one forward.
    pub salt: u64,
}

impl<D: Device<f32>> Linear<D> {
    /// `[tokens, I]` → `[tokens, O]`.
    pub fn forward<I: Dim, O: Dim, T: Tape<f32, D> + Merge<T>>(
        &self,
        ctx: &Ctx<'_, D>,
        x: Rows<I, D, T>,
        out: O,
    ) -> Rows<O, D, T> {
        let (n, inp) = *x.shape();
        #[cfg(feature = "cuda")]
        let x = match self.fused_lora_bf16(ctx, x, out) {
            Ok(y) => return y,
            Err(x) => x,
        };
        let lora = match (&self.lora, ctx.lora) {
            (Some(ad), Some(lc)) => {
                let xa = self.dropout_input(ctx, lc, &x).unwrap_or_else(|| x.with_empty_tape());
                Some((xa, ad, lc.scale()))
            }
            _ => None,
        };
        let mut y = ctx.matmul_wt(x, &self.weight, out);
        if let Some(b) = &self.bias {
            y = y + ctx.fetch::<T>(b).reshape_like(&(out,)).broadcast_like::<_, Axis<0>>(&(n, out));
        }
        if let Some((xa, ad, scale)) = lora {
            let r = ad.a.shape[0];
            let a = ctx.fetch2::<usize, I, T>(&ad.a, r, inp);
            let b = ctx.fetch2::<O, usize, T>(&ad.b, out, r);
            let z = xa.matmul(a.permute::<(I, usize), Axes2<1, 0>>()).matmul(b.permute::<(usize, O), Axes2<1, 0>>());
            y = y + z * scale;
        }
        y
    }

    /// The LoRA branch's input `dropout(x)` in a training forward with `lora_dropout > 0` (`None`
    /// otherwise: the branch reads `x`). The mask comes from the forward's seed and this layer's
    /// salt, so a recomputed forward (gradient checkpointing) draws the same one; on CUDA it is
    /// drawn on the device ([`kernels::cuda::dropout_keep`]), on the CPU by [`dropout_mask`].
    pub(crate) fn dropout_input<I: Dim, T: Tape<f32, D> + Merge<T>>(
        &self,
        ctx: &Ctx<'_, D>,
        lc: &LoraConfig,
        x: &Rows<I, D, T>,
    ) -> Option<Rows<I, D, T>> {
        let seed = ctx.dropout_seed.filter(|_| lc.dropout > 0.0)?;
        let (n, inp) = *x.shape();
        let seed = mix_seed(seed, self.salt);
        #[cfg(feature = "cuda")]
        if let Some(cuda) = (ctx.dev as &dyn std::any::Any).downcast_ref::<Cuda>() {
            let m = kernels::cuda::dropout_keep(cuda, n * inp.size(), lc.dropout, seed)
                .unwrap_or_else(|e| panic!("LoRA dropout mask over [{n} x {}]: {e}", inp.size()));
            let m: Tensor<(usize, I), f32, D> =
                kernels::cast(cuda.build_tensor((n, inp), (n, inp).strides(), m)).expect("the CUDA device");
            return Some(x.with_empty_tape() * m.retaped::<T>());
        }
        let mask = dropout_mask(n * inp.size(), lc.dropout, seed);
        Some(x.with_empty_tape() * ctx.dev.tensor_from_vec(mask, (n, inp)).retaped::<T>())
    }

    /// A training forward of a LoRA projection over a bf16 base on CUDA, as the one fused op of
    /// [`kernels::frozen::lora_linear_bf16`] (`Err(x)`: not this case, `x` handed back;
    /// `PIPELINE_REFERENCE_KERNELS=1` keeps dfdx's ops).
    #[cfg(feature = "cuda")]
    #[allow(clippy::result_large_err)]
    fn fused_lora_bf16<I: Dim, O: Dim, T: Tape<f32, D> + Merge<T>>(
        &self,
        ctx: &Ctx<'_, D>,
        x: Rows<I, D, T>,
        out: O,
    ) -> Result<Rows<O, D, T>, Rows<I, D, T>> {
        let (Store::FrozenBf16(w), Some(ad), Some(lc)) = (&self.weight.store, &self.lora, ctx.lora) else {
            return Err(x);
        };
        let (Store::Flat(a), Store::Flat(b)) = (&ad.a.store, &ad.b.store) else { return Err(x) };
        if !T::OWNS_TAPE || kernels::reference_only() {
            return Err(x);
        }
        let n = x.shape().0;
        let lo = kernels::cuda::LoraSlots { a: *a, b: *b, r: ad.a.shape[0], scale: lc.scale() };
        let xa = self.dropout_input(ctx, lc, &x);
        let mut y = kernels::frozen::lora_linear_bf16(x, xa, w, out, ctx.flat, lo);
        if let Some(b) = &self.bias {
            y = y + ctx.fetch::<T>(b).reshape_like(&(out,)).broadcast_like::<_, Axis<0>>(&(n, out));
        }
        Ok(y)
    }
}

/// `down(silu(gate(x)) · up(x))` as the one fused op of [`kernels::mlp`] when the three
/// projections are frozen bf16 weights without biases on CUDA, whose adapters (if any) are views
/// of the trained vector (`Err(x)`: not this case, `x` handed back).
#[cfg(feature = "cuda")]
#[allow(clippy::result_large_err)]
pub(crate) fn fused_swiglu_bf16<X: Dim, M: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    ctx: &Ctx<'_, D>,
    [gate, up, down]: [&Linear<D>; 3],
    x: Rows<X, D, T>,
    inter: M,
) -> Result<Rows<X, D, T>, Rows<X, D, T>> {
    // (the kernels take four columns a thread)
    if !ctx.fused_mlp || !kernels::is_cuda::<D>() || kernels::reference_only() || inter.size() % 4 != 0 {
        return Err(x);
    }
    let (Store::FrozenBf16(wg), Store::FrozenBf16(wu), Store::FrozenBf16(wd)) =
        (&gate.weight.store, &up.weight.store, &down.weight.store)
    else {
        return Err(x);
    };
    if gate.bias.is_some() || up.bias.is_some() || down.bias.is_some() {
        return Err(x);
    }
    let mut slots = [None; 3];
    for (slot, lin) in slots.iter_mut().zip([gate, up, down]) {
        if let (Some(ad), Some(lc)) = (&lin.lora, ctx.lora) {
            let (Store::Flat(a), Store::Flat(b)) = (&ad.a.store, &ad.b.store) else { return Err(x) };
            *slot = Some(kernels::cuda::LoraSlots { a: *a, b: *b, r: ad.a.shape[0], scale: lc.scale() });
        }
    }
    let xa = [gate, up].map(|lin| match (&lin.lora, ctx.lora) {
        (Some(_), Some(lc)) => lin.dropout_input(ctx, lc, &x),
        _ => None,
    });
    let down_dropout = match (&down.lora, ctx.lora, ctx.dropout_seed) {
        (Some(_), Some(lc), Some(seed)) if lc.dropout > 0.0 => Some((mix_seed(seed, down.salt), lc.dropout)),
        _ => None,
    };
    let w = kernels::mlp::MlpWeights { gate: wg, up: wu, down: wd };
    let lora = kernels::mlp::MlpLora { slots, down_dropout };
    Ok(kernels::mlp::lora_mlp_bf16(x, xa, w, inter, ctx.flat, lora))
}
