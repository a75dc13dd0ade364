//! The bitsandbytes / EETQ quantisers (`pipeline_model::quant`) against golden values from the
//! reference packages: `tests/fixtures/quant/golden.json`, written by
//! `scripts/oracles/bnb_golden.py` (bitsandbytes 0.50.2, hqq 0.2.8.post1, torch 2.9.1, CPU; the
//! versions are in the file and checked below). Both sides make the same inputs from an integer
//! generator, so codes compare bit for bit.

use std::path::Path;

use pipeline_model::quant::bnb::{self, Absmax, QuantType};
use sha2::{Digest, Sha256};

fn golden() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant/golden.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `inputs()` of bnb_golden.py: a 64-bit LCG, 4 uniforms of 24 bits summed in f32, minus 2, times
/// a per-row power of two; row 3's first 64 values 0, value [1][5] = 7.5.
fn test_input(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        let scale = 2f32.powi((r % 5) as i32 - 3);
        for c in 0..cols {
            let mut acc = 0f32;
            for _ in 0..4 {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                acc += ((s >> 40) as f64 / 16777216.0) as f32;
            }
            out[r * cols + c] = (acc - 2.0) * scale;
        }
    }
    if rows > 3 && cols >= 64 {
        out[3 * cols..3 * cols + 64].fill(0.0);
    }
    if rows > 1 && cols > 5 {
        out[cols + 5] = 7.5;
    }
    out
}

fn input(g: &serde_json::Value, name: &str) -> (Vec<f32>, Vec<usize>) {
    let spec: Vec<u64> = g["inputs"][name].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let (r, c) = (spec[0] as usize, spec[1] as usize);
    (test_input(r, c, spec[2]), vec![r, c])
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// sha256 and first 16 of the dequantised values, as the golden file stores them.
fn check_digest(what: &str, got: &[f32], want: &serde_json::Value) {
    let head = floats(&want["head"]);
    assert_eq!(&got[..16.min(got.len())], &head[..], "{what}: first dequantised values");
    let bytes: Vec<u8> = got.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(hex(&Sha256::digest(&bytes)), want["sha256"].as_str().unwrap(), "{what}: dequantised values differ");
}

#[test]
fn oracle_versions_are_the_pinned_ones() {
    let g = golden();
    assert_eq!(g["oracle"]["bitsandbytes"], "0.50.2");
    assert_eq!(g["oracle"]["hqq"], "0.2.8.post1");
}

/// bitsandbytes 0.50.2 `create_dynamic_map()`: equal entry for entry.
#[test]
fn dynamic_map_equals_bitsandbytes() {
    let g = golden();
    assert_eq!(bnb::dynamic_map().to_vec(), floats(&g["dynamic_map"]));
}

/// bitsandbytes 0.50.2 `quantize_4bit` / `dequantize_4bit` (nf4, fp4, blocksize 64, with and
/// without `compress_statistics`) on a 40x448 tensor (280 blocks: two nested blocks of 256, the
/// second partial) and a 7x65 one (odd count, partial last block): identical packed codes, block
/// scales, double-quantisation state, `quant_state` JSON and dequantised values.
#[test]
fn bnb_4bit_equals_bitsandbytes() {
    let g = golden();
    for (case, want) in g["bnb4"].as_object().unwrap() {
        let parts: Vec<&str> = case.split('/').collect();
        let (x, shape) = input(&g, parts[0]);
        let qt = QuantType::parse(parts[1]).unwrap();
        let q = bnb::quantize_4bit(&x, &shape, qt, parts[2] == "dq");
        assert_eq!(hex(&q.packed), want["packed"].as_str().unwrap(), "{case}: packed codes");
        assert_eq!(q.quant_type.code().to_vec(), floats(&want["quant_map"]), "{case}: quant_map");
        match &q.absmax {
            Absmax::Plain(a) => assert_eq!(a, &floats(&want["absmax"]), "{case}: absmax"),
            Absmax::Nested { codes, nested_absmax, offset } => {
                assert_eq!(*offset, want["nested_offset"].as_f64().unwrap() as f32, "{case}: nested_offset");
                assert_eq!(hex(codes), want["absmax_codes"].as_str().unwrap(), "{case}: absmax codes");
                assert_eq!(nested_absmax, &floats(&want["nested_absmax"]), "{case}: nested_absmax");
                assert_eq!(bnb::dynamic_map().to_vec(), floats(&want["nested_quant_map"]), "{case}: nested_quant_map");
            }
        }
        assert_eq!(bnb::quant_state_json(&q, "float32"), want["quant_state_json"].as_str().unwrap(), "{case}");
        check_digest(case, &q.dequantize(), &want["dequantized"]);
    }
}

/// bitsandbytes 0.50.2 `int8_vectorwise_quant(w.half())` (what `Int8Params` saves) and
/// `int8_vectorwise_dequant`: identical int8 codes, SCB and dequantised values.
#[test]
fn bnb_int8_equals_bitsandbytes() {
    let g = golden();
    for (case, want) in g["int8"].as_object().unwrap() {
        let (x, shape) = input(&g, case);
        let q = bnb::quantize_int8(&x, shape[0], shape[1]);
        let bytes: Vec<u8> = q.weight.iter().map(|&v| v as u8).collect();
        assert_eq!(hex(&bytes), want["weight"].as_str().unwrap(), "{case}: int8 codes");
        assert_eq!(q.scb, floats(&want["scb"]), "{case}: SCB");
        check_digest(case, &q.dequantize(), &want["dequantized"]);
    }
}

/// hqq 0.2.8.post1 `Quantizer.quantize(optimize=True, axis=0, group_size=64)` (round_zero for 4
/// bits, as its `BaseQuantizeConfig`) on an 8x128 tensor, for 8/4/3/2 bits: hqq's own tolerance
/// (its tests compare dequantised weights loosely; torch sums in another order, so a code at a
/// rounding boundary may differ): at least 99% of the codes equal, zero and scale within 1e-3
/// relative, and the dequantised error within 2% of hqq's own error.
#[test]
fn hqq_within_tolerance_of_hqq() {
    use pipeline_model::quant::hqq;
    let g = golden();
    let x = test_input(8, 128, 3);
    for (bits, want) in g["hqq"].as_object().unwrap() {
        let bits: u32 = bits.parse().unwrap();
        let q = hqq::quantize(&x, &[8, 128], bits, 64);
        let codes: Vec<u8> = (0..want["codes"].as_str().unwrap().len() / 2)
            .map(|i| u8::from_str_radix(&want["codes"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let same = q.codes.iter().zip(&codes).filter(|(a, b)| a == b).count();
        assert!(same as f64 >= 0.99 * codes.len() as f64, "{bits} bits: {same}/{} codes equal", codes.len());
        for (name, ours, theirs) in
            [("scale", &q.scale, floats(&want["scale"])), ("zero", &q.zero, floats(&want["zero"]))]
        {
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "{bits} bits: {name} {a} vs hqq {b}");
            }
        }
        let deq = q.dequantize();
        let theirs = floats(&want["dequantized_values"]);
        let err = |d: &[f32]| d.iter().zip(&x).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / x.len() as f64;
        let (ours_err, hqq_err) = (err(&deq), err(&theirs));
        assert!(ours_err <= hqq_err * 1.02 + 1e-9, "{bits} bits: mean error {ours_err} vs hqq {hqq_err}");
    }
}
