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
//! - [`Bf16Weight`]: a frozen weight held as bf16 on the device (`torch_dtype = "bfloat16"`), and
//!   its products on tensor cores with cuBLAS `GemmEx` (bf16 inputs, f32 accumulate and output;
//!   the f32 activation is rounded to bf16 by a small kernel first, as autocast does):
//!   [`bf16_linear`] (`y = x·Wᵀ`), [`bf16_dx`] (`dx += dy·W`), [`bf16_gather`] (embedding rows)
//!   and [`head_logprobs_bf16`] (the fused head over a bf16 `W`).
//!
//! Failures are returned, never panicked: NVRTC compile errors as [`KernelError::Nvrtc`], driver
//! and cuBLAS errors (out of memory included) as dfdx's [`CudaError`].

use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, Gemm, GemmConfig};
use cudarc::driver::{CudaDevice, CudaSlice, DevicePtr, DevicePtrMut, DeviceSlice, LaunchAsync, LaunchConfig};
use dfdx::prelude::*;
use dfdx::tensor::Tensorlike;

const MODULE: &str = "pipeline_kernels";
const FUNCS: &[&str] = &[
    "row_logsoftmax",
    "row_logsoftmax_bf16",
    "add_target_rows",
    "add_target_rows_bf16",
    "scale_rows_add",
    "f32_to_bf16",
    "bf16_to_f32",
    "gather_bf16",
    "add_into",
    "swiglu_fwd",
    "swiglu_bwd",
    "dropout_keep",
    "rms_fwd",
    "rms_dx",
    "rms_dw",
    "rope_fwd",
    "rope_dx",
];
/// Device helpers shared by the kernel modules (this one and [`super::mlp`]'s): bf16 as its 16
/// bits, and the dropout keep-mask hash.
pub(crate) const PRELUDE: &str = r#"
// bf16 as its 16 bits (no cuda_bf16.h: NVRTC runs without the toolkit's headers on the device)
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u); // quiet NaN
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                // round to nearest even
}
__device__ __forceinline__ float bf2f(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

// inverted dropout's keep factor for element i: 0 with probability p, else keep = 1 / (1 - p),
// from a counter-based hash of (seed, i) (splitmix64), so a recomputed forward draws the same mask
__device__ __forceinline__ float keep_factor(unsigned long long seed, unsigned long long i, float p, float keep) {
    unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float r = (float)(z >> 40) * (1.f / 16777216.f);
    return r < p ? 0.f : keep;
}
"#;

const SRC: &str = r#"

// log-sum-exp of one row, by the whole block (blockDim.x a multiple of 32, at most 1024)
__device__ float row_lse(const float* row, unsigned long long v) {
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
    __syncthreads();
    return lse;
}

extern "C" __global__ void row_logsoftmax(float* s, const unsigned long long* y, const unsigned char* need,
                                          float* lp, unsigned long long rows, unsigned long long v) {
    // one block per row; s is [rows, v]; writes lp[row] and s = softmax(s)
    unsigned long long r = blockIdx.x;
    if (r >= rows) return;
    float* row = s + r * v;
    float lse = row_lse(row, v);
    if (threadIdx.x == 0) lp[r] = need[r] ? row[y[r]] - lse : 0.f;
    __syncthreads(); // row[y] is read before the row is overwritten
    for (unsigned long long j = threadIdx.x; j < v; j += blockDim.x) row[j] = __expf(row[j] - lse);
}

extern "C" __global__ void row_logsoftmax_bf16(const float* s, const unsigned long long* y, const unsigned char* need,
                                               float* lp, unsigned short* p, unsigned long long rows,
                                               unsigned long long v) {
    // as row_logsoftmax, but P = softmax(s) goes to p [rows, v] as bf16 (the next product's input)
    unsigned long long r = blockIdx.x;
    if (r >= rows) return;
    const float* row = s + r * v;
    unsigned short* prow = p + r * v;
    float lse = row_lse(row, v);
    if (threadIdx.x == 0) lp[r] = need[r] ? row[y[r]] - lse : 0.f;
    for (unsigned long long j = threadIdx.x; j < v; j += blockDim.x) prow[j] = f2bf(__expf(row[j] - lse));
}

extern "C" __global__ void add_target_rows_bf16(float* u, const unsigned short* w, const unsigned long long* y,
                                                const unsigned char* need, unsigned long long rows,
                                                unsigned long long h) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= rows * h) return;
    unsigned long long r = i / h, k = i % h;
    u[i] = need[r] ? u[i] + bf2f(w[y[r] * h + k]) : 0.f;
}

extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        y[i] = f2bf(x[i]);
}

extern "C" __global__ void bf16_to_f32(const unsigned short* x, float* y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        y[i] = bf2f(x[i]);
}

extern "C" __global__ void add_into(float* dst, const float* src, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] += src[i];
}

extern "C" __global__ void gather_bf16(const unsigned short* w, const unsigned long long* ids, float* out,
                                       unsigned long long n, unsigned long long h) {
    // out[t][k] = w[ids[t]][k]
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n * h;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = bf2f(w[ids[i / h] * h + i % h]);
}

// SwiGLU's gate: h = silu(g) * u = g * sigmoid(g) * u, and its two input gradients
extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* h, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float x = g[i];
        h[i] = x / (1.f + __expf(-x)) * u[i];
    }
}

extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* dh, float* dg, float* du,
                                       unsigned long long n) {
    // dg += dh u silu'(g), silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))); du += dh silu(g)
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float x = g[i], s = 1.f / (1.f + __expf(-x)), d = dh[i];
        dg[i] += d * u[i] * s * (1.f + x * (1.f - s));
        du[i] += d * x * s;
    }
}

// inverted dropout's keep mask (keep_factor of every element)
extern "C" __global__ void dropout_keep(float* m, unsigned long long n, unsigned long long seed, float p, float keep) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        m[i] = keep_factor(seed, i, p, keep);
}

// RMSNorm over rows of h: y = x * inv * w, inv = 1 / sqrt(mean(x^2) + eps); one warp per row,
// inv kept for the backward
extern "C" __global__ void rms_fwd(const float* x, const float* w, float* y, float* inv, unsigned long long n,
                                   int h, float eps) {
    unsigned long long row = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const float* xr = x + row * h;
    float ss = 0.f;
    for (int c = lane; c < h; c += 32) ss += xr[c] * xr[c];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    float r = 1.f / sqrtf(ss / (float)h + eps);
    float* yr = y + row * h;
    for (int c = lane; c < h; c += 32) yr[c] = xr[c] * r * w[c];
    if (lane == 0) inv[row] = r;
}

// dx += inv * dy * w - x * inv^3 * mean(dy * w * x); one warp per row
extern "C" __global__ void rms_dx(const float* x, const float* w, const float* inv, const float* dy, float* dx,
                                  unsigned long long n, int h) {
    unsigned long long row = (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const float* xr = x + row * h;
    const float* gr = dy + row * h;
    float dot = 0.f;
    for (int c = lane; c < h; c += 32) dot += gr[c] * w[c] * xr[c];
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    float r = inv[row], k = r * r * r * dot / (float)h;
    float* dr = dx + row * h;
    for (int c = lane; c < h; c += 32) dr[c] += r * gr[c] * w[c] - xr[c] * k;
}

// dw[c] += sum over rows of dy * x * inv: each block sums 64 rows of 256 columns, one atomic add
// per column per block
extern "C" __global__ void rms_dw(const float* x, const float* inv, const float* dy, float* dw,
                                  unsigned long long n, int h) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    unsigned long long r0 = (unsigned long long)blockIdx.y * 64, r1 = r0 + 64 < n ? r0 + 64 : n;
    float acc = 0.f;
    for (unsigned long long r = r0; r < r1; ++r) acc += dy[r * h + c] * x[r * h + c] * inv[r];
    atomicAdd(dw + c, acc);
}

// rotary embedding (rotate-half convention) of rows [n, heads * hd] with per-row tables
// cos, sin [n, hd]: y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half])
extern "C" __global__ void rope_fwd(const float* x, const float* cs, const float* sn, float* y,
                                    unsigned long long total, int width, int hd) {
    int half = hd / 2;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / width;
        int d = (int)(i % width) % hd;
        float rot = d < half ? -x[i + half] : x[i - half];
        y[i] = x[i] * cs[r * hd + d] + rot * sn[r * hd + d];
    }
}

// its backward: dx += dy * cos + rotate_half^T(dy * sin), rotate_half^T(z) = (z[half:], -z[:half])
extern "C" __global__ void rope_dx(const float* dy, const float* cs, const float* sn, float* dx,
                                   unsigned long long total, int width, int hd) {
    int half = hd / 2;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / width;
        int d = (int)(i % width) % hd;
        float rt = d < half ? dy[i + half] * sn[r * hd + d + half] : -dy[i - half] * sn[r * hd + d - half];
        dx[i] += dy[i] * cs[r * hd + d] + rt;
    }
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

/// A failure of this module's kernels: dfdx's [`CudaError`] has no variant for an NVRTC compile
/// error, so the forward entry points return this (the tape's backward ops, which must return
/// [`CudaError`], only run after their forward loaded the module).
#[derive(Debug, thiserror::Error)]
pub(crate) enum KernelError {
    #[error("compiling the CUDA kernels with NVRTC failed: {0}")]
    Nvrtc(String),
    // dfdx's CudaError implements Display but not std::error::Error, so it is no `#[source]`
    #[error("CUDA: {0}")]
    Cuda(CudaError),
}

impl From<CudaError> for KernelError {
    fn from(e: CudaError) -> Self {
        KernelError::Cuda(e)
    }
}

impl From<cudarc::driver::DriverError> for KernelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        KernelError::Cuda(CudaError::Driver(e))
    }
}

/// Compiles and loads the kernels once per device.
pub(crate) fn module(dev: &Arc<CudaDevice>) -> Result<(), KernelError> {
    if !dev.has_func(MODULE, FUNCS[0]) {
        keep_pool_memory(dev)?;
        let ptx =
            cudarc::nvrtc::compile_ptx(format!("{PRELUDE}{SRC}")).map_err(|e| KernelError::Nvrtc(e.to_string()))?;
        dev.load_ptx(ptx, MODULE, FUNCS)?;
    }
    Ok(())
}

/// Keeps freed memory in the device's default memory pool. cudarc allocates stream-ordered
/// (`cuMemAllocAsync`), and the pool's default release threshold (0) hands every freed byte back
/// to the driver at each synchronisation — once per training step at least — so each step would
/// map its kernels' temporaries again. PyTorch's caching allocator keeps them; so does this.
fn keep_pool_memory(dev: &Arc<CudaDevice>) -> Result<(), KernelError> {
    use cudarc::driver::sys;
    let mut cu_dev = 0;
    let mut pool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver queries on a valid ordinal; the attribute takes a u64 by pointer.
    unsafe {
        sys::cuDeviceGet(&mut cu_dev, dev.ordinal() as i32).result()?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()?;
    }
    Ok(())
}

/// A kernel of the loaded module (`CUDA_ERROR_NOT_FOUND` if [`module`] never ran on `dev`).
pub(crate) fn func(dev: &Arc<CudaDevice>, name: &str) -> Result<cudarc::driver::CudaFunction, CudaError> {
    dev.get_func(MODULE, name)
        .ok_or(CudaError::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_FOUND)))
}

/// A launch over `n` elements for the grid-stride kernels.
pub(crate) fn elems(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The CUDA buffer of a tensor.
fn buf<S: Shape, T>(t: &Tensor<S, f32, Cuda, T>) -> &CudaSlice<f32> {
    Tensorlike::data(t).expect("a tensor holds its data")
}

/// The raw device address of a slice (for cuBLAS and our kernels' pointer arguments).
pub(crate) fn ptr<T, P: DevicePtr<T>>(p: &P) -> u64 {
    *p.device_ptr()
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
) -> Result<(CudaSlice<f32>, CudaSlice<f32>), KernelError> {
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
        let f = func(cu, "row_logsoftmax")?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let (yc, nc) = (y.slice(r0..r0 + rows), need.slice(r0..r0 + rows));
        let mut lpc = lp.slice_mut(r0..r0 + rows);
        // SAFETY: the kernel reads rows×vocab of sc, rows of yc/nc, writes rows of lpc.
        unsafe { f.launch(cfg, (&mut sc, &yc, &nc, &mut lpc, rows as u64, vocab as u64))? };
        let mut uc = u.slice_mut(r0 * hidden..(r0 + rows) * hidden);
        // uc[rows×hidden] = -P[rows×vocab] · W[vocab×hidden]
        // SAFETY: shapes as stated; sc now holds P.
        unsafe { gemm_rm(dev.cuda_blas(), rows, hidden, vocab, &sc, wb, false, &mut uc, -1.0, 0.0)? };
        let f = func(cu, "add_target_rows")?;
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
    let rows = g.shape().0;
    let h = u.len() / rows.max(1);
    let f = func(cu, "scale_rows_add")?;
    // SAFETY: dst and u hold rows×h floats, g holds rows.
    unsafe { f.launch(LaunchConfig::for_num_elems((rows * h) as u32), (dst, u, buf(g), rows as u64, h as u64))? };
    Ok(())
}

// ---------------------------------------------------------------- bf16 frozen weights

/// A frozen weight held as bf16 on the device (its 16-bit patterns), with the device it lives on.
/// Cloning shares the buffer.
#[derive(Clone)]
pub(crate) struct Bf16Weight {
    data: Arc<CudaSlice<u16>>,
    dev: Cuda,
}

// SAFETY: dfdx's `Cuda` is not `Send` only because it holds a cudarc stream handle (a raw
// pointer). A `Bf16Weight` exists only inside a `Qwen2<Cuda>`, which stays `!Send` through its own
// `Cuda` device and tensors; these impls keep the weight type from making every `Qwen2<D>` (the
// CPU model the server's engine thread owns in a CUDA build) `!Send`. Every use of the buffer
// goes through cudarc calls that bind the device's context to the calling thread first.
unsafe impl Send for Bf16Weight {}
unsafe impl Sync for Bf16Weight {}

impl std::fmt::Debug for Bf16Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Weight({} values)", self.data.len())
    }
}

/// `x` rounded to the nearest bf16 (ties to even; NaN stays NaN), as the device kernel does.
pub(crate) fn f32_to_bf16_host(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

impl Bf16Weight {
    /// Rounds host values to bf16 and uploads them (no f32 copy on the device).
    pub(crate) fn from_host(dev: &Cuda, values: &[f32]) -> Result<Self, KernelError> {
        let cu = dev.cuda_device();
        module(cu)?;
        let bits: Vec<u16> = values.iter().map(|&v| f32_to_bf16_host(v)).collect();
        Ok(Bf16Weight { data: Arc::new(cu.htod_copy(bits)?), dev: dev.clone() })
    }

    /// Uploads bf16 bits as they are (a bf16 checkpoint's bytes: no rounding, no f32 copy).
    pub(crate) fn from_bits(dev: &Cuda, bits: &[u16]) -> Result<Self, KernelError> {
        let cu = dev.cuda_device();
        module(cu)?;
        Ok(Bf16Weight { data: Arc::new(cu.htod_sync_copy(bits)?), dev: dev.clone() })
    }

    /// Rounds an f32 device vector to bf16 on the device.
    pub(crate) fn from_device(t: &Tensor<(usize,), f32, Cuda>) -> Result<Self, KernelError> {
        let dev = t.device().clone();
        let cu = dev.cuda_device();
        module(cu)?;
        let data = to_bf16(cu, ptr(buf(t)), t.shape().0)?;
        Ok(Bf16Weight { data: Arc::new(data), dev })
    }

    pub(crate) fn len(&self) -> usize {
        self.data.len()
    }

    /// The device address of the bits (`len()` u16 values).
    pub(crate) fn addr(&self) -> u64 {
        ptr(&*self.data)
    }

    pub(crate) fn device(&self) -> &Cuda {
        &self.dev
    }

    /// The values widened to f32 on the device (for the reference paths and full fine-tuning).
    pub(crate) fn to_f32(&self) -> Result<Tensor<(usize,), f32, Cuda>, KernelError> {
        let cu = self.dev.cuda_device();
        let n = self.len();
        // SAFETY: every element is written by the kernel below.
        let mut out = unsafe { cu.alloc::<f32>(n)? };
        let f = func(cu, "bf16_to_f32")?;
        // SAFETY: reads n u16, writes n f32.
        unsafe { f.launch(elems(n), (ptr(&*self.data), ptr(&out), n as u64))? };
        let _ = &mut out;
        Ok(self.dev.build_tensor((n,), [1], out))
    }

    /// The values widened to f32 on the host.
    pub(crate) fn to_host(&self) -> Result<Vec<f32>, KernelError> {
        let bits = self.dev.cuda_device().dtoh_sync_copy(&*self.data)?;
        Ok(bits.into_iter().map(|b| f32::from_bits(u32::from(b) << 16)).collect())
    }
}

/// `n` f32 values at device address `x` rounded to a fresh bf16 buffer.
pub(crate) fn to_bf16(cu: &Arc<CudaDevice>, x: u64, n: usize) -> Result<CudaSlice<u16>, CudaError> {
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { cu.alloc::<u16>(n)? };
    let f = func(cu, "f32_to_bf16")?;
    // SAFETY: reads n f32 at x, writes n u16.
    unsafe { f.launch(elems(n), (x, ptr(&out), n as u64))? };
    Ok(out)
}

/// The first `n` values of `x` rounded to a fresh bf16 buffer (loads the module first).
pub(crate) fn to_bf16_buf(cu: &Arc<CudaDevice>, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>, KernelError> {
    assert!(n <= x.len(), "to_bf16_buf: {n} values of a buffer of {}", x.len());
    module(cu)?;
    Ok(to_bf16(cu, ptr(x), n)?)
}

/// Row-major `c[m×n] = alpha · op(a) · op(b) + beta · c` with `a`, `b` bf16 and `c` f32, or bf16
/// when `c_bf16` (cuBLAS `GemmEx`, f32 compute: tensor cores); `a_t`: `a` is stored `[k×m]`,
/// `b_t`: `b` is stored `[n×k]`. Same column-major trick as [`sgemm_rm`].
///
/// # Safety
/// The addresses must hold the stated shapes on `blas`'s device.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm16_rm(
    blas: &cudarc::cublas::CudaBlas,
    (m, n, k): (usize, usize, usize),
    (a, a_t): (u64, bool),
    (b, b_t): (u64, bool),
    (c, c_bf16): (u64, bool),
    alpha: f32,
    beta: f32,
) -> Result<(), CudaError> {
    use blas_sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    blas_sys::cublasGemmEx(
        *blas.handle(),
        op(b_t),
        op(a_t),
        n as i32,
        m as i32,
        k as i32,
        (&alpha as *const f32).cast(),
        b as *const std::ffi::c_void,
        cudaDataType_t::CUDA_R_16BF,
        if b_t { k as i32 } else { n as i32 },
        a as *const std::ffi::c_void,
        cudaDataType_t::CUDA_R_16BF,
        if a_t { m as i32 } else { k as i32 },
        (&beta as *const f32).cast(),
        c as *mut std::ffi::c_void,
        if c_bf16 { cudaDataType_t::CUDA_R_16BF } else { cudaDataType_t::CUDA_R_32F },
        n as i32,
        cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .result()
    .map_err(CudaError::Blas)
}

/// `y[n×o] = bf16(x[n×i]) · Wᵀ` for a frozen bf16 `W: [o, i]`; `x` is contiguous f32.
pub(crate) fn bf16_linear(
    x: &CudaSlice<f32>,
    n: usize,
    i: usize,
    w: &Bf16Weight,
    o: usize,
) -> Result<CudaSlice<f32>, CudaError> {
    let cu = w.dev.cuda_device();
    let x16 = to_bf16(cu, ptr(x), n * i)?;
    // SAFETY: written whole by the product (beta = 0).
    let y = unsafe { cu.alloc::<f32>(n * o)? };
    // SAFETY: x16 is [n×i], W is [o×i] (so `ᵀ`), y holds n×o.
    unsafe {
        gemm16_rm(w.dev.cuda_blas(), (n, o, i), (ptr(&x16), false), (w.addr(), true), (ptr(&y), false), 1.0, 0.0)?
    };
    Ok(y)
}

/// The backward of [`bf16_linear`]: `dx[n×i] += bf16(dy[n×o]) · W`.
pub(crate) fn bf16_dx(
    dx: &mut CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    n: usize,
    o: usize,
    w: &Bf16Weight,
    i: usize,
) -> Result<(), CudaError> {
    let cu = w.dev.cuda_device();
    let dy16 = to_bf16(cu, ptr(dy), n * o)?;
    // SAFETY: dy16 is [n×o], W is [o×i], dx holds n×i f32.
    unsafe {
        gemm16_rm(w.dev.cuda_blas(), (n, i, o), (ptr(&dy16), false), (w.addr(), false), (ptr(dx), false), 1.0, 1.0)
    }
}

/// `h = silu(g) · u` over `n` elements (SwiGLU's gate, one pass instead of three dfdx ops).
pub(crate) fn swiglu_forward(
    dev: &Cuda,
    g: &CudaSlice<f32>,
    u: &CudaSlice<f32>,
    n: usize,
) -> Result<CudaSlice<f32>, KernelError> {
    let cu = dev.cuda_device();
    module(cu)?;
    // SAFETY: written whole by the kernel.
    let h = unsafe { cu.alloc::<f32>(n)? };
    // SAFETY: g, u and h hold n floats.
    unsafe { func(cu, "swiglu_fwd")?.launch(elems(n), (ptr(g), ptr(u), ptr(&h), n as u64))? };
    Ok(h)
}

/// The backward of [`swiglu_forward`] in one pass: `dg += dh · u · silu'(g)` and
/// `du += dh · silu(g)` at the device addresses `dg`, `du` (n floats each).
pub(crate) fn swiglu_backward(
    dev: &Cuda,
    g: &CudaSlice<f32>,
    u: &CudaSlice<f32>,
    dh: &CudaSlice<f32>,
    dg: u64,
    du: u64,
) -> Result<(), CudaError> {
    let cu = dev.cuda_device();
    let n = g.len();
    // SAFETY: every buffer holds n floats (the module was loaded by the forward).
    unsafe { func(cu, "swiglu_bwd")?.launch(elems(n), (ptr(g), ptr(u), ptr(dh), dg, du, n as u64))? };
    Ok(())
}

/// An inverted-dropout keep mask of `n` values drawn on the device from `seed` (0 with
/// probability `p`, else `1 / (1 - p)`): the host draws and uploads nothing.
pub(crate) fn dropout_keep(dev: &Cuda, n: usize, p: f32, seed: u64) -> Result<CudaSlice<f32>, KernelError> {
    let cu = dev.cuda_device();
    module(cu)?;
    // SAFETY: written whole by the kernel.
    let m = unsafe { cu.alloc::<f32>(n)? };
    let keep = 1.0 / (1.0 - p);
    // SAFETY: m holds n floats.
    unsafe { func(cu, "dropout_keep")?.launch(elems(n), (ptr(&m), n as u64, seed, p, keep))? };
    Ok(m)
}

/// Row-major f32 `c[m×n] = alpha · op(a) · op(b) + beta · c` on raw device addresses, where
/// `a_t` says `a` is stored `[k×m]` (so `op = ᵀ`) rather than `[m×k]`, and `b_t` that `b` is
/// stored `[n×k]` rather than `[k×n]` (cuBLAS SGEMM on the column-major transposes; TF32 when
/// [`set_tf32`] turned it on).
///
/// # Safety
/// The addresses must hold the stated shapes on `blas`'s device.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_rm(
    blas: &cudarc::cublas::CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    a_t: bool,
    b: u64,
    b_t: bool,
    c: u64,
    alpha: f32,
    beta: f32,
) -> Result<(), CudaError> {
    use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    blas_sys::cublasSgemm_v2(
        *blas.handle(),
        if b_t { CUBLAS_OP_T } else { CUBLAS_OP_N },
        if a_t { CUBLAS_OP_T } else { CUBLAS_OP_N },
        n as i32,
        m as i32,
        k as i32,
        &alpha,
        b as *const f32,
        if b_t { k as i32 } else { n as i32 },
        a as *const f32,
        if a_t { m as i32 } else { k as i32 },
        &beta,
        c as *mut f32,
        n as i32,
    )
    .result()
    .map_err(CudaError::Blas)
}

/// Where a LoRA adapter's `A: [r, i]` and `B: [o, r]` sit in the trained vector.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoraSlots {
    pub a: usize,
    pub b: usize,
    pub r: usize,
    pub scale: f32,
}

/// The forward of a LoRA projection over a frozen bf16 base, in three products and no
/// element-wise pass: `y = bf16(x)·Wᵀ` (tensor cores), `t = xa·Aᵀ`, `y += scale · t·Bᵀ` (SGEMM
/// accumulating into `y`). `xa` is `x`, or `x` with the LoRA dropout mask applied. Returns `y`
/// `[n×o]` and `t` `[n×r]` (kept for the backward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_bf16_forward(
    x: &CudaSlice<f32>,
    xa: &CudaSlice<f32>,
    n: usize,
    i: usize,
    w: &Bf16Weight,
    o: usize,
    flat: &CudaSlice<f32>,
    lo: LoraSlots,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>), CudaError> {
    let y = bf16_linear(x, n, i, w, o)?;
    let cu = w.dev.cuda_device();
    // SAFETY: written whole by the product (beta = 0).
    let t = unsafe { cu.alloc::<f32>(n * lo.r)? };
    let blas = w.dev.cuda_blas();
    let base = ptr(flat);
    // SAFETY: xa is [n×i]; A = flat[a..a + r·i] is [r×i] (so `ᵀ`); t holds n×r. B = flat[b..b + o·r]
    // is [o×r] (so `ᵀ`); y holds n×o and is accumulated into (beta = 1).
    unsafe {
        sgemm_rm(blas, n, lo.r, i, ptr(xa), false, base + 4 * lo.a as u64, true, ptr(&t), 1.0, 0.0)?;
        sgemm_rm(blas, n, o, lo.r, ptr(&t), false, base + 4 * lo.b as u64, true, ptr(&y), lo.scale, 1.0)?;
    }
    Ok((y, t))
}

/// The adapters' part of the backward of [`lora_bf16_forward`]: `u = dy·B` `[n×r]`,
/// `dB += scale · dyᵀ·t` and `dA += scale · uᵀ·xa` into the trained vector's gradient `dflat`.
/// Returns `u` for [`lora_bf16_backward_dx`]; the base's `dx += bf16(dy)·W` is [`bf16_dx`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_bf16_backward_params(
    dev: &Cuda,
    dy: &CudaSlice<f32>,
    xa: &CudaSlice<f32>,
    t: &CudaSlice<f32>,
    flat: &CudaSlice<f32>,
    dflat: &mut CudaSlice<f32>,
    (n, i, o): (usize, usize, usize),
    lo: LoraSlots,
) -> Result<CudaSlice<f32>, CudaError> {
    let blas = dev.cuda_blas();
    // SAFETY: written whole by the product (beta = 0).
    let u = unsafe { dev.cuda_device().alloc::<f32>(n * lo.r)? };
    let (base, gbase) = (ptr(flat), ptr(dflat));
    // SAFETY: dy [n×o], B [o×r], u [n×r]; dB [o×r] = dyᵀ [o×n] · t [n×r]; dA [r×i] = uᵀ [r×n] ·
    // xa [n×i]. Offsets are f32 elements of the flat vector (4 bytes each).
    unsafe {
        sgemm_rm(blas, n, lo.r, o, ptr(dy), false, base + 4 * lo.b as u64, false, ptr(&u), 1.0, 0.0)?;
        sgemm_rm(blas, o, lo.r, n, ptr(dy), true, ptr(t), false, gbase + 4 * lo.b as u64, lo.scale, 1.0)?;
        sgemm_rm(blas, lo.r, i, n, ptr(&u), true, ptr(xa), false, gbase + 4 * lo.a as u64, lo.scale, 1.0)?;
    }
    Ok(u)
}

/// `dxa[n×i] += scale · u·A` (the LoRA branch's input gradient; `u` from
/// [`lora_bf16_backward_params`]).
pub(crate) fn lora_bf16_backward_dx(
    dev: &Cuda,
    u: &CudaSlice<f32>,
    flat: &CudaSlice<f32>,
    dxa: &mut CudaSlice<f32>,
    (n, i): (usize, usize),
    lo: LoraSlots,
) -> Result<(), CudaError> {
    // SAFETY: u [n×r], A = flat[a..a + r·i] [r×i], dxa holds n×i and is accumulated into.
    unsafe {
        sgemm_rm(
            dev.cuda_blas(),
            n,
            i,
            lo.r,
            ptr(u),
            false,
            ptr(flat) + 4 * lo.a as u64,
            false,
            ptr(dxa),
            lo.scale,
            1.0,
        )
    }
}

/// Rows `ids` of a bf16 table `[_, h]`, widened to f32 `[ids.len(), h]`.
pub(crate) fn bf16_gather(w: &Bf16Weight, ids: &[usize], h: usize) -> Result<CudaSlice<f32>, KernelError> {
    let cu = w.dev.cuda_device();
    module(cu)?;
    let n = ids.len();
    let idx = cu.htod_copy(ids.iter().map(|&i| i as u64).collect::<Vec<u64>>())?;
    // SAFETY: written whole by the kernel.
    let out = unsafe { cu.alloc::<f32>(n * h)? };
    let f = func(cu, "gather_bf16")?;
    // SAFETY: ids are < rows of w (checked by the caller against the vocabulary), out holds n×h.
    unsafe { f.launch(elems(n * h), (ptr(&*w.data), ptr(&idx), ptr(&out), n as u64, h as u64))? };
    Ok(out)
}

/// [`head_logprobs`] over a bf16 head: `S = bf16(H_c)·Wᵀ` and `u = W[y] − bf16(P)·W` on tensor
/// cores, the log-softmax in f32. Returns `lp [n]` and `u [n, hidden]` (f32).
pub(crate) fn head_logprobs_bf16(
    h: &CudaSlice<f32>,
    hidden: usize,
    w: &Bf16Weight,
    vocab: usize,
    targets: &[usize],
    needed: &[bool],
) -> Result<(CudaSlice<f32>, CudaSlice<f32>), KernelError> {
    let (dev, cu) = (&w.dev, w.dev.cuda_device());
    module(cu)?;
    let n = targets.len();
    let y = cu.htod_copy(targets.iter().map(|&t| t as u64).collect::<Vec<u64>>())?;
    let need = cu.htod_copy(needed.iter().map(|&k| u8::from(k)).collect::<Vec<u8>>())?;
    let h16 = to_bf16(cu, ptr(h), n * hidden)?;
    let mut lp = cu.alloc_zeros::<f32>(n)?;
    let mut u = cu.alloc_zeros::<f32>(n * hidden)?;
    let c = chunk_rows(vocab).min(n).max(1);
    // SAFETY: each chunk's rows are written by the product before they are read.
    let s = unsafe { cu.alloc::<f32>(c * vocab)? };
    // SAFETY: as above, written by the softmax kernel before the second product reads it.
    let p = unsafe { cu.alloc::<u16>(c * vocab)? };
    let wb = ptr(&*w.data);
    let (soft, target) = (func(cu, "row_logsoftmax_bf16")?, func(cu, "add_target_rows_bf16")?);
    let mut r0 = 0;
    while r0 < n {
        let rows = c.min(n - r0);
        let uc = ptr(&u) + (r0 * hidden * 4) as u64;
        // SAFETY: h16 rows r0.. are [rows×hidden] bf16, W [vocab×hidden] (so `ᵀ`), s holds rows×vocab.
        unsafe {
            let h = ptr(&h16) + (r0 * hidden * 2) as u64;
            gemm16_rm(dev.cuda_blas(), (rows, vocab, hidden), (h, false), (wb, true), (ptr(&s), false), 1.0, 0.0)?
        };
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let (yc, nc, lpc) = (ptr(&y) + (r0 * 8) as u64, ptr(&need) + r0 as u64, ptr(&lp) + (r0 * 4) as u64);
        // SAFETY: reads rows×vocab of s and rows of yc/nc, writes rows of lpc and rows×vocab of p.
        unsafe { soft.clone().launch(cfg, (ptr(&s), yc, nc, lpc, ptr(&p), rows as u64, vocab as u64))? };
        // uc[rows×hidden] = -P[rows×vocab] · W[vocab×hidden]
        // SAFETY: shapes as stated.
        unsafe {
            gemm16_rm(dev.cuda_blas(), (rows, hidden, vocab), (ptr(&p), false), (wb, false), (uc, false), -1.0, 0.0)?
        };
        // SAFETY: reads W rows at y (< vocab, checked by the caller), writes rows×hidden of uc.
        unsafe {
            target.clone().launch(
                LaunchConfig::for_num_elems((rows * hidden) as u32),
                (uc, wb, yc, nc, rows as u64, hidden as u64),
            )?
        };
        r0 += rows;
    }
    let _ = (&mut lp, &mut u);
    Ok((lp, u))
}

/// One warp per row, 8 rows per block.
fn warp_rows(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// RMSNorm of `n` rows of `h` (`x` at device address `x`, weight `w` `[h]`): `(y, inv)`, `inv`
/// the per-row `1 / rms` the backward needs.
pub(crate) fn rms_norm_forward(
    cu: &Arc<CudaDevice>,
    x: u64,
    w: u64,
    n: usize,
    h: usize,
    eps: f32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>), KernelError> {
    module(cu)?;
    // SAFETY: written whole by the kernel (every row, every column; one inv per row).
    let (y, inv) = unsafe { (cu.alloc::<f32>(n * h)?, cu.alloc::<f32>(n)?) };
    // SAFETY: x holds n·h floats, w h floats; one warp per row stays below n.
    unsafe { func(cu, "rms_fwd")?.launch(warp_rows(n), (x, w, ptr(&y), ptr(&inv), n as u64, h as i32, eps))? };
    Ok((y, inv))
}

/// The backward of [`rms_norm_forward`]: `dx += ∂x` at address `dx`, and `dw += ∂w` at `dw` when
/// given (a trained norm weight).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_backward(
    cu: &Arc<CudaDevice>,
    x: u64,
    w: u64,
    inv: &CudaSlice<f32>,
    dy: u64,
    dx: u64,
    dw: Option<u64>,
    n: usize,
    h: usize,
) -> Result<(), CudaError> {
    // SAFETY: every address holds the shapes of the forward ([n, h], [h], [n]).
    unsafe {
        func(cu, "rms_dx")?.launch(warp_rows(n), (x, w, ptr(inv), dy, dx, n as u64, h as i32))?;
        if let Some(dw) = dw {
            let cfg = LaunchConfig {
                grid_dim: (h.div_ceil(256) as u32, n.div_ceil(64) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            func(cu, "rms_dw")?.launch(cfg, (x, ptr(inv), dy, dw, n as u64, h as i32))?;
        }
    }
    Ok(())
}

/// Rotary embedding of `n` rows of `width = heads · hd` at address `x` with per-row tables `cos`,
/// `sin` `[n, hd]` (rotate-half convention): a fresh `[n, width]`.
pub(crate) fn rope_forward(
    cu: &Arc<CudaDevice>,
    x: u64,
    cos: u64,
    sin: u64,
    n: usize,
    width: usize,
    hd: usize,
) -> Result<CudaSlice<f32>, KernelError> {
    module(cu)?;
    let total = n * width;
    // SAFETY: written whole by the kernel.
    let y = unsafe { cu.alloc::<f32>(total)? };
    // SAFETY: x and y hold n·width floats, the tables n·hd; width is a multiple of hd (even).
    unsafe {
        func(cu, "rope_fwd")?.launch(elems(total), (x, cos, sin, ptr(&y), total as u64, width as i32, hd as i32))?
    };
    Ok(y)
}

/// The backward of [`rope_forward`]: `dx += Rᵀ dy` at address `dx`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_backward(
    cu: &Arc<CudaDevice>,
    dy: u64,
    cos: u64,
    sin: u64,
    dx: u64,
    n: usize,
    width: usize,
    hd: usize,
) -> Result<(), CudaError> {
    let total = n * width;
    // SAFETY: as in the forward; dx holds n·width floats.
    unsafe { func(cu, "rope_dx")?.launch(elems(total), (dy, cos, sin, dx, total as u64, width as i32, hd as i32))? };
    Ok(())
}

/// `dst += src` (gradient buffers of one length; gradient checkpointing's accumulation).
pub(crate) fn add_into(dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<(), CudaError> {
    let cu = dst.device();
    module(&cu).map_err(|e| match e {
        KernelError::Cuda(e) => e,
        // an NVRTC failure surfaces at the first forward (module loads there); never reached
        KernelError::Nvrtc(_) => {
            CudaError::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_PTX))
        }
    })?;
    let n = dst.len().min(src.len());
    let f = func(&cu, "add_into")?;
    // SAFETY: both hold at least n floats.
    unsafe { f.launch(elems(n), (ptr(dst), ptr(src), n as u64))? };
    Ok(())
}
