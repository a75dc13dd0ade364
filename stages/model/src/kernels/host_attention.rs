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
    // one item per (query token, KV head): the `rep` query heads reading that KV head are
    // adjacent (`h = kv * rep + i`), so an item owns `rep * hd` contiguous outputs and reads each
    // cached key and value once for all of them
    let work = |i: usize, out: &mut [f32]| {
        let (tok, kvh) = (i / kv_heads, i % kv_heads);
        let (r, t) = (tok / s, tok % s);
        let row = &rows[r];
        let mask = &key_mask[r];
        let stored = row.k.len() / kw;
        // the row's buffer holds the cache's last `stored` positions (`KvCache::stack` pads
        // shorter rows logically only)
        let offset = mask.len() - stored;
        let visible = mask.len() - s + t + 1;
        let at: Vec<usize> =
            (offset.min(visible)..visible).filter(|&j| mask[j]).map(|j| (j - offset) * kw + kvh * hd).collect();
        out.fill(0.0);
        if at.is_empty() {
            return;
        }
        let mut w = vec![0f32; at.len()];
        for (g, o) in out.chunks_exact_mut(hd).enumerate() {
            let h = kvh * rep + g;
            let qv = &q[tok * qw + h * hd..tok * qw + (h + 1) * hd];
            scores(qv, &row.k, &at, scale, &mut w, simd);
            let max = w.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in w.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            w.iter_mut().for_each(|x| *x *= inv);
            weighted_sum(o, &w, &row.v, &at, simd);
        }
    };
    let mut out = vec![0f32; b * s * qw];
    let visible_total: usize = key_mask.iter().map(Vec::len).sum::<usize>() * s;
    if visible_total * heads * hd < PARALLEL_MIN_WORK {
        out.chunks_exact_mut(rep * hd).enumerate().for_each(|(i, o)| work(i, o));
    } else {
        let min_len = (b * s * kv_heads / (4 * rayon::current_num_threads())).max(1);
        out.par_chunks_exact_mut(rep * hd).enumerate().with_min_len(min_len).for_each(|(i, o)| work(i, o));
    }
    out
}

/// `w[i] = (q · k[at[i]..at[i] + q.len()]) · scale`.
#[inline]
fn scores(q: &[f32], k: &[f32], at: &[usize], scale: f32, w: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd && q.len().is_multiple_of(8) {
        assert!(at.iter().all(|&p| p + q.len() <= k.len()) && w.len() == at.len(), "key rows within the cache");
        // SAFETY: `simd` is only true when the CPU has AVX2 and FMA (`quant::simd_on`); the rows are within `k` (checked just above).
        unsafe { avx2::scores(q, k, at, scale, w) };
        return;
    }
    let _ = simd;
    for (x, &p) in w.iter_mut().zip(at) {
        *x = q.iter().zip(&k[p..p + q.len()]).map(|(a, b)| a * b).sum::<f32>() * scale;
    }
}

/// `out = Σ_i w[i] · v[at[i]..at[i] + out.len()]`.
#[inline]
fn weighted_sum(out: &mut [f32], w: &[f32], v: &[f32], at: &[usize], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd && out.len().is_multiple_of(8) {
        // SAFETY: as in `scores`; every `at[i] + out.len()` is within `v` (checked here).
        assert!(at.iter().all(|&p| p + out.len() <= v.len()), "value rows within the cache");
        unsafe { avx2::weighted_sum(out, w, v, at) };
        return;
    }
    let _ = simd;
    out.fill(0.0);
    let n = out.len();
    for (&wi, &p) in w.iter().zip(at) {
        for (o, &x) in out.iter_mut().zip(&v[p..p + n]) {
            *o += wi * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `w[i] = (q · k[at[i]..]) · scale`, four positions at a time (four independent chains of
    /// multiply-adds rather than one whose latency bounds a short dot product).
    ///
    /// # Safety
    /// AVX2 and FMA; `q.len()` a multiple of 8; `at[i] + q.len() <= k.len()`; `w.len() == at.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(q: &[f32], k: &[f32], at: &[usize], scale: f32, w: &mut [f32]) {
        let (qp, kp, n) = (q.as_ptr(), k.as_ptr(), q.len());
        let mut quads = at.chunks_exact(4);
        let mut i = 0;
        for p in quads.by_ref() {
            let (r0, r1, r2, r3) = (kp.add(p[0]), kp.add(p[1]), kp.add(p[2]), kp.add(p[3]));
            // four named accumulators: an array of them is kept on the stack
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            for c in (0..n).step_by(8) {
                let qv = _mm256_loadu_ps(qp.add(c));
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r0.add(c)), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r1.add(c)), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r2.add(c)), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r3.add(c)), a3);
            }
            *w.get_unchecked_mut(i) = hsum(a0) * scale;
            *w.get_unchecked_mut(i + 1) = hsum(a1) * scale;
            *w.get_unchecked_mut(i + 2) = hsum(a2) * scale;
            *w.get_unchecked_mut(i + 3) = hsum(a3) * scale;
            i += 4;
        }
        for &p in quads.remainder() {
            let mut acc = _mm256_setzero_ps();
            for c in (0..n).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kp.add(p + c)), acc);
            }
            *w.get_unchecked_mut(i) = hsum(acc) * scale;
            i += 1;
        }
    }

    /// `out = Σ_i w[i] · v[at[i]..]`, 64 outputs (eight named vector accumulators, kept in
    /// registers across all positions) at a time, then eight at a time.
    ///
    /// # Safety
    /// AVX2 and FMA; `out.len()` a multiple of 8; `at[i] + out.len() <= v.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(out: &mut [f32], w: &[f32], v: &[f32], at: &[usize]) {
        let (vp, op) = (v.as_ptr(), out.as_mut_ptr());
        let mut c = 0;
        while c + 64 <= out.len() {
            let z = _mm256_setzero_ps();
            let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = (z, z, z, z, z, z, z, z);
            for (&wi, &p) in w.iter().zip(at) {
                let (wv, src) = (_mm256_set1_ps(wi), vp.add(p + c));
                a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src), a0);
                a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(8)), a1);
                a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(16)), a2);
                a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(24)), a3);
                a4 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(32)), a4);
                a5 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(40)), a5);
                a6 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(48)), a6);
                a7 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(56)), a7);
            }
            for (l, a) in [a0, a1, a2, a3, a4, a5, a6, a7].into_iter().enumerate() {
                _mm256_storeu_ps(op.add(c + 8 * l), a);
            }
            c += 64;
        }
        while c < out.len() {
            let mut a = _mm256_setzero_ps();
            for (&wi, &p) in w.iter().zip(at) {
                a = _mm256_fmadd_ps(_mm256_set1_ps(wi), _mm256_loadu_ps(vp.add(p + c)), a);
            }
            _mm256_storeu_ps(op.add(c), a);
            c += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 scores and weighted sum equal the portable loops (head widths 64, 128 and 24
    /// cover the full 64-wide pass and the remainder).
    #[test]
    fn simd_loops_equal_the_portable_ones() {
        if !crate::kernels::quant::simd_on() {
            return;
        }
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0).collect()
        };
        for hd in [64, 128, 24] {
            let a = vals(hd, 1);
            let k = vals(hd * 10, 5);
            for at in [vec![0, 2 * hd, 9 * hd, hd, 4 * hd, 7 * hd], vec![3 * hd]] {
                let (mut fast, mut slow) = (vec![0f32; at.len()], vec![0f32; at.len()]);
                scores(&a, &k, &at, 0.125, &mut fast, true);
                scores(&a, &k, &at, 0.125, &mut slow, false);
                for (f, s) in fast.iter().zip(&slow) {
                    assert!((f - s).abs() <= 1e-5 * (1.0 + s.abs()), "scores {hd}: {f} vs {s}");
                }
            }
            let v = vals(hd * 10, 3);
            let w = vals(4, 4);
            let at = [0, 3 * hd, 9 * hd, 5 * hd];
            let (mut fast, mut slow) = (vec![1f32; hd], vec![2f32; hd]);
            weighted_sum(&mut fast, &w, &v, &at, true);
            weighted_sum(&mut slow, &w, &v, &at, false);
            for (f, s) in fast.iter().zip(&slow) {
                assert!((f - s).abs() <= 1e-5, "weighted sum {hd}: {f} vs {s}");
            }
        }
    }
}
