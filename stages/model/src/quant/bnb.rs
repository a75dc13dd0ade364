//! bitsandbytes' weight formats, as its CPU backend (0.50) computes them: 4-bit NF4 / FP4 in
//! blocks of 64 with optional double quantisation of the block scales, and LLM.int8()'s row-wise
//! int8 (`Int8Params`: `weight` + `SCB`). Pure functions on `f32` slices; every rounding step is
//! the one bitsandbytes takes in `f32`, so codes are bit-identical with its `quantize_4bit`,
//! `quantize_blockwise` and `int8_vectorwise_quant` (tests/quant.rs, golden values from
//! `scripts/oracles/bnb_golden.py`).
//!
//! - 4-bit (`quantize_4bit`, the `default` backend kernel used on the CPU): per block of 64,
//!   `absmax = max|x|`, `s = clamp(x · (1/absmax), −1, 1)` (the last, partial block divides
//!   instead), the code is the number of midpoints of the sorted code book strictly below `s`
//!   (`torch.bucketize`), mapped back to the code's own index for FP4; two codes per byte, the
//!   first in the high nibble; an odd count is padded with a zero.
//! - Double quantisation (`compress_statistics`): `offset = mean(absmax)` (summed as torch does),
//!   then `absmax − offset`
//!   is quantised blockwise over 256 with the signed 8-bit dynamic map (`create_dynamic_map`),
//!   by the CPU kernel's 65,536-entry look-up table (`cquantize_blockwise_cpu_fp32`).
//! - int8: the weight is cast to f16, `SCB = max|row|`, `q = round(x · (127 / SCB))`
//!   (half-to-even; `127 / SCB` rounded as torch does it, `(1/SCB) · 127`). Saved weights hold no outliers: the 6.0 threshold (`llm_int8_threshold`)
//!   applies to activations at run time, so `W ≈ q · SCB / 127`.

use half::f16;

/// The 16 NF4 levels (QLoRA), in code order (sorted).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) before normalising by 12, in
/// code order. Code 8 (sign bit, zero) is +0.0: bitsandbytes' table writes the Python integer
/// `-0`, which is 0.
const FP4_RAW: [f32; 16] =
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];

/// The 4-bit data type (`bnb_4bit_quant_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// The code book (`get_4bit_type`, which `weight.quant_map` stores): value of each code.
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4,
            QuantType::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }

    /// Midpoints between neighbours of the sorted code book, and the code of each sorted entry
    /// (a stable sort: FP4's +0 (code 0) sorts before −0 (code 8)).
    fn bounds(self) -> ([f32; 15], [u8; 16]) {
        let code = self.code();
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        order.sort_by(|&a, &b| code[a as usize].partial_cmp(&code[b as usize]).expect("finite"));
        let mids = std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
        (mids, order)
    }
}

/// Block size of the 4-bit codes (transformers' and bitsandbytes' default).
pub const BLOCKSIZE: usize = 64;
/// Block size of the double quantisation of the scales.
pub const NESTED_BLOCKSIZE: usize = 256;

/// A 4-bit quantised tensor (bitsandbytes' `Params4bit` data + `QuantState`).
#[derive(Debug, Clone, PartialEq)]
pub struct Quant4 {
    pub quant_type: QuantType,
    pub shape: Vec<usize>,
    /// `(numel + 1) / 2` bytes, first code in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// The per-block scales, plain or double-quantised.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested { codes: Vec<u8>, nested_absmax: Vec<f32>, offset: f32 },
}

/// Blockwise absmax and `x / absmax` clamped to ±1 over `blocksize`, as bitsandbytes' default
/// 4-bit kernel: full blocks multiply by the reciprocal, the partial last block divides.
fn scaled_blocks(x: &[f32], blocksize: usize) -> (Vec<f32>, Vec<f32>) {
    let full = x.len() - x.len() % blocksize;
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    let mut scaled = Vec::with_capacity(x.len() + 1);
    for (b, block) in x.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        let am = am.max(1e-38);
        if b * blocksize < full {
            let inv = 1.0 / am;
            scaled.extend(block.iter().map(|v| (v * inv).clamp(-1.0, 1.0)));
        } else {
            scaled.extend(block.iter().map(|v| (v / am).clamp(-1.0, 1.0)));
        }
    }
    (absmax, scaled)
}

/// `quantize_4bit(x, blocksize=64, quant_type, compress_statistics=double)` of a tensor of
/// `shape` (row-major).
pub fn quantize_4bit(x: &[f32], shape: &[usize], quant_type: QuantType, double: bool) -> Quant4 {
    let (absmax, mut scaled) = scaled_blocks(x, BLOCKSIZE);
    if scaled.len() % 2 == 1 {
        scaled.push(0.0);
    }
    let (mids, order) = quant_type.bounds();
    let code = |s: f32| order[mids.iter().take_while(|&&m| m < s).count()];
    let packed = scaled.chunks(2).map(|p| (code(p[0]) << 4) | code(p[1])).collect();
    let absmax = if double {
        let offset = torch_sum_f32(&absmax) / absmax.len() as f32;
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (codes, nested_absmax) = quantize_blockwise(&centred, NESTED_BLOCKSIZE);
        Absmax::Nested { codes, nested_absmax, offset }
    } else {
        Absmax::Plain(absmax)
    };
    Quant4 { quant_type, shape: shape.to_vec(), packed, absmax }
}

impl Quant4 {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The block scales (double quantisation undone: `dynamic[code] · nested_absmax + offset`).
    pub fn block_absmax(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested { codes, nested_absmax, offset } => {
                dequantize_blockwise(codes, nested_absmax, NESTED_BLOCKSIZE).into_iter().map(|a| a + offset).collect()
            }
        }
    }

    /// `dequantize_4bit`: `code[q] · absmax` per value. The CPU kernel (taken when the last
    /// dimension is even) has FP4's code 8 as −0.0, the fall-back as +0.0; so does this.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut code = self.quant_type.code();
        if self.quant_type == QuantType::Fp4 && self.shape.last().is_some_and(|d| d % 2 == 0) {
            code[8] = -0.0;
        }
        let absmax = self.block_absmax();
        (0..self.numel())
            .map(|i| {
                let byte = self.packed[i / 2];
                let q = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
                code[q as usize] * absmax[i / BLOCKSIZE]
            })
            .collect()
    }
}

/// `torch.sum` of a contiguous f32 vector on one CPU thread (AVX2: 8 lanes), so that
/// `absmax.mean()` is bit-identical: under 8 values, 4 scalar accumulators; else 4 vector
/// accumulators over groups of 4 vectors with torch's cascade (levels of `2^max(4, ⌈log2 n⌉/4)`
/// groups), the leftover vectors into the first, then the scalar tail, then the 8 lanes in order.
/// (torch splits a reduction over 32,768 values across threads; beyond that a tensor's offset can
/// differ from one computed by torch in the last bit.)
#[allow(clippy::needless_range_loop)] // indexes as torch's kernel does, for review against it
fn torch_sum_f32(a: &[f32]) -> f32 {
    const V: usize = 8;
    let n = a.len();
    if n < V {
        let mut p = [0f32; 4];
        let groups = n / 4;
        for i in 0..groups {
            for k in 0..4 {
                p[k] += a[4 * i + k];
            }
        }
        for &v in &a[groups * 4..] {
            p[0] += v;
        }
        return p[0] + p[1] + p[2] + p[3];
    }
    let vecs = n / V;
    let lane_add = |acc: &mut [f32; V], v: &[f32]| acc.iter_mut().zip(v).for_each(|(x, y)| *x += y);
    let vec = |i: usize| &a[i * V..(i + 1) * V];
    let groups = vecs / 4;
    const LEVELS: usize = 4;
    let ceil_log2 = if groups <= 1 { 0 } else { usize::BITS - (groups - 1).leading_zeros() } as usize;
    let power = 4.max(ceil_log2 / LEVELS);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0f32; V]; 4]; LEVELS];
    let mut i = 0;
    while i + step <= groups {
        for _ in 0..step {
            for k in 0..4 {
                lane_add(&mut acc[0][k], vec(4 * i + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..4 {
                let lower = acc[j - 1][k];
                lane_add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; V];
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < groups {
        for k in 0..4 {
            lane_add(&mut acc[0][k], vec(4 * i + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..4 {
            let upper = acc[j][k];
            lane_add(&mut acc[0][k], &upper);
        }
    }
    let mut p = acc[0];
    for i in groups * 4..vecs {
        lane_add(&mut p[0], vec(i));
    }
    for k in 1..4 {
        let pk = p[k];
        lane_add(&mut p[0], &pk);
    }
    let mut total = 0f32;
    for &v in &a[vecs * V..] {
        total += v;
    }
    for l in p[0] {
        total += l;
    }
    total
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`: 7 exponent
/// levels, each the midpoints of an f32 `linspace(0.1, 1, 2^i + 1)` times `10^(i−6)`, ± , 0 and 1,
/// sorted).
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        let b = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    data.try_into().expect("256 entries")
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the first half counts up from
/// `start`, the second half down from `end`, with an f32 step; the compiler fuses each
/// multiply-add of torch's kernel into one FMA, so this does too (bit-identical with torch 2.9).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// The CPU kernel's look-up table: 65,536 evenly spaced values in [−1, 1] → the code whose
/// midpoint interval holds them.
fn blockwise_lut(code: &[f32; 256]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut idx = 0usize;
    (0..65_536u32)
        .map(|i| {
            let v = -1.0f32 + (2.0f32 * i as f32) / 65_535.0;
            while idx < 255 && mids[idx] < v {
                idx += 1;
            }
            idx as u8
        })
        .collect()
}

/// `quantize_blockwise(x, code=dynamic, blocksize)` on the CPU: per block `absmax`, then each
/// `x · (1/absmax)` through the look-up table (index `(s + 1) · 0.5 · 65535 + 0.5`, truncated; the
/// last multiply-add fused, as the compiled kernel does).
pub fn quantize_blockwise(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = blockwise_lut(&dynamic_map());
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|v| {
            let s = (v * inv).clamp(-1.0, 1.0);
            lut[((s + 1.0) * 0.5).mul_add(65_535.0, 0.5) as u16 as usize]
        }));
    }
    (codes, absmax)
}

/// `dequantize_blockwise` with the dynamic map: `code[q] · absmax`.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let code = dynamic_map();
    codes.iter().enumerate().map(|(i, &q)| code[q as usize] * absmax[i / blocksize]).collect()
}

/// LLM.int8() weight storage (`Int8Params`): `weight` int8 `[rows, cols]` and `SCB` (f32 per row).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8 {
    pub rows: usize,
    pub cols: usize,
    pub weight: Vec<i8>,
    pub scb: Vec<f32>,
}

/// `int8_vectorwise_quant(w.half())` (threshold 0: what `Int8Params` saves).
pub fn quantize_int8(x: &[f32], rows: usize, cols: usize) -> Int8 {
    assert_eq!(x.len(), rows * cols, "int8: {rows}x{cols} values expected");
    let mut weight = Vec::with_capacity(x.len());
    let mut scb = Vec::with_capacity(rows);
    for row in x.chunks(cols.max(1)) {
        let h: Vec<f32> = row.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        let max = h.iter().fold(0f32, |m, v| m.max(v.abs()));
        scb.push(max);
        // Python's `127.0 / t` is `t.reciprocal() * 127`: two roundings, as here.
        let k = (1.0f32 / max) * 127.0;
        weight.extend(h.iter().map(|v| if max == 0.0 { 0 } else { (v * k).round_ties_even() as i8 }));
    }
    Int8 { rows, cols, weight, scb }
}

/// bitsandbytes' `7.874015718698502e-3` as the f32 torch multiplies by.
const INV_127: f32 = 7.874_016e-3;

impl Int8 {
    /// `int8_vectorwise_dequant`: `q · SCB · (1/127)`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.weight.iter().enumerate().map(|(i, &q)| q as f32 * self.scb[i / self.cols.max(1)] * INV_127).collect()
    }
}

/// `repr()` of a Python float (shortest round-trip digits; exponent form below 1e-4 and from
/// 1e16), for the packed quant state JSON that `json.dumps` writes.
pub fn python_float(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let a = x.abs();
    if (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{x:e}");
        let (m, e) = s.split_once('e').expect("exponent");
        let e: i32 = e.parse().expect("exponent digits");
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    }
}

/// The packed quant state (`weight.quant_state.bitsandbytes__<type>`): `json.dumps` of the
/// non-tensor items of `QuantState.as_dict`, in its key order.
pub fn quant_state_json(q: &Quant4, dtype: &str) -> String {
    let shape: Vec<String> = q.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {BLOCKSIZE}, \"dtype\": \"{dtype}\", \"shape\": [{}]",
        q.quant_type.name(),
        shape.join(", ")
    );
    if let Absmax::Nested { offset, .. } = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float(*offset as f64)
        ));
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_matches_repr() {
        assert_eq!(python_float(0.5), "0.5");
        assert_eq!(python_float(2.0), "2.0");
        assert_eq!(python_float(0.012_345_678_918_063_641), "0.012345678918063641");
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
        assert_eq!(python_float(1e16), "1e+16");
    }

    #[test]
    fn nf4_round_trip_is_within_half_a_level() {
        let x: Vec<f32> = (0..200).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for double in [false, true] {
            let q = quantize_4bit(&x, &[200], QuantType::Nf4, double);
            assert_eq!(q.packed.len(), 100);
            let d = q.dequantize();
            for (b, (xs, ds)) in x.chunks(64).zip(d.chunks(64)).enumerate() {
                let am = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b2) in xs.iter().zip(ds) {
                    assert!((a - b2).abs() <= 0.16 * am + 1e-3, "block {b}: {a} vs {b2}");
                }
            }
        }
    }

    #[test]
    fn fp4_zero_codes_and_high_nibble_first() {
        let mut x = vec![0f32; 64];
        x[0] = 1.0;
        x[1] = -1.0;
        let q = quantize_4bit(&x, &[64], QuantType::Fp4, false);
        // +1 is code 3 (12/12), −1 is code 11; first in the high nibble.
        assert_eq!(q.packed[0], 0x3B);
        assert_eq!(q.packed[1], 0x00);
    }

    #[test]
    fn int8_rows_scale_to_127() {
        let x = [1.0f32, -0.5, 0.25, 0.0, 2.0, 1.0];
        let q = quantize_int8(&x, 2, 3);
        assert_eq!(q.weight, vec![127, -64, 32, 0, 127, 64]);
        assert_eq!(q.scb, vec![1.0, 2.0]);
    }
}
