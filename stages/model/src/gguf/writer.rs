//! GGUF v3 writing (for the quantize/export stages): metadata, tensors quantised from f32 with
//! llama.cpp's reference quantisers (`quantize_row_*_ref`, identical to the PyPI `gguf` package's
//! `gguf.quants.quantize`), laid out exactly as `gguf.GGUFWriter` does (key/values in insertion
//! order, tensor data aligned to 32 bytes, each tensor padded).
//!
//! Quantisers: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (bit-equal to `gguf.quants.quantize`)
//! and Q4_K (after `quantize_row_q4_K_ref`, bit-equal to llama.cpp's C compiled without FMA
//! contraction; golden from `scripts/oracles/q4k_golden.py`) and Q6_K (after
//! `quantize_row_q6_K_ref`: 16 sub-blocks of 16 with `make_qx_quants(nmax = 32, rmse_type = 1)`
//! scales, re-quantised to int8 against one f16 super-block scale; checked by dequantising our
//! blocks with `gguf.quants.dequantize`, golden from `scripts/oracles/quant_golden.py`).

use std::io::Write;
use std::path::Path;

use half::{bf16, f16};

use super::{GgmlType, GgufError, GgufValue};

const ALIGN: usize = 32;

/// An in-memory GGUF file being assembled.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a metadata key/value (kept in insertion order; a repeated key is an error at write).
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) {
        self.metadata.push((key.into(), value));
    }

    /// Quantise `data` (row-major, HF `shape`) to `ty` and add it.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], data: &[f32], ty: GgmlType) -> Result<(), GgufError> {
        let err = |msg: String| GgufError::Tensor { path: "<writer>".into(), tensor: name.to_string(), msg };
        if shape.iter().product::<usize>() != data.len() || shape.is_empty() {
            return Err(err(format!("shape {shape:?} does not hold {} values", data.len())));
        }
        let bytes = quantize(ty, data).map_err(|m| err(m.to_string()))?;
        let inner = *shape.last().unwrap_or(&0);
        if !inner.is_multiple_of(ty.block().0) {
            return Err(err(format!("innermost dimension {inner} is not a multiple of the {} block size", ty.name())));
        }
        self.add_raw_tensor(name, shape.iter().rev().map(|&d| d as u64).collect(), ty as u32, bytes);
        Ok(())
    }

    /// Add already-encoded tensor bytes; `dims` in ggml order (innermost first).
    pub fn add_raw_tensor(&mut self, name: &str, dims: Vec<u64>, ggml_type: u32, bytes: Vec<u8>) {
        self.tensors.push((name.to_string(), dims, ggml_type, bytes));
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = self.header()?;
        self.write_tensor_data(&mut out).expect("writing to a Vec cannot fail");
        Ok(out)
    }

    /// Everything before the tensor data (magic, counts, key/values, tensor infos), padded to the
    /// alignment; the duplicate-key check happens here, before any file is opened.
    fn header(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        let mut seen = std::collections::BTreeSet::new();
        for (k, v) in &self.metadata {
            if !seen.insert(k) {
                return Err(GgufError::Metadata {
                    path: "<writer>".into(),
                    key: k.clone(),
                    msg: "duplicate key".into(),
                });
            }
            put_str(&mut out, k);
            out.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += bytes.len().next_multiple_of(ALIGN) as u64;
        }
        out.resize(out.len().next_multiple_of(ALIGN), 0);
        Ok(out)
    }

    /// The tensor data after an aligned header: each tensor padded to the alignment.
    fn write_tensor_data(&self, w: &mut impl Write) -> std::io::Result<()> {
        const PAD: [u8; ALIGN] = [0; ALIGN];
        for (_, _, _, bytes) in &self.tensors {
            w.write_all(bytes)?;
            w.write_all(&PAD[..bytes.len().next_multiple_of(ALIGN) - bytes.len()])?;
        }
        Ok(())
    }

    /// Stream the file to `path` atomically ([`pipeline_cache::fs::write_atomic_with`]: unique
    /// temp file beside `path`, fsync, rename), without assembling it in memory first.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let header = self.header()?;
        pipeline_cache::fs::write_atomic_with(path, |w| {
            w.write_all(&header)?;
            self.write_tensor_data(w)
        })
        .map_err(|source| GgufError::Io { path: path.to_path_buf(), source })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            // An empty array is written as an array of u8 (its element type is not recorded).
            out.extend_from_slice(&items.first().map_or(0, value_type).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Why a tensor cannot be quantised.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("{0} values are not a whole number of {1}-value blocks")]
    Blocks(usize, usize),
}

/// C's `roundf`: halves away from zero.
fn roundf(x: f32) -> f32 {
    x.round()
}

/// Encode `data` as `ty` blocks (llama.cpp's reference quantisers).
pub fn quantize(ty: GgmlType, data: &[f32]) -> Result<Vec<u8>, QuantizeError> {
    let (be, bb) = ty.block();
    if !data.len().is_multiple_of(be) {
        return Err(QuantizeError::Blocks(data.len(), be));
    }
    let mut out = Vec::with_capacity(data.len() / be * bb);
    match ty {
        GgmlType::F32 => data.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgmlType::F16 => data.iter().for_each(|x| out.extend_from_slice(&f16::from_f32(*x).to_le_bytes())),
        GgmlType::BF16 => data.iter().for_each(|x| out.extend_from_slice(&bf16::from_f32(*x).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|x| roundf(x * id) as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(32) {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in b {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |x: f32| ((x * id + 8.5) as i8).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(32) {
                let min = b.iter().fold(f32::INFINITY, |m, &x| m.min(x));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |x: f32| (((x - min) * id + 0.5) as i8).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for b in data.chunks_exact(32) {
                let q: Vec<u8> = if ty == GgmlType::Q5_0 {
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in b {
                        if amax < v.abs() {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    let d = max / -16.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    b.iter().map(|x| ((x * id + 16.5) as i8).clamp(0, 31) as u8).collect()
                } else {
                    let min = b.iter().fold(f32::INFINITY, |m, &x| m.min(x));
                    let max = b.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let d = (max - min) / 31.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    b.iter().map(|x| (((x - min) * id + 0.5) as i8).clamp(0, 31) as u8).collect()
                };
                let qh = q.iter().enumerate().fold(0u32, |h, (j, &v)| h | (u32::from(v >> 4) << j));
                out.extend_from_slice(&qh.to_le_bytes());
                out.extend((0..16).map(|j| (q[j] & 0xF) | (q[j + 16] << 4)));
            }
        }
        GgmlType::Q4_K => data.chunks_exact(256).for_each(|b| quantize_q4_k_block(b, &mut out)),
        GgmlType::Q6_K => data.chunks_exact(256).for_each(|b| quantize_q6_k_block(b, &mut out)),
    }
    Ok(out)
}

/// ggml's `nearest_int`: round half to even through the float mantissa (|x| < 2^22).
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants(n = 32, nmax = 15, ..., rmin = -1, rdelta = 0.1, nstep = 20,
/// use_mad = false)`: scale and (negated) min of one 32-value sub-block, levels in `l`.
fn make_qkx2_quants(x: &[f32], weights: &[f32], l: &mut [u8]) -> (f32, f32) {
    const NMAX: i32 = 15;
    let (rmin, rdelta, nstep) = (-1.0f32, 0.1f32, 20);
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
        l[i] = li as u8;
        let diff = scale * li as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `quantize_row_q4_K_ref` for one 256-value super-block.
fn quantize_q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (sc, mn) = make_qkx2_quants(xs, &weights, &mut l[32 * j..32 * j + 32]);
        scales[j] = sc;
        mins[j] = mn;
        if sc > max_scale {
            max_scale = sc;
        }
        if mn > max_min {
            max_min = mn;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (s, m) = super::dequant::scale_min_k4(j, &sc);
        let dd = d.to_f32() * s as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dd).clamp(0, 15) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&sc);
    for j in (0..256).step_by(64) {
        out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
    }
}

/// ggml's `GROUP_MAX_EPS`: a (sub-)block whose largest |x| is below it quantises to zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw = NULL)`: a symmetric scale for the
/// values `x` (levels `l[i]` in `0..2·nmax`, value ≈ scale·(l − nmax)), weighted by x², refined
/// over 18 trial inverse scales `-(nmax + 0.1·is)/max`.
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.iter_mut().for_each(|q| *q = 0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    for (q, &v) in l.iter_mut().zip(x) {
        *q = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `quantize_row_q6_K_ref` for one 256-value super-block: `ql[128]` (low nibbles),
/// `qh[64]` (high 2 bits), `scales[16]` (int8), `d` (f16); value = d·scale[j]·(q − 32).
fn quantize_q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend(std::iter::repeat_n(0u8, 210));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for (q, &s) in sc.iter_mut().zip(&scales) {
        *q = nearest_int(iscale * s).min(127) as i8;
    }
    for j in 0..16 {
        let dd = d.to_f32() * sc[j] as f32;
        if dd == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / dd).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (half, j) in (0..256).step_by(128).enumerate() {
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            ql[64 * half + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[64 * half + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[32 * half + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q6_K round trip through our dequantiser (itself golden-tested against `gguf`): each value
    /// is its nearest level of its sub-block's step (error at most half a step) unless it lies past
    /// the levels -32..=31 and is clamped (the int8 sub-block scales are rounded), and zero blocks
    /// are exact.
    #[test]
    fn q6_k_round_trips_to_the_nearest_level() {
        let mut rng = 0x9E37_79B9u32;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            (rng as f32 / u32::MAX as f32) - 0.5
        };
        let mut x: Vec<f32> = (0..1024).map(|i| next() * if i % 97 == 0 { 8.0 } else { 1.0 }).collect();
        x[512..768].iter_mut().for_each(|v| *v = 0.0);
        let q = quantize(GgmlType::Q6_K, &x).unwrap();
        assert_eq!(q.len(), 4 * 210);
        let y = super::super::dequant::dequantize(GgmlType::Q6_K, &q, x.len());
        for (sb, (xs, ys)) in x.chunks(256).zip(y.chunks(256)).enumerate() {
            let d = f16::from_le_bytes([q[210 * sb + 208], q[210 * sb + 209]]).to_f32();
            for (j, (xb, yb)) in xs.chunks(16).zip(ys.chunks(16)).enumerate() {
                let step = (d * q[210 * sb + 192 + j] as i8 as f32).abs();
                for (a, b) in xb.iter().zip(yb) {
                    let bound = if a.abs() <= 31.5 * step { 0.5 * step } else { a.abs() - 31.0 * step };
                    assert!((a - b).abs() <= bound + 1e-6, "block {sb}.{j}: {a} vs {b} (step {step})");
                }
            }
        }
        assert!(y[512..768].iter().all(|&v| v == 0.0));
    }

    /// `write` streams header and padded tensors into the file; the bytes are `to_bytes()`'s
    /// (which the golden test compares with `gguf.GGUFWriter`'s files).
    #[test]
    fn streamed_file_equals_to_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", GgufValue::String("llama".into()));
        w.add_metadata("general.name", GgufValue::String("odd length name".into()));
        // Sizes that are not multiples of the alignment, so padding is exercised.
        w.add_raw_tensor("a", vec![3], 0, vec![1; 12]);
        w.add_raw_tensor("b", vec![5, 2], 0, vec![2; 40]);
        w.add_raw_tensor("c", vec![8], 0, vec![3; 32]);
        w.write(&path).unwrap();
        let bytes = w.to_bytes().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(bytes.len() % ALIGN, 0);
    }

    #[test]
    fn duplicate_key_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"old").unwrap();
        let mut w = GgufWriter::new();
        w.add_metadata("k", GgufValue::U32(1));
        w.add_metadata("k", GgufValue::U32(2));
        let e = w.write(&path).unwrap_err().to_string();
        assert!(e.contains("`k`") && e.contains("duplicate"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file is left");
    }
}
