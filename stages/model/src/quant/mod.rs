//! Quantised Hugging Face folders: bitsandbytes 4-bit (NF4/FP4, optional double quantisation)
//! and LLM.int8(), EETQ int8 and HQQ, written the way transformers' `save_pretrained` writes a model
//! quantised with that method, and read back (dequantised to f32 at load, by
//! [`crate::checkpoint::load_hf_folder`] when `config.json` has a `quantization_config`).
//!
//! What is quantised follows transformers' rule for these methods: every `nn.Linear` of the
//! decoder layers (`model.layers.N.*_proj.weight`); `lm_head` (the output embedding, in
//! transformers' `modules_to_not_convert`), the token embedding, norms and biases stay as they
//! are (f32 here, `torch_dtype = "float32"`).
//!
//! Tensor names per quantised linear `P` (bitsandbytes' `_save_to_state_dict`):
//! - 4-bit: `P.weight` (u8 `[(numel + 1) / 2, 1]`), `P.weight.absmax` (f32, or u8 codes with
//!   double quantisation), `P.weight.quant_map` (f32 16), with double quantisation
//!   `P.weight.nested_absmax` (f32) and `P.weight.nested_quant_map` (f32 256), and
//!   `P.weight.quant_state.bitsandbytes__<nf4|fp4>` (u8: the JSON of the non-tensor state).
//! - int8: `P.weight` (i8 `[out, in]`), `P.SCB` (f32 `[out]`), `P.weight_format` (u8 scalar 0 =
//!   row-major).
//! - EETQ: `P.weight` (i8 `[in, out]`), `P.weight_scales` (f16 `[out]`).
//! - HQQ (`HQQLinear.state_dict` with `encoded_state_dict`, no `P.weight`): `P.W_q` (hqq's bit
//!   packing, u8 or i32 for 3 bits), `P.scale` / `P.zero` (f32 `[1, n]`), `P.shape` (i64),
//!   `P.nbits` / `P.group_size` / `P.axis` (i32 scalars), `P.packing` / `P.unpack_view_dtype` /
//!   `P.compute_dtype` (u8 text) and the flags `view_as_float`, `offload_meta`,
//!   `encoded_state_dict`, `stores_quant_config`, `channel_wise`, `optimize`, `round_zero`,
//!   `quant_scale`, `quant_zero` (u8).

pub mod bnb;
pub mod eetq;
pub mod hqq;

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::checkpoint::write_atomic;
use crate::error::ModelError;
use crate::host::{HostTensor, HostTensors};

/// A quantisation method and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// bitsandbytes 4-bit (`load_in_4bit`).
    Bnb4 { quant_type: bnb::QuantType, double_quant: bool, compute_dtype: &'static str },
    /// bitsandbytes LLM.int8() (`load_in_8bit`).
    Bnb8,
    /// EETQ int8 weight-only.
    Eetq,
    /// HQQ with `nbits` in groups of `group_size` on axis 0.
    Hqq { nbits: u32, group_size: usize },
}

/// Whether transformers quantises tensor `name` with these methods (module docs).
pub fn is_quantized_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

impl Method {
    /// `config.json`'s `quantization_config` (transformers' `to_dict` of the method's config).
    pub fn quantization_config(&self) -> serde_json::Value {
        match *self {
            Method::Bnb4 { .. } | Method::Bnb8 => {
                let (four, qt, dq, cd) = match *self {
                    Method::Bnb4 { quant_type, double_quant, compute_dtype } => {
                        (true, quant_type.name(), double_quant, compute_dtype)
                    }
                    _ => (false, "fp4", false, "float32"),
                };
                serde_json::json!({
                    "_load_in_4bit": four,
                    "_load_in_8bit": !four,
                    "bnb_4bit_compute_dtype": cd,
                    "bnb_4bit_quant_storage": "uint8",
                    "bnb_4bit_quant_type": qt,
                    "bnb_4bit_use_double_quant": dq,
                    "llm_int8_enable_fp32_cpu_offload": false,
                    "llm_int8_has_fp16_weight": false,
                    "llm_int8_skip_modules": null,
                    "llm_int8_threshold": 6.0,
                    "load_in_4bit": four,
                    "load_in_8bit": !four,
                    "quant_method": "bitsandbytes",
                })
            }
            Method::Hqq { nbits, group_size } => serde_json::json!({
                "quant_config": {
                    "offload_meta": false,
                    "scale_quant_params": null,
                    "zero_quant_params": null,
                    "weight_quant_params": {
                        "axis": 0,
                        "channel_wise": true,
                        "group_size": group_size,
                        "nbits": nbits,
                        "optimize": true,
                        "round_zero": nbits == 4,
                        "view_as_float": false,
                    },
                },
                "quant_method": "hqq",
                "skip_modules": ["lm_head"],
            }),
            Method::Eetq => serde_json::json!({
                "modules_to_not_convert": ["lm_head"],
                "quant_method": "eetq",
                "weights": "int8",
            }),
        }
    }
}

/// What [`write_safetensors`] wrote: parameters quantised / kept, and the bytes of tensor data
/// (all of it, and the quantised linears' share).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Written {
    pub quantized_tensors: usize,
    pub quantized_parameters: u64,
    pub quantized_bytes: u64,
    pub kept_parameters: u64,
    pub data_bytes: u64,
}

struct Raw {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn raw_f32(v: &[f32]) -> Raw {
    Raw { dtype: StDtype::F32, shape: vec![v.len()], bytes: f32s(v) }
}

/// The tensors of one quantised weight `name` (`P.weight`).
fn quantize_one(name: &str, t: &HostTensor, method: Method, out: &mut BTreeMap<String, Raw>) {
    let prefix = name.strip_suffix("weight").expect("a .weight tensor");
    let (rows, cols) = (t.shape[0], t.shape[1]);
    match method {
        Method::Bnb4 { quant_type, double_quant, .. } => {
            let q = bnb::quantize_4bit(&t.data, &t.shape, quant_type, double_quant);
            let n = q.packed.len();
            out.insert(name.into(), Raw { dtype: StDtype::U8, shape: vec![n, 1], bytes: q.packed.clone() });
            match &q.absmax {
                bnb::Absmax::Plain(a) => {
                    out.insert(format!("{name}.absmax"), raw_f32(a));
                }
                bnb::Absmax::Nested { codes, nested_absmax, .. } => {
                    out.insert(
                        format!("{name}.absmax"),
                        Raw { dtype: StDtype::U8, shape: vec![codes.len()], bytes: codes.clone() },
                    );
                    out.insert(format!("{name}.nested_absmax"), raw_f32(nested_absmax));
                    out.insert(format!("{name}.nested_quant_map"), raw_f32(&bnb::dynamic_map()));
                }
            }
            out.insert(format!("{name}.quant_map"), raw_f32(&quant_type.code()));
            let json = bnb::quant_state_json(&q, "float32").into_bytes();
            out.insert(
                format!("{name}.quant_state.bitsandbytes__{}", quant_type.name()),
                Raw { dtype: StDtype::U8, shape: vec![json.len()], bytes: json },
            );
        }
        Method::Bnb8 => {
            let q = bnb::quantize_int8(&t.data, rows, cols);
            out.insert(
                name.into(),
                Raw { dtype: StDtype::I8, shape: vec![rows, cols], bytes: q.weight.iter().map(|&v| v as u8).collect() },
            );
            out.insert(format!("{prefix}SCB"), raw_f32(&q.scb));
            out.insert(format!("{prefix}weight_format"), Raw { dtype: StDtype::U8, shape: vec![], bytes: vec![0] });
        }
        Method::Hqq { nbits, group_size } => {
            let q = hqq::quantize(&t.data, &t.shape, nbits, group_size);
            let (bytes, shape) = q.packed();
            let dtype = if nbits == 3 { StDtype::I32 } else { StDtype::U8 };
            out.insert(format!("{prefix}W_q"), Raw { dtype, shape, bytes });
            let text = |v: &str| Raw { dtype: StDtype::U8, shape: vec![v.len()], bytes: v.as_bytes().to_vec() };
            let int = |v: i32| Raw { dtype: StDtype::I32, shape: vec![], bytes: v.to_le_bytes().to_vec() };
            let flag = |v: bool| Raw { dtype: StDtype::U8, shape: vec![], bytes: vec![v as u8] };
            let n = q.scale.len();
            out.insert(format!("{prefix}scale"), Raw { dtype: StDtype::F32, shape: vec![1, n], bytes: f32s(&q.scale) });
            out.insert(format!("{prefix}zero"), Raw { dtype: StDtype::F32, shape: vec![1, n], bytes: f32s(&q.zero) });
            out.insert(
                format!("{prefix}shape"),
                Raw {
                    dtype: StDtype::I64,
                    shape: vec![2],
                    bytes: [rows as i64, cols as i64].iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            );
            out.insert(format!("{prefix}nbits"), int(nbits as i32));
            out.insert(format!("{prefix}group_size"), int(group_size as i32));
            out.insert(format!("{prefix}axis"), int(0));
            let packing = match nbits {
                8 => "8bit_u8",
                4 => "4bit_u8",
                3 => "3bit_32",
                _ => "2bit_u8",
            };
            out.insert(format!("{prefix}packing"), text(packing));
            out.insert(
                format!("{prefix}unpack_view_dtype"),
                text(if nbits == 3 { "torch.int32" } else { "torch.uint8" }),
            );
            out.insert(format!("{prefix}compute_dtype"), text("torch.float32"));
            for (k, v) in [
                ("view_as_float", false),
                ("offload_meta", false),
                ("encoded_state_dict", true),
                ("stores_quant_config", true),
                ("channel_wise", true),
                ("optimize", true),
                ("round_zero", nbits == 4),
                ("quant_scale", false),
                ("quant_zero", false),
            ] {
                out.insert(format!("{prefix}{k}"), flag(v));
            }
        }
        Method::Eetq => {
            let q = eetq::quantize(&t.data, rows, cols);
            out.insert(
                name.into(),
                Raw { dtype: StDtype::I8, shape: vec![cols, rows], bytes: q.weight.iter().map(|&v| v as u8).collect() },
            );
            out.insert(
                format!("{prefix}weight_scales"),
                Raw {
                    dtype: StDtype::F16,
                    shape: vec![rows],
                    bytes: q.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                },
            );
        }
    }
}

/// Writes `tensors` quantised with `method` as one safetensors file at `path` (module docs).
pub fn write_safetensors(path: &Path, tensors: &HostTensors, method: Method) -> Result<Written, ModelError> {
    let mut raw = BTreeMap::<String, Raw>::new();
    let mut w = Written::default();
    for (name, t) in tensors {
        if let (Method::Hqq { group_size, .. }, true) = (method, is_quantized_linear(name, &t.shape)) {
            if !t.numel().is_multiple_of(group_size) {
                return Err(ModelError::config(
                    "group_size",
                    format!("hqq: `{name}` has {} values, not a multiple of group_size {group_size}", t.numel()),
                ));
            }
        }
        if is_quantized_linear(name, &t.shape) {
            let before: u64 = raw.values().map(|r| r.bytes.len() as u64).sum();
            quantize_one(name, t, method, &mut raw);
            let after: u64 = raw.values().map(|r| r.bytes.len() as u64).sum();
            w.quantized_tensors += 1;
            w.quantized_parameters += t.numel() as u64;
            w.quantized_bytes += after - before;
        } else {
            w.kept_parameters += t.numel() as u64;
            raw.insert(name.clone(), Raw { dtype: StDtype::F32, shape: t.shape.clone(), bytes: f32s(&t.data) });
        }
    }
    w.data_bytes = raw.values().map(|r| r.bytes.len() as u64).sum();
    let views: Vec<(&String, TensorView<'_>)> = raw
        .iter()
        .map(|(k, r)| {
            let v = TensorView::new(r.dtype, r.shape.clone(), &r.bytes)
                .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: format!("tensor `{k}`: {e}") })?;
            Ok((k, v))
        })
        .collect::<Result<_, ModelError>>()?;
    let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, &Some(meta))
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    write_atomic(path, &bytes)?;
    Ok(w)
}

/// One tensor of a quantised file, as stored.
struct Stored {
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Stored {
    fn f32s(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let b = &self.bytes;
        Ok(match self.dtype {
            StDtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StDtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StDtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(ModelError::Dtype { name: name.to_string(), dtype: format!("{other:?}") }),
        })
    }
}

fn bad(path: &Path, name: &str, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Safetensors { path: path.to_path_buf(), msg: format!("tensor `{name}`: {msg}") }
}

/// Reads a quantised `model.safetensors` (bitsandbytes 4-bit / int8, EETQ; `quant_method` from
/// `config.json`'s `quantization_config`) and dequantises every weight to f32.
pub fn read_dequantized(path: &Path, quantization_config: &serde_json::Value) -> Result<HostTensors, ModelError> {
    let method = quantization_config.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if !matches!(method, "bitsandbytes" | "eetq" | "hqq") {
        return Err(ModelError::config(
            "quantization_config.quant_method",
            format!("\"{method}\" is not readable here (\"bitsandbytes\", \"eetq\" and \"hqq\" are)"),
        ));
    }
    let bytes = pipeline_cache::checked::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    let mut all: BTreeMap<String, Stored> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, Stored { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() }))
        .collect();
    let mut out = HostTensors::new();
    let names: Vec<String> = all.keys().cloned().collect();
    for name in names.iter().filter(|n| n.ends_with(".W_q")) {
        let prefix = name.strip_suffix("W_q").expect("suffix");
        let scalar = |k: &str| -> Result<i64, ModelError> {
            let key = format!("{prefix}{k}");
            let t = all.get(&key).ok_or_else(|| ModelError::MissingTensor { name: key.clone() })?;
            Ok(match (t.dtype, t.bytes.len()) {
                (StDtype::I32, 4) => i32::from_le_bytes([t.bytes[0], t.bytes[1], t.bytes[2], t.bytes[3]]) as i64,
                (StDtype::I64, 8) => i64::from_le_bytes(t.bytes[..8].try_into().expect("8 bytes")),
                _ => return Err(bad(path, &key, "not an integer scalar")),
            })
        };
        let (nbits, group_size) = (scalar("nbits")? as u32, scalar("group_size")? as usize);
        if scalar("axis")? != 0 {
            return Err(bad(path, name, "HQQ axis 1 is not read (axis 0 is)"));
        }
        let shape_key = format!("{prefix}shape");
        let shape: Vec<usize> = match all.get(&shape_key) {
            Some(t) if t.dtype == StDtype::I64 => {
                t.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8")) as usize).collect()
            }
            _ => return Err(bad(path, &shape_key, "missing or not int64")),
        };
        let scale = all
            .get(&format!("{prefix}scale"))
            .ok_or_else(|| ModelError::MissingTensor { name: format!("{prefix}scale") })?
            .f32s(name)?;
        let zero = all
            .get(&format!("{prefix}zero"))
            .ok_or_else(|| ModelError::MissingTensor { name: format!("{prefix}zero") })?
            .f32s(name)?;
        let numel: usize = shape.iter().product();
        if group_size == 0
            || !numel.is_multiple_of(group_size)
            || scale.len() != numel / group_size
            || zero.len() != scale.len()
        {
            return Err(bad(path, name, format!("scale/zero do not fit shape {shape:?} in groups of {group_size}")));
        }
        let codes = hqq::Hqq::unpack(nbits, group_size, scale.len(), &all[name].bytes).ok_or_else(|| {
            bad(path, name, format!("{} bytes of {nbits}-bit codes do not fit shape {shape:?}", all[name].bytes.len()))
        })?;
        let q = hqq::Hqq { nbits, group_size, shape: shape.clone(), codes, scale, zero };
        out.insert(format!("{prefix}weight"), HostTensor::new(shape, q.dequantize()));
        for k in [
            "W_q",
            "nbits",
            "group_size",
            "shape",
            "scale",
            "zero",
            "axis",
            "packing",
            "unpack_view_dtype",
            "view_as_float",
            "compute_dtype",
            "offload_meta",
            "encoded_state_dict",
            "stores_quant_config",
            "channel_wise",
            "optimize",
            "round_zero",
            "quant_scale",
            "quant_zero",
        ] {
            all.remove(&format!("{prefix}{k}"));
        }
    }
    for name in names {
        if !all.contains_key(&name) {
            continue;
        }
        let Some(prefix) = name.strip_suffix("weight") else { continue };
        let qs_key = ["nf4", "fp4"]
            .iter()
            .map(|t| format!("{name}.quant_state.bitsandbytes__{t}"))
            .find(|k| all.contains_key(k));
        let shape_and_data = if let Some(qs_key) = qs_key {
            let qs = all.remove(&qs_key).expect("present");
            let state: serde_json::Value =
                serde_json::from_slice(&qs.bytes).map_err(|e| bad(path, &qs_key, format!("invalid JSON: {e}")))?;
            let qt = state["quant_type"]
                .as_str()
                .and_then(bnb::QuantType::parse)
                .ok_or_else(|| bad(path, &qs_key, "no quant_type nf4/fp4"))?;
            if state["blocksize"].as_u64() != Some(bnb::BLOCKSIZE as u64) {
                return Err(bad(
                    path,
                    &qs_key,
                    format!("blocksize {} (only {} is read)", state["blocksize"], bnb::BLOCKSIZE),
                ));
            }
            let shape: Vec<usize> = state["shape"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| bad(path, &qs_key, "no shape"))?;
            let packed = all.remove(&name).expect("present").bytes;
            let absmax_key = format!("{name}.absmax");
            let absmax =
                all.remove(&absmax_key).ok_or_else(|| ModelError::MissingTensor { name: absmax_key.clone() })?;
            all.remove(&format!("{name}.quant_map"));
            let absmax = if let Some(nested) = all.remove(&format!("{name}.nested_absmax")) {
                all.remove(&format!("{name}.nested_quant_map"));
                let offset =
                    state["nested_offset"].as_f64().ok_or_else(|| bad(path, &qs_key, "no nested_offset"))? as f32;
                bnb::Absmax::Nested { codes: absmax.bytes, nested_absmax: nested.f32s(&name)?, offset }
            } else {
                bnb::Absmax::Plain(absmax.f32s(&absmax_key)?)
            };
            let q = bnb::Quant4 { quant_type: qt, shape: shape.clone(), packed, absmax };
            let numel = q.numel();
            if q.packed.len() != numel.div_ceil(2) || q.block_absmax().len() != numel.div_ceil(bnb::BLOCKSIZE) {
                return Err(bad(
                    path,
                    &name,
                    format!("{} code bytes / scales do not fit shape {shape:?}", q.packed.len()),
                ));
            }
            Some((shape, q.dequantize()))
        } else if let Some(scb) = all.remove(&format!("{prefix}SCB")) {
            all.remove(&format!("{prefix}weight_format"));
            let w = all.remove(&name).expect("present");
            let [rows, cols] = w.shape[..] else { return Err(bad(path, &name, "int8 weight is not 2-D")) };
            let scb = scb.f32s(&name)?;
            if scb.len() != rows || w.bytes.len() != rows * cols {
                return Err(bad(path, &name, "SCB does not have one scale per row"));
            }
            let q = bnb::Int8 { rows, cols, weight: w.bytes.iter().map(|&b| b as i8).collect(), scb };
            Some((vec![rows, cols], q.dequantize()))
        } else if let Some(scales) = all.remove(&format!("{prefix}weight_scales")) {
            let w = all.remove(&name).expect("present");
            let [inf, outf] = w.shape[..] else { return Err(bad(path, &name, "EETQ weight is not 2-D")) };
            let scales: Vec<half::f16> =
                scales.bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
            if scales.len() != outf || w.bytes.len() != inf * outf {
                return Err(bad(path, &name, "weight_scales does not have one scale per output channel"));
            }
            let q = eetq::Eetq {
                out_features: outf,
                in_features: inf,
                weight: w.bytes.iter().map(|&b| b as i8).collect(),
                scales,
            };
            Some((vec![outf, inf], q.dequantize()))
        } else {
            None
        };
        if let Some((shape, data)) = shape_and_data {
            out.insert(name, HostTensor::new(shape, data));
        }
    }
    for (name, s) in &all {
        out.insert(name.clone(), HostTensor::new(s.shape.clone(), s.f32s(name)?));
    }
    Ok(out)
}
