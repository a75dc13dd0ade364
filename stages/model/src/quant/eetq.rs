//! EETQ's weight-only int8 (per output channel, symmetric, no calibration), in transformers'
//! `EetqLinear` layout: `weight` int8 `[in_features, out_features]` (the transposed matrix) and
//! `weight_scales` (f16, one per output channel).
//!
//! `scale[o] = max_i |W[o][i]| / 127`, `q = round(W / scale)` clamped to ±127;
//! `W ≈ q · scale`. EETQ's CUDA loader additionally permutes and interleaves the int8 bytes for its
//! GPU kernel at load time (`preprocess_weights`, architecture-dependent); the file keeps the plain
//! row-major codes, which that step takes as its input.

use half::f16;

/// One quantised matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Eetq {
    pub out_features: usize,
    pub in_features: usize,
    /// `[in_features, out_features]`, row-major.
    pub weight: Vec<i8>,
    /// One per output channel (f16, as `EetqLinear` stores them).
    pub scales: Vec<f16>,
}

/// Quantises `w` (`[out, in]`, row-major).
pub fn quantize(w: &[f32], out_features: usize, in_features: usize) -> Eetq {
    assert_eq!(w.len(), out_features * in_features, "eetq: {out_features}x{in_features} values expected");
    let mut weight = vec![0i8; w.len()];
    let mut scales = Vec::with_capacity(out_features);
    for (o, row) in w.chunks(in_features.max(1)).enumerate() {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = f16::from_f32(max / 127.0);
        scales.push(scale);
        let s = scale.to_f32();
        for (i, v) in row.iter().enumerate() {
            let q = if s > 0.0 { (v / s).round_ties_even().clamp(-127.0, 127.0) as i8 } else { 0 };
            weight[i * out_features + o] = q;
        }
    }
    Eetq { out_features, in_features, weight, scales }
}

impl Eetq {
    /// `W[o][i] = q[i][o] · scale[o]`, `[out, in]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.weight.len()];
        for o in 0..self.out_features {
            let s = self.scales[o].to_f32();
            for i in 0..self.in_features {
                w[o * self.in_features + i] = self.weight[i * self.out_features + o] as f32 * s;
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_symmetric_round_trip() {
        let w = [1.0f32, -0.5, 0.25, 0.0, 0.0, 0.0, 2.0, 1.0, -2.0];
        let q = quantize(&w, 3, 3);
        assert_eq!(q.weight[0], 127, "W[0][0] is the row max");
        assert_eq!(q.weight[1], 0, "row 1 is zero: q[0][1] = 0");
        assert_eq!(q.weight[2], 127, "W[2][0] = 2 is row 2's max");
        let d = q.dequantize();
        for (a, b) in w.iter().zip(&d) {
            assert!((a - b).abs() <= 2.0 / 127.0, "{a} vs {b}");
        }
    }
}
