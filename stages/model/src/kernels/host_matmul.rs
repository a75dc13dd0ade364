//! Row dot products `x · Wᵀ` on a host copy of a frozen weight: the CPU's batch-1 decoding step.
//!
//! Decoding is bound by reading the weights: dfdx 0.13's gemm runs `[1, k] × Wᵀ` at ~0.6 GFLOP/s
//! here (its m = 1 path walks the transposed weight through the general kernel), while
//! [`host_matmul_wt`] reads each weight row once, contiguously, with 16 independent accumulators
//! the compiler vectorises (AVX2 chosen at run time). `benches/decode.rs` measures it.

use std::sync::OnceLock;

/// A no-gradient product `x Wᵀ` on the CPU with at most this many rows (batch-1 decoding) and a
/// weight of at least [`HOST_MATMUL_MIN_WEIGHT`] elements is computed by [`host_matmul_wt`]
/// instead of dfdx's gemm (`benches/decode.rs`: with more rows, or small weights, gemm wins).
pub(crate) const HOST_MATMUL_MAX_ROWS: usize = 1;
pub(crate) const HOST_MATMUL_MIN_WEIGHT: usize = 1 << 17;

/// The kernel of [`host_matmul_wt`]: `cols[r][j - j0] = w[j] · x[r]` for `j` in `j0..j1`.
#[inline(always)]
fn dot_rows(x: &[f32], w: &[f32], n: usize, k: usize, j0: usize, j1: usize, cols: &mut [f32]) {
    let width = j1 - j0;
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..n {
            let xr = &x[r * k..(r + 1) * k];
            // 16 independent partial sums: two 8-lane vectors with AVX2, four with SSE
            let mut acc = [0f32; 16];
            let (wc, xc) = (wr.chunks_exact(16), xr.chunks_exact(16));
            let (wt, xt) = (wc.remainder(), xc.remainder());
            for (a, b) in wc.zip(xc) {
                for l in 0..16 {
                    acc[l] += a[l] * b[l];
                }
            }
            let mut sum = 0f32;
            for l in 0..8 {
                sum += acc[l] + acc[l + 8];
            }
            for (a, b) in wt.iter().zip(xt) {
                sum += a * b;
            }
            cols[r * width + (j - j0)] = sum;
        }
    }
}

/// [`dot_rows`] compiled for AVX2 (chosen at run time; the default x86-64 target has only SSE2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(x: &[f32], w: &[f32], n: usize, k: usize, j0: usize, j1: usize, cols: &mut [f32]) {
    dot_rows(x, w, n, k, j0, j1, cols)
}

/// [`host_matmul_wt`] is used unless `PIPELINE_NO_HOST_MATMUL` is set (read once; for benchmarks
/// comparing it with dfdx's gemm, `benches/throughput.rs`).
pub(crate) fn host_matmul_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PIPELINE_NO_HOST_MATMUL").is_none())
}

/// `y[r][j] = Σ_k x[r][k] · w[j][k]` for `x: [n, k]`, `w: [out, k]` row-major (a linear layer's HF
/// layout), `n` ≤ [`HOST_MATMUL_MAX_ROWS`]. Decoding is bound by reading the weights: dfdx 0.13's
/// gemm runs `[1, k] × Wᵀ` at ~0.6 GFLOP/s here (its m = 1 path walks the transposed weight
/// through the general kernel), while this reads each weight row once, contiguously, for all `n`
/// rows, with 8 independent accumulators the compiler vectorises. Large weights are split over the
/// available cores.
pub(crate) fn host_matmul_wt(x: &[f32], n: usize, w: &[f32], out: usize) -> Vec<f32> {
    let k = x.len() / n;
    debug_assert_eq!(w.len(), out * k);
    let mut y = vec![0f32; n * out];
    // each task owns output columns [j0, j1) of all rows: `cols` is [n][j1 - j0]
    let work = |j0: usize, j1: usize, cols: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { dot_rows_avx2(x, w, n, k, j0, j1, cols) };
            return;
        }
        dot_rows(x, w, n, k, j0, j1, cols);
    };
    let threads = super::host_threads();
    if threads < 2 || out * k < (1 << 20) {
        work(0, out, &mut y);
        return y;
    }
    let chunk = out.div_ceil(threads);
    let parts: Vec<(usize, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..out)
            .step_by(chunk)
            .map(|j0| {
                let j1 = (j0 + chunk).min(out);
                s.spawn(move || {
                    let mut cols = vec![0f32; n * (j1 - j0)];
                    work(j0, j1, &mut cols);
                    (j0, cols)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("host matmul worker")).collect()
    });
    for (j0, cols) in parts {
        let width = cols.len() / n;
        for r in 0..n {
            y[r * out + j0..r * out + j0 + width].copy_from_slice(&cols[r * width..(r + 1) * width]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_matmul_matches_a_f64_reference() {
        // k not a multiple of 16; out * k above the threading threshold
        for (n, k, out) in [(1, 37, 5), (1, 601, 2000), (3, 100, 40)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
            let w: Vec<f32> = (0..out * k).map(|i| ((i * 104_729) % 89) as f32 / 89.0 - 0.5).collect();
            let y = host_matmul_wt(&x, n, &w, out);
            for r in 0..n {
                for j in 0..out {
                    let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
                    let got = y[r * out + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "[{n},{k},{out}] ({r},{j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
