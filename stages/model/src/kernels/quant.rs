//! `x Wᵀ` through a quantised weight ([`QMatrix`]) without dequantising it: each activation row
//! is quantised to int8 blocks ([`QAct`], llama.cpp's q8_0 / q8_K), then every output is a sum of
//! block-wise int8 dot products scaled by the blocks' f16 scales ([`super::qblocks`] documents the
//! formats and the rounding this implies).
//!
//! The row kernels are AVX2 + FMA + F16C, chosen at run time (`is_x86_feature_detected!`, as
//! [`super::host_matmul`] does), with [`dot_row_scalar`] as the portable fallback the tests
//! compare them with. Every format has a hand-written AVX2 loop (llama.cpp's `maddubs` scheme:
//! unsigned × signed bytes to i16 pairs, pairs to i32 with the block scale); Q5_0/Q5_1 spread
//! their 32 fifth bits to a byte mask first. Output rows are split over rayon's pool.
//!
//! `PIPELINE_SCALAR_QUANT=1` forces the portable kernels (read once; for comparisons).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::qblocks::{dot_row_scalar, QAct, QFormat, QMatrix};

/// Whether the AVX2 kernels run here (the CPU has AVX2, FMA and F16C, and
/// `PIPELINE_SCALAR_QUANT` is not `1`).
pub(crate) fn simd_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let forced_off = std::env::var("PIPELINE_SCALAR_QUANT").is_ok_and(|v| v == "1");
        !forced_off && has_avx2()
    })
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

/// One output: row `w` (its blocks) · activation row `x`, on the fastest kernel available.
#[inline]
fn dot_row(fmt: QFormat, w: &[u8], x: &QAct, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2, FMA and F16C (`simd_on`).
        return unsafe { avx2::dot_row(fmt, w, x) };
    }
    let _ = simd;
    dot_row_scalar(fmt, w, x)
}

/// `ys[r] = w · xs[r]` for one weight row and every activation row. Q8_0, Q4_0 and Q4_1 (the
/// block formats of llama.cpp's common quantisations) have AVX2 kernels that unpack each weight
/// block once for up to [`avx2::ROWS`] activation rows, so a batched decoding step pays the
/// unpacking (nibbles, f16 scales) once per block rather than once per sequence; each row's sum
/// is the single-row kernel's, operation for operation (a sequence gets the same output batched
/// or alone). Other formats loop over the rows (the weight row stays in L1 across them).
#[inline]
fn dot_rows(fmt: QFormat, w: &[u8], xs: &[QAct], ys: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd && xs.len() > 1 && avx2::has_rows_kernel(fmt) {
        // SAFETY: `simd` is only true when the CPU has AVX2, FMA and F16C (`simd_on`).
        unsafe { avx2::dot_rows(fmt, w, xs, ys) };
        return;
    }
    for (y, a) in ys.iter_mut().zip(xs) {
        *y = dot_row(fmt, w, a, simd);
    }
}

/// Output rows per rayon task (one task per row would cost more in scheduling than a short row).
const ROWS_PER_TASK: usize = 32;

/// `y[r][j] = Σ_k x[r][k] · W[j][k]` for `x: [n, k]` row-major and `W = w: [out, k]`, through the
/// quantised blocks. `simd = false` takes the portable kernels.
pub(crate) fn quant_matmul_wt_with(x: &[f32], n: usize, w: &QMatrix, simd: bool) -> Vec<f32> {
    let (k, out) = (w.cols(), w.rows());
    assert_eq!(x.len(), n * k, "activations [{n}, {k}] for a weight [{out}, {k}]");
    let fmt = w.format();
    let acts: Vec<QAct> = x.chunks_exact(k).map(|r| QAct::new(fmt, r)).collect();
    // yt[j][r]: each task owns ROWS_PER_TASK weight rows of every activation row
    let mut yt = vec![0f32; out * n];
    let rows = w.view();
    let work = |(t, ys): (usize, &mut [f32])| {
        for (jj, yj) in ys.chunks_exact_mut(n).enumerate() {
            dot_rows(fmt, rows.row(t * ROWS_PER_TASK + jj), &acts, yj, simd);
        }
    };
    if out * k < 1 << 16 {
        yt.chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(work);
    } else {
        yt.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(work);
    }
    if n == 1 {
        return yt;
    }
    let mut y = vec![0f32; n * out];
    for j in 0..out {
        for r in 0..n {
            y[r * out + j] = yt[j * n + r];
        }
    }
    y
}

/// [`quant_matmul_wt_with`] on the kernels this CPU runs ([`simd_on`]).
pub(crate) fn quant_matmul_wt(x: &[f32], n: usize, w: &QMatrix) -> Vec<f32> {
    quant_matmul_wt_with(x, n, w, simd_on())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::qblocks::{dot_row_scalar, scales_mins_k4, Q8Block, Q8KBlock, QAct, QFormat};

    /// f16 bits at `p` to f32 (F16C).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Eight i32 sums of four products each of two signed byte vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mul_sum_i8(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
    }

    /// Eight i32 sums of unsigned `w` × signed `x` byte products, each pair sum scaled by the
    /// i16 lanes of `scale`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mul_sum_u8_i8(w: __m256i, x: __m256i, scale: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), scale)
    }

    /// 16 bytes of nibbles as 32 bytes: low nibbles first, then high ones (Q4_0/Q4_1's order).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let m4 = _mm_set1_epi8(0xF);
        let lo = _mm_and_si128(q, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        _mm256_set_m128i(hi, lo)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const i8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0(w: &[u8], xs: &[Q8Block]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, a) in w.chunks_exact(34).zip(xs) {
            let p = b.as_ptr();
            let s = mul_sum_i8(_mm256_loadu_si256(p.add(2) as *const __m256i), load(a.qs.as_ptr()));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(p) * a.d), _mm256_cvtepi32_ps(s), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0(w: &[u8], xs: &[Q8Block]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let eight = _mm256_set1_epi8(8);
        for (b, a) in w.chunks_exact(18).zip(xs) {
            let p = b.as_ptr();
            let q = _mm256_sub_epi8(nibbles(p.add(2)), eight);
            let s = mul_sum_i8(q, load(a.qs.as_ptr()));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(p) * a.d), _mm256_cvtepi32_ps(s), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1(w: &[u8], xs: &[Q8Block]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let ones = _mm256_set1_epi16(1);
        let mut mins = 0f32;
        for (b, a) in w.chunks_exact(20).zip(xs) {
            let p = b.as_ptr();
            let s = mul_sum_u8_i8(nibbles(p.add(4)), load(a.qs.as_ptr()), ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(p) * a.d), _mm256_cvtepi32_ps(s), acc);
            mins += f16(p.add(2)) * a.ds;
        }
        hsum(acc) + mins
    }

    /// The 32 fifth bits of a Q5 block (`qh`, bit `i` for element `i`) as 32 bytes, 0x10 where
    /// the bit is set and 0 elsewhere: byte `i` takes `qh`'s byte `i / 8` and tests bit `i % 8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        let qh = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
        // the byte index (0..4) of each element's bit, the same in both 128-bit lanes
        let which = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), which);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0(w: &[u8], xs: &[Q8Block]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let sixteen = _mm256_set1_epi8(16);
        for (b, a) in w.chunks_exact(22).zip(xs) {
            let p = b.as_ptr();
            // codes 0..32 minus 16: signed bytes in -16..16
            let q = _mm256_sub_epi8(_mm256_or_si256(nibbles(p.add(6)), fifth_bits(p.add(2))), sixteen);
            let s = mul_sum_i8(q, load(a.qs.as_ptr()));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(p) * a.d), _mm256_cvtepi32_ps(s), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_1(w: &[u8], xs: &[Q8Block]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let ones = _mm256_set1_epi16(1);
        let mut mins = 0f32;
        for (b, a) in w.chunks_exact(24).zip(xs) {
            let p = b.as_ptr();
            let q = _mm256_or_si256(nibbles(p.add(8)), fifth_bits(p.add(4)));
            let s = mul_sum_u8_i8(q, load(a.qs.as_ptr()), ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(p) * a.d), _mm256_cvtepi32_ps(s), acc);
            mins += f16(p.add(2)) * a.ds;
        }
        hsum(acc) + mins
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k(w: &[u8], xs: &[Q8KBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        let m4 = _mm256_set1_epi8(0xF);
        for (b, a) in w.chunks_exact(144).zip(xs) {
            let p = b.as_ptr();
            let (sc, m) = scales_mins_k4(&b[4..16]);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let q = _mm256_loadu_si256(p.add(16 + 32 * j) as *const __m256i);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                let x0 = load(a.qs.as_ptr().add(64 * j));
                let x1 = load(a.qs.as_ptr().add(64 * j + 32));
                let s0 = mul_sum_u8_i8(lo, x0, _mm256_set1_epi16(sc[2 * j] as i16));
                let s1 = mul_sum_u8_i8(hi, x1, _mm256_set1_epi16(sc[2 * j + 1] as i16));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(s0, s1));
            }
            let mut mi = 0i32;
            for (g, &mg) in m.iter().enumerate() {
                mi += mg as i32 * (a.bsums[2 * g] as i32 + a.bsums[2 * g + 1] as i32);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(p) * a.d), _mm256_cvtepi32_ps(sumi), acc);
            mins += f16(p.add(2)) * a.d * mi as f32;
        }
        hsum(acc) - mins
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k(w: &[u8], xs: &[Q8KBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut corr = 0f32;
        let m4 = _mm256_set1_epi8(0xF);
        let (m03, m0c, m30, mc0) =
            (_mm256_set1_epi8(0x03), _mm256_set1_epi8(0x0C), _mm256_set1_epi8(0x30), _mm256_set1_epi8(0xC0u8 as i8));
        for (b, a) in w.chunks_exact(210).zip(xs) {
            let p = b.as_ptr();
            let sc = &b[192..208];
            // two i8 scales (elements 0..16 and 16..32 of a 32-element code vector) as i16 lanes
            let scale =
                |g: usize| _mm256_set_m128i(_mm_set1_epi16(sc[g + 1] as i8 as i16), _mm_set1_epi16(sc[g] as i8 as i16));
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                let q1 = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m03), 4));
                let q2 = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m0c), 2));
                let q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
                let q4 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_srli_epi16(_mm256_and_si256(qh, mc0), 2),
                );
                let x = a.qs.as_ptr().add(128 * h);
                for (i, q) in [q1, q2, q3, q4].into_iter().enumerate() {
                    let s = mul_sum_u8_i8(q, load(x.add(32 * i)), scale(8 * h + 2 * i));
                    sumi = _mm256_add_epi32(sumi, s);
                }
            }
            // Σ sc · (q − 32) · x = Σ sc · q · x − 32 Σ sc · bsum
            let sb: i32 = sc.iter().zip(&a.bsums).map(|(&s, &b)| s as i8 as i32 * b as i32).sum();
            let d = f16(p.add(208)) * a.d;
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
            corr += d * (32 * sb) as f32;
        }
        hsum(acc) - corr
    }

    /// Activation rows one weight block is unpacked for ([`dot_rows`]).
    pub(super) const ROWS: usize = 4;

    /// Whether [`dot_rows`] has a multi-row kernel for `fmt`.
    pub(super) fn has_rows_kernel(fmt: QFormat) -> bool {
        matches!(fmt, QFormat::Q8_0 | QFormat::Q4_0 | QFormat::Q4_1)
    }

    /// The q8_0 blocks of `R` activation rows.
    #[inline]
    fn blocks<const R: usize>(xs: &[QAct]) -> [&[Q8Block]; R] {
        std::array::from_fn(|r| match &xs[r] {
            QAct::B32(b) => b.as_slice(),
            QAct::K(_) => panic!("q8_K activations for a 32-element block format"),
        })
    }

    /// [`q8_0`] for `R` activation rows at once (the same operations per row).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_rows<const R: usize>(w: &[u8], xs: [&[Q8Block]; R]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for (i, b) in w.chunks_exact(34).enumerate() {
            let p = b.as_ptr();
            let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
            let d = f16(p);
            for r in 0..R {
                let a = xs[r].get_unchecked(i);
                let s = mul_sum_i8(q, load(a.qs.as_ptr()));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]))
    }

    /// [`q4_0`] for `R` activation rows at once.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_rows<const R: usize>(w: &[u8], xs: [&[Q8Block]; R]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let eight = _mm256_set1_epi8(8);
        for (i, b) in w.chunks_exact(18).enumerate() {
            let p = b.as_ptr();
            let q = _mm256_sub_epi8(nibbles(p.add(2)), eight);
            let d = f16(p);
            for r in 0..R {
                let a = xs[r].get_unchecked(i);
                let s = mul_sum_i8(q, load(a.qs.as_ptr()));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]))
    }

    /// [`q4_1`] for `R` activation rows at once.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_rows<const R: usize>(w: &[u8], xs: [&[Q8Block]; R]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [0f32; R];
        let ones = _mm256_set1_epi16(1);
        for (i, b) in w.chunks_exact(20).enumerate() {
            let p = b.as_ptr();
            let q = nibbles(p.add(4));
            let (d, m) = (f16(p), f16(p.add(2)));
            for r in 0..R {
                let a = xs[r].get_unchecked(i);
                let s = mul_sum_u8_i8(q, load(a.qs.as_ptr()), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(s), acc[r]);
                mins[r] += m * a.ds;
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + mins[r])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_of<const R: usize>(fmt: QFormat, w: &[u8], xs: &[QAct], ys: &mut [f32]) {
        let xs = blocks::<R>(xs);
        let n = w.len() / fmt.block().1;
        assert!(xs.iter().all(|x| x.len() >= n), "activation rows shorter than the weight row");
        let out = match fmt {
            QFormat::Q8_0 => q8_0_rows::<R>(w, xs),
            QFormat::Q4_0 => q4_0_rows::<R>(w, xs),
            QFormat::Q4_1 => q4_1_rows::<R>(w, xs),
            _ => unreachable!("has_rows_kernel"),
        };
        ys[..R].copy_from_slice(&out);
    }

    /// `ys[r] = w · xs[r]`, [`ROWS`] activation rows per pass over the weight row.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `has_rows_kernel(fmt)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(fmt: QFormat, w: &[u8], xs: &[QAct], ys: &mut [f32]) {
        let mut i = 0;
        while i + ROWS <= xs.len() {
            rows_of::<ROWS>(fmt, w, &xs[i..], &mut ys[i..]);
            i += ROWS;
        }
        match xs.len() - i {
            0 => {}
            1 => rows_of::<1>(fmt, w, &xs[i..], &mut ys[i..]),
            2 => rows_of::<2>(fmt, w, &xs[i..], &mut ys[i..]),
            _ => rows_of::<3>(fmt, w, &xs[i..], &mut ys[i..]),
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row(fmt: QFormat, w: &[u8], x: &QAct) -> f32 {
        match (fmt, x) {
            (QFormat::Q8_0, QAct::B32(xs)) => q8_0(w, xs),
            (QFormat::Q4_0, QAct::B32(xs)) => q4_0(w, xs),
            (QFormat::Q4_1, QAct::B32(xs)) => q4_1(w, xs),
            (QFormat::Q5_0, QAct::B32(xs)) => q5_0(w, xs),
            (QFormat::Q5_1, QAct::B32(xs)) => q5_1(w, xs),
            (QFormat::Q4_K, QAct::K(xs)) => q4_k(w, xs),
            (QFormat::Q6_K, QAct::K(xs)) => q6_k(w, xs),
            // a format with activations of the other kind: `QAct::new` never makes one
            _ => dot_row_scalar(fmt, w, x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{quantize, GgmlType};

    /// Deterministic values in [-1, 1) with some structure (row offsets, a few outliers).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0;
                if i % 97 == 3 {
                    v * 4.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn matrix(ty: GgmlType, rows: usize, cols: usize) -> (QMatrix, Vec<f32>) {
        let w = values(rows * cols, 1);
        let bytes = quantize(ty, &w).expect("quantise");
        let q = QMatrix::new(QFormat::from_ggml(ty).unwrap(), rows, cols, bytes).unwrap();
        let deq = q.dequantize();
        (q, deq)
    }

    #[test]
    fn every_kernel_equals_the_scalar_reference_and_the_dequantised_product() {
        let formats = [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ];
        for ty in formats {
            for (n, cols, rows) in [(1, 256, 3), (3, 512, 70), (2, 1536, 40)] {
                let (q, deq) = matrix(ty, rows, cols);
                let x = values(n * cols, 7);
                let scalar = quant_matmul_wt_with(&x, n, &q, false);
                let fast = quant_matmul_wt_with(&x, n, &q, true);
                for r in 0..n {
                    let xr = &x[r * cols..(r + 1) * cols];
                    let amax = xr.chunks(if QFormat::from_ggml(ty).unwrap().k_quant() { 256 } else { 32 });
                    for j in 0..rows {
                        let wr = &deq[j * cols..(j + 1) * cols];
                        let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        // activation rounding: |Δx| ≤ d/2 = max|x_block| / 254 per element
                        let bound: f64 = amax
                            .clone()
                            .zip(wr.chunks(xr.len() / amax.len()))
                            .map(|(xb, wb)| {
                                let m = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 254.0;
                                m * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
                            })
                            .sum();
                        let (s, f) = (scalar[r * rows + j] as f64, fast[r * rows + j] as f64);
                        let tol = 1e-5 * (1.0 + exact.abs() + bound);
                        assert!((s - f).abs() <= tol, "{ty:?} [{n},{cols},{rows}] ({r},{j}): simd {f} vs scalar {s}");
                        assert!(
                            (s - exact).abs() <= bound + tol,
                            "{ty:?} ({r},{j}): {s} vs f32 product {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    /// Random bytes (every pattern of fifth bits and nibbles) with sane f16 scales.
    fn random_blocks(fmt: QFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let (be, bb) = fmt.block();
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (s >> 33) as u8
        };
        let scales = if matches!(fmt, QFormat::Q5_1 | QFormat::Q4_1) { 2 } else { 1 };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / be {
            for k in 0..scales {
                let v = (0.01 + next() as f32 / 5000.0) * if k == 1 && next() & 1 == 1 { -1.0 } else { 1.0 };
                bytes.extend(half::f16::from_f32(v).to_le_bytes());
            }
            bytes.extend((2 * scales..bb).map(|_| next()));
        }
        bytes
    }

    /// The SIMD product equals the scalar one (to 1e-5 relative) and both are within the
    /// activation rounding's bound of the f64 product with the dequantised weights (`block`: the
    /// activation block length, 32 or 256).
    fn assert_simd_matches_scalar(q: &QMatrix, n: usize, seed: usize, block: usize, what: &str) {
        let (rows, cols) = (q.rows(), q.cols());
        let deq = q.dequantize();
        let x = values(n * cols, seed);
        let scalar = quant_matmul_wt_with(&x, n, q, false);
        let fast = quant_matmul_wt_with(&x, n, q, true);
        for r in 0..n {
            let xr = &x[r * cols..(r + 1) * cols];
            for j in 0..rows {
                let wr = &deq[j * cols..(j + 1) * cols];
                let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let bound: f64 = xr
                    .chunks(block)
                    .zip(wr.chunks(block))
                    .map(|(xb, wb)| {
                        xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 254.0
                            * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
                    })
                    .sum();
                let (sv, f) = (scalar[r * rows + j] as f64, fast[r * rows + j] as f64);
                let tol = 1e-5 * (1.0 + exact.abs() + bound);
                assert!((sv - f).abs() <= tol, "{what} ({r},{j}): simd {f} vs scalar {sv}");
                assert!((sv - exact).abs() <= bound + tol, "{what} ({r},{j}): {sv} vs {exact}");
            }
        }
    }

    #[test]
    fn q5_kernels_equal_the_scalar_reference_on_random_blocks() {
        for fmt in [QFormat::Q5_0, QFormat::Q5_1] {
            let (rows, cols) = (37, 320);
            let q = QMatrix::new(fmt, rows, cols, random_blocks(fmt, rows, cols, 99)).unwrap();
            for n in [1, 3] {
                assert_simd_matches_scalar(&q, n, 5, 32, &format!("{fmt:?}"));
            }
        }
    }

    /// A batched product gives every activation row exactly what it gets alone (the multi-row
    /// kernels do the single-row kernel's operations per row), for batches that use the 4-row
    /// pass and each remainder.
    #[test]
    fn every_row_of_a_batched_product_equals_the_row_alone() {
        let formats = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q4_K, GgmlType::Q6_K];
        let (rows, cols) = (37, 512);
        for ty in formats {
            let (q, _) = matrix(ty, rows, cols);
            for n in [2, 3, 4, 5, 9, 16] {
                let x = values(n * cols, 11 + n);
                for simd in [false, true] {
                    let batched = quant_matmul_wt_with(&x, n, &q, simd);
                    for r in 0..n {
                        let alone = quant_matmul_wt_with(&x[r * cols..(r + 1) * cols], 1, &q, simd);
                        let got = &batched[r * rows..(r + 1) * rows];
                        assert!(
                            got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{ty:?} simd {simd} n {n} row {r}: {got:?} vs {alone:?}"
                        );
                    }
                }
            }
        }
    }

    /// Q6_K blocks of random bytes (negative and extreme scales a quantiser does not write).
    #[test]
    fn q6_k_kernel_equals_the_scalar_reference_and_the_dequantised_product() {
        let (rows, cols) = (9, 512);
        let mut bytes = Vec::new();
        let mut s = 12345u64;
        let mut next = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (s >> 33) as u8
        };
        for _ in 0..rows * cols / 256 {
            let mut b: Vec<u8> = (0..208).map(|_| next()).collect();
            b.extend(half::f16::from_f32(0.01 + next() as f32 / 5000.0).to_le_bytes());
            bytes.extend(b);
        }
        let q = QMatrix::new(QFormat::Q6_K, rows, cols, bytes).unwrap();
        for n in [1, 2] {
            assert_simd_matches_scalar(&q, n, 3, 256, "Q6_K");
        }
    }
}
