//! HQQ (half-quadratic quantisation, hqq 0.2.8's `Quantizer.quantize` with its default config):
//! no calibration data; `nbits` ∈ {8, 4, 3, 2}, groups of `group_size` on axis 0 — the flat
//! weight seen as `[group_size, numel / group_size]`, one scale and zero per column.
//!
//! Per column: `s = (2^b − 1) / (max − min)` (1 when `|max − min| ≤ 1e-4`, clamped at 2e4),
//! `z = −min · s` (rounded for 4 bits: hqq's `round_zero` default), then hqq's default solver
//! (`optimize_weights_proximal_legacy`, lp 0.7, β 10, 20 iterations): each step
//! `q = clamp(round(W·s + z))`, `W_r = (q − z)/s`, `W_e = shrink_lp(W − W_r)`,
//! `z = mean_axis0(q − (W − W_e)·s)`, stopping when the mean |W − W_r| stops falling (the zero of
//! that step is kept, as hqq does). κ = 1.01 is in hqq's parameters but its default solver does not
//! apply it, so neither does this. Stored: codes, `scale = 1/s`, `zero`; `W ≈ (q − zero) · scale`.
//! Checked against hqq within tolerance (tests/quant.rs: torch's reductions sum in another order).

/// One quantised matrix in hqq's (unpacked) form.
#[derive(Debug, Clone, PartialEq)]
pub struct Hqq {
    pub nbits: u32,
    pub group_size: usize,
    pub shape: Vec<usize>,
    /// `[group_size, numel / group_size]`, row-major, one code per value.
    pub codes: Vec<u8>,
    /// `[numel / group_size]` (hqq stores `[1, n]`).
    pub scale: Vec<f32>,
    pub zero: Vec<f32>,
}

/// hqq's `shrink_lp_op`: `sign(x) · max(|x| − |x|^(p−1)/β, 0)`.
fn shrink(x: f32, beta: f32, lp: f32) -> f32 {
    let a = x.abs();
    let v = (a - (1.0 / beta) * a.powf(lp - 1.0)).max(0.0);
    v * if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// torch's sum over axis 0 of 64 (or any) rows: runs of 16 rows summed in order, the runs added
/// in order (its cascade for an outer-dimension reduction).
fn cascade_column_sum(values: impl Iterator<Item = f32>) -> f32 {
    let (mut total, mut run, mut n) = (0f32, 0f32, 0);
    for v in values {
        run += v;
        n += 1;
        if n == 16 {
            total += run;
            run = 0.0;
            n = 0;
        }
    }
    total + run
}

/// Quantises `w` (row-major, `shape`) with `nbits` in groups of `group_size` on axis 0.
pub fn quantize(w: &[f32], shape: &[usize], nbits: u32, group_size: usize) -> Hqq {
    assert!(
        group_size > 0 && w.len().is_multiple_of(group_size),
        "hqq: {} values are not a multiple of {group_size}",
        w.len()
    );
    let (g, n) = (group_size, w.len() / group_size);
    let max_v = ((1u32 << nbits) - 1) as f32;
    let at = |r: usize, c: usize| w[r * n + c];
    let mut scale = vec![0f32; n];
    let mut zero = vec![0f32; n];
    for c in 0..n {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for r in 0..g {
            lo = lo.min(at(r, c));
            hi = hi.max(at(r, c));
        }
        let denom = hi - lo;
        let s = if denom.abs() <= 1e-4 { 1.0 } else { max_v / denom };
        scale[c] = s.min(2e4);
        zero[c] = -lo * scale[c];
        if nbits == 4 {
            zero[c] = zero[c].round_ties_even();
        }
    }
    let q = |v: f32, s: f32, z: f32| (v * s + z).round_ties_even().clamp(0.0, max_v);
    let (beta, lp) = (10.0f32, 0.7f32);
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let mut err = 0f64;
        let mut new_zero = vec![0f32; n];
        for (c, nz) in new_zero.iter_mut().enumerate() {
            let (s, z) = (scale[c], zero[c]);
            let terms = (0..g).map(|r| {
                let x = at(r, c);
                let wq = q(x, s, z);
                let wr = (wq - z) / s;
                err += (x - wr).abs() as f64;
                let we = shrink(x - wr, beta, lp);
                wq - (x - we) * s
            });
            *nz = cascade_column_sum(terms.collect::<Vec<_>>().into_iter()) / g as f32;
        }
        zero = new_zero;
        let err = err / w.len() as f64;
        if err < best {
            best = err;
        } else {
            break;
        }
    }
    let mut codes = vec![0u8; w.len()];
    for r in 0..g {
        for c in 0..n {
            codes[r * n + c] = q(at(r, c), scale[c], zero[c]) as u8;
        }
    }
    Hqq { nbits, group_size, shape: shape.to_vec(), codes, scale: scale.iter().map(|s| 1.0 / s).collect(), zero }
}

impl Hqq {
    /// `(q − zero) · scale`, in the original shape (row-major).
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.scale.len();
        self.codes.iter().enumerate().map(|(i, &q)| (q as f32 - self.zero[i % n]) * self.scale[i % n]).collect()
    }

    /// hqq's bit packing of the `[group_size, n]` codes (`Quantizer.pack`): 8 bits as is; 4 bits
    /// two row halves per byte (first half high); 2 bits four row quarters; 3 bits ten row tenths
    /// per int32 (rows padded to a multiple of 10), first in the highest bits. Returns the bytes
    /// (little-endian for int32) and the packed shape.
    pub fn packed(&self) -> (Vec<u8>, Vec<usize>) {
        let (g, n) = (self.group_size, self.scale.len());
        let row = |r: usize| &self.codes[r * n..(r + 1) * n];
        match self.nbits {
            8 => (self.codes.clone(), vec![g, n]),
            4 | 2 => {
                let parts = (8 / self.nbits) as usize;
                let step = g / parts;
                let mut out = vec![0u8; step * n];
                for p in 0..parts {
                    let shift = self.nbits as usize * (parts - 1 - p);
                    for r in 0..step {
                        for (o, &c) in out[r * n..(r + 1) * n].iter_mut().zip(row(p * step + r)) {
                            *o |= c << shift;
                        }
                    }
                }
                (out, vec![step, n])
            }
            _ => {
                let step = g.div_ceil(10);
                let mut out = vec![0u32; step * n];
                for p in 0..10 {
                    for r in 0..step {
                        let src = p * step + r;
                        if src >= g {
                            continue;
                        }
                        for (o, &c) in out[r * n..(r + 1) * n].iter_mut().zip(row(src)) {
                            *o |= (c as u32) << (27 - 3 * p);
                        }
                    }
                }
                (out.iter().flat_map(|v| v.to_le_bytes()).collect(), vec![step, n])
            }
        }
    }

    /// The inverse of [`Hqq::packed`].
    pub fn unpack(nbits: u32, group_size: usize, n: usize, bytes: &[u8]) -> Option<Vec<u8>> {
        let g = group_size;
        let mut codes = vec![0u8; g * n];
        match nbits {
            8 => codes.copy_from_slice(bytes.get(..g * n)?),
            4 | 2 => {
                let parts = (8 / nbits) as usize;
                let step = g / parts;
                let mask = ((1u16 << nbits) - 1) as u8;
                for p in 0..parts {
                    let shift = nbits as usize * (parts - 1 - p);
                    for r in 0..step {
                        for c in 0..n {
                            codes[(p * step + r) * n + c] = (bytes.get(r * n + c)? >> shift) & mask;
                        }
                    }
                }
            }
            3 => {
                let step = g.div_ceil(10);
                let words: Vec<u32> =
                    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                for p in 0..10 {
                    for r in 0..step {
                        let dst = p * step + r;
                        if dst >= g {
                            continue;
                        }
                        for c in 0..n {
                            codes[dst * n + c] = ((words.get(r * n + c)? >> (27 - 3 * p)) & 7) as u8;
                        }
                    }
                }
            }
            _ => return None,
        }
        Some(codes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_for_every_width() {
        let w: Vec<f32> = (0..64 * 6).map(|i| ((i * 29 % 97) as f32 - 48.0) / 30.0).collect();
        for bits in [8, 4, 3, 2] {
            let q = quantize(&w, &[6, 64], bits, 64);
            let (bytes, _) = q.packed();
            assert_eq!(Hqq::unpack(bits, 64, 6, &bytes).unwrap(), q.codes, "{bits} bits");
            assert!(q.codes.iter().all(|&c| (c as u32) < (1 << bits)));
        }
    }
}
