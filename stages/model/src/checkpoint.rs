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
    let bytes = pipeline_cache::checked::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    let mut out = HostTensors::new();
    for (name, view) in st.tensors() {
        let data = to_f32(&name, &view)?;
        out.insert(name, HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
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
}

/// Reads `dir/config.json` and `dir/model.safetensors` or the shards named by
/// `dir/model.safetensors.index.json`; a quantised folder (`quantization_config` in
/// `config.json`) is dequantised to f32 ([`crate::quant::read_dequantized`]).
pub fn load_hf_folder(dir: &Path) -> Result<Checkpoint, ModelError> {
    let cfg_path = dir.join("config.json");
    let text = pipeline_cache::checked::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let raw_config: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: cfg_path.clone(), source })?;
    let config = ModelConfig::from_hf_value(&raw_config)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let tensors = if let Some(qc) = raw_config.get("quantization_config").filter(|_| single.exists()) {
        crate::quant::read_dequantized(&single, qc)?
    } else if single.exists() {
        read_safetensors(&single)?
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
            let shard = read_safetensors(&dir.join(f))?;
            all.extend(shard);
        }
        for name in map.keys() {
            if !all.contains_key(name) {
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
    Ok(Checkpoint { config, raw_config, tensors })
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
