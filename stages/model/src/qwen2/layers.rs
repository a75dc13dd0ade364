//! The decoder's sub-layers, each bound to its Hugging Face tensors and with its own `forward`:
//! [`RmsNorm`], [`Attention`] (`self_attn.{q,k,v,o}_proj`), [`Mlp`] (`mlp.{gate,up,down}_proj`) and
//! [`DecoderLayer`] (`model.layers.{i}`). Every activation is typed with the model's dimension
//! types `S` ([`crate::dims`]).

use dfdx::prelude::*;

use crate::batch::{HostLayer, Kv, KvPair};
use crate::dims::{DimValues, Dims};
use crate::kernels::profile::mark;
use crate::linear::{Ctx, Linear, Rows};
use crate::lora::Proj;
use crate::params::Param;

type T3<D, T> = Tensor<(usize, usize, usize), f32, D, T>;

/// `x / sqrt(mean(x²) + eps) * weight` over the last axis.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm<D: Storage<f32>> {
    pub weight: Param<D>,
    pub eps: f32,
}

impl<D: Device<f32>> RmsNorm<D> {
    pub fn forward<X: Dim, T: Tape<f32, D> + Merge<T>>(&self, ctx: &Ctx<'_, D>, x: Rows<X, D, T>) -> Rows<X, D, T> {
        #[cfg(feature = "cuda")]
        if crate::kernels::is_cuda::<D>() && !crate::kernels::reference_only() {
            use crate::kernels::fused::{rms_norm, NormWeight};
            let w = match &self.weight.store {
                crate::params::Store::Frozen(t) => Some(NormWeight::Frozen(t)),
                crate::params::Store::Flat(offset) => Some(NormWeight::Flat { flat: ctx.flat, offset: *offset }),
                _ => None,
            };
            if let Some(w) = w {
                return mark(rms_norm(x, w, self.eps), "rms_norm");
            }
        }
        let (n, h) = *x.shape();
        let ms = x.with_empty_tape().square().mean::<(usize,), Axis<1>>();
        let inv = (ms + self.eps).sqrt().recip().broadcast_like::<_, Axis<1>>(&(n, h));
        let w = ctx.fetch::<T>(&self.weight).reshape_like(&(h,)).broadcast_like::<_, Axis<0>>(&(n, h));
        mark(x * inv * w, "rms_norm")
    }
}

/// What every layer of one forward shares: rotary tables of the batch's positions, the additive
/// attention mask and the batch's shape.
pub(crate) struct Step<'a, D: Device<f32>, S: Dims> {
    pub dims: DimValues<S>,
    /// `[tokens, head_dim]` (rotate-half convention: the half-width tables repeated twice).
    pub cos: Rows<S::HeadDim, D, NoneTape>,
    pub sin: Rows<S::HeadDim, D, NoneTape>,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation matrix.
    pub rot: &'a Tensor<(S::HeadDim, S::HeadDim), f32, D>,
    /// How the attention masks its keys.
    pub mask: AttnMask<D>,
    pub batch: usize,
    pub seq: usize,
    pub past: usize,
}

/// The attention's mask, in the form its implementation takes.
pub(crate) enum AttnMask<D: Device<f32>> {
    /// Additive causal + padding mask `[batch, seq, past + seq]` for dfdx's ops.
    Dense(T3<D, NoneTape>),
    /// The host attention over a host KV cache ([`crate::kernels::host_attention`]): no-gradient
    /// CPU forwards with a cache.
    Host(std::sync::Arc<HostStep>),
    /// The batch's attention mask `[batch * seq]` for the fused CUDA kernel
    /// ([`crate::kernels::attention`]: causal, no KV cache), which builds no `[seq, seq]` mask.
    #[cfg(feature = "cuda")]
    Keys(std::sync::Arc<Vec<bool>>),
}

impl<D: Device<f32>> Clone for AttnMask<D> {
    fn clone(&self) -> Self {
        match self {
            AttnMask::Dense(m) => AttnMask::Dense(m.clone()),
            AttnMask::Host(h) => AttnMask::Host(h.clone()),
            #[cfg(feature = "cuda")]
            AttnMask::Keys(k) => AttnMask::Keys(k.clone()),
        }
    }
}

/// What the host attention reads besides the activations: each row's key mask over the cache's
/// positions after this step, and the rotary tables `[tokens, head_dim]` on the host.
pub(crate) struct HostStep {
    pub key_mask: Vec<Vec<bool>>,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// One layer's slot of a KV cache, in the cache's layout.
pub(crate) enum LayerCache<'a, D: Storage<f32>, S: Dims> {
    Dense(&'a mut Option<KvPair<D, S>>),
    Host(&'a mut HostLayer),
}

impl<D: Device<f32>, S: Dims> Step<'_, D, S> {
    /// Rotary embedding of `[tokens, heads * head_dim]`.
    fn rope<H: Dim, X: Dim, T: Tape<f32, D> + Merge<T>>(&self, x: Rows<X, D, T>, heads: H) -> Rows<X, D, T> {
        #[cfg(feature = "cuda")]
        if crate::kernels::is_cuda::<D>() && !crate::kernels::reference_only() {
            return crate::kernels::fused::rope(x, &self.cos, &self.sin);
        }
        let (n, width) = *x.shape();
        let hd = self.dims.head_dim;
        let x3 = x.reshape_like(&(n, heads, hd));
        let rot = x3
            .with_empty_tape()
            .reshape_like(&(n * heads.size(), hd))
            .matmul(self.rot.clone())
            .reshape_like(&(n, heads, hd));
        let c = self.cos.clone().broadcast_like::<_, Axis<1>>(&(n, heads, hd));
        let s = self.sin.clone().broadcast_like::<_, Axis<1>>(&(n, heads, hd));
        (x3 * c + rot * s).reshape_like(&(n, width))
    }
}

/// Grouped-query self-attention with rotary positions (q/k/v biases for Qwen2).
#[derive(Debug, Clone)]
pub(crate) struct Attention<D: Storage<f32>> {
    pub q_proj: Linear<D>,
    pub k_proj: Linear<D>,
    pub v_proj: Linear<D>,
    pub o_proj: Linear<D>,
}

impl<D: Device<f32>> Attention<D> {
    /// `[tokens, hidden]` → `[tokens, hidden]`; with a cache slot, the new keys/values are
    /// appended to it and attention covers the cached prefix too.
    pub fn forward<S: Dims, T: Tape<f32, D> + Merge<T>>(
        &self,
        ctx: &Ctx<'_, D>,
        step: &Step<'_, D, S>,
        x: Rows<S::Hidden, D, T>,
        cache: Option<LayerCache<'_, D, S>>,
    ) -> Rows<S::Hidden, D, T> {
        let DimValues { hidden, heads: nq, kv_heads: nkv, head_dim: hd, q_dim, kv_dim, .. } = step.dims;
        let (b, s) = (step.batch, step.seq);
        let (n, skv) = (b * s, step.past + s);
        let rep = nq.size() / nkv.size();
        let q = self.q_proj.forward(ctx, x.with_empty_tape(), q_dim);
        let k = self.k_proj.forward(ctx, x.with_empty_tape(), kv_dim);
        let v = mark(self.v_proj.forward(ctx, x, kv_dim), "q/k/v proj (+LoRA)");
        if let AttnMask::Host(hs) = &step.mask {
            let Some(LayerCache::Host(layer)) = cache else {
                panic!("the host attention runs with a host KV cache (`Qwen2::hidden` pairs them)")
            };
            use crate::kernels::host_attention::{attend, rope, HostShape};
            let (mut qh, mut kh) = (q.as_vec(), k.as_vec());
            rope(&mut qh, nq.size(), hd.size(), &hs.cos, &hs.sin);
            rope(&mut kh, nkv.size(), hd.size(), &hs.cos, &hs.sin);
            let sh = HostShape { batch: b, seq: s, heads: nq.size(), kv_heads: nkv.size(), head_dim: hd.size() };
            let att = attend(&qh, &kh, &v.as_vec(), layer, &hs.key_mask, sh);
            // no tape is recorded (`Qwen2::hidden` takes this path for `NoneTape` forwards only)
            let att = mark(ctx.dev.tensor_from_vec(att, (n, q_dim)).retaped::<T>(), "attention (host)");
            return mark(self.o_proj.forward(ctx, att, hidden), "o_proj (+LoRA)");
        }
        let q = step.rope(q, nq);
        let k = mark(step.rope(k, nkv), "rope");
        let mask = match &step.mask {
            AttnMask::Dense(m) => m.clone(),
            AttnMask::Host(_) => unreachable!("handled above"),
            #[cfg(feature = "cuda")]
            AttnMask::Keys(valid) => {
                // chosen only for forwards without a KV cache (`Qwen2::hidden`)
                debug_assert!(cache.is_none() && step.past == 0);
                use crate::kernels::attention::{causal_attention, AttnShape};
                let sh = AttnShape { batch: b, seq: s, heads: nq.size(), kv_heads: nkv.size(), head_dim: hd.size() };
                // infallible like every op of this forward: a device error here is dfdx's OOM panic
                let att = causal_attention(q, k, v, valid, sh)
                    .unwrap_or_else(|e| panic!("fused attention over [{b} x {s}] tokens, {} heads: {e}", sh.heads));
                let att = mark(att, "attention (fused)");
                return mark(self.o_proj.forward(ctx, att, hidden), "o_proj (+LoRA)");
            }
        };
        // Grouped-query attention without repeating K/V: query head `j * rep + r` uses KV head
        // `j` (transformers' `repeat_kv`), so the `rep` query heads of one KV head are stacked
        // along the query axis, [b, nkv, rep * s, hd]. (Repeating K/V by broadcast + reshape
        // trains wrongly on CUDA: dfdx 0.13's reshape backward visits only as many elements as
        // the broadcast input stores, so K/V gradients lose all but 1/rep of their terms.)
        let q = q.reshape_like(&(b, s, nq, hd)).permute::<_, Axes4<0, 2, 1, 3>>().reshape_like(&(b, nkv, rep * s, hd));
        let mut k: Kv<S, D, T> = k.reshape_like(&(b, s, nkv, hd)).permute::<_, Axes4<0, 2, 1, 3>>();
        let mut v: Kv<S, D, T> = v.reshape_like(&(b, s, nkv, hd)).permute::<_, Axes4<0, 2, 1, 3>>();
        if let Some(cache) = cache {
            let LayerCache::Dense(slot) = cache else {
                panic!("a host KV cache in dfdx's attention (`Qwen2::hidden` pairs them)")
            };
            if let Some((pk, pv)) = slot.take() {
                k = (pk.retaped::<T>(), k).concat_along(Axis::<2>);
                v = (pv.retaped::<T>(), v).concat_along(Axis::<2>);
            } else {
                k = k.contiguous();
                v = v.contiguous();
            }
            *slot = Some((k.retaped::<NoneTape>(), v.retaped::<NoneTape>()));
        }
        let scale = 1.0 / (hd.size() as f32).sqrt();
        let scores = q.matmul(k.permute::<_, Axes4<0, 1, 3, 2>>()) * scale;
        let scores =
            scores.reshape_like(&(b, nkv, rep, s, skv)) + mask.broadcast_like::<_, Axes2<1, 2>>(&(b, nkv, rep, s, skv));
        let probs = scores.softmax::<Axis<4>>().reshape_like(&(b, nkv, rep * s, skv));
        let att =
            probs.matmul(v).reshape_like(&(b, nq, s, hd)).permute::<_, Axes4<0, 2, 1, 3>>().reshape_like(&(n, q_dim));
        let att = mark(att, "attention (dfdx ops)");
        mark(self.o_proj.forward(ctx, att, hidden), "o_proj (+LoRA)")
    }
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub(crate) struct Mlp<D: Storage<f32>> {
    pub gate_proj: Linear<D>,
    pub up_proj: Linear<D>,
    pub down_proj: Linear<D>,
}

impl<D: Device<f32>> Mlp<D> {
    pub fn forward<S: Dims, T: Tape<f32, D> + Merge<T>>(
        &self,
        ctx: &Ctx<'_, D>,
        dims: &DimValues<S>,
        x: Rows<S::Hidden, D, T>,
    ) -> Rows<S::Hidden, D, T> {
        #[cfg(feature = "cuda")]
        let x = match crate::linear::fused_swiglu_bf16(
            ctx,
            [&self.gate_proj, &self.up_proj, &self.down_proj],
            x,
            dims.intermediate,
        ) {
            Ok(y) => return mark(y, "mlp (fused, bf16)"),
            Err(x) => x,
        };
        let g = self.gate_proj.forward(ctx, x.with_empty_tape(), dims.intermediate);
        let u = mark(self.up_proj.forward(ctx, x, dims.intermediate), "gate/up proj (+LoRA)");
        #[cfg(feature = "cuda")]
        if crate::kernels::is_cuda::<D>() && !crate::kernels::reference_only() {
            let h = mark(crate::kernels::frozen::swiglu(g, u), "silu * up");
            return mark(self.down_proj.forward(ctx, h, dims.hidden), "down proj (+LoRA)");
        }
        let act = g.with_empty_tape().sigmoid() * g;
        let h = mark(act * u, "silu * up");
        mark(self.down_proj.forward(ctx, h, dims.hidden), "down proj (+LoRA)")
    }
}

/// One pre-norm transformer block (`model.layers.{i}`).
#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer<D: Storage<f32>> {
    pub input_layernorm: RmsNorm<D>,
    pub self_attn: Attention<D>,
    pub post_attention_layernorm: RmsNorm<D>,
    pub mlp: Mlp<D>,
}

impl<D: Storage<f32>> DecoderLayer<D> {
    /// The projection `p`.
    pub fn linear(&self, p: Proj) -> &Linear<D> {
        let (a, m) = (&self.self_attn, &self.mlp);
        match p {
            Proj::Q => &a.q_proj,
            Proj::K => &a.k_proj,
            Proj::V => &a.v_proj,
            Proj::O => &a.o_proj,
            Proj::Gate => &m.gate_proj,
            Proj::Up => &m.up_proj,
            Proj::Down => &m.down_proj,
        }
    }
    pub fn linear_mut(&mut self, p: Proj) -> &mut Linear<D> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        match p {
            Proj::Q => &mut a.q_proj,
            Proj::K => &mut a.k_proj,
            Proj::V => &mut a.v_proj,
            Proj::O => &mut a.o_proj,
            Proj::Gate => &mut m.gate_proj,
            Proj::Up => &mut m.up_proj,
            Proj::Down => &mut m.down_proj,
        }
    }
}

impl<D: Device<f32>> DecoderLayer<D> {
    /// [`Self::forward`] with gradient checkpointing (`gradient_checkpointing = true`): the
    /// forward runs without recording its intermediates, and one backward op keeps only the
    /// layer's input; when the backward reaches it, it runs the layer again on a tape of its own,
    /// back-propagates the output gradient through it and adds the input's and the trained
    /// vector's gradients into the outer ones. Activation memory is then one layer's instead of
    /// every layer's, for one more forward per step. Dropout masks are drawn from the same seed,
    /// so the recomputation is the forward that ran.
    pub fn forward_checkpointed<S: Dims, T: Tape<f32, D> + Merge<T>>(
        &self,
        ctx: &Ctx<'_, D>,
        step: &Step<'_, D, S>,
        x: Rows<S::Hidden, D, T>,
    ) -> Rows<S::Hidden, D, T> {
        let (x, mut tape) = x.split_tape();
        let y = self.forward(ctx, step, x.clone(), None);
        if !T::OWNS_TAPE {
            return y.put_tape(tape);
        }
        let layer = self.clone();
        let (dev, flat, lora, seed, fused_mlp) =
            (ctx.dev.clone(), ctx.flat.clone(), ctx.lora.cloned(), ctx.dropout_seed, ctx.fused_mlp);
        let (dims, cos, sin, rot, mask) =
            (step.dims, step.cos.clone(), step.sin.clone(), step.rot.clone(), step.mask.clone());
        let (batch, seq, past) = (step.batch, step.seq, step.past);
        let yg = y.ghost();
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&yg)?;
            let dy: Rows<S::Hidden, D, NoneTape> = grads.get(&yg);
            let ctx = Ctx { dev: &dev, flat: &flat, lora: lora.as_ref(), dropout_seed: seed, fused_mlp };
            let step =
                Step { dims, cos: cos.clone(), sin: sin.clone(), rot: &rot, mask: mask.clone(), batch, seq, past };
            let (_, t0) = flat.trace(Gradients::leaky()).split_tape();
            let y = layer.forward(&ctx, &step, x.clone().put_tape(t0), None);
            let mut inner = (y * dy).try_sum::<(), _>()?.try_backward()?;
            crate::kernels::add_assign_buf::<D>(grads.get_or_alloc_mut(&x)?, inner.get_or_alloc_mut(&x)?)?;
            crate::kernels::add_assign_buf::<D>(grads.get_or_alloc_mut(&flat)?, inner.get_or_alloc_mut(&flat)?)
        });
        y.put_tape(tape)
    }

    pub fn forward<S: Dims, T: Tape<f32, D> + Merge<T>>(
        &self,
        ctx: &Ctx<'_, D>,
        step: &Step<'_, D, S>,
        x: Rows<S::Hidden, D, T>,
        cache: Option<LayerCache<'_, D, S>>,
    ) -> Rows<S::Hidden, D, T> {
        let h = self.input_layernorm.forward(ctx, x.with_empty_tape());
        let a = self.self_attn.forward(ctx, step, h, cache);
        let x = mark(x + a, "residual add");
        let h = self.post_attention_layernorm.forward(ctx, x.with_empty_tape());
        let m = self.mlp.forward(ctx, &step.dims, h);
        mark(x + m, "residual add")
    }
}
