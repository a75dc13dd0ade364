//! The SwiGLU MLP `down(silu(gate(x)) · up(x))` over a frozen bf16 base, with the projections'
//! LoRA adapters, as one op whose `[tokens, intermediate]` activations are bf16 (behind the
//! `cuda` feature).
//!
//! Three [`super::frozen::lora_linear_bf16`] products and the f32 SwiGLU between them move each
//! `[tokens, intermediate]` element as f32 about ten times (the products' f32 outputs, the LoRA
//! products accumulated into them, the gate, its bf16 copy for the down product, and the same
//! again for the gradients) and keep three f32 copies of it for the backward. Here, as under
//! PyTorch's bf16 autocast, the gate and up products write bf16, the rank-`r` LoRA terms
//! `scale · t·Bᵀ` are added element by element inside the SwiGLU kernel (`t = x·Aᵀ` is
//! `[tokens, r]`), the SwiGLU writes the down product's bf16 input, and the backward's `dh`, `dg`,
//! `du` are bf16 too. Kept for the backward: the bf16 gate and up products and the `[tokens, r]`
//! LoRA inputs; `silu(g)·u` is recomputed there. `x` and the adapters stay f32 (peft's mixed
//! precision); their gradients are accumulated in f32.
//!
//! The reference is the per-projection path ([`crate::linear::Linear::forward`] with
//! [`super::frozen::swiglu`]), taken with [`crate::Qwen2::set_fused_mlp`]`(false)`; the CUDA
//! parity test compares the two on the same model.

use std::sync::Arc;

use cudarc::driver::{CudaDevice, CudaSlice, DeviceRepr, LaunchAsync, LaunchConfig};
use dfdx::prelude::*;

use super::cuda::{self, gemm16_rm, ptr, sgemm_rm, Bf16Weight, KernelError, LoraSlots};
use super::{cast, cuda_buffer, cuda_data};

type Rows<X, D, T> = Tensor<(usize, X), f32, D, T>;
type T1<D, T> = Tensor<(usize,), f32, D, T>;

const ON: &str = "the fused MLP runs on the CUDA device";
const BUF: &str = "a CUDA gradient buffer";
const MODULE: &str = "pipeline_mlp";
const FUNCS: &[&str] = &["lora_swiglu_fwd", "lora_swiglu_bwd", "transpose_f32"];

const SRC: &str = r#"
// A LoRA term scale * t[row] . b[:, col]: t is [rows x r] f32, b is [r x cols] f32 (B transposed,
// or A as stored). r == 0: no adapter (the pointers are not read).
struct Term { unsigned long long t, b; int r; float s; };
// LoRA dropout on the down projection's input: p == 0 means none.
struct Dropout { unsigned long long seed; float p, keep; };
struct __align__(16) F4 { float x, y, z, w; };
struct __align__(8) H4 { unsigned short x, y, z, w; };

// the term at columns col..col + 3 (cols a multiple of 4: 16-byte loads of b)
__device__ __forceinline__ F4 lora4(const Term& a, unsigned long long row, unsigned long long col,
                                    unsigned long long cols) {
    F4 acc = {0.f, 0.f, 0.f, 0.f};
    const float* t = (const float*)a.t + row * a.r;
    const float* b = (const float*)a.b + col;
    for (int k = 0; k < a.r; ++k) {
        float tk = t[k];
        F4 bk = *(const F4*)(b + k * cols);
        acc.x += tk * bk.x; acc.y += tk * bk.y; acc.z += tk * bk.z; acc.w += tk * bk.w;
    }
    acc.x *= a.s; acc.y *= a.s; acc.z *= a.s; acc.w *= a.s;
    return acc;
}
__device__ __forceinline__ F4 widen(H4 h) { F4 r = {bf2f(h.x), bf2f(h.y), bf2f(h.z), bf2f(h.w)}; return r; }
__device__ __forceinline__ float lane(const F4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }
__device__ __forceinline__ void set(H4& h, int j, float v) {
    unsigned short b = f2bf(v);
    if (j == 0) h.x = b; else if (j == 1) h.y = b; else if (j == 2) h.z = b; else h.w = b;
}

// B [cols x r] -> Bt [r x cols]
extern "C" __global__ void transpose_f32(const float* b, float* bt, unsigned long long cols, int r) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < cols * r;
         i += (unsigned long long)gridDim.x * blockDim.x)
        bt[(i % r) * cols + i / r] = b[i];
}

// h = silu(g) * u with g = g0 + LoRA(gate), u = u0 + LoRA(up), all [rows x cols], four columns a
// thread; ha = h * the down adapter's dropout mask (written when ha != 0)
extern "C" __global__ void lora_swiglu_fwd(const H4* g0, const H4* u0, Term lg, Term lu, H4* h, H4* ha, Dropout d,
                                            unsigned long long rows, unsigned long long cols) {
    unsigned long long q = cols / 4;
    for (unsigned long long row = blockIdx.y; row < rows; row += gridDim.y)
        for (unsigned long long c = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; c < q;
             c += (unsigned long long)gridDim.x * blockDim.x) {
            unsigned long long i = row * q + c;
            F4 g = widen(g0[i]), u = widen(u0[i]);
            F4 tg = lora4(lg, row, 4 * c, cols), tu = lora4(lu, row, 4 * c, cols);
            H4 hv, hav;
            for (int j = 0; j < 4; ++j) {
                float gj = lane(g, j) + lane(tg, j), uj = lane(u, j) + lane(tu, j);
                float v = gj / (1.f + __expf(-gj)) * uj;
                set(hv, j, v);
                if (ha) set(hav, j, v * keep_factor(d.seed, 4 * i + j, d.p, d.keep));
            }
            h[i] = hv;
            if (ha) ha[i] = hav;
        }
}

// the backward: dh = dh0 + mask * LoRA(down)'s input gradient (ld: t = dy B_d [rows x r], b = A_d),
// dg = dh u silu'(g), du = dh silu(g); ha = silu(g) u mask again (for dA_d; when ha != 0)
extern "C" __global__ void lora_swiglu_bwd(const H4* g0, const H4* u0, const H4* dh0, Term lg, Term lu, Term ld,
                                            Dropout d, H4* dg, H4* du, H4* ha,
                                            unsigned long long rows, unsigned long long cols) {
    unsigned long long q = cols / 4;
    for (unsigned long long row = blockIdx.y; row < rows; row += gridDim.y)
        for (unsigned long long c = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; c < q;
             c += (unsigned long long)gridDim.x * blockDim.x) {
            unsigned long long i = row * q + c;
            F4 g = widen(g0[i]), u = widen(u0[i]), dh = widen(dh0[i]);
            F4 tg = lora4(lg, row, 4 * c, cols), tu = lora4(lu, row, 4 * c, cols), td = lora4(ld, row, 4 * c, cols);
            H4 dgv, duv, hav;
            for (int j = 0; j < 4; ++j) {
                float gj = lane(g, j) + lane(tg, j), uj = lane(u, j) + lane(tu, j);
                float m = d.p > 0.f ? keep_factor(d.seed, 4 * i + j, d.p, d.keep) : 1.f;
                float dhj = lane(dh, j) + m * lane(td, j);
                float s = 1.f / (1.f + __expf(-gj));
                set(dgv, j, dhj * uj * s * (1.f + gj * (1.f - s)));
                set(duv, j, dhj * gj * s);
                set(hav, j, gj * s * uj * m);
            }
            dg[i] = dgv;
            du[i] = duv;
            if (ha) ha[i] = hav;
        }
}
"#;

/// [`Term`]'s device layout.
#[repr(C)]
#[derive(Clone, Copy)]
struct Term {
    t: u64,
    b: u64,
    r: i32,
    s: f32,
}
// SAFETY: plain `repr(C)` data, passed to the kernels by value.
unsafe impl DeviceRepr for Term {}

impl Term {
    const NONE: Term = Term { t: 0, b: 0, r: 0, s: 0.0 };
}

/// [`Dropout`]'s device layout.
#[repr(C)]
#[derive(Clone, Copy)]
struct Dropout {
    seed: u64,
    p: f32,
    keep: f32,
}
// SAFETY: plain `repr(C)` data, passed to the kernels by value.
unsafe impl DeviceRepr for Dropout {}

/// The MLP's three frozen bf16 weights (`gate`, `up`: `[inter, hidden]`; `down`: `[hidden, inter]`).
pub(crate) struct MlpWeights<'a> {
    pub gate: &'a Bf16Weight,
    pub up: &'a Bf16Weight,
    pub down: &'a Bf16Weight,
}

/// The adapters of gate, up and down (each `None` when that projection has none in this forward)
/// and the down adapter's dropout `(seed, p)` (gate's and up's masked inputs are passed in).
#[derive(Clone, Copy)]
pub(crate) struct MlpLora {
    pub slots: [Option<LoraSlots>; 3],
    pub down_dropout: Option<(u64, f32)>,
}

fn module(dev: &Arc<CudaDevice>) -> Result<(), KernelError> {
    cuda::module(dev)?;
    if !dev.has_func(MODULE, FUNCS[0]) {
        let ptx = cudarc::nvrtc::compile_ptx(format!("{}{SRC}", cuda::PRELUDE))
            .map_err(|e| KernelError::Nvrtc(e.to_string()))?;
        dev.load_ptx(ptx, MODULE, FUNCS)?;
    }
    Ok(())
}

fn func(dev: &Arc<CudaDevice>, name: &str) -> Result<cudarc::driver::CudaFunction, CudaError> {
    dev.get_func(MODULE, name)
        .ok_or(CudaError::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_FOUND)))
}

/// One thread per four columns, one block row per token row (grid-strided both ways).
fn grid(rows: usize, cols: usize) -> LaunchConfig {
    let x = (cols / 4).div_ceil(256).clamp(1, 1024) as u32;
    let y = rows.clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (x, y, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn err<E: 'static>(e: CudaError) -> E {
    cast::<CudaError, E>(e).expect("CUDA error type")
}

/// `n` u16 values, written whole by the caller's next launch.
fn alloc16(cu: &Arc<CudaDevice>, n: usize) -> Result<CudaSlice<u16>, CudaError> {
    // SAFETY: every caller writes all n values (a product with beta = 0 or a kernel) before reading.
    Ok(unsafe { cu.alloc::<u16>(n)? })
}

fn alloc32(cu: &Arc<CudaDevice>, n: usize) -> Result<CudaSlice<f32>, CudaError> {
    // SAFETY: as `alloc16`.
    Ok(unsafe { cu.alloc::<f32>(n)? })
}

/// A LoRA `B: [cols×r]` at device address `b` as `Bᵀ: [r×cols]`, for the kernels' coalesced loads.
fn transposed(cu: &Arc<CudaDevice>, b: u64, cols: usize, r: usize) -> Result<CudaSlice<f32>, CudaError> {
    let bt = alloc32(cu, cols * r)?;
    // SAFETY: b holds cols×r f32, bt as many; the kernel writes every element.
    unsafe { func(cu, "transpose_f32")?.launch(cuda::elems(cols * r), (b, ptr(&bt), cols as u64, r as i32))? };
    Ok(bt)
}

/// The dropout argument of the kernels.
fn drop_arg(d: Option<(u64, f32)>) -> Dropout {
    match d {
        Some((seed, p)) => Dropout { seed, p, keep: 1.0 / (1.0 - p) },
        None => Dropout { seed: 0, p: 0.0, keep: 1.0 },
    }
}

/// `down(silu(gate(x)) · up(x))` with the LoRA terms of [`MlpLora`] (module docs). `xa`: gate's
/// and up's LoRA inputs when dropout masks them (`None`: `x`). `flat`: the trained vector the
/// adapters view.
pub(crate) fn lora_mlp_bf16<X: Dim, M: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    x: Rows<X, D, T>,
    xa: [Option<Rows<X, D, T>>; 2],
    w: MlpWeights<'_>,
    inter: M,
    flat: &T1<D, NoneTape>,
    lora: MlpLora,
) -> Rows<X, D, T> {
    let (n, hid) = *x.shape();
    let (h, im) = (hid.size(), inter.size());
    let (x, mut tape) = x.contiguous().split_tape();
    let mut xas: [Option<Rows<X, D, NoneTape>>; 2] = [None, None];
    for (slot, a) in xas.iter_mut().zip(xa) {
        if let Some(a) = a {
            let (a, ta) = a.contiguous().split_tape();
            tape = tape.merge(ta);
            *slot = Some(a);
        }
    }
    let dev: Cuda = cast(x.device().clone()).expect(ON);
    let saved = forward(&dev, &x, &xas, &w, (n, h, im), flat, lora)
        .unwrap_or_else(|e| panic!("fused MLP over [{n} x {h}] -> {im}: {e}"));
    let y: Rows<X, D, NoneTape> = cast(dev.build_tensor((n, hid), (n, hid).strides(), saved.y)).expect(ON);
    if T::OWNS_TAPE {
        let (xg, yg, flat) = (x.ghost(), y.ghost(), flat.clone());
        let ws = [w.gate.clone(), w.up.clone(), w.down.clone()];
        let (g0, u0, t) = (saved.g0, saved.u0, saved.t);
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&yg)?;
            let dy: Rows<X, D, NoneTape> = grads.get(&yg);
            let dy = cuda_data(&dy).expect(ON);
            let any_lora = lora.slots.iter().any(Option::is_some);
            let dflat = if any_lora { ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&flat)?).expect(BUF)) } else { 0 };
            let mut dxa = [0u64; 2];
            for (d, a) in dxa.iter_mut().zip(&xas) {
                if let Some(a) = a {
                    *d = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&a.ghost())?).expect(BUF));
                }
            }
            let dx = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&xg)?).expect(BUF));
            let xs =
                [0, 1].map(|j| xas[j].as_ref().map_or(ptr(cuda_data(&x).expect(ON)), |a| ptr(cuda_data(a).expect(ON))));
            let dxs = [0, 1].map(|j| if dxa[j] != 0 { dxa[j] } else { dx });
            let fb = ptr(cuda_data(&flat).expect(ON));
            let b = Back { dev: &dev, ws: &ws, g0: &g0, u0: &u0, t: &t, fb, dflat, dims: (n, h, im), lora };
            b.run(ptr(dy), xs, dxs, dx).map_err(err)
        });
    }
    y.put_tape(tape)
}

/// What the forward keeps: the output, the bf16 gate and up products, the LoRA inputs `t`.
struct Saved {
    y: CudaSlice<f32>,
    g0: CudaSlice<u16>,
    u0: CudaSlice<u16>,
    t: [Option<CudaSlice<f32>>; 3],
}

fn forward<X: Dim, D: Storage<f32>>(
    dev: &Cuda,
    x: &Rows<X, D, NoneTape>,
    xas: &[Option<Rows<X, D, NoneTape>>; 2],
    w: &MlpWeights<'_>,
    (n, h, im): (usize, usize, usize),
    flat: &T1<D, NoneTape>,
    lora: MlpLora,
) -> Result<Saved, KernelError> {
    let cu = dev.cuda_device();
    module(cu)?;
    let blas = dev.cuda_blas();
    let fb = ptr(cuda_data(flat).expect(ON));
    let xp = ptr(cuda_data(x).expect(ON));
    let xb = cuda::to_bf16(cu, xp, n * h)?;
    let mut t: [Option<CudaSlice<f32>>; 3] = [None, None, None];
    let mut terms = [Term::NONE; 2];
    let mut bts = Vec::new();
    for j in 0..2 {
        if let Some(lo) = lora.slots[j] {
            let xa = xas[j].as_ref().map_or(xp, |a| ptr(cuda_data(a).expect(ON)));
            let tj = alloc32(cu, n * lo.r)?;
            // SAFETY: xa [n×h], A = flat[a..] [r×h] (so `ᵀ`), tj [n×r].
            unsafe { sgemm_rm(blas, n, lo.r, h, xa, false, fb + 4 * lo.a as u64, true, ptr(&tj), 1.0, 0.0)? };
            let bt = transposed(cu, fb + 4 * lo.b as u64, im, lo.r)?;
            terms[j] = Term { t: ptr(&tj), b: ptr(&bt), r: lo.r as i32, s: lo.scale };
            t[j] = Some(tj);
            bts.push(bt);
        }
    }
    let (g0, u0) = (alloc16(cu, n * im)?, alloc16(cu, n * im)?);
    // SAFETY: xb [n×h], W_gate/W_up [im×h] (so `ᵀ`), g0/u0 [n×im] bf16.
    unsafe {
        gemm16_rm(blas, (n, im, h), (ptr(&xb), false), (w.gate.addr(), true), (ptr(&g0), true), 1.0, 0.0)?;
        gemm16_rm(blas, (n, im, h), (ptr(&xb), false), (w.up.addr(), true), (ptr(&u0), true), 1.0, 0.0)?;
    }
    drop(xb);
    let hb = alloc16(cu, n * im)?;
    let hab = match (lora.slots[2], lora.down_dropout) {
        (Some(_), Some(_)) => Some(alloc16(cu, n * im)?),
        _ => None,
    };
    let args = (
        ptr(&g0),
        ptr(&u0),
        terms[0],
        terms[1],
        ptr(&hb),
        hab.as_ref().map_or(0, |b| ptr(b)),
        drop_arg(lora.down_dropout),
        n as u64,
        im as u64,
    );
    // SAFETY: g0/u0/hb/hab hold n×im values (im a multiple of 4); the terms point at [n×r] and
    // [r×im] f32.
    unsafe { func(cu, "lora_swiglu_fwd")?.launch(grid(n, im), args)? };
    drop(bts);
    let y = alloc32(cu, n * h)?;
    // SAFETY: hb [n×im], W_down [h×im] (so `ᵀ`), y [n×h] f32.
    unsafe { gemm16_rm(blas, (n, h, im), (ptr(&hb), false), (w.down.addr(), true), (ptr(&y), false), 1.0, 0.0)? };
    if let Some(lo) = lora.slots[2] {
        let ab = cuda::to_bf16(cu, fb + 4 * lo.a as u64, lo.r * im)?;
        let td = alloc32(cu, n * lo.r)?;
        let ha = hab.as_ref().unwrap_or(&hb);
        // SAFETY: ha [n×im] bf16, A_down [r×im] bf16 (so `ᵀ`), td [n×r] f32; then y += s·td·B_downᵀ
        // with B_down = flat[b..] [h×r].
        unsafe {
            gemm16_rm(blas, (n, lo.r, im), (ptr(ha), false), (ptr(&ab), true), (ptr(&td), false), 1.0, 0.0)?;
            sgemm_rm(blas, n, h, lo.r, ptr(&td), false, fb + 4 * lo.b as u64, true, ptr(&y), lo.scale, 1.0)?;
        }
        t[2] = Some(td);
    }
    Ok(Saved { y, g0, u0, t })
}

/// The backward's inputs (see [`Back::run`]).
struct Back<'a> {
    dev: &'a Cuda,
    ws: &'a [Bf16Weight; 3],
    g0: &'a CudaSlice<u16>,
    u0: &'a CudaSlice<u16>,
    t: &'a [Option<CudaSlice<f32>>; 3],
    /// The trained vector and its gradient (device addresses; 0 without adapters).
    fb: u64,
    dflat: u64,
    dims: (usize, usize, usize),
    lora: MlpLora,
}

impl Back<'_> {
    /// Given `dy` `[n×h]`: the adapters' gradients into `dflat`, gate's and up's LoRA input
    /// gradients into `dxs` (their masked inputs' buffers, or `dx`), and the base's into `dx`.
    /// `xs`: gate's and up's LoRA inputs (f32 `[n×h]`).
    fn run(&self, dy: u64, xs: [u64; 2], dxs: [u64; 2], dx: u64) -> Result<(), CudaError> {
        let (n, h, im) = self.dims;
        let cu = self.dev.cuda_device();
        let blas = self.dev.cuda_blas();
        let (fb, dflat) = (self.fb, self.dflat);
        let at = |off: usize| 4 * off as u64;
        let dyb = cuda::to_bf16(cu, dy, n * h)?;
        // down's adapter: ud = dy·B_down [n×r], dB_down += s·dyᵀ·td
        let mut ld = Term::NONE;
        let ud = match (self.lora.slots[2], &self.t[2]) {
            (Some(lo), Some(td)) => {
                let ud = alloc32(cu, n * lo.r)?;
                // SAFETY: dy [n×h], B_down [h×r], ud [n×r]; dB_down [h×r] = dyᵀ [h×n]·td [n×r].
                unsafe {
                    sgemm_rm(blas, n, lo.r, h, dy, false, fb + at(lo.b), false, ptr(&ud), 1.0, 0.0)?;
                    sgemm_rm(blas, h, lo.r, n, dy, true, ptr(td), false, dflat + at(lo.b), lo.scale, 1.0)?;
                }
                ld = Term { t: ptr(&ud), b: fb + at(lo.a), r: lo.r as i32, s: lo.scale };
                Some(ud)
            }
            _ => None,
        };
        let dh0 = alloc16(cu, n * im)?;
        // SAFETY: dyb [n×h], W_down [h×im], dh0 [n×im] bf16.
        unsafe {
            gemm16_rm(blas, (n, im, h), (ptr(&dyb), false), (self.ws[2].addr(), false), (ptr(&dh0), true), 1.0, 0.0)?
        };
        drop(dyb);
        let mut terms = [Term::NONE; 2];
        let mut bts = Vec::new();
        for (j, term) in terms.iter_mut().enumerate() {
            if let (Some(lo), Some(tj)) = (self.lora.slots[j], &self.t[j]) {
                let bt = transposed(cu, fb + at(lo.b), im, lo.r)?;
                *term = Term { t: ptr(tj), b: ptr(&bt), r: lo.r as i32, s: lo.scale };
                bts.push(bt);
            }
        }
        let (dg, du) = (alloc16(cu, n * im)?, alloc16(cu, n * im)?);
        let ha = if ud.is_some() { Some(alloc16(cu, n * im)?) } else { None };
        let args = (
            ptr(self.g0),
            ptr(self.u0),
            ptr(&dh0),
            terms[0],
            terms[1],
            ld,
            drop_arg(self.lora.down_dropout),
            ptr(&dg),
            ptr(&du),
            ha.as_ref().map_or(0, |b| ptr(b)),
            n as u64,
            im as u64,
        );
        // SAFETY: every [n×im] buffer holds n×im values; the terms point at their f32 operands.
        unsafe { func(cu, "lora_swiglu_bwd")?.launch(grid(n, im), args)? };
        drop((dh0, bts));
        if let (Some(lo), Some(ud), Some(ha)) = (self.lora.slots[2], &ud, &ha) {
            let udb = cuda::to_bf16(cu, ptr(ud), n * lo.r)?;
            // SAFETY: dA_down [r×im] += s · udᵀ [r×n] · ha [n×im].
            unsafe {
                gemm16_rm(
                    blas,
                    (lo.r, im, n),
                    (ptr(&udb), true),
                    (ptr(ha), false),
                    (dflat + at(lo.a), false),
                    lo.scale,
                    1.0,
                )?
            };
        }
        drop(ha);
        // gate's and up's adapters, then the base's dx += dg·W_gate + du·W_up
        for (j, d) in [&dg, &du].into_iter().enumerate() {
            let (Some(lo), Some(tj)) = (self.lora.slots[j], &self.t[j]) else { continue };
            let bb = cuda::to_bf16(cu, fb + at(lo.b), im * lo.r)?;
            let tb = cuda::to_bf16(cu, ptr(tj), n * lo.r)?;
            let uj = alloc32(cu, n * lo.r)?;
            // SAFETY: uj [n×r] = d [n×im]·B [im×r]; dB [im×r] += s·dᵀ [im×n]·t [n×r]; dA [r×h] +=
            // s·ujᵀ [r×n]·xa [n×h]; dxa [n×h] += s·uj [n×r]·A [r×h].
            unsafe {
                gemm16_rm(blas, (n, lo.r, im), (ptr(d), false), (ptr(&bb), false), (ptr(&uj), false), 1.0, 0.0)?;
                gemm16_rm(
                    blas,
                    (im, lo.r, n),
                    (ptr(d), true),
                    (ptr(&tb), false),
                    (dflat + at(lo.b), false),
                    lo.scale,
                    1.0,
                )?;
                sgemm_rm(blas, lo.r, h, n, ptr(&uj), true, xs[j], false, dflat + at(lo.a), lo.scale, 1.0)?;
                sgemm_rm(blas, n, h, lo.r, ptr(&uj), false, fb + at(lo.a), false, dxs[j], lo.scale, 1.0)?;
            }
        }
        // SAFETY: dg/du [n×im] bf16, W_gate/W_up [im×h], dx [n×h] f32 accumulated into.
        unsafe {
            gemm16_rm(blas, (n, h, im), (ptr(&dg), false), (self.ws[0].addr(), false), (dx, false), 1.0, 1.0)?;
            gemm16_rm(blas, (n, h, im), (ptr(&du), false), (self.ws[1].addr(), false), (dx, false), 1.0, 1.0)?;
        }
        Ok(())
    }
}
