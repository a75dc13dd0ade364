//! A loaded model written as the files other tools run (the `export` and `quantize` stages):
//! a Hugging Face folder that transformers loads unchanged, and a llama.cpp GGUF file.
//!
//! [`ExportModel::new`] takes a loaded [`Pretrained`] (an adapter is already merged into its
//! base by the loader, so LoRA leaves as `W + (alpha/r)·B·A`) and undoes a restricted vocabulary
//! (`vocab_map.json`, the tiny preset): the embedding and head are expanded to the full
//! tokenizer's rows so that the standard tokenizer drives the exported model:
//!
//! - `model.embed_tokens` row of tokenizer id `t` = the trained row of `t`'s model id, and for an
//!   id outside the map the row of model id 0 (what our runtime feeds for such an id);
//! - the head is untied (`lm_head.weight`, `tie_word_embeddings = false`): mapped rows are the
//!   trained head rows, rows of ids outside the map are zero (logit 0: below the trained tokens'
//!   logits for the answers the model was trained on, so greedy decoding picks the same tokens);
//! - the rows are Qwen2.5's 151,936 for the Qwen2.5 tokenizer (every Qwen2.5 checkpoint's
//!   `vocab_size`), else the tokenizer's size; `bos/eos_token_id` become tokenizer ids.
//!
//! HF folder: `config.json` (`torch_dtype` = the dtype written), `model.safetensors` (F32, F16 or
//! BF16), `tokenizer.json`, `tokenizer_config.json` (the source's when it has one, else written
//! from the tokenizer: special tokens and chat template), `generation_config.json` (the source's,
//! else greedy with the config's bos/eos/pad ids) and `chat_defaults.json` (the trained-with
//! system prompt, when known). GGUF: [`crate::gguf::export_gguf`] with each tensor's type from a
//! [`FileType`] (llama.cpp's per-tensor choice) and `general.file_type`,
//! `general.quantization_version`.

use std::path::Path;

use dfdx::prelude::Device;
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::checkpoint::write_atomic;
use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::gguf::{FileType, GgufError, GgufValue};
use crate::host::{HostTensor, HostTensors};
use crate::pretrained::Pretrained;
use crate::tokenizer::Tokenizer;

/// Rows of every Qwen2.5 checkpoint's embedding (the tokenizer's 151,665 ids, padded).
pub const QWEN25_ROWS: usize = 151_936;

/// The dtype of an HF export's weights (ms-swift / transformers names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Float32,
    Float16,
    Bfloat16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float16 => "float16",
            Dtype::Bfloat16 => "bfloat16",
        }
    }
    fn bytes(self, data: &[f32]) -> Vec<u8> {
        match self {
            Dtype::Float32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::Float16 => data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            Dtype::Bfloat16 => data.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        }
    }
    fn safetensors(self) -> StDtype {
        match self {
            Dtype::Float32 => StDtype::F32,
            Dtype::Float16 => StDtype::F16,
            Dtype::Bfloat16 => StDtype::BF16,
        }
    }
}

/// A model ready to be written out (module docs).
#[derive(Debug, Clone)]
pub struct ExportModel {
    pub config: ModelConfig,
    /// HF names, full vocabulary.
    pub tensors: HostTensors,
    pub tokenizer: Tokenizer,
    /// The trained-with system prompt (`chat_defaults.json`), when known.
    pub system: Option<String>,
    /// `Some((model rows, full rows))` when a restricted vocabulary was expanded.
    pub expanded_vocab: Option<(usize, usize)>,
}

impl ExportModel {
    /// From a loaded model (module docs).
    pub fn new<D: Device<f32>>(p: &Pretrained<D>, system: Option<String>) -> Result<Self, ModelError> {
        let mut config = p.model.cfg.clone();
        let mut tensors = p.model.to_host();
        let mut expanded_vocab = None;
        if let Some(map) = &p.vocab {
            let tok_rows = p.tokenizer.max_id_exclusive();
            let rows = if p.tokenizer.im_start_id() == Some(151_644) && tok_rows <= QWEN25_ROWS {
                QWEN25_ROWS
            } else {
                tok_rows
            };
            let hidden = config.hidden_size;
            let embed = tensors
                .get("model.embed_tokens.weight")
                .ok_or_else(|| ModelError::MissingTensor { name: "model.embed_tokens.weight".into() })?;
            let head = if config.tie_word_embeddings { embed } else { tensors.get("lm_head.weight").unwrap_or(embed) };
            let model_rows = embed.shape[0];
            let mut e = vec![0f32; rows * hidden];
            let mut h = vec![0f32; rows * hidden];
            for t in 0..rows {
                let m = map.model_id(t as u32).map(|m| m as usize);
                let src = m.unwrap_or(0);
                e[t * hidden..(t + 1) * hidden].copy_from_slice(&embed.data[src * hidden..(src + 1) * hidden]);
                if let Some(m) = m {
                    h[t * hidden..(t + 1) * hidden].copy_from_slice(&head.data[m * hidden..(m + 1) * hidden]);
                }
            }
            tensors.insert("model.embed_tokens.weight".into(), HostTensor::new(vec![rows, hidden], e));
            tensors.insert("lm_head.weight".into(), HostTensor::new(vec![rows, hidden], h));
            config.tie_word_embeddings = false;
            config.vocab_size = rows;
            config.eos_token_id = map.to_tokenizer(&config.eos_token_id)?;
            config.bos_token_id = match config.bos_token_id {
                Some(b) => map.to_tokenizer(&[b])?.first().copied(),
                None => None,
            };
            expanded_vocab = Some((model_rows, rows));
        }
        Ok(ExportModel { config, tensors, tokenizer: p.tokenizer.clone(), system, expanded_vocab })
    }

    /// `config.json` as transformers reads it, with `torch_dtype` = `dtype`.
    pub fn hf_config(&self, dtype: Dtype) -> serde_json::Value {
        let mut v = self.config.to_hf_json();
        v["torch_dtype"] = dtype.name().into();
        if let Some(pad) = self.pad_id() {
            v["pad_token_id"] = pad.into();
        }
        v
    }

    fn pad_id(&self) -> Option<u32> {
        self.tokenizer.pad_id().or(self.tokenizer.eos_id())
    }

    /// Writes the HF folder into `dir` (module docs); `tokenizer_config` / `generation_config`
    /// are the source's files, copied when given. Returns the file names written.
    pub fn write_hf(
        &self,
        dir: &Path,
        dtype: Dtype,
        tokenizer_config: Option<&Path>,
        generation_config: Option<&Path>,
    ) -> Result<Vec<String>, ModelError> {
        let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
        write_atomic(&dir.join("config.json"), &json(&self.hf_config(dtype)))?;
        write_safetensors_as(&dir.join("model.safetensors"), &self.tensors, dtype)?;
        self.write_hf_side_files(dir, tokenizer_config, generation_config)
    }

    /// The HF folder's files beside `config.json` and `model.safetensors` (tokenizer, generation
    /// config, chat defaults); returns every file name of the folder.
    pub fn write_hf_side_files(
        &self,
        dir: &Path,
        tokenizer_config: Option<&Path>,
        generation_config: Option<&Path>,
    ) -> Result<Vec<String>, ModelError> {
        let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
        let copy = |src: &Path, name: &str| -> Result<(), ModelError> {
            let bytes = std::fs::read(src).map_err(|e| ModelError::io(src, e))?;
            write_atomic(&dir.join(name), &bytes)
        };
        match tokenizer_config {
            Some(src) => {
                let json =
                    self.tokenizer.inner().to_string(false).map_err(|e| {
                        ModelError::config("tokenizer", format!("cannot serialise tokenizer.json: {e}"))
                    })?;
                write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
                copy(src, "tokenizer_config.json")?
            }
            None => self.tokenizer.write_hf_files(dir, self.config.max_position_embeddings)?,
        }
        match generation_config {
            Some(src) => copy(src, "generation_config.json")?,
            None => write_atomic(&dir.join("generation_config.json"), &json(&self.generation_config()))?,
        }
        let mut files: Vec<String> =
            ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
                .map(String::from)
                .into();
        if let Some(sys) = &self.system {
            write_atomic(&dir.join("chat_defaults.json"), &json(&serde_json::json!({ "system": sys })))?;
            files.push("chat_defaults.json".into());
        }
        Ok(files)
    }

    /// Greedy decoding with the model's stop ids (what `pipeline generate` does by default).
    fn generation_config(&self) -> serde_json::Value {
        let mut eos = self.config.eos_token_id.clone();
        eos.extend(self.tokenizer.im_end_id());
        eos.sort_unstable();
        eos.dedup();
        let mut v = serde_json::json!({ "do_sample": false, "eos_token_id": eos });
        if let Some(b) = self.config.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if let Some(p) = self.pad_id() {
            v["pad_token_id"] = p.into();
        }
        v
    }

    /// Writes a GGUF file of type `ft` to `path` (module docs).
    pub fn write_gguf(&self, path: &Path, ft: FileType, name: &str) -> Result<(), GgufError> {
        let n_layers = self.config.num_hidden_layers;
        let tied = self.config.tie_word_embeddings;
        let shape = |n: &str| self.tensors.get(n).map(|t| t.shape.clone()).unwrap_or_default();
        let mut w =
            crate::gguf::export_gguf(&self.config.to_hf_json(), &self.tensors, Some(&self.tokenizer), None, |n| {
                ft.tensor_type(n, &shape(n), n_layers, tied)
            })?;
        w.add_metadata("general.name", GgufValue::String(name.to_string()));
        w.add_metadata("general.file_type", GgufValue::U32(ft.id()));
        w.add_metadata("general.quantization_version", GgufValue::U32(2));
        w.write(path)
    }
}

/// Serialises tensors as a safetensors file of `dtype` (with `{"format": "pt"}` metadata, which
/// transformers expects).
pub fn write_safetensors_as(path: &Path, tensors: &HostTensors, dtype: Dtype) -> Result<(), ModelError> {
    let bytes: Vec<(&String, Vec<u8>, &Vec<usize>)> =
        tensors.iter().map(|(k, t)| (k, dtype.bytes(&t.data), &t.shape)).collect();
    let views: Vec<(&String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, shape)| {
            let v = TensorView::new(dtype.safetensors(), (*shape).clone(), b)
                .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: format!("tensor `{k}`: {e}") })?;
            Ok((*k, v))
        })
        .collect::<Result<_, ModelError>>()?;
    let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let out = safetensors::serialize(views, &Some(meta))
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    write_atomic(path, &out)
}

impl ExportModel {
    /// Writes the HF folder quantised with `method` into `dir` (`config.json` with
    /// `quantization_config`, the quantised `model.safetensors`, the side files of
    /// [`ExportModel::write_hf`]); returns the file names and what the weights file holds.
    pub fn write_hf_quantized(
        &self,
        dir: &Path,
        method: crate::quant::Method,
        tokenizer_config: Option<&Path>,
        generation_config: Option<&Path>,
    ) -> Result<(Vec<String>, crate::quant::Written), ModelError> {
        let mut config = self.hf_config(Dtype::Float32);
        config["quantization_config"] = method.quantization_config();
        let json = serde_json::to_vec_pretty(&config).expect("json");
        write_atomic(&dir.join("config.json"), &json)?;
        let written = crate::quant::write_safetensors(&dir.join("model.safetensors"), &self.tensors, method)?;
        Ok((self.write_hf_side_files(dir, tokenizer_config, generation_config)?, written))
    }
}
