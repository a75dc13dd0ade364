//! RMSNorm and the rotary embedding as one CUDA kernel each way (behind the `cuda` feature).
//!
//! dfdx runs RMSNorm as five ops (`square`, `mean`, `+ eps`/`sqrt`/`recip`, two broadcast
//! products) and RoPE as a `[head_dim × head_dim]` product plus four broadcast ops, each with its
//! own `[tokens, width]` temporary and gradient buffer. Here the forward is one pass over the rows
//! and the backward adds straight into the tape's gradient buffers: RMSNorm keeps only the per-row
//! `1 / rms`, RoPE nothing but the batch's tables. The dfdx expressions in
//! [`crate::qwen2`]'s layers stay the reference (CPU, `PIPELINE_REFERENCE_KERNELS=1`); the CUDA
//! parity tests compare the two on the same model.

use dfdx::prelude::*;

use super::cuda::{self, ptr};
use super::{cast, cuda_buffer, cuda_data};

type Rows<X, D, T> = Tensor<(usize, X), f32, D, T>;
type T1<D, T> = Tensor<(usize,), f32, D, T>;

const ON: &str = "the fused kernels run on the CUDA device";
const BUF: &str = "a CUDA gradient buffer";

/// Where an RMSNorm weight lives: a frozen vector, or a slice of the trained flat vector (full
/// fine-tuning), whose gradient the backward then adds into.
pub(crate) enum NormWeight<'a, D: Storage<f32>> {
    Frozen(&'a T1<D, NoneTape>),
    Flat { flat: &'a T1<D, NoneTape>, offset: usize },
}

fn err<E: 'static>(e: CudaError) -> E {
    cast::<CudaError, E>(e).expect("CUDA error type")
}

/// `x / sqrt(mean(x²) + eps) · w` over the rows of `x`.
pub(crate) fn rms_norm<X: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    x: Rows<X, D, T>,
    w: NormWeight<'_, D>,
    eps: f32,
) -> Rows<X, D, T> {
    let shape = *x.shape();
    let (n, h) = (shape.0, shape.1.size());
    let (x, mut tape) = x.contiguous().split_tape();
    let dev: Cuda = cast(x.device().clone()).expect(ON);
    let cu = dev.cuda_device().clone();
    // the weight's vector is held by the backward (its address is w_addr)
    let (wt, offset, trained) = match w {
        NormWeight::Frozen(t) => (t.clone(), 0, false),
        NormWeight::Flat { flat, offset } => (flat.clone(), offset, true),
    };
    let w_addr = ptr(cuda_data(&wt).expect(ON)) + (offset * std::mem::size_of::<f32>()) as u64;
    let (y, inv) = cuda::rms_norm_forward(&cu, ptr(cuda_data(&x).expect(ON)), w_addr, n, h, eps)
        .unwrap_or_else(|e| panic!("fused RMSNorm over [{n} x {h}]: {e}"));
    let y: Rows<X, D, NoneTape> = cast(dev.build_tensor(shape, shape.strides(), y)).expect(ON);
    if T::OWNS_TAPE {
        let (xg, yg) = (x.ghost(), y.ghost());
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&yg)?;
            let dy: Rows<X, D, NoneTape> = grads.get(&yg);
            let dx = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&xg)?).expect(BUF));
            let dw = if trained {
                let base = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&wt)?).expect(BUF));
                Some(base + (offset * std::mem::size_of::<f32>()) as u64)
            } else {
                None
            };
            let (xa, dya) = (ptr(cuda_data(&x).expect(ON)), ptr(cuda_data(&dy).expect(ON)));
            cuda::rms_norm_backward(&cu, xa, w_addr, &inv, dya, dx, dw, n, h).map_err(err::<D::Err>)
        });
    }
    y.put_tape(tape)
}

/// The rotary embedding of `[tokens, heads · hd]` rows with the batch's per-token tables
/// `cos`, `sin` `[tokens, hd]` (rotate-half convention, as transformers' `apply_rotary_pos_emb`).
pub(crate) fn rope<X: Dim, H: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    x: Rows<X, D, T>,
    cos: &Rows<H, D, NoneTape>,
    sin: &Rows<H, D, NoneTape>,
) -> Rows<X, D, T> {
    let shape = *x.shape();
    let (n, width, hd) = (shape.0, shape.1.size(), cos.shape().1.size());
    let (x, mut tape) = x.contiguous().split_tape();
    let dev: Cuda = cast(x.device().clone()).expect(ON);
    let cu = dev.cuda_device().clone();
    let (c, s) = (cos.clone(), sin.clone());
    let (ca, sa) = (ptr(cuda_data(&c).expect(ON)), ptr(cuda_data(&s).expect(ON)));
    let y = cuda::rope_forward(&cu, ptr(cuda_data(&x).expect(ON)), ca, sa, n, width, hd)
        .unwrap_or_else(|e| panic!("fused RoPE over [{n} x {width}]: {e}"));
    let y: Rows<X, D, NoneTape> = cast(dev.build_tensor(shape, shape.strides(), y)).expect(ON);
    if T::OWNS_TAPE {
        let (xg, yg) = (x.ghost(), y.ghost());
        drop(x);
        tape.add_backward_op(move |grads| {
            // the tables stay alive with the closure (their addresses are ca, sa)
            let _tables = (&c, &s);
            grads.try_alloc_for(&yg)?;
            let dy: Rows<X, D, NoneTape> = grads.get(&yg);
            let dx = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&xg)?).expect(BUF));
            cuda::rope_backward(&cu, ptr(cuda_data(&dy).expect(ON)), ca, sa, dx, n, width, hd).map_err(err::<D::Err>)
        });
    }
    y.put_tape(tape)
}
