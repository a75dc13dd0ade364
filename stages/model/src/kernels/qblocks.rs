//! GGUF block formats held as they are on disk ([`QMatrix`]), the activation blocks their dot
//! products take ([`Q8Block`], [`Q8KBlock`]), and the portable scalar dot products every SIMD
//! kernel of [`super::quant`] is tested against.
//!
//! A weight `[rows, cols]` is `rows` rows of `cols / block` blocks each, ggml's layouts
//! (`ggml-common.h`), little-endian, f16 scales:
//!
//! | format | elements / bytes per block | value of element `i` |
//! |---|---|---|
//! | Q8_0 | 32 / 34: `d`, `qs[32]` (i8) | `d · qs[i]` |
//! | Q4_0 | 32 / 18: `d`, `qs[16]` (low nibbles are elements 0..16, high 16..32) | `d · (q − 8)` |
//! | Q4_1 | 32 / 20: `d`, `m`, `qs[16]` | `d · q + m` |
//! | Q5_0 | 32 / 22: `d`, `qh` (u32: the 5th bits), `qs[16]` | `d · (q − 16)` |
//! | Q5_1 | 32 / 24: `d`, `m`, `qh`, `qs[16]` | `d · q + m` |
//! | Q4_K | 256 / 144: `d`, `dmin`, 12 bytes of eight 6-bit (scale, min), `qs[128]` | `d · sc · q − dmin · m` per 32 |
//! | Q6_K | 256 / 210: `ql[128]`, `qh[64]`, `scales[16]` (i8), `d` | `d · sc · (q − 32)` per 16 |
//!
//! Activations are quantised per row as llama.cpp does before these products: to 32-element
//! blocks `d · q` with `d = max|x| / 127` for the 32-element formats (q8_0; the block also keeps
//! `Σ q`, which Q4_1/Q5_1's minimum term needs, as q8_1 does), and to 256-element blocks with
//! sums of each 16 (`bsums`) for the K-quants (q8_K). Integer sums are exact, so a kernel differs
//! from [`dot_row_scalar`] only by float rounding, and from the f32 product of the dequantised
//! weight by the activation rounding (≤ `max|x| / 254` per element).

use std::sync::Arc;

use crate::gguf::GgmlType;

/// The quantised block formats products run on without dequantising.
#[allow(non_camel_case_types)] // ggml's names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QFormat {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q6_K,
}

impl QFormat {
    /// The block format of a ggml tensor type (`None` for F32/F16/BF16).
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        Some(match ty {
            GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q4_0 => Self::Q4_0,
            GgmlType::Q4_1 => Self::Q4_1,
            GgmlType::Q5_0 => Self::Q5_0,
            GgmlType::Q5_1 => Self::Q5_1,
            GgmlType::Q4_K => Self::Q4_K,
            GgmlType::Q6_K => Self::Q6_K,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
        })
    }
    pub fn ggml(self) -> GgmlType {
        match self {
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q4_K => GgmlType::Q4_K,
            Self::Q6_K => GgmlType::Q6_K,
        }
    }
    /// (elements, bytes) per block.
    pub fn block(self) -> (usize, usize) {
        self.ggml().block()
    }
    /// Whether the activations are quantised to 256-element q8_K blocks (else 32-element q8_0).
    pub fn k_quant(self) -> bool {
        matches!(self, Self::Q4_K | Self::Q6_K)
    }
    pub fn name(self) -> &'static str {
        self.ggml().name()
    }
}

/// Where a matrix's bytes live (shared by its clones): its own buffer, or a range of a read-only map of the GGUF file
/// (shared by every matrix of the file, so resident memory is the file's size).
#[derive(Clone)]
pub(crate) enum QBytes {
    Owned(Arc<[u8]>),
    Mapped { map: Arc<memmap2::Mmap>, start: usize, len: usize },
}

impl QBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            QBytes::Owned(v) => v,
            QBytes::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

/// A quantised weight `[rows, cols]` in one [`QFormat`], rows contiguous (a linear layer's HF
/// layout `[out, in]`: `x Wᵀ` is one row dot product per output).
#[derive(Clone)]
pub struct QMatrix {
    fmt: QFormat,
    rows: usize,
    cols: usize,
    bytes: QBytes,
    /// Row `j` is stored row `order[j]` (llama's Q/K rows, un-permuted without a copy).
    order: Option<Arc<[u32]>>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({} [{}, {}])", self.fmt.name(), self.rows, self.cols)
    }
}

impl QMatrix {
    /// A matrix over owned bytes; errors say why the sizes do not fit the format.
    pub fn new(fmt: QFormat, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self, String> {
        Self::check(fmt, rows, cols, bytes.len())?;
        Ok(QMatrix { fmt, rows, cols, bytes: QBytes::Owned(bytes.into()), order: None })
    }

    /// A matrix over `map[start..start + len]`.
    pub(crate) fn mapped(
        fmt: QFormat,
        rows: usize,
        cols: usize,
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    ) -> Result<Self, String> {
        Self::check(fmt, rows, cols, len)?;
        if start.checked_add(len).is_none_or(|e| e > map.len()) {
            return Err(format!("bytes {start}..{} lie outside the file ({} bytes)", start + len, map.len()));
        }
        Ok(QMatrix { fmt, rows, cols, bytes: QBytes::Mapped { map, start, len }, order: None })
    }

    fn check(fmt: QFormat, rows: usize, cols: usize, len: usize) -> Result<(), String> {
        let (be, bb) = fmt.block();
        if !cols.is_multiple_of(be) {
            return Err(format!("{cols} columns are not a multiple of the {} block size {be}", fmt.name()));
        }
        let want = rows * (cols / be) * bb;
        if len != want {
            return Err(format!("{len} bytes, expected {want} for {} [{rows}, {cols}]", fmt.name()));
        }
        Ok(())
    }

    pub fn format(&self) -> QFormat {
        self.fmt
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// `[rows, cols]`.
    pub fn shape(&self) -> Vec<usize> {
        vec![self.rows, self.cols]
    }
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        let (be, bb) = self.fmt.block();
        self.cols / be * bb
    }
    /// The rows' bytes and layout, resolved once for a loop over many rows.
    #[inline]
    pub(crate) fn view(&self) -> RowsView<'_> {
        RowsView { bytes: self.bytes.as_slice(), rb: self.row_bytes(), order: self.order.as_deref() }
    }
    /// The blocks of row `j`.
    #[inline]
    pub fn row(&self, j: usize) -> &[u8] {
        let i = self.order.as_ref().map_or(j, |o| o[j] as usize);
        let rb = self.row_bytes();
        &self.bytes.as_slice()[i * rb..(i + 1) * rb]
    }
    /// Row `j` as f32 (ggml's `dequantize_row_*`; the embedding lookup).
    pub fn dequantize_row(&self, j: usize) -> Vec<f32> {
        crate::gguf::dequantize_blocks(self.fmt.ggml(), self.row(j), self.cols)
    }
    /// The whole matrix as f32, row-major (the paths that need f32 values: training, merging).
    pub fn dequantize(&self) -> Vec<f32> {
        if self.order.is_none() {
            return crate::gguf::dequantize_blocks(self.fmt.ggml(), self.bytes.as_slice(), self.rows * self.cols);
        }
        (0..self.rows).flat_map(|j| self.dequantize_row(j)).collect()
    }
    /// The same matrix with its rows in the order `src` (row `j` of the result is row `src[j]`
    /// of this one), sharing the blocks.
    pub(crate) fn reorder_rows(&self, src: &[usize]) -> Result<Self, String> {
        if src.len() != self.rows || src.iter().any(|&s| s >= self.rows) {
            return Err(format!("row order of {} entries for {} rows", src.len(), self.rows));
        }
        let order: Arc<[u32]> = src.iter().map(|&s| self.order.as_ref().map_or(s, |o| o[s] as usize) as u32).collect();
        Ok(QMatrix { order: Some(order), ..self.clone() })
    }
}

/// [`QMatrix::row`] without recomputing the row length (a division) or matching the storage at
/// every row: a decoding step's products read short rows by the thousand.
#[derive(Clone, Copy)]
pub(crate) struct RowsView<'a> {
    bytes: &'a [u8],
    rb: usize,
    order: Option<&'a [u32]>,
}

impl<'a> RowsView<'a> {
    /// The blocks of row `j`.
    #[inline]
    pub fn row(&self, j: usize) -> &'a [u8] {
        let i = self.order.map_or(j, |o| o[j] as usize);
        &self.bytes[i * self.rb..(i + 1) * self.rb]
    }
}

/// A 32-element activation block: `x ≈ d · qs`, `sum = Σ qs`, `ds = d · sum` (llama.cpp's q8_0 /
/// q8_1; `ds` is q8_1's `s`, the factor of a weight block's minimum, so the kernels of the
/// formats with one (Q4_1, Q5_1) multiply it once per block instead of converting `sum`).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8Block {
    pub qs: [i8; 32],
    pub d: f32,
    pub sum: i32,
    pub ds: f32,
}

/// A 256-element activation block: `x ≈ d · qs`, `bsums[g] = Σ qs[16g..16g + 16]` (q8_K).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8KBlock {
    pub qs: [i8; 256],
    pub d: f32,
    pub bsums: [i16; 16],
}

/// `d` and the rounded `x / d` of one block, `d = max|x| / 127` (0 for an all-zero block).
#[inline(always)]
fn quantize_block(x: &[f32], qs: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// One activation row as 32-element blocks (`x.len()` a multiple of 32).
pub(crate) fn quantize_q8(x: &[f32]) -> Vec<Q8Block> {
    #[cfg(target_arch = "x86_64")]
    if super::quant::simd_on() {
        // SAFETY: `simd_on` is only true when the CPU has AVX2, FMA and F16C.
        return unsafe { quantize_q8_avx2(x) };
    }
    quantize_q8_blocks(x)
}

/// [`quantize_q8`] compiled for AVX2: `f32::round` is then an inlined, vectorised instruction
/// sequence with `roundf`'s result (half away from zero) instead of a libm call per element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_avx2(x: &[f32]) -> Vec<Q8Block> {
    quantize_q8_blocks(x)
}

#[inline(always)]
fn quantize_q8_blocks(x: &[f32]) -> Vec<Q8Block> {
    x.chunks_exact(32)
        .map(|c| {
            let mut b = Q8Block { qs: [0; 32], d: 0.0, sum: 0, ds: 0.0 };
            b.d = quantize_block(c, &mut b.qs);
            b.sum = b.qs.iter().map(|&q| q as i32).sum();
            b.ds = b.d * b.sum as f32;
            b
        })
        .collect()
}

/// One activation row as 256-element blocks (`x.len()` a multiple of 256).
pub(crate) fn quantize_q8k(x: &[f32]) -> Vec<Q8KBlock> {
    x.chunks_exact(256)
        .map(|c| {
            let mut b = Q8KBlock { qs: [0; 256], d: 0.0, bsums: [0; 16] };
            b.d = quantize_block(c, &mut b.qs);
            for (g, s) in b.bsums.iter_mut().enumerate() {
                *s = b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
            }
            b
        })
        .collect()
}

/// One activation row, quantised for a weight format.
pub(crate) enum QAct {
    B32(Vec<Q8Block>),
    K(Vec<Q8KBlock>),
}

impl QAct {
    pub fn new(fmt: QFormat, x: &[f32]) -> Self {
        if fmt.k_quant() {
            QAct::K(quantize_q8k(x))
        } else {
            QAct::B32(quantize_q8(x))
        }
    }
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`, all eight (scale, min) pairs of a Q4_K block.
#[inline(always)]
pub(crate) fn scales_mins_k4(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = crate::gguf::scale_min_k4(j, q);
    }
    (sc, m)
}

/// The 32 element codes of a Q5_0/Q5_1 block (0..32; Q5_0 subtracts 16).
#[inline(always)]
pub(crate) fn q5_codes(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for j in 0..16 {
        out[j] = (qs[j] & 0xF) | ((((qh >> j) << 4) & 0x10) as u8);
        out[j + 16] = (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
    }
    out
}

/// The 256 codes (0..64) of a Q6_K block in element order.
#[inline(always)]
pub(crate) fn q6k_codes(b: &[u8]) -> [u8; 256] {
    let mut out = [0u8; 256];
    for h in 0..2 {
        let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32]);
        let o = &mut out[128 * h..128 * h + 128];
        for l in 0..32 {
            o[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            o[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    out
}

fn idot(a: impl Iterator<Item = i32>, b: &[i8]) -> i32 {
    a.zip(b).map(|(a, &b)| a * b as i32).sum()
}

/// `Σ_i w[i] · x[i]` of one weight row (`w`: its blocks) and one quantised activation row: the
/// portable reference of every kernel (integer sums per block, then the scales in f32).
pub(crate) fn dot_row_scalar(fmt: QFormat, w: &[u8], x: &QAct) -> f32 {
    let (_, bb) = fmt.block();
    let mut sum = 0f32;
    match (fmt, x) {
        (QFormat::Q8_0, QAct::B32(xs)) => {
            for (b, a) in w.chunks_exact(bb).zip(xs) {
                let s = idot(b[2..34].iter().map(|&q| q as i8 as i32), &a.qs);
                sum += f16_at(b, 0) * a.d * s as f32;
            }
        }
        (QFormat::Q4_0, QAct::B32(xs)) => {
            for (b, a) in w.chunks_exact(bb).zip(xs) {
                let qs = &b[2..18];
                let lo = idot(qs.iter().map(|&q| (q & 0xF) as i32 - 8), &a.qs[..16]);
                let hi = idot(qs.iter().map(|&q| (q >> 4) as i32 - 8), &a.qs[16..]);
                sum += f16_at(b, 0) * a.d * (lo + hi) as f32;
            }
        }
        (QFormat::Q4_1, QAct::B32(xs)) => {
            for (b, a) in w.chunks_exact(bb).zip(xs) {
                let qs = &b[4..20];
                let lo = idot(qs.iter().map(|&q| (q & 0xF) as i32), &a.qs[..16]);
                let hi = idot(qs.iter().map(|&q| (q >> 4) as i32), &a.qs[16..]);
                sum += f16_at(b, 0) * a.d * (lo + hi) as f32 + f16_at(b, 2) * a.ds;
            }
        }
        (QFormat::Q5_0 | QFormat::Q5_1, QAct::B32(xs)) => {
            let o = if fmt == QFormat::Q5_0 { 2 } else { 4 };
            for (b, a) in w.chunks_exact(bb).zip(xs) {
                let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                let codes = q5_codes(qh, &b[o + 4..o + 20]);
                let off = if fmt == QFormat::Q5_0 { 16 } else { 0 };
                let s = idot(codes.iter().map(|&q| q as i32 - off), &a.qs);
                sum += f16_at(b, 0) * a.d * s as f32;
                if fmt == QFormat::Q5_1 {
                    sum += f16_at(b, 2) * a.ds;
                }
            }
        }
        (QFormat::Q4_K, QAct::K(xs)) => {
            for (b, a) in w.chunks_exact(bb).zip(xs) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, m) = scales_mins_k4(&b[4..16]);
                let qs = &b[16..144];
                let (mut si, mut mi) = (0i32, 0i32);
                for j in 0..4 {
                    let q = &qs[32 * j..32 * j + 32];
                    let lo = idot(q.iter().map(|&v| (v & 0xF) as i32), &a.qs[64 * j..64 * j + 32]);
                    let hi = idot(q.iter().map(|&v| (v >> 4) as i32), &a.qs[64 * j + 32..64 * j + 64]);
                    si += sc[2 * j] as i32 * lo + sc[2 * j + 1] as i32 * hi;
                    let bs = |g: usize| a.bsums[2 * g] as i32 + a.bsums[2 * g + 1] as i32;
                    mi += m[2 * j] as i32 * bs(2 * j) + m[2 * j + 1] as i32 * bs(2 * j + 1);
                }
                sum += d * a.d * si as f32 - dmin * a.d * mi as f32;
            }
        }
        (QFormat::Q6_K, QAct::K(xs)) => {
            for (b, a) in w.chunks_exact(bb).zip(xs) {
                let codes = q6k_codes(b);
                let sc = &b[192..208];
                let mut si = 0i32;
                for g in 0..16 {
                    let s = idot(codes[16 * g..16 * g + 16].iter().map(|&q| q as i32 - 32), &a.qs[16 * g..16 * g + 16]);
                    si += sc[g] as i8 as i32 * s;
                }
                sum += f16_at(b, 208) * a.d * si as f32;
            }
        }
        _ => unreachable!("activation blocks are made for the weight's format (QAct::new)"),
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_activation_blocks_round_within_half_a_step() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 7919) % 1001) as f32 / 1001.0 - 0.5).collect();
        for b in [quantize_q8(&x).iter().map(|b| (b.d, b.qs.to_vec())).collect::<Vec<_>>()] {
            for (i, (d, qs)) in b.iter().enumerate() {
                for (j, &q) in qs.iter().enumerate() {
                    assert!((q as f32 * d - x[32 * i + j]).abs() <= d * 0.5 + 1e-7);
                }
            }
        }
        let k = quantize_q8k(&x);
        for (i, b) in k.iter().enumerate() {
            for g in 0..16 {
                let s: i16 = b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
                assert_eq!(b.bsums[g], s);
            }
            for (j, &q) in b.qs.iter().enumerate() {
                assert!((q as f32 * b.d - x[256 * i + j]).abs() <= b.d * 0.5 + 1e-7);
            }
        }
        assert!(quantize_q8(&[0.0; 32])[0].qs.iter().all(|&q| q == 0));
    }

    #[test]
    fn reordered_rows_read_through_the_order_without_a_copy() {
        let w: Vec<f32> = (0..4 * 32).map(|i| i as f32 / 10.0 - 6.0).collect();
        let bytes = crate::gguf::quantize(GgmlType::Q8_0, &w).unwrap();
        let q = QMatrix::new(QFormat::Q8_0, 4, 32, bytes).unwrap();
        let r = q.reorder_rows(&[2, 0, 3, 1]).unwrap().reorder_rows(&[1, 0, 2, 3]).unwrap();
        let want: Vec<f32> = [0, 2, 3, 1].iter().flat_map(|&j| q.dequantize_row(j)).collect();
        assert_eq!(r.dequantize(), want);
        assert_eq!(r.row(1).as_ptr(), q.row(2).as_ptr(), "the blocks are shared");
        assert!(q.reorder_rows(&[0, 1, 2]).is_err() && q.reorder_rows(&[0, 1, 2, 4]).is_err());
    }

    /// The AVX2 build of the activation quantiser rounds exactly as `roundf` (half away from
    /// zero), halfway cases and the values just below them included, and the row view reads the
    /// rows `row` reads (reordered too).
    #[test]
    fn avx2_activation_quantiser_and_row_view_equal_the_plain_ones() {
        let mut x: Vec<f32> = (0..256).map(|i| ((i * 7919) % 2003) as f32 / 1001.5 - 1.0).collect();
        // block amax 127 makes x / d the values themselves: exact halves and their neighbours
        x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| match i {
            0 => 127.0,
            1 => -126.5,
            2 => 0.5,
            3 => -0.5,
            4 => 0.499_999_97,
            5 => 2.5,
            6 => -3.5,
            _ => i as f32 * 0.37 - 5.0,
        }));
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::quant::simd_on() {
            let (fast, plain) = (unsafe { quantize_q8_avx2(&x) }, quantize_q8_blocks(&x));
            for (f, p) in fast.iter().zip(&plain) {
                assert_eq!((f.qs, f.d.to_bits(), f.sum, f.ds.to_bits()), (p.qs, p.d.to_bits(), p.sum, p.ds.to_bits()));
            }
            assert_eq!(&plain[0].qs[..7], &[127, -127, 1, -1, 0, 3, -4]);
        }
        let q = QMatrix::new(QFormat::Q8_0, 4, 64, crate::gguf::quantize(crate::gguf::GgmlType::Q8_0, &x).unwrap())
            .unwrap();
        let r = q.reorder_rows(&[2, 0, 3, 1]).unwrap();
        for m in [&q, &r] {
            let v = m.view();
            assert!((0..4).all(|j| v.row(j) == m.row(j)));
        }
    }
}
