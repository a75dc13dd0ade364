//! The CUDA side of the kernels (behind the `cuda` feature, built against dfdx with
//! `scripts/gpu/dfdx-0.13.0.diff` applied: it exposes the device's cudarc and cuBLAS handles,
//! `Tensorlike` (a tensor's buffer) and `build_tensor`).
//!
//! - [`frozen_backward`]: `dx += dy · W` with one cuBLAS SGEMM (the frozen weight gets no `dW`).
//! - [`target_logprobs`]: the fused LM head + log-softmax at the targets, chunked over tokens so
//!   the logits of one chunk exist at a time: `S = H_c · Wᵀ` (SGEMM), one NVRTC kernel per row for
//!   the max, `logsumexp`, the target's log-prob and `P = softmax(S)` in place, then
//!   `u = W[y] − P · W` (SGEMM + kernel). The backward is `dh[t] += g[t] · u[t]` (kernel).
//! - [`set_tf32`]: cuBLAS TF32 tensor-op math for the f32 products (`tf32 = true`).

use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, Gemm, GemmConfig};
use cudarc::driver::{CudaDevice, CudaSlice, DevicePtr, DevicePtrMut, DeviceSlice, LaunchAsync, LaunchConfig};
use dfdx::prelude::*;
use dfdx::tensor::Tensorlike;

const MODULE: &str = "pipeline_kernels";
const FUNCS: &[&str] = &["row_logsoftmax", "add_target_rows", "scale_rows_add"];
const SRC: &str = r#"
extern "C" __global__ void row_logsoftmax(float* s, const unsigned long long* y, const unsigned char* need,
                                          float* lp, unsigned long long rows, unsigned long long v) {
    // one block per row; s is [rows, v]; writes lp[row] and s = softmax(s)
    unsigned long long r = blockIdx.x;
    if (r >= rows) return;
    float* row = s + r * v;
    __shared__ float red[32];
    float mx = -3.402823466e38f;
    for (unsigned long long j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, row[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
    __syncthreads();
    if (threadIdx.x < 32) {
        float m = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : -3.402823466e38f;
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
        if (threadIdx.x == 0) red[0] = m;
    }
    __syncthreads();
    mx = red[0];
    __syncthreads();
    float sum = 0.f;
    for (unsigned long long j = threadIdx.x; j < v; j += blockDim.x) sum += __expf(row[j] - mx);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
        if (threadIdx.x == 0) red[0] = t;
    }
    __syncthreads();
    float lse = mx + logf(red[0]);
    if (threadIdx.x == 0) lp[r] = need[r] ? row[y[r]] - lse : 0.f;
    __syncthreads();
    for (unsigned long long j = threadIdx.x; j < v; j += blockDim.x) row[j] = __expf(row[j] - lse);
}

extern "C" __global__ void add_target_rows(float* u, const float* w, const unsigned long long* y,
                                           const unsigned char* need, unsigned long long rows, unsigned long long h) {
    // u[r] = need[r] ? u[r] + w[y[r]] : 0   (u holds -P·W on entry)
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= rows * h) return;
    unsigned long long r = i / h, k = i % h;
    u[i] = need[r] ? u[i] + w[y[r] * h + k] : 0.f;
}

extern "C" __global__ void scale_rows_add(float* dst, const float* u, const float* g,
                                          unsigned long long rows, unsigned long long h) {
    // dst[r][k] += g[r] * u[r][k]
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= rows * h) return;
    dst[i] += g[i / h] * u[i];
}
"#;

fn driver_err(e: impl std::fmt::Debug) -> CudaError {
    // dfdx's error type has no variant for our own failures; NVRTC / launch errors are bugs of
    // this module, reported with their cause
    panic!("pipeline CUDA kernel: {e:?}")
}

fn module(dev: &Arc<CudaDevice>) -> Result<(), CudaError> {
    if !dev.has_func(MODULE, FUNCS[0]) {
        let ptx = cudarc::nvrtc::compile_ptx(SRC).map_err(driver_err)?;
        dev.load_ptx(ptx, MODULE, FUNCS)?;
    }
    Ok(())
}

/// The CUDA buffer of a tensor.
fn buf<S: Shape, T>(t: &Tensor<S, f32, Cuda, T>) -> &CudaSlice<f32> {
    Tensorlike::data(t).expect("a tensor holds its data")
}

/// Row-major `c[m×n] (+)= a[m×k] · op(b)`, where `b_t` says `b` is stored `[n×k]` (so `op = ᵀ`)
/// rather than `[k×n]`. cuBLAS is column-major: a row-major `X` is its column-major `Xᵀ`, so this
/// computes `cᵀ = op(b)ᵀ · aᵀ`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    blas: &cudarc::cublas::CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: &A,
    b: &B,
    b_t: bool,
    c: &mut C,
    alpha: f32,
    beta: f32,
) -> Result<(), CudaError> {
    let cfg = GemmConfig {
        transa: if b_t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N },
        transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha,
        lda: if b_t { k as i32 } else { n as i32 },
        ldb: k as i32,
        beta,
        ldc: n as i32,
    };
    blas.gemm(cfg, b, a, c)?;
    Ok(())
}

/// Turns cuBLAS TF32 tensor-op math on or off for `dev`'s f32 products.
pub(crate) fn set_tf32(dev: &Cuda, on: bool) {
    let mode = if on {
        blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
    } else {
        blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
    };
    // SAFETY: the handle is the device's live cuBLAS handle; setting its math mode is always valid.
    let status = unsafe { blas_sys::cublasSetMathMode(*dev.cuda_blas().handle(), mode) };
    assert_eq!(status, blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS, "cublasSetMathMode");
}

/// The backward of `y = x · Wᵀ` for a frozen `W: [o, i]`: `dx[n×i] += dy[n×o] · W`.
pub(crate) fn frozen_backward(
    dev: &Cuda,
    dx: &mut CudaSlice<f32>,
    dy: &Tensor<(usize, usize), f32, Cuda>,
    w: &Tensor<(usize, usize), f32, Cuda>,
) -> Result<(), CudaError> {
    let (n, o) = *dy.shape();
    let i = w.shape().1;
    // SAFETY: dy is [n×o], w is [o×i] row-major and contiguous (callers pass fresh/contiguous
    // tensors), dx holds n×i floats.
    unsafe { gemm_rm(dev.cuda_blas(), n, i, o, buf(dy), buf(w), false, dx, 1.0, 1.0) }
}

/// Tokens per chunk: the chunk's logits `[chunk, vocab]` stay under 512 MiB.
fn chunk_rows(vocab: usize) -> usize {
    ((512usize << 20) / 4 / vocab.max(1)).clamp(1, 4096)
}

/// Fused head log-probs on CUDA (module docs): returns `lp [n]` and `u [n, hidden]`.
pub(crate) fn head_logprobs(
    dev: &Cuda,
    h: &Tensor<(usize, usize), f32, Cuda>,
    w: &Tensor<(usize,), f32, Cuda>,
    vocab: usize,
    targets: &[usize],
    needed: &[bool],
) -> Result<(CudaSlice<f32>, CudaSlice<f32>), CudaError> {
    let cu = dev.cuda_device();
    module(cu)?;
    let (n, hidden) = *h.shape();
    let y: Vec<u64> = targets.iter().map(|&t| t as u64).collect();
    let need: Vec<u8> = needed.iter().map(|&k| u8::from(k)).collect();
    let y = cu.htod_copy(y)?;
    let need = cu.htod_copy(need)?;
    let mut lp = cu.alloc_zeros::<f32>(n)?;
    let mut u = cu.alloc_zeros::<f32>(n * hidden)?;
    let c = chunk_rows(vocab).min(n);
    let mut s = cu.alloc_zeros::<f32>(c * vocab)?;
    let (hb, wb) = (buf(h), buf(w));
    let mut r0 = 0;
    while r0 < n {
        let rows = c.min(n - r0);
        let hc = hb.slice(r0 * hidden..(r0 + rows) * hidden);
        let mut sc = s.slice_mut(..rows * vocab);
        // SAFETY: hc is [rows×hidden], w is [vocab×hidden] (so `ᵀ`), sc holds rows×vocab.
        unsafe { gemm_rm(dev.cuda_blas(), rows, vocab, hidden, &hc, wb, true, &mut sc, 1.0, 0.0)? };
        let f = cu.get_func(MODULE, "row_logsoftmax").expect("loaded");
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let (yc, nc) = (y.slice(r0..r0 + rows), need.slice(r0..r0 + rows));
        let mut lpc = lp.slice_mut(r0..r0 + rows);
        // SAFETY: the kernel reads rows×vocab of sc, rows of yc/nc, writes rows of lpc.
        unsafe { f.launch(cfg, (&mut sc, &yc, &nc, &mut lpc, rows as u64, vocab as u64))? };
        let mut uc = u.slice_mut(r0 * hidden..(r0 + rows) * hidden);
        // uc[rows×hidden] = -P[rows×vocab] · W[vocab×hidden]
        // SAFETY: shapes as stated; sc now holds P.
        unsafe { gemm_rm(dev.cuda_blas(), rows, hidden, vocab, &sc, wb, false, &mut uc, -1.0, 0.0)? };
        let f = cu.get_func(MODULE, "add_target_rows").expect("loaded");
        // SAFETY: reads w rows at y (< vocab, checked by the caller), writes rows×hidden of uc.
        unsafe {
            f.launch(
                LaunchConfig::for_num_elems((rows * hidden) as u32),
                (&mut uc, wb, &yc, &nc, rows as u64, hidden as u64),
            )?
        };
        r0 += rows;
    }
    Ok((lp, u))
}

/// `dst[t] += g[t] · u[t]` over `[rows, h]`.
pub(crate) fn scale_rows_add(
    dev: &Cuda,
    dst: &mut CudaSlice<f32>,
    u: &CudaSlice<f32>,
    g: &Tensor<(usize,), f32, Cuda>,
) -> Result<(), CudaError> {
    let cu = dev.cuda_device();
    module(cu)?;
    let rows = g.shape().0;
    let h = u.len() / rows.max(1);
    let f = cu.get_func(MODULE, "scale_rows_add").expect("loaded");
    // SAFETY: dst and u hold rows×h floats, g holds rows.
    unsafe { f.launch(LaunchConfig::for_num_elems((rows * h) as u32), (dst, u, buf(g), rows as u64, h as u64))? };
    Ok(())
}
