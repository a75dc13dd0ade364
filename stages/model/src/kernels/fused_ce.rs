//! Fused LM head + log-softmax at the targets: `lp[t] = h[t]·W[y_t] − logsumexp_j(h[t]·W[j])` for a
//! frozen head `W: [vocab, hidden]`, without the `[tokens × vocab]` logits ever existing whole.
//!
//! The reference ([`crate::Qwen2::forward_logprobs`]'s unfused path) is `log_softmax(h·Wᵀ)` then a
//! select: over Qwen2.5's 151,936 columns that is four to five `tokens × vocab` f32 tensors and
//! their gradients, and a full `dW` product dfdx computes and drops (the head is frozen in LoRA).
//! Here (Liger Kernel's fused linear cross-entropy; flash-attention's online softmax):
//!
//! - tokens are split over the cores, and each thread walks the vocabulary in blocks that stay in
//!   cache: `S = H_blk · W_blkᵀ` (gemm), a running max `m` and sum `l` of `exp(S − m)` (rescaled when
//!   the max grows), and the running `acc = Σ exp(S − m) · W_blk` (gemm);
//! - at the end `lse = m + ln l`, and the gradient direction `u[t] = W[y_t] − acc/l = W[y_t] − E_p[W]`
//!   is kept (`tokens × hidden`), since `∂lp[t]/∂h[t] = u[t]`;
//! - the backward is then `dh[t] += g[t] · u[t]`: no product at all.
//!
//! Rows whose `needed` flag is false (prompt and padding tokens of SFT, masked by the loss anyway)
//! are skipped: their log-prob is 0 and they receive no gradient.

use dfdx::prelude::*;

use super::{cpu_buffer, host_threads};

/// Output of [`forward_host`]: log-probs `[n]` and gradient directions `[n, hidden]`.
pub(crate) struct HostLogprobs {
    pub lp: Vec<f32>,
    pub u: Vec<f32>,
}

/// `lp` and `u` (see the module docs) for `h: [n, hidden]`, `w: [vocab, hidden]`, targets `[n]`.
pub(crate) fn forward_host(h: &[f32], hidden: usize, w: &[f32], targets: &[usize], needed: &[bool]) -> HostLogprobs {
    let n = targets.len();
    debug_assert_eq!(h.len(), n * hidden);
    let vocab = w.len() / hidden;
    let rows: Vec<usize> = (0..n).filter(|&t| needed[t]).collect();
    let mut lp = vec![0f32; n];
    let mut u = vec![0f32; n * hidden];
    if rows.is_empty() {
        return HostLogprobs { lp, u };
    }
    let threads = host_threads().min(rows.len().div_ceil(TOKEN_BLOCK)).max(1);
    let per = rows.len().div_ceil(threads);
    let parts: Vec<(Vec<usize>, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|mine| {
                s.spawn(move || {
                    let mut lp = vec![0f32; mine.len()];
                    let mut u = vec![0f32; mine.len() * hidden];
                    for (k, blk) in mine.chunks(TOKEN_BLOCK).enumerate() {
                        let off = k * TOKEN_BLOCK;
                        block(
                            h,
                            hidden,
                            w,
                            vocab,
                            targets,
                            blk,
                            &mut lp[off..off + blk.len()],
                            &mut u[off * hidden..(off + blk.len()) * hidden],
                        );
                    }
                    (mine.to_vec(), lp, u)
                })
            })
            .collect();
        handles.into_iter().map(|j| j.join().expect("fused cross-entropy worker")).collect()
    });
    for (mine, plp, pu) in parts {
        for (k, &t) in mine.iter().enumerate() {
            lp[t] = plp[k];
            u[t * hidden..(t + 1) * hidden].copy_from_slice(&pu[k * hidden..(k + 1) * hidden]);
        }
    }
    HostLogprobs { lp, u }
}

/// Tokens per block: the rows of one `S` block.
const TOKEN_BLOCK: usize = 64;

/// Vocabulary rows per block: `W_blk` (`rows × hidden` f32) about 256 KiB, so it and `S` stay in L2.
fn vocab_block(hidden: usize) -> usize {
    ((256 * 1024 / 4) / hidden.max(1)).clamp(64, 2048)
}

/// One token block `rows` (indices into `h`/`targets`): writes its `lp` and `u`.
#[allow(clippy::too_many_arguments)]
fn block(
    h: &[f32],
    hidden: usize,
    w: &[f32],
    vocab: usize,
    targets: &[usize],
    rows: &[usize],
    lp: &mut [f32],
    u: &mut [f32],
) {
    let tb = rows.len();
    let vb = vocab_block(hidden);
    // the block's hidden states, contiguous
    let mut hb = vec![0f32; tb * hidden];
    for (r, &t) in rows.iter().enumerate() {
        hb[r * hidden..(r + 1) * hidden].copy_from_slice(&h[t * hidden..(t + 1) * hidden]);
    }
    let mut m = vec![f32::NEG_INFINITY; tb];
    let mut l = vec![0f32; tb];
    let mut tgt = vec![0f32; tb];
    let acc = u; // accumulates Σ p·W, turned into u at the end
    acc.fill(0.0);
    let mut s = vec![0f32; tb * vb];
    let mut v0 = 0;
    while v0 < vocab {
        let width = vb.min(vocab - v0);
        let wb = &w[v0 * hidden..(v0 + width) * hidden];
        let sb = &mut s[..tb * width];
        // S[tb, width] = hb[tb, hidden] · wbᵀ
        // SAFETY: every pointer/stride pair addresses inside its slice: dst `sb` is tb × width
        // row-major, lhs `hb` tb × hidden row-major, rhs element (k, j) = wb[j * hidden + k].
        unsafe {
            gemm::gemm(
                tb,
                width,
                hidden,
                sb.as_mut_ptr(),
                1,
                width as isize,
                false,
                hb.as_ptr(),
                1,
                hidden as isize,
                wb.as_ptr(),
                hidden as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for r in 0..tb {
            let row = &mut sb[r * width..(r + 1) * width];
            let y = targets[rows[r]];
            if (v0..v0 + width).contains(&y) {
                tgt[r] = row[y - v0];
            }
            let mx = row_max(row);
            if mx > m[r] {
                let scale = if m[r] == f32::NEG_INFINITY { 0.0 } else { exp(m[r] - mx) };
                l[r] *= scale;
                for a in &mut acc[r * hidden..(r + 1) * hidden] {
                    *a *= scale;
                }
                m[r] = mx;
            }
            l[r] += exp_shifted(row, m[r]);
        }
        // acc[tb, hidden] += P[tb, width] · wb[width, hidden]
        // SAFETY: as above; rhs `wb` is width × hidden row-major, dst `acc` tb × hidden.
        unsafe {
            gemm::gemm(
                tb,
                hidden,
                width,
                acc.as_mut_ptr(),
                1,
                hidden as isize,
                true,
                sb.as_ptr(),
                1,
                width as isize,
                wb.as_ptr(),
                1,
                hidden as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        v0 += width;
    }
    for r in 0..tb {
        let y = targets[rows[r]];
        lp[r] = tgt[r] - (m[r] + l[r].ln());
        let inv = 1.0 / l[r];
        let wy = &w[y * hidden..(y + 1) * hidden];
        for (a, &wv) in acc[r * hidden..(r + 1) * hidden].iter_mut().zip(wy) {
            *a = wv - *a * inv;
        }
    }
}

/// `x ← exp(x − m)` over the row, returning the sum.
fn exp_shifted(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { exp_shifted_avx2(row, m) };
    }
    exp_shifted_with::<false>(row, m)
}

#[inline(always)]
fn exp_shifted_with<const FMA: bool>(row: &mut [f32], m: f32) -> f32 {
    let mut sum = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp_with::<FMA>(c[l] - m);
            sum[l] += c[l];
        }
    }
    let mut total: f32 = sum.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_with::<FMA>(*x - m);
        total += *x;
    }
    total
}

/// [`exp_shifted_with`] in AVX2 + FMA intrinsics (the compiler only half-vectorises the scalar
/// form), tested against it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], m: f32) -> f32 {
    use std::arch::x86_64::*;
    let vm = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    let full = row.len() / 8 * 8;
    let ptr = row.as_mut_ptr();
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= row.len()
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(i)), vm));
        _mm256_storeu_ps(ptr.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut total: f32 = lanes.iter().sum();
    for x in &mut row[full..] {
        *x = exp_with::<true>(*x - m);
        total += *x;
    }
    total
}

/// [`exp_with`] on 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    const ROUND: f32 = 12_582_912.0;
    let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0)), _mm256_set1_ps(-87.0));
    let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(ROUND));
    let n = _mm256_sub_ps(t, _mm256_set1_ps(ROUND));
    let k = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(ROUND.to_bits() as i32));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_359_4), x));
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
    _mm256_mul_ps(e, scale)
}

/// The row's maximum (AVX2 when present).
fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { row_max_avx2(row) };
    }
    row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_max_avx2(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    let full = row.len() / 8 * 8;
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= row.len()
        mx = _mm256_max_ps(mx, _mm256_loadu_ps(row.as_ptr().add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
    lanes.iter().chain(&row[full..]).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `a·b + c`, fused where the caller runs with FMA (a plain `mul_add` without the instruction is
/// a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` without fused multiply-adds (tests and the odd scalar caller).
#[inline(always)]
fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// `e^x` for `x ≤ 0` (and moderate positive `x`) to about 2 ulp, written so the compiler
/// vectorises it: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for `e^r` (Cephes'
/// `expf` coefficients), and `2^n` put into the exponent bits. `n` is rounded with the
/// 1.5·2²³ trick and read from the float's bits, because a float-to-int `as` cast (saturating)
/// does not vectorise. Underflows to ~1e-38 below −87.
#[inline(always)]
fn exp_with<const FMA: bool>(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer in the low mantissa bits
    let x = x.clamp(-87.0, 88.0);
    let t = madd::<FMA>(x, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let k = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32; // n as an integer
    let r = madd::<FMA>(n, 2.121_944_4e-4, madd::<FMA>(n, -0.693_359_4, x));
    let mut p = 1.987_569_1e-4f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let e = madd::<FMA>(p * r, r, r) + 1.0;
    e * f32::from_bits(((k + 127) as u32) << 23)
}

/// The fused op on a taped `h: [n, H]`: log-probs `[n]` whose backward adds `g[t]·u[t]` to `dh`.
/// Only on the CPU (the caller checks); `w` is the host copy of the frozen head.
pub(crate) fn target_logprobs<H: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    h: Tensor<(usize, H), f32, D, T>,
    w: &[f32],
    targets: &[usize],
    needed: &[bool],
) -> Tensor<(usize,), f32, D, T> {
    let (n, hd) = *h.shape();
    let (h, mut tape) = h.contiguous().split_tape();
    let HostLogprobs { lp, u } = forward_host(&h.as_vec(), hd.size(), w, targets, needed);
    let out: Tensor<(usize,), f32, D> = h.device().tensor_from_vec(lp, (n,));
    if T::OWNS_TAPE {
        let (hg, og) = (h.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&og)?;
            let g = grads.get(&og).as_vec();
            let buf = grads.get_or_alloc_mut(&hg)?;
            let dst = cpu_buffer::<D>(buf).expect("the fused cross-entropy runs on the CPU");
            let hs = u.len() / g.len().max(1);
            for (t, &gt) in g.iter().enumerate() {
                if gt != 0.0 {
                    for (d, &uv) in dst[t * hs..(t + 1) * hs].iter_mut().zip(&u[t * hs..(t + 1) * hs]) {
                        *d += gt * uv;
                    }
                }
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// [`target_logprobs`] on CUDA over a frozen head `[vocab × hidden]` on the device, f32
/// ([`super::cuda::head_logprobs`]) or bf16 ([`super::cuda::head_logprobs_bf16`]); the backward is
/// [`super::cuda::scale_rows_add`]. NVRTC and driver failures (out of memory) are returned.
#[cfg(feature = "cuda")]
pub(crate) fn target_logprobs_cuda<H: Dim, D: Device<f32>, T: Tape<f32, D> + Merge<T>>(
    h: Tensor<(usize, H), f32, D, T>,
    w: CudaHead<'_, D>,
    targets: &[usize],
    needed: &[bool],
) -> Result<Tensor<(usize,), f32, D, T>, super::cuda::KernelError> {
    use super::{cast, cuda, cuda_buffer, cuda_data};
    let (n, hd) = *h.shape();
    let (h, mut tape) = h.contiguous().split_tape();
    let (dev, lp, u) = match w {
        CudaHead::F32(w) => {
            let hc: Tensor<(usize, usize), f32, Cuda> =
                cast(h.clone().reshape_like(&(n, hd.size()))).expect("a CUDA tensor");
            let wc: Tensor<(usize,), f32, Cuda> = cast(w.clone()).expect("a CUDA tensor");
            let dev = hc.device().clone();
            let vocab = w.shape().0 / hd.size();
            let (lp, u) = cuda::head_logprobs(&dev, &hc, &wc, vocab, targets, needed)?;
            (dev, lp, u)
        }
        CudaHead::Bf16(w) => {
            let hb = cuda_data(&h).expect("a CUDA tensor");
            let (lp, u) = cuda::head_logprobs_bf16(hb, hd.size(), w, w.len() / hd.size(), targets, needed)?;
            (w.device().clone(), lp, u)
        }
    };
    let out: Tensor<(usize,), f32, D> = cast(dev.build_tensor((n,), [1], lp)).expect("the same device");
    if T::OWNS_TAPE {
        let (hg, og) = (h.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&og)?;
            let g: Tensor<(usize,), f32, Cuda> = cast(grads.get(&og)).expect("a CUDA tensor");
            let dst = cuda_buffer::<D>(grads.get_or_alloc_mut(&hg)?).expect("a CUDA buffer");
            cuda::scale_rows_add(&dev, dst, &u, &g).map_err(|e| cast::<CudaError, D::Err>(e).expect("CUDA error type"))
        });
    }
    Ok(out.put_tape(tape))
}

/// The frozen head [`target_logprobs_cuda`] reads.
#[cfg(feature = "cuda")]
pub(crate) enum CudaHead<'a, D: Storage<f32>> {
    F32(&'a Tensor<(usize,), f32, D>),
    Bf16(&'a crate::params::Bf16Weight),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -87.0 + 95.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            for got in [exp_with::<false>(x), exp_with::<true>(x)] {
                worst = worst.max(((got as f64 - want) / want).abs());
            }
        }
        assert!(worst < 3e-7, "{worst:e}");
        assert!(exp(-200.0) < 1e-37 && exp(0.0) == 1.0);
    }

    #[test]
    fn simd_exp_and_max_match_the_scalar_forms() {
        let row: Vec<f32> = (0..1003).map(|i| ((i * 7919 % 1000) as f32 / 10.0) - 95.0).collect();
        let want_max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert_eq!(row_max(&row), want_max);
        let (mut a, mut b) = (row.clone(), row.clone());
        let sa = exp_shifted(&mut a, 2.0);
        let sb = exp_shifted_with::<false>(&mut b, 2.0);
        assert!((sa - sb).abs() <= 1e-5 * sb.abs(), "{sa} vs {sb}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * y.abs(), "{x} vs {y}");
        }
    }

    /// Against the unfused f64 reference `log_softmax(h·Wᵀ)[y]` and its gradient, with a vocabulary
    /// that is not a multiple of the block, logits large enough to need the running rescale, and
    /// skipped rows.
    #[test]
    fn matches_log_softmax_and_its_gradient() {
        let (n, hidden, vocab) = (70, 24, 3 * vocab_block(24) + 17);
        let h: Vec<f32> = (0..n * hidden).map(|i| ((i * 7919 % 211) as f32 / 211.0 - 0.5) * 3.0).collect();
        let w: Vec<f32> = (0..vocab * hidden).map(|i| ((i * 104_729 % 157) as f32 / 157.0 - 0.5) * 2.0).collect();
        let targets: Vec<usize> = (0..n).map(|t| (t * 977) % vocab).collect();
        let needed: Vec<bool> = (0..n).map(|t| t % 5 != 3).collect();
        let out = forward_host(&h, hidden, &w, &targets, &needed);
        for t in 0..n {
            if !needed[t] {
                assert_eq!(out.lp[t], 0.0);
                assert!(out.u[t * hidden..(t + 1) * hidden].iter().all(|&x| x == 0.0));
                continue;
            }
            let logits: Vec<f64> = (0..vocab)
                .map(|j| (0..hidden).map(|k| h[t * hidden + k] as f64 * w[j * hidden + k] as f64).sum())
                .collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|x| (x - mx).exp()).sum();
            let want = logits[targets[t]] - mx - z.ln();
            assert!((out.lp[t] as f64 - want).abs() < 2e-5 * (1.0 + want.abs()), "lp[{t}] {} vs {want}", out.lp[t]);
            for k in 0..hidden {
                let ep: f64 = (0..vocab).map(|j| (logits[j] - mx).exp() / z * w[j * hidden + k] as f64).sum();
                let want = w[targets[t] * hidden + k] as f64 - ep;
                let got = out.u[t * hidden + k] as f64;
                assert!((got - want).abs() < 2e-5 * (1.0 + want.abs()), "u[{t}][{k}] {got} vs {want}");
            }
        }
    }

    /// The taped op's gradient equals dfdx's log_softmax + select on the same inputs.
    #[test]
    fn taped_op_matches_dfdx() {
        let dev = Cpu::default();
        let (n, hidden, vocab) = (9, 8, 300);
        let hv: Vec<f32> = (0..n * hidden).map(|i| ((i * 31 % 17) as f32 - 8.0) / 5.0).collect();
        let wv: Vec<f32> = (0..vocab * hidden).map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0).collect();
        let targets: Vec<usize> = (0..n).map(|t| t * 31 % vocab).collect();
        let weights: Vec<f32> = (0..n).map(|t| t as f32 - 3.0).collect();
        let h: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(hv, (n, hidden));
        let wt: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(wv.clone(), (vocab, hidden));
        let c: Tensor<(usize,), f32, Cpu> = dev.tensor_from_vec(weights, (n,));
        let lp = target_logprobs(h.leaky_trace(), &wv, &targets, &vec![true; n]);
        let lpv = lp.as_vec();
        let g = (lp * c.clone()).sum::<(), _>().backward();
        let idx: Tensor<(usize,), usize, Cpu> = dev.tensor_from_vec(targets, (n,));
        let want =
            h.leaky_trace().matmul(wt.permute::<(usize, usize), Axes2<1, 0>>()).log_softmax::<Axis<1>>().select(idx);
        let wantv = want.as_vec();
        let g2 = (want * c).sum::<(), _>().backward();
        for (a, b) in lpv.iter().zip(wantv) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        for (a, b) in g.get(&h).as_vec().iter().zip(g2.get(&h).as_vec()) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
