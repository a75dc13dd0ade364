//! `y = x · Wᵀ` through a frozen weight, with a backward that computes `dx = dy · W` only.
//!
//! dfdx 0.13's matmul backward always computes the gradient of both operands, so a product with a
//! frozen weight would pay a full `dW = dyᵀ · x` product and an f32 buffer the size of `W` in every
//! LoRA step, only for the gradient to be thrown away. This op records its own backward instead.

use dfdx::prelude::*;

use super::{cpu_buffer, is_cpu, reference_only};

type Rows<X, D, T> = Tensor<(usize, X), f32, D, T>;

/// `x · Wᵀ` for a frozen `w: [out, in]` (no gradient ever reaches `w`). Without a tape this is a
/// plain product; on the CPU with a tape the backward adds `dy · W` to `dx` and allocates nothing
/// for `W`; elsewhere it is dfdx's matmul (whose `dW` is computed and dropped).
pub(crate) fn matmul_wt<I: Dim, O: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    x: Rows<I, D, T>,
    w: Tensor<(O, I), f32, D>,
) -> Rows<O, D, T> {
    #[cfg(feature = "cuda")]
    if T::OWNS_TAPE && super::is_cuda::<D>() && !reference_only() {
        return matmul_wt_cuda(x, w);
    }
    if !T::OWNS_TAPE || !is_cpu::<D>() || reference_only() {
        return x.matmul(w.retaped::<T>().permute::<(I, O), Axes2<1, 0>>());
    }
    with_dx_backward(x, w, |dx_buf, dy, w| {
        let dx = dy.matmul(w.clone()).as_vec();
        let dst = cpu_buffer::<D>(dx_buf).expect("the CPU path runs on the CPU");
        for (d, s) in dst.iter_mut().zip(dx) {
            *d += s;
        }
        Ok(())
    })
}

/// `y = x · Wᵀ` with the tape's backward replaced by `add_dx(dx, dy, W)`, which adds `dy · W` to
/// `x`'s gradient buffer `dx`; `W` gets no gradient.
fn with_dx_backward<I: Dim, O: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>, F>(
    x: Rows<I, D, T>,
    w: Tensor<(O, I), f32, D>,
    add_dx: F,
) -> Rows<O, D, T>
where
    F: 'static
        + FnOnce(&mut <D as Storage<f32>>::Vec, Rows<O, D, NoneTape>, &Tensor<(O, I), f32, D>) -> Result<(), D::Err>,
{
    // the gradient buffer of `x` is laid out like its data: make both row-major
    let (x, mut tape) = x.contiguous().split_tape();
    let y = x.clone().matmul(w.clone().permute::<(I, O), Axes2<1, 0>>());
    let (xg, yg) = (x.ghost(), y.ghost());
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&yg)?;
        let dy: Rows<O, D, NoneTape> = grads.get(&yg);
        add_dx(grads.get_or_alloc_mut(&xg)?, dy, &w)
    });
    y.put_tape(tape)
}

/// [`matmul_wt`] on CUDA: the backward is one SGEMM into `dx` ([`super::cuda::frozen_backward`]).
#[cfg(feature = "cuda")]
fn matmul_wt_cuda<I: Dim, O: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    x: Rows<I, D, T>,
    w: Tensor<(O, I), f32, D>,
) -> Rows<O, D, T> {
    use super::{cast, cuda, cuda_buffer};
    with_dx_backward(x, w, |dx_buf, dy, w| {
        let ((n, o), i) = (*dy.shape(), w.shape().1);
        let w: Tensor<(usize, usize), f32, Cuda> =
            cast(w.clone().reshape_like(&(o.size(), i.size()))).expect("a CUDA tensor");
        let dy: Tensor<(usize, usize), f32, Cuda> = cast(dy.reshape_like(&(n, o.size()))).expect("a CUDA tensor");
        let dst = cuda_buffer::<D>(dx_buf).expect("a CUDA buffer");
        cuda::frozen_backward(&w.device().clone(), dst, &dy, &w)
            .map_err(|e| cast::<CudaError, D::Err>(e).expect("CUDA error type"))
    })
}

/// `x · Wᵀ` for a frozen bf16 `w: [out, in]` (only a CUDA device holds one): the product and the
/// `dx`-only backward are bf16 tensor-core GEMMs with f32 accumulation
/// ([`super::cuda::bf16_linear`], [`super::cuda::bf16_dx`]); with `PIPELINE_REFERENCE_KERNELS=1`
/// the weight is widened to f32 and the f32 path runs.
#[cfg(feature = "cuda")]
pub(crate) fn matmul_wt_bf16<I: Dim, O: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    x: Rows<I, D, T>,
    w: &crate::params::Bf16Weight,
    out: O,
) -> Rows<O, D, T> {
    use super::{cast, cuda, cuda_buffer, cuda_data};
    let (n, inp) = *x.shape();
    if reference_only() {
        let wf = crate::params::bf16_to_f32::<D>(w).reshape_like(&(out, inp));
        return matmul_wt(x, wf);
    }
    let (x, mut tape) = x.contiguous().split_tape();
    let xb = cuda_data(&x).expect("bf16 weights live on the CUDA device");
    let y = cuda::bf16_linear(xb, n, inp.size(), w, out.size())
        .unwrap_or_else(|e| panic!("bf16 frozen product [{n}x{}] -> {}: {e}", inp.size(), out.size()));
    let y: Rows<O, D, NoneTape> =
        cast(w.device().build_tensor((n, out), (n, out).strides(), y)).expect("the CUDA device");
    if T::OWNS_TAPE {
        let (xg, yg, w) = (x.ghost(), y.ghost(), w.clone());
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&yg)?;
            let dy: Rows<O, D, NoneTape> = grads.get(&yg);
            let dy = cuda_data(&dy).expect("a CUDA tensor");
            let dx = cuda_buffer::<D>(grads.get_or_alloc_mut(&xg)?).expect("a CUDA buffer");
            cuda::bf16_dx(dx, dy, n, out.size(), &w, inp.size())
                .map_err(|e| cast::<CudaError, D::Err>(e).expect("CUDA error type"))
        });
    }
    y.put_tape(tape)
}

/// A LoRA projection over a frozen bf16 base, `x·Wᵀ + scale·(xa·Aᵀ)·Bᵀ`, as one op of five
/// products and no element-wise pass ([`super::cuda::lora_bf16_forward`]); `A` and `B` are
/// views of the trained vector `flat` (at `lo`'s offsets) and their gradients are written into
/// its gradient directly. `xa`: the LoRA branch's input when dropout masks it (`None`: `x`).
/// dfdx's path for the same product runs the branch as four ops whose outputs and gradients
/// are `[n, out]`-sized f32 tensors.
#[cfg(feature = "cuda")]
pub(crate) fn lora_linear_bf16<I: Dim, O: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    x: Rows<I, D, T>,
    xa: Option<Rows<I, D, T>>,
    w: &crate::params::Bf16Weight,
    out: O,
    flat: &Tensor<(usize,), f32, D>,
    lo: super::cuda::LoraSlots,
) -> Rows<O, D, T> {
    use super::{cast, cuda, cuda_buffer, cuda_data};
    const ON: &str = "LoRA over a bf16 base runs on the CUDA device";
    let (n, inp) = *x.shape();
    let (x, tx) = x.contiguous().split_tape();
    let (xa, mut tape) = match xa {
        Some(xa) => {
            let (xa, ta) = xa.contiguous().split_tape();
            (Some(xa), tx.merge(ta))
        }
        None => (None, tx),
    };
    let xb = cuda_data(&x).expect(ON);
    let xab = xa.as_ref().map_or(xb, |t| cuda_data(t).expect(ON));
    let (y, t) = cuda::lora_bf16_forward(xb, xab, n, inp.size(), w, out.size(), cuda_data(flat).expect(ON), lo)
        .unwrap_or_else(|e| panic!("LoRA product [{n}x{}] -> {}: {e}", inp.size(), out.size()));
    let y: Rows<O, D, NoneTape> =
        cast(w.device().build_tensor((n, out), (n, out).strides(), y)).expect("the CUDA device");
    if T::OWNS_TAPE {
        let (xg, yg, w, flat) = (x.ghost(), y.ghost(), w.clone(), flat.clone());
        tape.add_backward_op(move |grads| {
            let err = |e: CudaError| cast::<CudaError, D::Err>(e).expect("CUDA error type");
            grads.try_alloc_for(&yg)?;
            let dy: Rows<O, D, NoneTape> = grads.get(&yg);
            let dyb = cuda_data(&dy).expect(ON);
            let dev = w.device().clone();
            let fb = cuda_data(&flat).expect(ON);
            let xab = match &xa {
                Some(t) => cuda_data(t),
                None => cuda_data(&x),
            }
            .expect(ON);
            let dims = (n, inp.size(), out.size());
            let dflat = cuda_buffer::<D>(grads.get_or_alloc_mut(&flat)?).expect("a CUDA buffer");
            let u = cuda::lora_bf16_backward_params(&dev, dyb, xab, &t, fb, dflat, dims, lo).map_err(err)?;
            if let Some(xa) = &xa {
                let dxa = cuda_buffer::<D>(grads.get_or_alloc_mut(&xa.ghost())?).expect("a CUDA buffer");
                cuda::lora_bf16_backward_dx(&dev, &u, fb, dxa, (n, inp.size()), lo).map_err(err)?;
            }
            let dx = cuda_buffer::<D>(grads.get_or_alloc_mut(&xg)?).expect("a CUDA buffer");
            if xa.is_none() {
                cuda::lora_bf16_backward_dx(&dev, &u, fb, dx, (n, inp.size()), lo).map_err(err)?;
            }
            cuda::bf16_dx(dx, dyb, n, out.size(), &w, inp.size()).map_err(err)
        });
    }
    y.put_tape(tape)
}

/// SwiGLU's gate `silu(g) · u` on CUDA as one kernel forward and one backward for both inputs
/// ([`super::cuda::swiglu_forward`]); dfdx's `g.sigmoid() * g * u` is three ops with two
/// `[tokens, intermediate]` temporaries and their gradients.
#[cfg(feature = "cuda")]
pub(crate) fn swiglu<X: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    g: Rows<X, D, T>,
    u: Rows<X, D, T>,
) -> Rows<X, D, T> {
    use super::{cast, cuda, cuda_buffer, cuda_data};
    const ON: &str = "the fused SwiGLU runs on the CUDA device";
    let shape = *g.shape();
    let (g, tg) = g.contiguous().split_tape();
    let (u, tu) = u.contiguous().split_tape();
    let mut tape = tg.merge(tu);
    let dev: Cuda = cast(g.device().clone()).expect(ON);
    let n = shape.num_elements();
    let h = cuda::swiglu_forward(&dev, cuda_data(&g).expect(ON), cuda_data(&u).expect(ON), n)
        .unwrap_or_else(|e| panic!("fused SwiGLU over {n} values: {e}"));
    let h: Rows<X, D, NoneTape> = cast(dev.build_tensor(shape, shape.strides(), h)).expect(ON);
    if T::OWNS_TAPE {
        let (gg, ug, hg) = (g.ghost(), u.ghost(), h.ghost());
        tape.add_backward_op(move |grads| {
            let err = |e: CudaError| cast::<CudaError, D::Err>(e).expect("CUDA error type");
            grads.try_alloc_for(&hg)?;
            let dh: Rows<X, D, NoneTape> = grads.get(&hg);
            let (gb, ub, dhb) = (cuda_data(&g).expect(ON), cuda_data(&u).expect(ON), cuda_data(&dh).expect(ON));
            // both gradient buffers in one pass (their device addresses stay put while `grads`
            // lends the second)
            let dg = cuda::ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&gg)?).expect("a CUDA buffer"));
            let du = cuda::ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&ug)?).expect("a CUDA buffer"));
            cuda::swiglu_backward(&dev, gb, ub, dhb, dg, du).map_err(err)
        });
    }
    h.put_tape(tape)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn matmul_wt_bf16<I: Dim, O: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    _x: Rows<I, D, T>,
    w: &crate::params::Bf16Weight,
    _out: O,
) -> Rows<O, D, T> {
    match *w {}
}

/// Rows `ids` of a frozen bf16 table `[_, H]` as f32 `[ids.len(), H]` (the embedding lookup; the
/// table gets no gradient). Errors (out of memory) are returned.
#[cfg(feature = "cuda")]
pub(crate) fn gather_bf16<H: Dim, D: Device<f32>>(
    w: &crate::params::Bf16Weight,
    ids: &[usize],
    h: H,
) -> Result<Rows<H, D, NoneTape>, super::cuda::KernelError> {
    let rows = super::cuda::bf16_gather(w, ids, h.size())?;
    let n = ids.len();
    Ok(super::cast(w.device().build_tensor((n, h), (n, h).strides(), rows)).expect("the CUDA device"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same value and same `dx` as dfdx's own product; no gradient is allocated for `W`.
    #[test]
    fn matches_dfdx_matmul_and_leaves_w_without_gradient() {
        let dev = Cpu::default();
        let (n, i, o) = (5, 7, 3);
        let xv: Vec<f32> = (0..n * i).map(|k| ((k * 37 % 23) as f32 - 11.0) / 10.0).collect();
        let wv: Vec<f32> = (0..o * i).map(|k| ((k * 53 % 19) as f32 - 9.0) / 7.0).collect();
        let x: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(xv, (n, i));
        let w: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(wv, (o, i));
        let c: Tensor<(usize, usize), f32, Cpu> =
            dev.tensor_from_vec((0..n * o).map(|k| k as f32 - 4.0).collect(), (n, o));

        let y = matmul_wt(x.leaky_trace(), w.clone());
        let got_y = y.as_vec();
        let g = (y * c.clone()).sum::<(), _>().backward();
        let (want_y, want_g) = {
            let y2 = x.leaky_trace().matmul(w.clone().permute::<(usize, usize), Axes2<1, 0>>());
            let y2v = y2.as_vec();
            let g2 = (y2 * c).sum::<(), _>().backward();
            (y2v, g2.get(&x).as_vec())
        };
        assert_eq!(got_y, want_y);
        let got = g.get(&x).as_vec();
        for (a, b) in got.iter().zip(&want_g) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // the op never touched W's gradient: asking for it would panic, so check via a fresh alloc
        let mut g = g;
        let wbuf = g.get_or_alloc_mut(&w).unwrap();
        assert!(wbuf.iter().all(|&v| v == 0.0), "no dW was written");
    }
}
