//! # export
//!
//! ## What it does
//! Writes a model in the layouts other tools run (ms-swift's `swift export --merge_lora`): a
//! merged Hugging Face folder that transformers loads unchanged, and/or a `.gguf` file that
//! llama.cpp loads. A LoRA adapter (an adapter folder, or a training stage's output) leaves merged
//! into its base; a restricted vocabulary (the tiny preset's `vocab_map.json`) is expanded to the
//! full tokenizer, so the standard tokenizer drives the exported model
//! (`pipeline_model::export` says how).
//!
//! ## Inputs
//! `model` (optional when the `model` param is set): a model folder from an upstream stage
//! (`pretrain`, `sft`, `align`, `quantize` with an f16/bf16 GGUF) or an artifact holding one
//! `.gguf` file.
//!
//! ## Outputs
//! `model` (with `"hf"`): `config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json` (with the chat template), `generation_config.json`,
//! `chat_defaults.json`. `gguf` (with `"gguf"`): `model.gguf`. The report lists the files
//! (relative to their output), their bytes and, for GGUF, the tensor types and bits per weight.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `format` | `"hf"` | `"hf"`, `"gguf"` or a list of both |
//! | `model` | input `model` | HF folder, adapter folder or `.gguf` path (`${VAR}` expanded) |
//! | `merge_lora` | `true` | merge LoRA into the base (the only export; the unmerged adapter is the training stage's `model/adapter/`) |
//! | `dtype` / `torch_dtype` | `"float32"` | `"float32"`, `"float16"` or `"bfloat16"`: the HF weights, and the GGUF matrices unless `gguf_type` is set |
//! | `gguf_type` | from `dtype` | `"F32"`, `"F16"`, `"BF16"` or `"Q8_0"` (for 4-bit files use the `quantize` stage) |
//!
//! ## Cache key
//! Params, the `model` artifact, and the content of the `model` path when given as a param.
//!
//! ## Example
//! ```toml
//! [stages.export]
//! kind = "export"
//! inputs = { model = "align.model" }
//! params = { format = ["hf", "gguf"], dtype = "bfloat16" }
//! ```

use std::path::Path;

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use pipeline_model::export::{Dtype, ExportModel};
use pipeline_model::gguf::FileType;

use crate::training;

pub(crate) struct Export;

/// An export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Format {
    Hf,
    Gguf,
}

/// One format or a list of them.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
enum Formats {
    One(Format),
    Many(Vec<Format>),
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "default_format")]
    format: Formats,
    #[serde(default)]
    model: Option<String>,
    #[serde(default = "yes")]
    merge_lora: bool,
    #[serde(default, alias = "torch_dtype")]
    dtype: Option<Dtype>,
    #[serde(default)]
    gguf_type: Option<String>,
}

fn default_format() -> Formats {
    Formats::One(Format::Hf)
}
fn yes() -> bool {
    true
}

/// The checked params: which formats, the HF dtype and the GGUF file type.
struct Config {
    model: Option<String>,
    hf: bool,
    gguf: Option<FileType>,
    dtype: Dtype,
}

impl Params {
    fn parse(table: &toml::Table) -> Result<Config, StageError> {
        let p: Params = pipeline_engine::stage::parse_params(table).map_err(|e| match e {
            StageError::Params(m) if m.contains("Formats") || m.contains("untagged") => StageError::Params(
                "`format` must be \"hf\", \"gguf\" or a list of them (e.g. [\"hf\", \"gguf\"])".into(),
            ),
            other => other,
        })?;
        let formats = match p.format {
            Formats::One(f) => vec![f],
            Formats::Many(v) => v,
        };
        if formats.is_empty() {
            return Err(StageError::Params("`format = []`: give \"hf\", \"gguf\" or both".into()));
        }
        if !p.merge_lora {
            return Err(StageError::Params(
                "`merge_lora = false`: export writes merged weights only; the unmerged LoRA adapter is the training stage's `model/adapter/` folder".into(),
            ));
        }
        let dtype = p.dtype.unwrap_or(Dtype::Float32);
        let gguf = formats.contains(&Format::Gguf);
        let ft = match (&p.gguf_type, gguf) {
            (Some(_), false) => {
                return Err(StageError::Params("`gguf_type` is set but `format` has no \"gguf\"".into()));
            }
            (Some(t), true) => match FileType::parse(t) {
                Some(ft @ (FileType::F32 | FileType::F16 | FileType::BF16 | FileType::Q8_0)) => Some(ft),
                Some(ft) => {
                    return Err(StageError::Params(format!(
                        "`gguf_type = \"{}\"`: export writes F32, F16, BF16 or Q8_0; 4-bit files come from the `quantize` stage (quant_method = \"gguf\")",
                        ft.name()
                    )))
                }
                None => {
                    return Err(StageError::Params(format!(
                        "`gguf_type = \"{t}\"` is not one of \"F32\", \"F16\", \"BF16\", \"Q8_0\""
                    )))
                }
            },
            (None, true) => Some(match dtype {
                Dtype::Float32 => FileType::F32,
                Dtype::Float16 => FileType::F16,
                Dtype::Bfloat16 => FileType::BF16,
            }),
            (None, false) => None,
        };
        Ok(Config { model: p.model, hf: formats.contains(&Format::Hf), gguf: ft, dtype })
    }
}

impl Stage for Export {
    fn kind(&self) -> &'static str {
        "export"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Merged HF folder (safetensors, tokenizer, configs) and/or a llama.cpp GGUF file"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&[], &["model"])?;
        let c = Params::parse(ctx.params)?;
        let files = training::declared_model_files(ctx, c.model.as_deref())?;
        let mut outputs = Vec::new();
        if c.hf {
            outputs.push("model".to_string());
        }
        if c.gguf.is_some() {
            outputs.push("gguf".to_string());
        }
        Ok(Declared { outputs, files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let c = Params::parse(ctx.raw_params())?;
        let src = training::model_path(ctx, c.model.as_deref())?;
        let loaded = load_for_export(&src)?;
        let mut report = serde_json::Map::new();
        if let Some((from, to)) = loaded.model.expanded_vocab {
            report.insert("vocab_rows".into(), serde_json::json!({ "trained": from, "exported": to }));
        }
        if c.hf {
            let dir = ctx.output("model")?;
            report.insert("hf".into(), write_hf(&loaded, dir, c.dtype)?);
        }
        if let Some(ft) = c.gguf {
            let dir = ctx.output("gguf")?;
            report.insert("gguf".into(), write_gguf(&loaded.model, &dir.join("model.gguf"), ft, ctx.stage_id())?);
        }
        ctx.set_report(serde_json::Value::Object(report));
        Ok(())
    }
}

/// A model loaded for writing out, with the side files of the folder it came from.
pub(crate) struct Loaded {
    pub model: ExportModel,
    tokenizer_config: Option<std::path::PathBuf>,
    generation_config: Option<std::path::PathBuf>,
}

/// Loads `src` (HF folder, adapter folder merged into its base, `.gguf`, or an artifact holding
/// one `.gguf`) on the CPU and prepares it for writing.
pub(crate) fn load_for_export(src: &Path) -> Result<Loaded, StageError> {
    let path = crate::evaluate_model::checkpoint_path(src);
    let failed = |e: &dyn std::fmt::Display| StageError::failed(format!("{}: {e}", path.display()));
    let source = pipeline_model::pretrained::ModelSource::resolve(&path, None).map_err(|e| failed(&e))?;
    let p = source.load(&dfdx::prelude::Cpu::default()).map_err(|e| failed(&e))?;
    let system = crate::evaluate_model::default_system(&source);
    let model = ExportModel::new(&p, system).map_err(|e| failed(&e))?;
    Ok(Loaded {
        model,
        tokenizer_config: source.find_file("tokenizer_config.json"),
        generation_config: source.find_file("generation_config.json"),
    })
}

fn file_bytes(p: &Path) -> Result<u64, StageError> {
    std::fs::metadata(p).map(|m| m.len()).map_err(|e| StageError::io(p, e))
}

/// The HF folder into `dir`; its report entry.
pub(crate) fn write_hf(l: &Loaded, dir: &Path, dtype: Dtype) -> Result<serde_json::Value, StageError> {
    let files = l
        .model
        .write_hf(dir, dtype, l.tokenizer_config.as_deref(), l.generation_config.as_deref())
        .map_err(|e| StageError::failed(format!("writing {}: {e}", dir.display())))?;
    let mut bytes = serde_json::Map::new();
    for f in &files {
        bytes.insert(f.clone(), file_bytes(&dir.join(f))?.into());
    }
    Ok(serde_json::json!({ "dtype": dtype.name(), "files": bytes }))
}

/// The HF folder quantised with `method` (bitsandbytes / EETQ / HQQ) into `dir`; the quantize stage's
/// report: the method's settings, the files and their bytes (`bytes`: `model.safetensors`, as a
/// GGUF report's is its one file), bits per weight over every tensor and over the quantised
/// linears alone.
pub(crate) fn write_hf_quantized(
    l: &Loaded,
    dir: &Path,
    method: pipeline_model::quant::Method,
) -> Result<serde_json::Value, StageError> {
    let (files, w) = l
        .model
        .write_hf_quantized(dir, method, l.tokenizer_config.as_deref(), l.generation_config.as_deref())
        .map_err(|e| StageError::failed(format!("writing {}: {e}", dir.display())))?;
    let mut bytes = serde_json::Map::new();
    for f in &files {
        bytes.insert(f.clone(), file_bytes(&dir.join(f))?.into());
    }
    let total = file_bytes(&dir.join("model.safetensors"))?;
    let params = w.quantized_parameters + w.kept_parameters;
    let bpw = |bytes: u64, n: u64| if n > 0 { (8000.0 * bytes as f64 / n as f64).round() / 1000.0 } else { 0.0 };
    let (name, settings) = match method {
        pipeline_model::quant::Method::Bnb4 { quant_type, double_quant, compute_dtype } => (
            "bnb",
            serde_json::json!({
                "quant_bits": 4,
                "bnb_4bit_quant_type": quant_type.name(),
                "bnb_4bit_use_double_quant": double_quant,
                "bnb_4bit_compute_dtype": compute_dtype,
            }),
        ),
        pipeline_model::quant::Method::Bnb8 => {
            ("bnb", serde_json::json!({ "quant_bits": 8, "llm_int8_threshold": 6.0 }))
        }
        pipeline_model::quant::Method::Eetq => ("eetq", serde_json::json!({ "quant_bits": 8 })),
        pipeline_model::quant::Method::Hqq { nbits, group_size } => {
            ("hqq", serde_json::json!({ "quant_bits": nbits, "group_size": group_size, "axis": 0 }))
        }
    };
    let mut r = serde_json::json!({
        "quant_method": name,
        "files": bytes,
        "bytes": total,
        "parameters": params,
        "quantized_tensors": w.quantized_tensors,
        "quantized_parameters": w.quantized_parameters,
        "bits_per_weight": bpw(w.data_bytes, params),
        "quantized_bits_per_weight": bpw(w.quantized_bytes, w.quantized_parameters),
    });
    for (k, v) in settings.as_object().expect("object") {
        r[k] = v.clone();
    }
    Ok(r)
}

/// A GGUF file of type `ft` at `path`; its report entry: file name, bytes, bits per weight (all
/// tensor data over all elements) and how many tensors of each ggml type.
pub(crate) fn write_gguf(
    m: &ExportModel,
    path: &Path,
    ft: FileType,
    name: &str,
) -> Result<serde_json::Value, StageError> {
    m.write_gguf(path, ft, name).map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
    let f = pipeline_model::gguf::GgufFile::open(path).map_err(StageError::failed)?;
    let mut types = std::collections::BTreeMap::<&'static str, usize>::new();
    let (mut data_bytes, mut elements) = (0u64, 0u64);
    for t in f.tensors() {
        let ty = pipeline_model::gguf::GgmlType::from_id(t.ggml_type)
            .ok_or_else(|| StageError::failed(format!("{}: tensor `{}`: unknown type", path.display(), t.name)))?;
        *types.entry(ty.name()).or_default() += 1;
        data_bytes += f.raw(t).map_err(StageError::failed)?.len() as u64;
        elements += t.numel();
    }
    let bpw = if elements > 0 { 8.0 * data_bytes as f64 / elements as f64 } else { 0.0 };
    Ok(serde_json::json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "file_type": ft.name(),
        "bytes": file_bytes(path)?,
        "parameters": elements,
        "bits_per_weight": (bpw * 1000.0).round() / 1000.0,
        "tensor_types": types,
    }))
}

/// The `export` and `quantize` stages on a tiny restricted-vocabulary model (random weights).
#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use dfdx::prelude::Cpu;
    use pipeline_engine::{NullSink, RunParts};
    use pipeline_model::gguf::{GgmlType, GgufFile};
    use pipeline_model::pretrained::load_pretrained;
    use pipeline_model::tokenizer::Tokenizer;
    use pipeline_model::vocab::VocabMap;
    use pipeline_model::{Batch, ModelConfig, Qwen2};

    use super::*;

    /// A tiny preset model over a restricted vocabulary (as `pretrain` writes one), in `dir`.
    pub(crate) fn tiny_model(dir: &Path) -> (VocabMap, Tokenizer) {
        let tok = Tokenizer::qwen25().unwrap();
        let text = "Who are you? I am swift-robot, an assistant made by swift. 你是谁？我是swift-robot。";
        let ids = tok.encode(text, false).unwrap();
        let required = [151643, 151644, 151645];
        let vocab = VocabMap::new(&required, ids);
        let mut cfg = ModelConfig::tiny(vocab.len());
        cfg.eos_token_id = vec![2, 0];
        let tensors = Qwen2::<Cpu>::random_host(&cfg, 7);
        pipeline_model::checkpoint::save_hf_folder(dir, &cfg, &tensors).unwrap();
        Tokenizer::write_qwen25_files(dir).unwrap();
        vocab.save(&dir.join("vocab_map.json")).unwrap();
        std::fs::write(dir.join("chat_defaults.json"), r#"{"system": "You are a helpful assistant."}"#).unwrap();
        (vocab, tok)
    }

    pub(crate) struct Ran {
        pub report: serde_json::Value,
        pub outputs: BTreeMap<String, PathBuf>,
        pub _tmp: tempfile::TempDir,
    }

    /// Plan (declare) then run `kind` with `params` (TOML) on the model folder `model`.
    pub(crate) fn run_stage(kind: &str, params: &str, model: &Path) -> Result<Ran, StageError> {
        run_stage_with(kind, params, &[("model", model)])
    }

    /// [`run_stage`] with the inputs `inputs` (the recipe dir is the first input's parent).
    pub(crate) fn run_stage_with(kind: &str, params: &str, inputs: &[(&str, &Path)]) -> Result<Ran, StageError> {
        let reg = crate::registry();
        let stage = reg.get(kind).unwrap();
        let params: toml::Table = toml::from_str(params).unwrap();
        let recipe_dir = inputs[0].1.parent().unwrap();
        let input_names = inputs.iter().map(|(n, _)| *n).collect();
        let declared = stage.declare(&PlanCtx { stage_id: kind, params: &params, input_names, recipe_dir })?;
        let tmp = tempfile::tempdir().unwrap();
        let outputs: BTreeMap<String, PathBuf> =
            declared.outputs.iter().map(|o| (o.clone(), tmp.path().join(o))).collect();
        for d in outputs.values() {
            std::fs::create_dir_all(d).unwrap();
        }
        let ctx = RunCtx::new(RunParts {
            stage_id: kind.to_string(),
            params,
            seed: 42,
            recipe_dir: recipe_dir.to_path_buf(),
            inputs: inputs.iter().map(|(n, p)| (n.to_string(), vec![p.to_path_buf()])).collect(),
            outputs: outputs.clone(),
            scratch: tmp.path().join("scratch"),
            sink: Arc::new(NullSink),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        stage.run(&ctx)?;
        Ok(Ran { report: ctx.take_report().expect("a report"), outputs, _tmp: tmp })
    }

    pub(crate) fn plan_error(kind: &str, params: &str) -> String {
        let reg = crate::registry();
        let params: toml::Table = toml::from_str(params).unwrap();
        let dir = Path::new(".");
        match reg.get(kind).unwrap().declare(&PlanCtx {
            stage_id: kind,
            params: &params,
            input_names: vec!["model"],
            recipe_dir: dir,
        }) {
            Ok(_) => panic!("{kind} {params:?} planned"),
            Err(e) => e.to_string(),
        }
    }

    /// With `PIPELINE_KEEP_EXPORT=DIR`, a copy of an output file or folder in `DIR` for the
    /// oracle scripts (`scripts/oracles/check_quantize.py`, `scripts/oracles/check_hf_export.py`).
    fn keep(path: &Path, name: &str) {
        let Some(dir) = std::env::var_os("PIPELINE_KEEP_EXPORT") else { return };
        let dest = Path::new(&dir).join(name);
        if path.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            for e in std::fs::read_dir(path).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
            }
        } else {
            std::fs::copy(path, dest).unwrap();
        }
    }

    /// Last-position logits of `ids` under a loaded model.
    fn last_logits(p: &pipeline_model::pretrained::Pretrained<Cpu>, ids: &[u32]) -> Vec<f32> {
        let logits = p.model.forward(&Batch::new(ids.to_vec(), 1, ids.len()).unwrap()).unwrap();
        let v = logits.as_vec();
        let vocab = v.len() / ids.len();
        v[(ids.len() - 1) * vocab..].to_vec()
    }

    /// The HF export loads on its own with the full Qwen2.5 vocabulary and gives, for every token
    /// of the trained vocabulary, the trained model's logit (tokenizer ids in, tokenizer ids out);
    /// the rest are 0. The report (files and bytes) is snapshotted.
    #[test]
    fn hf_export_expands_the_vocabulary_and_keeps_the_logits() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("trained");
        let (vocab, tok) = tiny_model(&src);
        let ran = run_stage("export", "format = [\"hf\", \"gguf\"]", &src).unwrap();
        insta::with_settings!({ snapshot_path => "../../snapshots/stages", prepend_module_to_snapshot => false }, {
            insta::assert_json_snapshot!("export_hf_gguf_report", ran.report);
        });
        let out = &ran.outputs["model"];
        keep(out, "hf");
        keep(&ran.outputs["gguf"].join("model.gguf"), "F32.gguf");
        for f in
            ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
        {
            assert!(out.join(f).is_file(), "{f}");
        }
        assert!(!out.join("vocab_map.json").exists());
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["vocab_size"], 151_936);
        assert_eq!(cfg["tie_word_embeddings"], false);
        assert_eq!(cfg["eos_token_id"], serde_json::json!([151645, 151643]));

        let trained = load_pretrained(&src, &Cpu::default()).unwrap();
        let exported = load_pretrained(out, &Cpu::default()).unwrap();
        let gguf = load_pretrained(&ran.outputs["gguf"].join("model.gguf"), &Cpu::default()).unwrap();
        assert!(exported.vocab.is_none());
        let text = tok.encode("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n", false).unwrap();
        let a = last_logits(&trained, &trained.to_model_ids(&text));
        let b = last_logits(&exported, &text);
        let c = last_logits(&gguf, &text);
        assert_eq!(b.len(), 151_936);
        assert_eq!(b, c, "F32 GGUF and the HF folder give the same logits");
        for t in 0..151_936u32 {
            match vocab.model_id(t) {
                Some(m) => assert!((a[m as usize] - b[t as usize]).abs() <= 1e-5 * a[m as usize].abs().max(1.0), "{t}"),
                None => assert_eq!(b[t as usize], 0.0),
            }
        }
    }

    /// The bf16 HF export, loaded on its own with the standard Qwen2.5 tokenizer, renders the chat
    /// prompt as the template says and decodes greedily. With `PIPELINE_KEEP_EXPORT=DIR` the folder
    /// and our figures (`DIR/hf-bf16.pipeline.json`: prompt ids, logits at every trained id, argmax,
    /// 8 greedy tokens) are kept for `scripts/oracles/check_hf_export.py`, which loads the folder
    /// with transformers and compares.
    #[test]
    fn hf_export_bf16_generates_through_the_full_tokenizer() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("trained");
        let (vocab, _) = tiny_model(&src);
        let ran = run_stage("export", "format = \"hf\"\ndtype = \"bfloat16\"", &src).unwrap();
        let out = &ran.outputs["model"];
        assert_eq!(ran.report["hf"]["dtype"], "bfloat16");
        let p = load_pretrained(out, &Cpu::default()).unwrap();
        let chat = p.chat.as_ref().unwrap();
        let msgs = [
            pipeline_model::chat::Message::new("system", "You are a helpful assistant."),
            pipeline_model::chat::Message::new("user", "Who are you?"),
        ];
        let text = chat.render(&msgs, true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
        );
        let prompt = p.tokenizer.encode(&text, false).unwrap();
        let logits = last_logits(&p, &prompt);
        let argmax = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a))).unwrap();
        let cfg = pipeline_model::GenerationConfig { max_new_tokens: 8, ..Default::default() };
        let gen = pipeline_model::generate(&p.model, std::slice::from_ref(&prompt), &cfg, None).unwrap();
        assert_eq!(gen[0].tokens[0] as usize, argmax);
        assert!(gen[0].tokens.iter().all(|&t| vocab.model_id(t).is_some()), "greedy stays in the trained vocabulary");
        let trained: Vec<u32> = (0..151_936u32).filter(|&t| vocab.model_id(t).is_some()).collect();
        keep(out, "hf-bf16");
        if let Some(dir) = std::env::var_os("PIPELINE_KEEP_EXPORT") {
            let ours = serde_json::json!({
                "text": text,
                "prompt_ids": prompt,
                "trained_ids": trained,
                "logits": trained.iter().map(|&t| logits[t as usize]).collect::<Vec<_>>(),
                "argmax": argmax,
                "greedy": gen[0].tokens,
            });
            std::fs::write(Path::new(&dir).join("hf-bf16.pipeline.json"), ours.to_string()).unwrap();
        }
    }

    /// Each GGUF type of `quantize`: the file loads, its tensors have llama.cpp's types for the
    /// tiny shapes (hidden 64, FFN 176: Q4_K → Q5_0, Q6_K head → Q8_0, 176-wide rows → F16), and
    /// the logits stay close to the F32 model's.
    #[test]
    fn quantize_gguf_types_load_and_stay_close() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("trained");
        let (_, tok) = tiny_model(&src);
        let text = tok.encode("Who are you?", false).unwrap();
        let f32 = load_pretrained(&src, &Cpu::default()).unwrap();
        let want = last_logits(&f32, &f32.to_model_ids(&text));
        let mut reports = BTreeMap::new();
        for (ty, tol) in [("F16", 1e-2), ("BF16", 5e-2), ("Q8_0", 5e-2), ("Q4_0", 0.3), ("Q4_K_M", 0.3)] {
            let ran = run_stage("quantize", &format!("quant_method = \"gguf\"\ngguf_type = \"{ty}\""), &src).unwrap();
            let path = ran.outputs["model"].join("model.gguf");
            keep(&path, &format!("{ty}.gguf"));
            let f = GgufFile::open(&path).unwrap();
            let ty_of = |n: &str| GgmlType::from_id(f.tensor_info(n).unwrap().ggml_type).unwrap();
            assert_eq!(ty_of("output_norm.weight"), GgmlType::F32);
            if ty == "Q4_K_M" {
                assert_eq!(ty_of("output.weight"), GgmlType::Q8_0);
                assert_eq!(ty_of("token_embd.weight"), GgmlType::Q5_0);
                assert_eq!(ty_of("blk.0.attn_q.weight"), GgmlType::Q5_0);
                assert_eq!(ty_of("blk.1.attn_v.weight"), GgmlType::Q8_0, "use_more_bits(1, 2)");
                assert_eq!(ty_of("blk.0.attn_v.weight"), GgmlType::Q5_0);
                assert_eq!(ty_of("blk.0.ffn_down.weight"), GgmlType::F16);
            }
            let q = load_pretrained(&path, &Cpu::default()).unwrap();
            let got = last_logits(&q, &text);
            let m = f32.vocab.as_ref().unwrap();
            let worst = (0..m.len() as u32)
                .map(|i| (want[i as usize] - got[m.to_tokenizer(&[i]).unwrap()[0] as usize]).abs())
                .fold(0f32, f32::max);
            assert!(worst < tol, "{ty}: max logit error {worst}");
            reports.insert(ty, ran.report);
        }
        insta::with_settings!({ snapshot_path => "../../snapshots/stages", prepend_module_to_snapshot => false }, {
            insta::assert_json_snapshot!("quantize_gguf_reports", reports);
        });
    }

    /// With a `data` input the report has llama.cpp's scoreboard figures: perplexity of both
    /// models and the mean KL divergence, which is 0 for the unquantised file type (F32 is refused,
    /// so F16 stands in: tiny but not zero) and grows from Q8_0 to Q4_0.
    #[test]
    fn quantize_reports_perplexity_and_kl_divergence() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("trained");
        tiny_model(&src);
        let data = tmp.path().join("heldout");
        let rows: Vec<crate::data::Sample> = ["Who are you?", "你是谁？"]
            .iter()
            .enumerate()
            .map(|(i, q)| crate::data::Sample {
                id: format!("h:{i}"),
                messages: vec![
                    crate::data::Message::new("user", *q),
                    crate::data::Message::new("assistant", "I am swift-robot, made by swift."),
                ],
                ..Default::default()
            })
            .collect();
        crate::data::write_dataset(&data, &rows).unwrap();
        let kld = |ty: &str| {
            let params = format!("quant_method = \"gguf\"\ngguf_type = \"{ty}\"");
            let r = run_stage_with("quantize", &params, &[("model", &src), ("data", &data)]).unwrap().report;
            let q = &r["quality"];
            assert_eq!(q["texts"], 2);
            assert!(q["perplexity_f32"].as_f64().unwrap() > 1.0, "{q}");
            q["mean_kld"].as_f64().unwrap()
        };
        let (f16, q8, q4) = (kld("F16"), kld("Q8_0"), kld("Q4_0"));
        assert!(f16 < q8 && q8 < q4, "KLD F16 {f16}, Q8_0 {q8}, Q4_0 {q4}");
        assert!(f16 < 1e-4, "{f16}");
    }

    /// The evaluate stage's `perplexity` scorer loads a quantised GGUF as any other model (its
    /// matrices stay in their blocks) and scores it beside the F32 file it came from: the same
    /// windows and tokens, a perplexity that quantisation moves a little, a Q4_0 file more than
    /// a Q8_0 one.
    #[test]
    fn evaluate_perplexity_scores_quantised_gguf_files() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("trained");
        tiny_model(&src);
        let text = tmp.path().join("text");
        std::fs::create_dir_all(&text).unwrap();
        let held_out =
            "Who are you? I am swift-robot, an assistant made by swift. 你是谁？我是swift-robot。 ".repeat(3);
        std::fs::write(text.join("held_out.txt"), held_out).unwrap();
        let f32 = run_stage("export", "format = [\"gguf\"]", &src).unwrap();
        let q8 = run_stage("quantize", "quant_method = \"gguf\"\ngguf_type = \"Q8_0\"", &src).unwrap();
        let q4 = run_stage("quantize", "quant_method = \"gguf\"\ngguf_type = \"Q4_0\"", &src).unwrap();
        let eval = |model: &Path| {
            let params = format!(
                "dataset = \"text\"\nscorer = \"perplexity\"\nlocal_path = {:?}\nn_ctx = 16\nreport_to = \"none\"",
                text.display().to_string()
            );
            let r = run_stage_with("evaluate", &params, &[("model", model)]).unwrap().report;
            assert_eq!(
                (r["scorer"].as_str(), r["rows"][0]["metric"].as_str()),
                (Some("perplexity"), Some("perplexity"))
            );
            (r["rows"][0]["score"].as_f64().unwrap(), r["rows"][0]["num"].as_u64().unwrap())
        };
        let (base, n) = eval(&f32.outputs["gguf"]);
        let (p8, n8) = eval(&q8.outputs["model"]);
        let (p4, n4) = eval(&q4.outputs["model"]);
        assert!(n > 0 && n == n8 && n == n4, "scored tokens {n}, {n8}, {n4}");
        assert!(base.is_finite() && base > 1.0, "{base}");
        let (d8, d4) = ((p8 - base).abs() / base, (p4 - base).abs() / base);
        assert!(d8 > 0.0 && d8 < 0.01 && d8 < d4 && d4 < 0.2, "perplexity F32 {base}, Q8_0 {p8}, Q4_0 {p4}");
    }

    /// bitsandbytes (nf4 + double quant, fp4, int8), EETQ and HQQ (4-bit, 3-bit in groups of 32)
    /// folders: transformers' tensor names
    /// and `quantization_config`, the linears of the layers quantised and everything else kept
    /// (embedding, head, norms, biases), and the folder loads back (dequantised) with logits close
    /// to the f32 model's. The reports are snapshotted. With `PIPELINE_KEEP_EXPORT=DIR` the
    /// folders are kept as `DIR/bnb-<kind>` for `scripts/oracles/check_bnb_folder.py`.
    #[test]
    fn quantize_bnb_and_eetq_folders_load_and_stay_close() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("trained");
        let (_, tok) = tiny_model(&src);
        let text = tok.encode("Who are you?", false).unwrap();
        let f32 = load_pretrained(&src, &Cpu::default()).unwrap();
        let want = last_logits(&f32, &f32.to_model_ids(&text));
        let q = "model.layers.0.self_attn.q_proj";
        let cases = [
            ("nf4", "quant_method = \"bnb\"\nquant_bits = 4", 0.3, vec!["weight.absmax", "weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"]),
            ("fp4", "quant_method = \"bnb\"\nquantization_bit = 4\nbnb_4bit_quant_type = \"fp4\"\nbnb_4bit_use_double_quant = false", 0.5, vec!["weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__fp4"]),
            ("int8", "quant_method = \"bnb\"\nquant_bits = 8", 5e-2, vec!["SCB", "weight_format"]),
            ("eetq", "quant_method = \"eetq\"", 5e-2, vec!["weight_scales"]),
            ("hqq4", "quant_method = \"hqq\"\nquant_bits = 4", 0.3, vec!["W_q", "scale", "zero", "nbits", "shape"]),
            ("hqq3", "quant_method = \"hqq\"\nquant_bits = 3\ngroup_size = 32", 0.6, vec!["W_q", "scale", "zero", "packing"]),
        ];
        let mut reports = BTreeMap::new();
        for (kind, params, tol, extra) in cases {
            let ran = run_stage("quantize", params, &src).unwrap();
            let out = &ran.outputs["model"];
            keep(out, &format!("bnb-{kind}"));
            let cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
            let qc = &cfg["quantization_config"];
            let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let names: std::collections::BTreeSet<String> = st.names().into_iter().cloned().collect();
            for e in &extra {
                assert!(names.contains(&format!("{q}.{e}")), "{kind}: {q}.{e} missing from {names:?}");
            }
            let w = st.tensor(&format!("{q}.{}", if kind.starts_with("hqq") { "W_q" } else { "weight" })).unwrap();
            match kind {
                "nf4" | "fp4" => {
                    assert_eq!(qc["quant_method"], "bitsandbytes");
                    assert_eq!(qc["load_in_4bit"], true);
                    assert_eq!(qc["bnb_4bit_quant_type"], kind);
                    assert_eq!(w.dtype(), safetensors::Dtype::U8);
                    assert_eq!(w.shape(), &[64 * 64 / 2, 1]);
                }
                "int8" => {
                    assert_eq!(qc["load_in_8bit"], true);
                    assert_eq!(w.dtype(), safetensors::Dtype::I8);
                    assert_eq!(w.shape(), &[64, 64]);
                }
                "hqq4" => {
                    assert_eq!(qc["quant_method"], "hqq");
                    assert_eq!(w.dtype(), safetensors::Dtype::U8);
                    assert_eq!(w.shape(), &[32, 64], "4-bit: 64-row groups packed in two halves");
                }
                "hqq3" => {
                    assert_eq!(w.dtype(), safetensors::Dtype::I32);
                    assert_eq!(w.shape(), &[4, 128], "3-bit: 32-row groups padded to 40, ten per int32");
                }
                _ => {
                    assert_eq!(qc["quant_method"], "eetq");
                    assert_eq!(w.dtype(), safetensors::Dtype::I8);
                }
            }
            for kept in [
                "model.embed_tokens.weight",
                "lm_head.weight",
                "model.norm.weight",
                "model.layers.0.self_attn.q_proj.bias",
            ] {
                assert_eq!(st.tensor(kept).unwrap().dtype(), safetensors::Dtype::F32, "{kind}: {kept} is kept");
            }
            let loaded = load_pretrained(out, &Cpu::default()).unwrap();
            let got = last_logits(&loaded, &text);
            let m = f32.vocab.as_ref().unwrap();
            let worst = (0..m.len() as u32)
                .map(|i| (want[i as usize] - got[m.to_tokenizer(&[i]).unwrap()[0] as usize]).abs())
                .fold(0f32, f32::max);
            assert!(worst < tol, "{kind}: max logit error {worst}");
            assert!(worst > 0.0, "{kind}: the weights were quantised");
            reports.insert(kind, ran.report);
        }
        insta::with_settings!({ snapshot_path => "../../snapshots/stages", prepend_module_to_snapshot => false }, {
            insta::assert_json_snapshot!("quantize_bnb_eetq_reports", reports);
        });
    }

    /// The quality figures of a bitsandbytes folder come from the codes as stored (the folder
    /// loaded back): nf4 costs more than int8.
    #[test]
    fn quantize_bnb_reports_perplexity_and_kl_divergence() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("trained");
        tiny_model(&src);
        let data = tmp.path().join("heldout");
        let rows = vec![crate::data::Sample {
            id: "h:0".into(),
            messages: vec![
                crate::data::Message::new("user", "Who are you?"),
                crate::data::Message::new("assistant", "I am swift-robot, made by swift."),
            ],
            ..Default::default()
        }];
        crate::data::write_dataset(&data, &rows).unwrap();
        let kld = |params: &str| {
            let r = run_stage_with("quantize", params, &[("model", &src), ("data", &data)]).unwrap().report;
            assert_eq!(r["quality"]["texts"], 1);
            r["quality"]["mean_kld"].as_f64().unwrap()
        };
        let (int8, nf4) =
            (kld("quant_method = \"bnb\"\nquant_bits = 8"), kld("quant_method = \"bnb\"\nquant_bits = 4"));
        assert!(0.0 < int8 && int8 < nf4, "KLD int8 {int8}, nf4 {nf4}");
    }

    /// Bad params are plan-time errors naming the key and the allowed values.
    #[test]
    fn bad_params_are_plan_time_errors() {
        let cases = [
            ("export", "format = \"onnx\"", "`format` must be \"hf\", \"gguf\""),
            ("export", "format = \"gguf\"\ngguf_type = \"Q4_K_M\"", "4-bit files come from the `quantize` stage"),
            ("export", "format = \"hf\"\ngguf_type = \"F16\"", "`gguf_type` is set but `format` has no \"gguf\""),
            ("export", "dtype = \"float8\"", "bfloat16"),
            ("export", "merge_lora = false", "model/adapter/"),
            ("export", "output = \"x\"", "unknown field `output`"),
            ("quantize", "gguf_type = \"Q4_K_M\"", "missing field `quant_method`"),
            ("quantize", "quant_method = \"gguf\"\ngguf_type = \"Q3_K\"", "\"Q4_K_M\""),
            ("quantize", "quant_method = \"gguf\"\nquantization_bit = 4", "`quant_bits = 4`"),
            ("quantize", "quant_method = \"awq\"", "gguf"),
            ("quantize", "quant_method = \"gguf\"\nbits = 4", "unknown field `bits`"),
            ("quantize", "quant_method = \"bnb\"", "needs `quant_bits` (or `quantization_bit`): one of 4, 8"),
            ("quantize", "quant_method = \"bnb\"\nquant_bits = 3", "`quant_bits = 3` is not one of 4, 8"),
            ("quantize", "quant_method = \"bnb\"\nquant_bits = 4\nbnb_4bit_quant_type = \"int4\"", "\"nf4\", \"fp4\""),
            ("quantize", "quant_method = \"bnb\"\nquant_bits = 4\nbnb_4bit_compute_dtype = \"fp8\"", "\"bfloat16\""),
            ("quantize", "quant_method = \"bnb\"\nquant_bits = 8\nbnb_4bit_quant_type = \"nf4\"", "4-bit setting"),
            ("quantize", "quant_method = \"eetq\"\nquant_bits = 4", "not one of 8"),
            ("quantize", "quant_method = \"hqq\"\nquant_bits = 5", "not one of 8, 4, 3, 2"),
            ("quantize", "quant_method = \"hqq\"", "needs `quant_bits`"),
            (
                "quantize",
                "quant_method = \"bnb\"\nquant_bits = 4\ngroup_size = 64",
                "`group_size` is a setting of quant_method = \"hqq\"",
            ),
            (
                "quantize",
                "quant_method = \"eetq\"\ngguf_type = \"Q8_0\"",
                "`gguf_type` is a setting of quant_method = \"gguf\"",
            ),
            (
                "quantize",
                "quant_method = \"gguf\"\nbnb_4bit_use_double_quant = true",
                "`bnb_4bit_use_double_quant` is a setting",
            ),
        ];
        for (kind, params, want) in cases {
            let e = plan_error(kind, params);
            assert!(e.contains(want), "{kind} {params:?}: {e}");
        }
    }
}
