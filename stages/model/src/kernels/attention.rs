//! Memory-efficient causal grouped-query attention on CUDA (FlashAttention-2's algorithm: Dao,
//! arXiv:2307.08691), forward and backward, on bf16 tensor cores with f32 accumulation.
//!
//! The dfdx path ([`crate::qwen2`]'s `Attention::forward`) materialises the scores and the
//! softmax, `[batch, heads, seq, seq]` f32 each, plus their gradients: at 2,048 tokens that is
//! most of a training step's memory and time. Here the scores of a 64-query × 64-key tile live in
//! registers only:
//!
//! - forward (`flash_fwd_*`, one block of 4 warps per 64 queries of one head): `S = Q·Kᵀ` by
//!   `mma.sync.m16n8k16` (bf16 in, f32 out), causal and key-padding mask, online softmax (running
//!   max and sum per row), `O += P·V` with `P` rounded to bf16 straight from the accumulator
//!   registers; writes `O` (f32) and the row's `logsumexp` for the backward. Key tiles after the
//!   last query of the block are skipped (causal).
//! - backward: `attn_delta` (`D = rowsum(dO ∘ O)`), then `flash_dkdv_*` (one block per 64 keys
//!   of one query head; per query tile `P = exp(S − lse)`, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`,
//!   `dS = P ∘ (dP − D)`, `dK += dSᵀ·Q`; the `rep` query heads of one KV head add into its
//!   `dK`/`dV` rows atomically, once per block) and `flash_dq_*` (one block per 64 queries,
//!   recomputing `S` and `dP` per key tile, `dQ = Σ dS·K`): a second pass instead of
//!   FlashAttention-2's per-tile atomic adds into `dQ` (`seq / 64` adds per element).
//!
//! Inputs are read in the layout the projections write (`[batch·seq, heads·head_dim]` rows), so
//! no permute is made; `Q`, `K`, `V` are rounded to bf16 once per call (and `dO` once per
//! backward, in the `D` pass) — the backward keeps only these bf16 copies — and tiles move into
//! shared memory 16 bytes per load and reach the tensor cores through `ldmatrix` (`.trans` for the
//! operands read column-wise: V, dO, Q, K in `P·V`, `Pᵀ·dO`, `dSᵀ·Q`, `dS·K`); `P` and `dS` are rounded from the accumulator registers (as
//! PyTorch's SDPA does under bf16 autocast); everything else is f32. Masks are evaluated only on
//! the tiles that need them (the diagonal, padding, the sequence's end). The backward adds its
//! gradients straight into the tape's buffers (no temporaries). Used on CUDA when
//! the frozen base is bf16 (`torch_dtype = "bfloat16"`, the mixed-precision mode) and the head
//! dimension is 64 or 128; `PIPELINE_REFERENCE_KERNELS=1` and f32 training keep dfdx's exact f32
//! attention. A query row with no visible key (left padding) gets a zero output; such rows feed
//! nothing (their keys are masked for every query and their loss is masked).
//!
//! No CUDA headers are needed: bf16 conversion is done on the bit patterns and the tensor-core
//! product is inline PTX (NVRTC on the GPU machine runs without the toolkit's headers).

use std::sync::Arc;

use cudarc::driver::{CudaDevice, CudaSlice, DevicePtr, DeviceRepr, LaunchAsync, LaunchConfig};
use dfdx::prelude::*;

use super::cuda::KernelError;
use super::{cast, cuda_buffer, cuda_data};

type Rows<X, D, T> = Tensor<(usize, X), f32, D, T>;

const MODULE: &str = "pipeline_attention";
const FUNCS: &[&str] =
    &["flash_fwd_64", "flash_fwd_128", "flash_dkdv_64", "flash_dkdv_128", "flash_dq_64", "flash_dq_128", "attn_delta"];
const ON_GPU: &str = "causal_attention's tensors live on the CUDA device";
/// Queries per forward block and keys per backward block (4 warps × 16 rows).
const BLOCK: usize = 64;

const SRC: &str = r#"
struct AttnDims { int b; int s; int nq; int nkv; float scale; };

__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return (unsigned int)f2bf(lo) | ((unsigned int)f2bf(hi) << 16);
}
__device__ __forceinline__ unsigned int ld2(const unsigned short* p) { return *(const unsigned int*)p; }
// 16- and 8-byte vectors of our own (NVRTC runs without the toolkit's headers on the device)
struct __align__(16) U4 { unsigned int x, y, z, w; };
struct __align__(8) F2 { float x, y; };
__device__ __forceinline__ F2 f2(float x, float y) { F2 r; r.x = x; r.y = y; return r; }
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

// c[16x8] += a[16x16] * b[16x8], bf16 in, f32 accumulate (PTX ISA fragment layouts:
// a: {row g, cols 2t..2t+1}, {row g+8, ...}, {row g, cols 2t+8..}, {row g+8, cols 2t+8..};
// b: {rows 2t..2t+1, col g}, {rows 2t+8.., col g}; c: {row g, cols 2t, 2t+1}, {row g+8, ...})
__device__ __forceinline__ void mma16816(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix: four 8x8 bf16 matrices from shared memory, each row's 16-byte address from one lane
// (lanes 8j..8j+7: rows of matrix j); `_t` transposes each matrix
__device__ __forceinline__ unsigned int smem(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}
__device__ __forceinline__ void ldsm4(unsigned int* r, const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem(p)));
}
__device__ __forceinline__ void ldsm4_t(unsigned int* r, const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem(p)));
}
// B fragments (b0, b1) of n-tiles nt and nt + 1, k-chunk kk, from a row-major shared tile whose
// rows are the product's n and columns its k (K for S = Q Kᵀ): r[0..2] for nt, r[2..4] for nt + 1
__device__ __forceinline__ void ldsm_b_rows(unsigned int* r, const unsigned short* tile, int pitch, int nt, int kk,
                                            int lane) {
    const int j = lane >> 3, i = lane & 7;
    ldsm4(r, tile + ((nt + (j >> 1)) * 8 + i) * pitch + kk * 16 + (j & 1) * 8);
}
// B fragments of n-tiles dn and dn + 1, k-chunk kk, from a row-major shared tile whose rows are
// the product's k and columns its n (V for O = P V), transposed by ldmatrix
__device__ __forceinline__ void ldsm_b_cols(unsigned int* r, const unsigned short* tile, int pitch, int kk, int dn,
                                            int lane) {
    const int j = lane >> 3, i = lane & 7;
    ldsm4_t(r, tile + (kk * 16 + (j & 1) * 8 + i) * pitch + (dn + (j >> 1)) * 8);
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The rows of one (batch, head) in the projections' layout: row i of head h of batch b is at
// base + ((b * s + i) * heads + h) * HD, i.e. `stride` = heads * HD elements between rows.
struct HeadRows {
    const unsigned short* p;
    long stride;
};
template <int HD>
__device__ __forceinline__ HeadRows head_rows(const unsigned short* base, int bb, int h, int heads, int s) {
    HeadRows r;
    r.stride = (long)heads * HD;
    r.p = base + (long)bb * s * r.stride + (long)h * HD;
    return r;
}

// A fragments of rows r0, r1 (= r0 + 8) of one head's bf16 rows, all HD columns (zero past `s`)
template <int HD>
__device__ __forceinline__ void load_a_rows(unsigned int (*fa)[4], HeadRows m, int r0, int r1, int s, int t) {
    for (int kk = 0; kk < HD / 16; ++kk) {
        const unsigned short* p0 = m.p + (long)r0 * m.stride + kk * 16 + t * 2;
        const unsigned short* p1 = m.p + (long)r1 * m.stride + kk * 16 + t * 2;
        fa[kk][0] = r0 < s ? ld2(p0) : 0u;
        fa[kk][1] = r1 < s ? ld2(p1) : 0u;
        fa[kk][2] = r0 < s ? ld2(p0 + 8) : 0u;
        fa[kk][3] = r1 < s ? ld2(p1 + 8) : 0u;
    }
}

// R rows from `r0` of one head into a shared [R][HD + 8] tile, 16 bytes per load (zero past `s`)
template <int R, int HD>
__device__ __forceinline__ void load_tile(unsigned short* dst, HeadRows m, int r0, int s) {
    const int VEC = HD / 8;
    for (int e = threadIdx.x; e < R * VEC; e += blockDim.x) {
        int r = e / VEC, c = (e % VEC) * 8;
        U4 val = {0u, 0u, 0u, 0u};
        if (r0 + r < s) val = *(const U4*)(m.p + (long)(r0 + r) * m.stride + c);
        *(U4*)(dst + r * (HD + 8) + c) = val;
    }
}

// The validity of keys k0..k0+BK-1 (in range and not padding) into `vk`; returns, for the whole
// block, whether every key of the tile is valid (one barrier: the tile loads before it are done).
template <int BK>
__device__ __forceinline__ bool load_key_mask(unsigned char* vk, const unsigned char* valid, int k0, int s) {
    int ok = 1;
    if (threadIdx.x < BK) {
        bool v = k0 + (int)threadIdx.x < s && valid[k0 + threadIdx.x];
        vk[threadIdx.x] = v;
        ok = v;
    }
    return __syncthreads_and(ok) != 0;
}

// Forward for 64 queries of one head: O (f32, the projections' layout) and the rows' logsumexp.
template <int HD>
__device__ void flash_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                          const unsigned short* __restrict__ v, const unsigned char* __restrict__ kvalid,
                          float* __restrict__ o, float* __restrict__ lse, AttnDims d) {
    const int BQ = 64, BK = 64, KP = HD + 8;
    __shared__ __align__(16) unsigned short ks[BK * KP];
    __shared__ __align__(16) unsigned short vs[BK * KP];
    __shared__ unsigned char vk[BK];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * BQ, h = blockIdx.y, bb = blockIdx.z;
    const int kvh = h / (d.nq / d.nkv);
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const HeadRows qm = head_rows<HD>(q, bb, h, d.nq, d.s);
    const HeadRows km = head_rows<HD>(k, bb, kvh, d.nkv, d.s), vm = head_rows<HD>(v, bb, kvh, d.nkv, d.s);
    const unsigned char* valid = kvalid + (long)bb * d.s;
    unsigned int qa[HD / 16][4];
    load_a_rows<HD>(qa, qm, r0, r1, d.s, t);
    float acc[HD / 8][4];
    for (int i = 0; i < HD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    const int kend = d.s < q0 + BQ ? d.s : q0 + BQ;
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        load_tile<BK, HD>(ks, km, k0, d.s);
        load_tile<BK, HD>(vs, vm, k0, d.s);
        // no mask at all on a tile of valid keys wholly before the block's first query
        const bool full = load_key_mask<BK>(vk, valid, k0, d.s) && k0 + BK - 1 <= q0;
        float sc[BK / 8][4];
        for (int nt = 0; nt < BK / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
        for (int kk = 0; kk < HD / 16; ++kk)
            for (int nt = 0; nt < BK / 8; nt += 2) {
                unsigned int b[4];
                ldsm_b_rows(b, ks, KP, nt, kk, lane);
                mma16816(sc[nt], qa[kk], b[0], b[1]);
                mma16816(sc[nt + 1], qa[kk], b[2], b[3]);
            }
        float mx0 = NEG_INF, mx1 = NEG_INF;
        for (int nt = 0; nt < BK / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                float x = sc[nt][e] * d.scale;
                if (!full) {
                    int jl = nt * 8 + t * 2 + (e & 1);
                    if (!vk[jl] || k0 + jl > (e < 2 ? r0 : r1)) x = NEG_INF;
                }
                sc[nt][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float a0 = n0 == NEG_INF ? 1.f : __expf(m0 - n0);
        const float a1 = n1 == NEG_INF ? 1.f : __expf(m1 - n1);
        const float b0 = n0 == NEG_INF ? 0.f : n0, b1 = n1 == NEG_INF ? 0.f : n1;
        float s0 = 0.f, s1 = 0.f;
        for (int nt = 0; nt < BK / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                float p = __expf(sc[nt][e] - (e < 2 ? b0 : b1));  // exp(-inf) = 0 for masked keys
                sc[nt][e] = p;
                if (e < 2) s0 += p; else s1 += p;
            }
        l0 = l0 * a0 + quad_sum(s0);
        l1 = l1 * a1 + quad_sum(s1);
        m0 = n0;
        m1 = n1;
        for (int dn = 0; dn < HD / 8; ++dn) {
            acc[dn][0] *= a0; acc[dn][1] *= a0; acc[dn][2] *= a1; acc[dn][3] *= a1;
        }
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned int pa[4] = {pack2(sc[2 * kk][0], sc[2 * kk][1]), pack2(sc[2 * kk][2], sc[2 * kk][3]),
                                  pack2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]), pack2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
            for (int dn = 0; dn < HD / 8; dn += 2) {
                unsigned int b[4];
                ldsm_b_cols(b, vs, KP, kk, dn, lane);
                mma16816(acc[dn], pa, b[0], b[1]);
                mma16816(acc[dn + 1], pa, b[2], b[3]);
            }
        }
    }
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const long qstride = (long)d.nq * HD;
    float* ob = o + (long)bb * d.s * qstride + (long)h * HD;
    for (int dn = 0; dn < HD / 8; ++dn) {
        int c = dn * 8 + t * 2;
        if (r0 < d.s) *(F2*)(ob + (long)r0 * qstride + c) = f2(acc[dn][0] * i0, acc[dn][1] * i0);
        if (r1 < d.s) *(F2*)(ob + (long)r1 * qstride + c) = f2(acc[dn][2] * i1, acc[dn][3] * i1);
    }
    if (t == 0) {
        float* lb = lse + ((long)bb * d.nq + h) * d.s;
        if (r0 < d.s) lb[r0] = l0 > 0.f ? m0 + logf(l0) : POS_INF;
        if (r1 < d.s) lb[r1] = l1 > 0.f ? m1 + logf(l1) : POS_INF;
    }
}

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d], and dO rounded to bf16 (same layout) for
// the tensor cores of both backward kernels; one warp per (row, head)
extern "C" __global__ void attn_delta(const float* dout, const float* o, float* delta, unsigned short* dout16,
                                      int hd, AttnDims d) {
    long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    long rows = (long)d.b * d.s * d.nq;
    if (w >= rows) return;
    long bi = w / d.nq;            // b * s + i
    int h = (int)(w % d.nq);
    const float* a = dout + w * hd;
    const float* c = o + w * hd;
    unsigned short* a16 = dout16 + w * hd;
    float x = 0.f;
    for (int e = lane * 2; e < hd; e += 64) {
        F2 av = *(const F2*)(a + e), cv = *(const F2*)(c + e);
        x += av.x * cv.x + av.y * cv.y;
        *(unsigned int*)(a16 + e) = pack2(av.x, av.y);
    }
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (lane == 0) {
        long bb = bi / d.s, i = bi % d.s;
        delta[(bb * d.nq + h) * d.s + i] = x;
    }
}

// dK, dV for 64 keys of one query head: loops over the query tiles at or after the keys (causal);
// the rep query heads of a KV head add into its dK / dV rows atomically, once per block.
template <int HD, int BQ>
__device__ void flash_bwd_dkdv(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                               const unsigned short* __restrict__ v, const unsigned short* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const unsigned char* __restrict__ kvalid, float* dk, float* dv, AttnDims d) {
    const int BK = 64, QP = HD + 8;
    __shared__ __align__(16) unsigned short qs[BQ * QP];
    __shared__ __align__(16) unsigned short dos[BQ * QP];
    __shared__ float ls[BQ], dls[BQ];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = blockIdx.x * BK, h = blockIdx.y, bb = blockIdx.z;
    const int kvh = h / (d.nq / d.nkv);
    const int j0 = k0 + warp * 16 + g, j1 = j0 + 8;
    const HeadRows qm = head_rows<HD>(q, bb, h, d.nq, d.s), dom = head_rows<HD>(dout, bb, h, d.nq, d.s);
    const HeadRows km = head_rows<HD>(k, bb, kvh, d.nkv, d.s), vm = head_rows<HD>(v, bb, kvh, d.nkv, d.s);
    const float* lb = lse + ((long)bb * d.nq + h) * d.s;
    const float* db = delta + ((long)bb * d.nq + h) * d.s;
    const unsigned char* valid = kvalid + (long)bb * d.s;
    unsigned int ka[HD / 16][4], va[HD / 16][4];
    load_a_rows<HD>(ka, km, j0, j1, d.s, t);
    load_a_rows<HD>(va, vm, j0, j1, d.s, t);
    const bool v0 = j0 < d.s && valid[j0], v1 = j1 < d.s && valid[j1];
    float dka[HD / 8][4], dva[HD / 8][4];
    for (int i = 0; i < HD / 8; ++i)
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.f;
    for (int qt0 = (k0 / BQ) * BQ; qt0 < d.s; qt0 += BQ) {
        __syncthreads();
        load_tile<BQ, HD>(qs, qm, qt0, d.s);
        load_tile<BQ, HD>(dos, dom, qt0, d.s);
        for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
            bool in = qt0 + i < d.s;
            ls[i] = in ? lb[qt0 + i] : POS_INF;
            dls[i] = in ? db[qt0 + i] : 0.f;
        }
        __syncthreads();
        // every query of the tile is in range and at or after every key of the block: no causal test
        const bool full = qt0 >= k0 + BK - 1 && qt0 + BQ <= d.s;
        // S^T = K Q^T (this warp's 16 keys x BQ queries), then P^T = exp(S^T * scale - lse)
        float st[BQ / 8][4];
        for (int nt = 0; nt < BQ / 8; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
        for (int kk = 0; kk < HD / 16; ++kk)
            for (int nt = 0; nt < BQ / 8; nt += 2) {
                unsigned int b[4];
                ldsm_b_rows(b, qs, QP, nt, kk, lane);
                mma16816(st[nt], ka[kk], b[0], b[1]);
                mma16816(st[nt + 1], ka[kk], b[2], b[3]);
            }
        for (int nt = 0; nt < BQ / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                int il = nt * 8 + t * 2 + (e & 1), i = qt0 + il;
                bool ok = e < 2 ? v0 : v1;
                if (!full) ok = ok && i < d.s && (e < 2 ? j0 : j1) <= i;
                st[nt][e] = ok ? __expf(st[nt][e] * d.scale - ls[il]) : 0.f;
            }
        // dV += P^T dO
        for (int kq = 0; kq < BQ / 16; ++kq) {
            unsigned int pa[4] = {pack2(st[2 * kq][0], st[2 * kq][1]), pack2(st[2 * kq][2], st[2 * kq][3]),
                                  pack2(st[2 * kq + 1][0], st[2 * kq + 1][1]), pack2(st[2 * kq + 1][2], st[2 * kq + 1][3])};
            for (int dn = 0; dn < HD / 8; dn += 2) {
                unsigned int b[4];
                ldsm_b_cols(b, dos, QP, kq, dn, lane);
                mma16816(dva[dn], pa, b[0], b[1]);
                mma16816(dva[dn + 1], pa, b[2], b[3]);
            }
        }
        // dP^T = V dO^T, dS^T = P^T (dP^T - D)
        float dpt[BQ / 8][4];
        for (int nt = 0; nt < BQ / 8; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
        for (int kk = 0; kk < HD / 16; ++kk)
            for (int nt = 0; nt < BQ / 8; nt += 2) {
                unsigned int b[4];
                ldsm_b_rows(b, dos, QP, nt, kk, lane);
                mma16816(dpt[nt], va[kk], b[0], b[1]);
                mma16816(dpt[nt + 1], va[kk], b[2], b[3]);
            }
        for (int nt = 0; nt < BQ / 8; ++nt)
            for (int e = 0; e < 4; ++e) st[nt][e] *= dpt[nt][e] - dls[nt * 8 + t * 2 + (e & 1)];
        // dK += dS^T Q
        for (int kq = 0; kq < BQ / 16; ++kq) {
            unsigned int sa[4] = {pack2(st[2 * kq][0], st[2 * kq][1]), pack2(st[2 * kq][2], st[2 * kq][3]),
                                  pack2(st[2 * kq + 1][0], st[2 * kq + 1][1]), pack2(st[2 * kq + 1][2], st[2 * kq + 1][3])};
            for (int dn = 0; dn < HD / 8; dn += 2) {
                unsigned int b[4];
                ldsm_b_cols(b, qs, QP, kq, dn, lane);
                mma16816(dka[dn], sa, b[0], b[1]);
                mma16816(dka[dn + 1], sa, b[2], b[3]);
            }
        }
    }
    const long kstride = (long)d.nkv * HD;
    float* dkb = dk + (long)bb * d.s * kstride + (long)kvh * HD;
    float* dvb = dv + (long)bb * d.s * kstride + (long)kvh * HD;
    for (int dn = 0; dn < HD / 8; ++dn) {
        int c = dn * 8 + t * 2;
        if (j0 < d.s) {
            atomicAdd(dkb + (long)j0 * kstride + c, dka[dn][0] * d.scale);
            atomicAdd(dkb + (long)j0 * kstride + c + 1, dka[dn][1] * d.scale);
            atomicAdd(dvb + (long)j0 * kstride + c, dva[dn][0]);
            atomicAdd(dvb + (long)j0 * kstride + c + 1, dva[dn][1]);
        }
        if (j1 < d.s) {
            atomicAdd(dkb + (long)j1 * kstride + c, dka[dn][2] * d.scale);
            atomicAdd(dkb + (long)j1 * kstride + c + 1, dka[dn][3] * d.scale);
            atomicAdd(dvb + (long)j1 * kstride + c, dva[dn][2]);
            atomicAdd(dvb + (long)j1 * kstride + c + 1, dva[dn][3]);
        }
    }
}

// dQ for 64 queries of one head (a second pass instead of atomics: S and dP are recomputed):
// loops over the key tiles up to the block's last query, dQ += scale * sum dS K.
template <int HD>
__device__ void flash_bwd_dq(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                             const unsigned short* __restrict__ v, const unsigned short* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             const unsigned char* __restrict__ kvalid, float* __restrict__ dq, AttnDims d) {
    const int BQ = 64, BK = 64, KP = HD + 8;
    __shared__ __align__(16) unsigned short ks[BK * KP];
    __shared__ __align__(16) unsigned short vs[BK * KP];
    __shared__ unsigned char vk[BK];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * BQ, h = blockIdx.y, bb = blockIdx.z;
    const int kvh = h / (d.nq / d.nkv);
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const HeadRows qm = head_rows<HD>(q, bb, h, d.nq, d.s), dom = head_rows<HD>(dout, bb, h, d.nq, d.s);
    const HeadRows km = head_rows<HD>(k, bb, kvh, d.nkv, d.s), vm = head_rows<HD>(v, bb, kvh, d.nkv, d.s);
    const float* lb = lse + ((long)bb * d.nq + h) * d.s;
    const float* db = delta + ((long)bb * d.nq + h) * d.s;
    const unsigned char* valid = kvalid + (long)bb * d.s;
    unsigned int qa[HD / 16][4], da[HD / 16][4];
    load_a_rows<HD>(qa, qm, r0, r1, d.s, t);
    load_a_rows<HD>(da, dom, r0, r1, d.s, t);
    const float L0 = r0 < d.s ? lb[r0] : POS_INF, L1 = r1 < d.s ? lb[r1] : POS_INF;
    const float D0 = r0 < d.s ? db[r0] : 0.f, D1 = r1 < d.s ? db[r1] : 0.f;
    float acc[HD / 8][4];
    for (int i = 0; i < HD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const int kend = d.s < q0 + BQ ? d.s : q0 + BQ;
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        load_tile<BK, HD>(ks, km, k0, d.s);
        load_tile<BK, HD>(vs, vm, k0, d.s);
        const bool full = load_key_mask<BK>(vk, valid, k0, d.s) && k0 + BK - 1 <= q0;
        float sc[BK / 8][4], dp[BK / 8][4];
        for (int nt = 0; nt < BK / 8; ++nt)
            for (int e = 0; e < 4; ++e) sc[nt][e] = dp[nt][e] = 0.f;
        for (int kk = 0; kk < HD / 16; ++kk)
            for (int nt = 0; nt < BK / 8; nt += 2) {
                unsigned int b[4], c[4];
                ldsm_b_rows(b, ks, KP, nt, kk, lane);
                mma16816(sc[nt], qa[kk], b[0], b[1]);
                mma16816(sc[nt + 1], qa[kk], b[2], b[3]);
                ldsm_b_rows(c, vs, KP, nt, kk, lane);
                mma16816(dp[nt], da[kk], c[0], c[1]);
                mma16816(dp[nt + 1], da[kk], c[2], c[3]);
            }
        for (int nt = 0; nt < BK / 8; ++nt)
            for (int e = 0; e < 4; ++e) {
                bool ok = true;
                if (!full) {
                    int jl = nt * 8 + t * 2 + (e & 1);
                    ok = vk[jl] && k0 + jl <= (e < 2 ? r0 : r1);
                }
                float p = ok ? __expf(sc[nt][e] * d.scale - (e < 2 ? L0 : L1)) : 0.f;
                sc[nt][e] = p * (dp[nt][e] - (e < 2 ? D0 : D1));
            }
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned int sa[4] = {pack2(sc[2 * kk][0], sc[2 * kk][1]), pack2(sc[2 * kk][2], sc[2 * kk][3]),
                                  pack2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]), pack2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
            for (int dn = 0; dn < HD / 8; dn += 2) {
                unsigned int b[4];
                ldsm_b_cols(b, ks, KP, kk, dn, lane);
                mma16816(acc[dn], sa, b[0], b[1]);
                mma16816(acc[dn + 1], sa, b[2], b[3]);
            }
        }
    }
    const long qstride = (long)d.nq * HD;
    float* dqb = dq + (long)bb * d.s * qstride + (long)h * HD;
    for (int dn = 0; dn < HD / 8; ++dn) {
        int c = dn * 8 + t * 2;
        if (r0 < d.s) {
            F2* p = (F2*)(dqb + (long)r0 * qstride + c);
            F2 a = *p;
            *p = f2(a.x + acc[dn][0] * d.scale, a.y + acc[dn][1] * d.scale);
        }
        if (r1 < d.s) {
            F2* p = (F2*)(dqb + (long)r1 * qstride + c);
            F2 a = *p;
            *p = f2(a.x + acc[dn][2] * d.scale, a.y + acc[dn][3] * d.scale);
        }
    }
}

typedef unsigned short bf;
extern "C" __global__ void flash_fwd_64(const bf* q, const bf* k, const bf* v, const unsigned char* kv,
                                        float* o, float* lse, AttnDims d) { flash_fwd<64>(q, k, v, kv, o, lse, d); }
extern "C" __global__ void flash_fwd_128(const bf* q, const bf* k, const bf* v, const unsigned char* kv,
                                         float* o, float* lse, AttnDims d) { flash_fwd<128>(q, k, v, kv, o, lse, d); }
extern "C" __global__ void flash_dkdv_64(const bf* q, const bf* k, const bf* v, const bf* dout, const float* lse,
                                         const float* delta, const unsigned char* kv, float* dk, float* dv,
                                         AttnDims d) {
    flash_bwd_dkdv<64, 64>(q, k, v, dout, lse, delta, kv, dk, dv, d);
}
extern "C" __global__ void flash_dkdv_128(const bf* q, const bf* k, const bf* v, const bf* dout, const float* lse,
                                          const float* delta, const unsigned char* kv, float* dk, float* dv,
                                          AttnDims d) {
    flash_bwd_dkdv<128, 32>(q, k, v, dout, lse, delta, kv, dk, dv, d);
}
extern "C" __global__ void flash_dq_64(const bf* q, const bf* k, const bf* v, const bf* dout, const float* lse,
                                       const float* delta, const unsigned char* kv, float* dq, AttnDims d) {
    flash_bwd_dq<64>(q, k, v, dout, lse, delta, kv, dq, d);
}
extern "C" __global__ void flash_dq_128(const bf* q, const bf* k, const bf* v, const bf* dout, const float* lse,
                                        const float* delta, const unsigned char* kv, float* dq, AttnDims d) {
    flash_bwd_dq<128>(q, k, v, dout, lse, delta, kv, dq, d);
}
"#;

/// The kernels' shape argument (`struct AttnDims` in [`SRC`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnDims {
    b: i32,
    s: i32,
    nq: i32,
    nkv: i32,
    scale: f32,
}

// SAFETY: a plain `#[repr(C)]` struct of 4-byte scalars, passed to the kernels by value.
unsafe impl DeviceRepr for AttnDims {}

/// The shape of one attention call: `batch × seq` tokens, `heads` query heads sharing
/// `kv_heads` key/value heads (`heads % kv_heads == 0`), `head_dim` each.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn dims(&self) -> Result<AttnDims, KernelError> {
        let i = |x: usize| i32::try_from(x).map_err(|_| KernelError::Nvrtc(format!("attention size {x} exceeds i32")));
        Ok(AttnDims {
            b: i(self.batch)?,
            s: i(self.seq)?,
            nq: i(self.heads)?,
            nkv: i(self.kv_heads)?,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        })
    }
}

/// Whether the fused kernels cover this head dimension.
pub(crate) fn supported(head_dim: usize) -> bool {
    head_dim == 64 || head_dim == 128
}

fn module(dev: &Arc<CudaDevice>) -> Result<(), KernelError> {
    if !dev.has_func(MODULE, FUNCS[0]) {
        // mma.sync with bf16 operands needs sm_80 or newer; the driver JIT-compiles this PTX for
        // the card it runs on.
        let opts = cudarc::nvrtc::CompileOptions { arch: Some("compute_80"), ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(SRC, opts).map_err(|e| KernelError::Nvrtc(e.to_string()))?;
        dev.load_ptx(ptx, MODULE, FUNCS)?;
    }
    Ok(())
}

fn func(dev: &Arc<CudaDevice>, name: &str) -> Result<cudarc::driver::CudaFunction, CudaError> {
    dev.get_func(MODULE, name)
        .ok_or(CudaError::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_FOUND)))
}

fn ptr<P: DevicePtr<T>, T>(p: &P) -> u64 {
    *p.device_ptr()
}

/// Forward over bf16 `q`, `k`, `v`: `O [b·s, heads·hd]` (f32) and `lse [b, heads, s]`.
fn forward(
    cu: &Arc<CudaDevice>,
    sh: &AttnShape,
    q: &CudaSlice<u16>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    valid: &CudaSlice<u8>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>), KernelError> {
    module(cu)?;
    let dims = sh.dims()?;
    let n = sh.batch * sh.seq;
    let o = cu.alloc_zeros::<f32>(n * sh.heads * sh.head_dim)?;
    let lse = cu.alloc_zeros::<f32>(sh.batch * sh.heads * sh.seq)?;
    let name = if sh.head_dim == 64 { "flash_fwd_64" } else { "flash_fwd_128" };
    // SAFETY: q is [n, heads·hd], k and v [n, kv_heads·hd] (bf16, 16-byte aligned rows: hd is a
    // multiple of 8), valid [n]; o and lse are sized as the kernel writes them; every index is
    // bounded by the dims passed.
    unsafe { func(cu, name)?.launch(tiles(sh), (ptr(q), ptr(k), ptr(v), ptr(valid), ptr(&o), ptr(&lse), dims))? };
    Ok((o, lse))
}

/// One block of 4 warps per 64 queries (or keys) of one head of one sequence.
fn tiles(sh: &AttnShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (sh.seq.div_ceil(BLOCK) as u32, sh.heads as u32, sh.batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The bf16 copies the kernels read (rounded once per layer, as autocast rounds SDPA's inputs).
struct Bf16Qkv {
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

/// Device addresses of the gradient buffers of `q` `[n, heads·hd]`, `k` and `v`
/// `[n, kv_heads·hd]` (f32), which the backward adds into.
struct Grads {
    dq: u64,
    dk: u64,
    dv: u64,
}

/// Backward: adds `dQ`, `dK`, `dV` into `into`.
#[allow(clippy::too_many_arguments)]
fn backward(
    cu: &Arc<CudaDevice>,
    sh: &AttnShape,
    x: &Bf16Qkv,
    o: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    valid: &CudaSlice<u8>,
    into: Grads,
) -> Result<(), CudaError> {
    let dims = sh.dims().map_err(|_| {
        CudaError::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE))
    })?;
    let n = sh.batch * sh.seq;
    let rows = n * sh.heads;
    let delta = cu.alloc_zeros::<f32>(rows)?;
    // SAFETY: written whole by attn_delta (every row, every column).
    let dout16 = unsafe { cu.alloc::<u16>(rows * sh.head_dim)? };
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: dout, o and dout16 are [rows, hd] (hd even); delta holds one value per row.
    unsafe {
        func(cu, "attn_delta")?.launch(cfg, (ptr(dout), ptr(o), ptr(&delta), ptr(&dout16), sh.head_dim as i32, dims))?
    };
    let (dkdv, dqk) =
        if sh.head_dim == 64 { ("flash_dkdv_64", "flash_dq_64") } else { ("flash_dkdv_128", "flash_dq_128") };
    let (q, k, v, d16) = (ptr(&x.q), ptr(&x.k), ptr(&x.v), ptr(&dout16));
    let args = (q, k, v, d16, ptr(lse), ptr(&delta), ptr(valid), into.dk, into.dv, dims);
    // SAFETY: shapes as in `forward`; into.dk / into.dv are sized like k / v.
    unsafe { func(cu, dkdv)?.launch(tiles(sh), args)? };
    let args = (q, k, v, d16, ptr(lse), ptr(&delta), ptr(valid), into.dq, dims);
    // SAFETY: as above; into.dq is sized like q, each element below seq is updated by one thread.
    unsafe { func(cu, dqk)?.launch(tiles(sh), args)? };
    Ok(())
}

fn driver_err<E: 'static>(e: KernelError) -> E {
    let e = match e {
        KernelError::Cuda(e) => e,
        KernelError::Nvrtc(_) => {
            CudaError::Driver(cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_PTX))
        }
    };
    cast::<CudaError, E>(e).expect("CUDA error type")
}

/// Causal attention of `q [b·s, heads·hd]` over `k`, `v` `[b·s, kv_heads·hd]` (rotary positions
/// already applied), keys masked where `key_valid` (`[b·s]`, the batch's attention mask) is
/// false: `[b·s, heads·hd]`, in the projections' row layout. Records its own backward on `T`'s
/// tape. Only for a CUDA `D` (callers check [`super::is_cuda`]).
pub(crate) fn causal_attention<Q: Dim, K: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    q: Rows<Q, D, T>,
    k: Rows<K, D, T>,
    v: Rows<K, D, T>,
    key_valid: &[bool],
    sh: AttnShape,
) -> Result<Rows<Q, D, T>, KernelError> {
    let (q, tq) = q.contiguous().split_tape();
    let (k, tk) = k.contiguous().split_tape();
    let (v, tv) = v.contiguous().split_tape();
    let mut tape = tq.merge(tk).merge(tv);
    let dev: Cuda = cast(q.device().clone()).expect("causal_attention runs on the CUDA device");
    let cu = dev.cuda_device().clone();
    let valid = cu.htod_copy(key_valid.iter().map(|&m| u8::from(m)).collect::<Vec<u8>>())?;
    let n = sh.batch * sh.seq;
    let x = Bf16Qkv {
        q: super::cuda::to_bf16_buf(&cu, cuda_data(&q).expect(ON_GPU), n * sh.heads * sh.head_dim)?,
        k: super::cuda::to_bf16_buf(&cu, cuda_data(&k).expect(ON_GPU), n * sh.kv_heads * sh.head_dim)?,
        v: super::cuda::to_bf16_buf(&cu, cuda_data(&v).expect(ON_GPU), n * sh.kv_heads * sh.head_dim)?,
    };
    let (o, lse) = forward(&cu, &sh, &x.q, &x.k, &x.v, &valid)?;
    let shape = *q.shape();
    let y: Rows<Q, D, NoneTape> = cast(dev.build_tensor(shape, shape.strides(), o)).expect("the CUDA device");
    if T::OWNS_TAPE {
        // the backward keeps the bf16 copies only: the f32 q, k, v may be freed after the forward
        let (qg, kg, vg, yg) = (q.ghost(), k.ghost(), v.ghost(), y.ghost());
        drop((q, k, v));
        let out = y.clone();
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&yg)?;
            let dy: Rows<Q, D, NoneTape> = grads.get(&yg);
            // the kernels add into the gradient buffers themselves (dQ row by row, dK/dV atomically);
            // the buffers stay where they are while `grads` lends the next one
            const BUF: &str = "a CUDA gradient buffer";
            let dq = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&qg)?).expect(BUF));
            let dk = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&kg)?).expect(BUF));
            let dv = ptr(cuda_buffer::<D>(grads.get_or_alloc_mut(&vg)?).expect(BUF));
            let into = Grads { dq, dk, dv };
            backward(&cu, &sh, &x, cuda_data(&out).expect(ON_GPU), &lse, cuda_data(&dy).expect(ON_GPU), &valid, into)
                .map_err(|e| driver_err::<D::Err>(KernelError::Cuda(e)))
        });
    }
    Ok(y.put_tape(tape))
}
