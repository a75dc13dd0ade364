//! Attention of a no-gradient CPU forward over a host KV cache ([`crate::batch::HostLayer`]): the
//! decoding step of `generate`, the evaluate stage and the server's batches.
//!
//! dfdx's ops would concatenate the whole cache onto the new keys at every step, repeat the work
//! of a `[rows, heads, 1, len]` mask and run each small product through its general gemm. Here
//! each row's new keys and values are appended to its own buffers, and every (query, head) pair
//! is one pass over that row's visible positions: scores `q · k / sqrt(head_dim)` (f32 dot
//! products, AVX2 + FMA chosen at run time), a max-subtracted softmax, then the weighted sum of
//! the values. Query head `h` reads KV head `h / (heads / kv_heads)` (transformers' `repeat_kv`)
//! without repeating anything. Rows have their own lengths and key masks, so a batch of sequences
//! of different lengths needs no padded copies. The result equals the dfdx path within float
//! rounding (`tests::host_attention_equals_the_dfdx_path`).
//!
//! Rotary embeddings are applied here too ([`rope`]), with the forward's host tables.

use rayon::prelude::*;

use crate::batch::HostLayer;

/// The shape of one forward's attention: `batch` rows of `seq` new tokens, `heads` query heads
/// over `kv_heads` key/value heads of `head_dim`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Below this many multiply-adds an attention runs on the calling thread (a decoding step of one
/// short sequence costs less than waking the pool).
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Rotary embedding in place of `x: [tokens, heads * head_dim]` with the rotate-half tables `cos`,
/// `sin: [tokens, head_dim]`: `x · cos + rotate_half(x) · sin`, the operations of the dfdx path.
pub(crate) fn rope(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    let width = heads * head_dim;
    for (t, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (&cos[t * head_dim..(t + 1) * head_dim], &sin[t * head_dim..(t + 1) * head_dim]);
        for h in row.chunks_exact_mut(head_dim) {
            let (lo, hi) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c[i] + -b * s[i];
                hi[i] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/// Appends the new keys `k` and values `v` (`[batch * seq, kv_heads * head_dim]`) to each row of
/// `layer`, then returns the attention output `[batch * seq, heads * head_dim]` of the queries `q`
/// (`[batch * seq, heads * head_dim]`, rotary embedding applied). `key_mask[r]` is row `r`'s mask
/// over the cache's positions including the new ones (its length is the cache's length after the
/// step); query `t` of row `r` sees the unmasked positions up to its own. A query that sees
/// nothing (a padding token before any real one) gets zeros: no real token attends to it.
pub(crate) fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layer: &mut HostLayer,
    key_mask: &[Vec<bool>],
    sh: HostShape,
) -> Vec<f32> {
    let HostShape { batch: b, seq: s, heads, kv_heads, head_dim: hd } = sh;
    let (qw, kw) = (heads * hd, kv_heads * hd);
    assert_eq!(q.len(), b * s * qw, "queries for [{b} x {s}] tokens");
    assert_eq!((k.len(), v.len()), (b * s * kw, b * s * kw), "keys/values for [{b} x {s}] tokens");
    assert_eq!(key_mask.len(), b, "a key mask per row");
    if layer.rows.len() < b {
        layer.rows.resize_with(b, Default::default);
    }
    for (r, row) in layer.rows.iter_mut().enumerate().take(b) {
        row.append(&k[r * s * kw..(r + 1) * s * kw], &v[r * s * kw..(r + 1) * s * kw], kw);
    }
    let rows = &layer.rows;
    let rep = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let simd = super::quant::simd_on();
    // one item per (query token, head): `hd` outputs
    let work = |i: usize, out: &mut [f32]| {
        let (tok, h) = (i / heads, i % heads);
        let (r, t) = (tok / s, tok % s);
        let row = &rows[r];
        let mask = &key_mask[r];
        let stored = row.k.len() / kw;
        // the row's buffer holds the cache's last `stored` positions (`KvCache::stack` pads
        // shorter rows logically only)
        let offset = mask.len() - stored;
        let visible = mask.len() - s + t + 1;
        let qv = &q[tok * qw + h * hd..tok * qw + (h + 1) * hd];
        let kv_off = (h / rep) * hd;
        let mut scores: Vec<(usize, f32)> = Vec::with_capacity(visible - offset.min(visible));
        for (j, _) in mask.iter().enumerate().take(visible).skip(offset).filter(|(_, &m)| m) {
            let p = (j - offset) * kw + kv_off;
            scores.push((p, dot(qv, &row.k[p..p + hd], simd) * scale));
        }
        out.fill(0.0);
        if scores.is_empty() {
            return;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &(_, x)| m.max(x));
        let mut sum = 0f32;
        for (_, x) in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for &(p, w) in &scores {
            axpy(out, w / sum, &row.v[p..p + hd], simd);
        }
    };
    let mut out = vec![0f32; b * s * qw];
    let visible_total: usize = key_mask.iter().map(Vec::len).sum::<usize>() * s;
    if visible_total * heads * hd < PARALLEL_MIN_WORK {
        out.chunks_exact_mut(hd).enumerate().for_each(|(i, o)| work(i, o));
    } else {
        let min_len = (b * s * heads / (4 * super::host_threads())).max(1);
        out.par_chunks_exact_mut(hd).enumerate().with_min_len(min_len).for_each(|(i, o)| work(i, o));
    }
    out
}

/// `a · b`.
#[inline]
fn dot(a: &[f32], b: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd && a.len() % 8 == 0 {
        // SAFETY: `simd` is only true when the CPU has AVX2 and FMA (`quant::simd_on`).
        return unsafe { avx2::dot(a, b) };
    }
    let _ = simd;
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out += w · x`.
#[inline]
fn axpy(out: &mut [f32], w: f32, x: &[f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd && out.len() % 8 == 0 {
        // SAFETY: as in `dot`.
        unsafe { avx2::axpy(out, w, x) };
        return;
    }
    let _ = simd;
    for (o, &v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA; `a.len() == b.len()`, a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        let mut acc = _mm256_setzero_ps();
        for i in (0..a.len()).step_by(8) {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// # Safety
    /// AVX2 and FMA; `out.len() == x.len()`, a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
        debug_assert_eq!(out.len(), x.len());
        let wv = _mm256_set1_ps(w);
        for i in (0..out.len()).step_by(8) {
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(o)));
        }
    }
}
