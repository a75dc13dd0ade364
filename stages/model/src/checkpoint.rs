//! Hugging Face checkpoint folders: `config.json` + `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), F32/F16/BF16 on disk, read into [`HostTensors`]; and writing
//! full weights or a peft LoRA adapter the way transformers / peft read them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::host::{HostTensor, HostTensors};

/// Reads every tensor of one `.safetensors` file, converted to f32.
pub fn read_safetensors(path: &Path) -> Result<HostTensors, ModelError> {
    Ok(read_safetensors_split(path, false)?.0)
}

/// A frozen matrix as bf16 bits on the host (`[out, in]` row-major), for a bf16 device upload
/// that never makes an f32 copy of the model ([`load_hf_folder_bf16`]).
#[derive(Debug, Clone)]
pub struct Bf16Host {
    pub shape: Vec<usize>,
    pub bits: Vec<u16>,
}

/// The tensors kept as bf16 by [`load_hf_folder_bf16`]: the matrices a bf16 base holds in bf16
/// (projections, embedding, LM head); norms, biases and a classification head stay f32.
fn bf16_matrix(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && name != "score.weight"
}

/// [`read_safetensors`], with the matrices [`bf16_matrix`] selects kept as bf16 bits when
/// `keep_bf16` (a BF16 file's bytes as they are; F16/F32 rounded to nearest even per tensor).
fn read_safetensors_split(
    path: &Path,
    keep_bf16: bool,
) -> Result<(HostTensors, BTreeMap<String, Bf16Host>), ModelError> {
    let bytes = pipeline_cache::checked::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    let (mut out, mut bf16) = (HostTensors::new(), BTreeMap::new());
    for (name, view) in st.tensors() {
        if keep_bf16 && bf16_matrix(&name, view.shape()) {
            let bits = to_bf16_bits(&name, &view)?;
            bf16.insert(name, Bf16Host { shape: view.shape().to_vec(), bits });
        } else {
            let data = to_f32(&name, &view)?;
            out.insert(name, HostTensor::new(view.shape().to_vec(), data));
        }
    }
    Ok((out, bf16))
}

fn to_bf16_bits(name: &str, view: &TensorView<'_>) -> Result<Vec<u16>, ModelError> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::BF16 => b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()).to_bits())
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits())
            .collect(),
        other => return Err(ModelError::Dtype { name: name.to_string(), dtype: format!("{other:?}") }),
    })
}

fn to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, ModelError> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => return Err(ModelError::Dtype { name: name.to_string(), dtype: format!("{other:?}") }),
    })
}

/// A checkpoint folder read into memory.
#[derive(Debug)]
pub struct Checkpoint {
    pub config: ModelConfig,
    /// `config.json` as found (kept to write back fields this crate does not model).
    pub raw_config: serde_json::Value,
    pub tensors: HostTensors,
    /// The matrices read as bf16 bits ([`load_hf_folder_bf16`]; empty from [`load_hf_folder`]).
    pub bf16: BTreeMap<String, Bf16Host>,
}

/// Reads `dir/config.json` and `dir/model.safetensors` or the shards named by
/// `dir/model.safetensors.index.json`; a quantised folder (`quantization_config` in
/// `config.json`) is dequantised to f32 ([`crate::quant::read_dequantized`]).
pub fn load_hf_folder(dir: &Path) -> Result<Checkpoint, ModelError> {
    load_hf_folder_with(dir, false)
}

/// [`load_hf_folder`] for a bf16 base (`torch_dtype = "bfloat16"` on CUDA): the projections,
/// embedding and LM head are read as bf16 bits into [`Checkpoint::bf16`] (a BF16 checkpoint's
/// bytes unchanged), so the host holds the model in bf16, never in f32; the rest is f32 in
/// [`Checkpoint::tensors`]. A quantised folder is dequantised to f32 as before.
pub fn load_hf_folder_bf16(dir: &Path) -> Result<Checkpoint, ModelError> {
    load_hf_folder_with(dir, true)
}

fn load_hf_folder_with(dir: &Path, keep_bf16: bool) -> Result<Checkpoint, ModelError> {
    let cfg_path = dir.join("config.json");
    let text = pipeline_cache::checked::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let raw_config: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?;
    let config = ModelConfig::from_hf_value(&raw_config)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut bf16 = BTreeMap::new();
    let tensors = if let Some(qc) = raw_config.get("quantization_config").filter(|_| single.exists()) {
        crate::quant::read_dequantized(&single, qc)?
    } else if single.exists() {
        let (t, b) = read_safetensors_split(&single, keep_bf16)?;
        bf16 = b;
        t
    } else if index.exists() {
        let text = pipeline_cache::checked::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index.clone(), source })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::config("weight_map", format!("missing in {}", index.display())))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let mut all = HostTensors::new();
        for f in files {
            let (shard, b) = read_safetensors_split(&dir.join(f), keep_bf16)?;
            all.extend(shard);
            bf16.extend(b);
        }
        for name in map.keys() {
            if !all.contains_key(name) && !bf16.contains_key(name) {
                return Err(ModelError::MissingTensor { name: name.clone() });
            }
        }
        all
    } else {
        return Err(ModelError::io(
            single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json exists",
            ),
        ));
    };
    Ok(Checkpoint { config, raw_config, tensors, bf16 })
}

/// Writes `path` atomically ([`pipeline_cache::fs::write_atomic`]: unique temp file in the same
/// folder, fsync, rename), creating the folder; an error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    pipeline_cache::fs::write_atomic(path, bytes).map_err(|e| ModelError::io(path, e))
}

/// Serialises tensors as an F32 safetensors file (with `{"format": "pt"}` metadata, which
/// transformers expects).
pub fn write_safetensors(path: &Path, tensors: &HostTensors) -> Result<(), ModelError> {
    let bytes: BTreeMap<&String, Vec<u8>> =
        tensors.iter().map(|(k, t)| (k, t.data.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(&String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            let v = TensorView::new(Dtype::F32, t.shape.clone(), &bytes[k])
                .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: format!("tensor `{k}`: {e}") })?;
            Ok((k, v))
        })
        .collect::<Result<_, ModelError>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let out = safetensors::serialize(views, &Some(meta))
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    write_atomic(path, &out)
}

/// Writes `dir/config.json` + `dir/model.safetensors` (full weights, HF names).
pub fn save_hf_folder(dir: &Path, config: &ModelConfig, tensors: &HostTensors) -> Result<(), ModelError> {
    let cfg = serde_json::to_string_pretty(&config.to_hf_json()).expect("json");
    write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
    write_safetensors(&dir.join("model.safetensors"), tensors)
}

/// Reads a peft adapter folder: `adapter_config.json` + `adapter_model.safetensors`.
pub fn load_peft_adapter(dir: &Path) -> Result<(serde_json::Value, HostTensors), ModelError> {
    let p = dir.join("adapter_config.json");
    let text = pipeline_cache::checked::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json { path: p, source })?;
    let tensors = read_safetensors(&dir.join("adapter_model.safetensors"))?;
    Ok((cfg, tensors))
}
