//! What the `pretrain`, `sft` and `align` stages share (not a stage kind): the ms-swift style model
//! parameters, loading the model to train (a `model` path param, the `model` input of an upstream
//! stage, or the built-in tiny preset), turning canonical rows into token ids of the model's
//! (possibly restricted) vocabulary, and writing the output model folder.
//!
//! # The output `model` folder
//! Always a complete Hugging Face folder that `load_pretrained` (and so `pipeline generate`)
//! reads on its own: `config.json` + `model.safetensors` (F32; with LoRA the adapters are merged
//! into the base weights, `W' = W + (alpha/r)·B·A`), `tokenizer.json` + `tokenizer_config.json`,
//! `vocab_map.json` when the model has a restricted vocabulary (the tiny preset), and
//! `chat_defaults.json` (`{"system": ...}`: the system prompt the model was trained with, used by
//! `pipeline generate` when no `--system` is given). With LoRA the adapter alone is also written
//! in peft's layout under `adapter/` (`adapter_config.json` + `adapter_model.safetensors`).

use std::path::{Path, PathBuf};

use dfdx::prelude::Device;
use pipeline_engine::{PlanCtx, RunCtx, StageError};
use pipeline_model::chat::ChatTemplate;
use pipeline_model::pretrained::{load_pretrained, ModelSource, Pretrained};
use pipeline_model::{Dims, LoraConfig, Qwen2, Trainable};
use pipeline_train::lm::TrainModel;
use pipeline_train::stage::{check_stopped, paths, stage_error, RunCtxCallbacks};
use pipeline_train::{train, Dataset, Objective, TrainConfig, TrainOutcome, TRAIN_CONFIG_KEYS};

/// `train_type` (ms-swift; alias `tuner_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TrainType {
    Lora,
    Full,
}

/// The model / tuner parameters shared by `sft` and `align` (ms-swift names).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TunerParams {
    /// HF folder or `.gguf`; absent = the `model` input.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "lora", alias = "tuner_type")]
    pub train_type: TrainType,
    #[serde(default = "eight")]
    pub lora_rank: usize,
    #[serde(default = "thirty_two")]
    pub lora_alpha: f32,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "all_linear")]
    pub target_modules: Vec<String>,
    /// Default system prompt for conversations that have none.
    #[serde(default)]
    pub system: Option<String>,
}

fn lora() -> TrainType {
    TrainType::Lora
}
fn eight() -> usize {
    8
}
fn thirty_two() -> f32 {
    32.0
}
fn all_linear() -> Vec<String> {
    vec!["all-linear".into()]
}

impl TunerParams {
    pub fn check(&self) -> Result<(), StageError> {
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(StageError::Params(format!("`lora_dropout = {}` must be in [0, 1)", self.lora_dropout)));
        }
        if self.train_type == TrainType::Lora && self.lora_rank == 0 {
            return Err(StageError::Params("`lora_rank` must be at least 1".into()));
        }
        Ok(())
    }

    pub fn trainable(&self) -> Result<Trainable, StageError> {
        Ok(match self.train_type {
            TrainType::Full => Trainable::Full,
            TrainType::Lora => {
                let all = self.target_modules.iter().any(|t| t == "all-linear");
                let lc = if all {
                    LoraConfig::all_linear(self.lora_rank, self.lora_alpha)
                } else {
                    LoraConfig::with_targets(self.lora_rank, self.lora_alpha, &self.target_modules)
                        .map_err(|e| StageError::Params(format!("target_modules: {e}")))?
                };
                Trainable::Lora(
                    lc.with_dropout(self.lora_dropout as f32)
                        .map_err(|e| StageError::Params(format!("lora_dropout: {e}")))?,
                )
            }
        })
    }
}

/// Split a stage's params into the training config and the stage's own keys, parsed as `T`.
/// Unknown keys name both lists.
pub(crate) fn split<T: serde::de::DeserializeOwned>(params: &toml::Table) -> Result<(TrainConfig, T), StageError> {
    let (cfg, rest) = TrainConfig::split_params(params).map_err(pipeline_train::stage::stage_error)?;
    let own = pipeline_engine::stage::parse_params::<T>(&rest).map_err(|e| match e {
        StageError::Params(m) if m.contains("unknown field") => {
            StageError::Params(format!("{m}; training keys: {}", TRAIN_CONFIG_KEYS.join(", ")))
        }
        other => other,
    })?;
    Ok((cfg, own))
}

/// Where the model to train comes from: the `model` param (resolved against the recipe), else
/// the `model` input.
pub(crate) fn model_path(ctx: &RunCtx, param: Option<&str>) -> Result<PathBuf, StageError> {
    match param {
        Some(p) => {
            let path = ctx.resolve(shellexpand_env(p));
            if !path.exists() {
                return Err(StageError::Params(format!("model `{}` does not exist", path.display())));
            }
            Ok(path)
        }
        None => ctx.input("model").map(Path::to_path_buf).map_err(|_| {
            StageError::Params("no model: set `model` (a HF folder or .gguf) or bind input `model`".into())
        }),
    }
}

/// `${VAR}` in a path param is replaced by the environment variable (left as is when unset).
pub(crate) fn shellexpand_env(p: &str) -> String {
    let mut out = p.to_string();
    while let Some(start) = out.find("${") {
        let Some(len) = out[start..].find('}') else { break };
        let name = out[start + 2..start + len].to_string();
        match std::env::var(&name) {
            Ok(v) => out.replace_range(start..start + len + 1, &v),
            Err(_) => break,
        }
    }
    out
}

/// Where a training stage runs: `pipeline run --device cpu|cuda` (the run option `device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The run option `device` (absent = CPU); `cuda` in a binary built without the `cuda`
    /// feature is an error that says how to get one.
    pub(crate) fn of(ctx: &RunCtx) -> Result<Self, StageError> {
        Self::parse(ctx.option("device"))
    }

    /// The value of a `device` option (absent = CPU).
    pub(crate) fn parse(device: Option<&str>) -> Result<Self, StageError> {
        match device.unwrap_or("cpu") {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" if cfg!(feature = "cuda") => Ok(DeviceKind::Cuda),
            "cuda" => Err(StageError::failed(
                "--device cuda: this pipeline binary was built without CUDA support; rebuild with `cargo build --release --features cuda` (see scripts/gpu/README.md)",
            )),
            other => Err(StageError::failed(format!("unknown device `{other}` (expected cpu or cuda)"))),
        }
    }
}

/// The CUDA device (GPU 0), or an error naming the cause (no GPU, no driver).
#[cfg(feature = "cuda")]
pub(crate) fn cuda() -> Result<dfdx::prelude::Cuda, StageError> {
    dfdx::prelude::Cuda::try_build(0, 0)
        .map_err(|e| StageError::failed(format!("--device cuda: cannot open GPU 0: {e:?}")))
}

/// `on_device!(ctx, |dev| body)`: evaluates `body` with `dev` bound to the device the run asked
/// for (`Cpu`, or `Cuda` when built with the `cuda` feature); `body` is usually a call of a
/// function generic over `D: Device<f32>`.
macro_rules! on_device {
    ($ctx:expr, |$dev:ident| $body:expr) => {
        match $crate::training::DeviceKind::of($ctx)? {
            #[cfg(feature = "cuda")]
            $crate::training::DeviceKind::Cuda => {
                let $dev = $crate::training::cuda()?;
                $body
            }
            _ => {
                let $dev = dfdx::prelude::Cpu::default();
                $body
            }
        }
    };
}
pub(crate) use on_device;

pub(crate) fn load<D: Device<f32>>(path: &Path, dev: &D) -> Result<Pretrained<D>, StageError> {
    load_pretrained(path, dev).map_err(|e| StageError::failed(format!("loading {}: {e}", path.display())))
}

/// The chat template of a loaded model (Qwen2.5's when the tokenizer has none).
pub(crate) fn chat_template<D: Device<f32>>(p: &Pretrained<D>) -> Result<&ChatTemplate, StageError> {
    p.chat.as_ref().ok_or_else(|| StageError::failed("the model's tokenizer has no chat template"))
}

/// The default system prompt a model folder was trained with (`chat_defaults.json`; for an
/// adapter folder, its own or its base's).
pub(crate) fn trained_system(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(ModelSource::resolve(dir, None).ok()?.find_file("chat_defaults.json")?).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("system")?.as_str().map(str::to_string)
}

fn copy(src: &Path, dst: &Path) -> Result<(), StageError> {
    std::fs::copy(src, dst).map(|_| ()).map_err(|e| StageError::io(src, e))
}

/// Trains `model` with `objective` on `train_set` (progress and metrics through `ctx`, the metrics
/// files in its `metrics` output, checkpoints in its scratch directory, so an interrupted stage
/// resumes) and returns the outcome and the trained model; a run stopped early is an error.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit<D, S, O>(
    ctx: &RunCtx,
    label: &str,
    cfg: &TrainConfig,
    seed: u64,
    dev: &D,
    model: Qwen2<D, S>,
    objective: &mut O,
    train_set: &dyn Dataset<Batch = O::Batch>,
    eval: Option<&dyn Dataset<Batch = O::Batch>>,
) -> Result<(TrainOutcome, Qwen2<D, S>), StageError>
where
    D: Device<f32>,
    S: Dims,
    O: Objective<TrainModel<D, S>, D>,
{
    let metrics_dir = ctx.output("metrics")?;
    let mut tm = TrainModel(model);
    let mut cb = RunCtxCallbacks { ctx, label: label.into() };
    let outcome = train(cfg, seed, dev, &mut tm, objective, train_set, eval, &paths(ctx, metrics_dir), &mut cb)
        .map_err(stage_error)?;
    check_stopped(&outcome)?;
    Ok((outcome, tm.0))
}

/// Write the output model folder (see the module docs). `src` is the folder the model was loaded
/// from (tokenizer files and vocabulary map are copied from it), or `None` for the tiny preset
/// (the embedded Qwen2.5 tokenizer files are written).
pub(crate) fn write_model<D: Device<f32>, S: Dims>(
    out: &Path,
    mut model: Qwen2<D, S>,
    src: Option<&Path>,
    system: Option<&str>,
) -> Result<(), StageError> {
    let merr = |e: pipeline_model::ModelError| StageError::failed(format!("writing {}: {e}", out.display()));
    if model.lora_config().is_some() {
        // Absolute: the cache dir may be given relative to the working directory, and a relative
        // `base_model_name_or_path` is read relative to the adapter folder.
        let base = src
            .map(|s| std::path::absolute(s).unwrap_or_else(|_| s.to_path_buf()).display().to_string())
            .unwrap_or_else(|| "tiny".into());
        model.save_adapter(&out.join("adapter"), &base).map_err(merr)?;
        model.merge_lora().map_err(merr)?;
    }
    model.save_pretrained(out).map_err(merr)?;
    match src.filter(|s| s.is_dir()) {
        Some(dir) => {
            // An adapter folder's side files are its base's.
            let files =
                ModelSource::resolve(dir, None).map_err(|e| StageError::failed(format!("{}: {e}", dir.display())))?;
            for f in ["tokenizer.json", "tokenizer_config.json", "vocab_map.json", "generation_config.json"] {
                if let Some(p) = files.find_file(f) {
                    copy(&p, &out.join(f))?;
                }
            }
        }
        None if src.is_none() => pipeline_model::tokenizer::Tokenizer::write_qwen25_files(out).map_err(merr)?,
        None => return Err(StageError::failed(
            "a model loaded from a .gguf file cannot be written back as a folder yet; convert it to a HF folder first",
        )),
    }
    let system = system.map(str::to_string).or_else(|| src.and_then(trained_system));
    if let Some(sys) = system {
        crate::data::write_json(&out.join("chat_defaults.json"), &serde_json::json!({ "system": sys }))?;
    }
    Ok(())
}

/// The stage report: the trainer's summary plus throughput and the output paths.
pub(crate) fn report(
    ctx: &RunCtx,
    outcome: &TrainOutcome,
    metrics_dir: &Path,
    model_dir: &Path,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut r = pipeline_train::stage::report(outcome, metrics_dir);
    let tps = outcome.history.iter().rev().find_map(|rec| match rec {
        pipeline_train::Record::Train(t) => Some(t.tokens_per_second),
        _ => None,
    });
    if let Some(o) = r.as_object_mut() {
        o.insert("tokens_per_second".into(), serde_json::json!(tps));
        o.insert("model".into(), serde_json::json!(model_dir.display().to_string()));
        o.insert("metrics_dir".into(), serde_json::json!(metrics_dir.display().to_string()));
        if let Some(e) = extra.as_object() {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
    }
    let _ = ctx;
    r
}

/// The local files a training stage's `model` param points at (their content enters the cache
/// key); an error when neither `model` nor an input `model` gives the stage a model to start from.
pub(crate) fn declared_model_files(ctx: &PlanCtx<'_>, model: Option<&str>) -> Result<Vec<PathBuf>, StageError> {
    match model {
        Some(m) => Ok(vec![ctx.resolve(shellexpand_env(m))]),
        None if !ctx.input_names.contains(&"model") => {
            Err(StageError::Params("no model: set `model` or bind input `model`".into()))
        }
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use pipeline_engine::{NullSink, RunParts};

    use super::*;

    fn ctx_with_device(device: Option<&str>) -> RunCtx {
        RunCtx::new(RunParts {
            stage_id: "sft".into(),
            params: toml::Table::new(),
            seed: 1,
            recipe_dir: PathBuf::from("."),
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            scratch: PathBuf::from("scratch"),
            options: device.map(|d| ("device".to_string(), d.to_string())).into_iter().collect(),
            sink: Arc::new(NullSink),
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    #[test]
    fn device_option_selects_the_device_or_says_how_to_get_cuda() {
        assert_eq!(DeviceKind::of(&ctx_with_device(None)).unwrap(), DeviceKind::Cpu);
        assert_eq!(DeviceKind::of(&ctx_with_device(Some("cpu"))).unwrap(), DeviceKind::Cpu);
        let cuda = DeviceKind::of(&ctx_with_device(Some("cuda")));
        if cfg!(feature = "cuda") {
            assert_eq!(cuda.unwrap(), DeviceKind::Cuda);
        } else {
            let msg = cuda.unwrap_err().to_string();
            assert!(msg.contains("built without CUDA") && msg.contains("--features cuda"), "{msg}");
        }
        let msg = DeviceKind::of(&ctx_with_device(Some("tpu"))).unwrap_err().to_string();
        assert!(msg.contains("unknown device `tpu`"), "{msg}");
    }
}
