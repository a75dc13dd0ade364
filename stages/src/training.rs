//! What the `pretrain`, `sft` and `align` stages share (not a stage kind): the ms-swift style model
//! parameters, [`stage_params!`] (a stage's `[params]` as one strict struct that embeds the
//! training arguments), loading the model to train (a `model` path param, the `model` input of an
//! upstream stage, or the built-in tiny preset), turning canonical rows into token ids of the
//! model's (possibly restricted) vocabulary, running pipeline-train's loop under the stage's
//! `RunCtx` ([`fit`]: progress, metrics, Ctrl-C, checkpoints in the scratch directory), and writing
//! the output model folder.
//!
//! # The `[params]` table
//! A training stage's params are one flat table (`learning_rate` beside `lora_rank` beside
//! `beta`, as ms-swift's command line has them). [`stage_params!`] builds, for each stage, one
//! `#[serde(deny_unknown_fields)]` wire struct holding every key, which is parsed in a single pass
//! and moved into the stage's typed config: its own fields plus a [`TrainConfig`] (fields from
//! `pipeline_train::with_train_args!`) and, for `sft` / `align`, a [`TunerParams`] (fields from
//! [`with_tuner_args!`]). Each field is written once; a misspelt key is serde's
//! "unknown field" error, which lists every key the stage takes. The cache key hashes the table
//! as written (the engine's), so none of this enters it.
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
use pipeline_train::{
    train, Callbacks, Control, Dataset, Objective, Record, StopReason, TrainConfig, TrainError, TrainOutcome,
    TrainPaths, TrainPlan,
};

/// `train_type` (ms-swift; alias `tuner_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TrainType {
    Lora,
    Full,
}

/// The model / tuner parameters shared by `sft` and `align` (ms-swift names), in the field-list
/// form of `pipeline_train::with_train_args!`: `with_tuner_args!({ m } tokens...)` expands to
/// `m! { tokens... [ fields ] }`.
macro_rules! with_tuner_args {
    ({ $($callback:tt)* } $($args:tt)*) => {
        $($callback)*! { $($args)* [
            /// HF folder or `.gguf`; absent = the `model` input.
            model: Option<String> = None,
            #[serde(alias = "tuner_type")]
            train_type: $crate::training::TrainType = $crate::training::TrainType::Lora,
            lora_rank: usize = 8,
            lora_alpha: f32 = 32.0,
            /// peft's dropout on the LoRA branch's input, in [0, 1).
            lora_dropout: f64 = 0.0,
            /// `["all-linear"]` or module names (`["q_proj", "v_proj"]`).
            target_modules: Vec<String> = vec!["all-linear".into()],
            /// Default system prompt for conversations that have none.
            system: Option<String> = None,
        ] }
    };
}
pub(crate) use with_tuner_args;

with_tuner_args! {
    { pipeline_train::params_group }
    /// The model / tuner parameters shared by `sft` and `align` (fields: [`with_tuner_args!`]).
    pub(crate) struct TunerParams
}

impl TunerParams {
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

/// The range checks of a group of params that [`stage_params!`] embeds, as a params error.
pub(crate) trait CheckParams {
    fn check(&self) -> Result<(), StageError>;
}

impl CheckParams for TrainConfig {
    fn check(&self) -> Result<(), StageError> {
        self.validate().map_err(stage_error)
    }
}

impl CheckParams for TunerParams {
    fn check(&self) -> Result<(), StageError> {
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(StageError::Params(format!("`lora_dropout = {}` must be in [0, 1)", self.lora_dropout)));
        }
        if self.train_type == TrainType::Lora && self.lora_rank == 0 {
            return Err(StageError::Params("`lora_rank` must be at least 1".into()));
        }
        self.trainable().map(|_| ())
    }
}

/// A training stage's typed params and the strict wire struct they are parsed from (`align.rs`
/// has both groups):
///
/// ```text
/// training::stage_params! {
///     /// `align`'s params.
///     struct Params {
///         /// Own fields, each `name: Type = default,` (attributes such as `#[serde(alias = "...")]` allowed).
///         beta: f64 = 0.1,
///     }
///     groups {
///         tuner: TunerParams = training::with_tuner_args,
///         train: TrainConfig = pipeline_train::with_train_args,
///     }
/// }
/// ```
///
/// defines `struct Params { pub beta: f64, pub tuner: TunerParams, pub train: TrainConfig }`,
/// its `Deserialize` (through a private `#[serde(deny_unknown_fields, default)]` struct that has
/// the own fields and every group's fields side by side, as the recipe writes them, so serde's
/// unknown-key message lists them all; no `#[serde(flatten)]`) and `Params::parse(&table)`, which
/// also runs each group's [`CheckParams`]. Each group is `name: Type = macro`, where `macro` is
/// a field-list macro (`with_tuner_args!`, `pipeline_train::with_train_args!`) whose fields are
/// those of `Type`. A key defined twice is a compile error (a duplicate field).
macro_rules! stage_params {
    // A group's macro called back with its fields: record them, go on with the next group.
    (@got head $head:tt own $own:tt done { $($done:tt)* } todo $todo:tt
        group $gname:ident : $gty:path [ $($fields:tt)* ]) => {
        $crate::training::stage_params! {
            @next head $head own $own done { $($done)* $gname : $gty [ $($fields)* ] } todo $todo
        }
    };
    // Ask the next group's macro for its fields.
    (@next head $head:tt own $own:tt done $done:tt
        todo { $gname:ident : $gty:path = $($gmacro:ident)::+ $(, $($rest:tt)*)? }) => {
        $($gmacro)::+! {
            { $crate::training::stage_params }
            @got head $head own $own done $done todo { $($($rest)*)? } group $gname : $gty
        }
    };
    // Every group's fields known: emit.
    (@next
        head { $(#[$meta:meta])* $vis:vis struct $name:ident }
        own { $( $(#[$ometa:meta])* $ofield:ident : $oty:ty = $odefault:expr ),* $(,)? }
        done { $( $gname:ident : $gty:path [
            $( $(#[$gmeta:meta])* $gfield:ident : $gfty:ty = $gdefault:expr ),* $(,)?
        ] )* }
        todo { }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        $vis struct $name {
            $( pub $ofield: $oty, )*
            $( pub $gname: $gty, )*
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<De: ::serde::Deserializer<'de>>(de: De) -> ::core::result::Result<Self, De::Error> {
                /// Every key of the stage side by side, as a recipe writes them.
                #[derive(::serde::Deserialize)]
                #[serde(deny_unknown_fields, default)]
                struct Wire {
                    $( $(#[$ometa])* $ofield: $oty, )*
                    $( $( $(#[$gmeta])* $gfield: $gfty, )* )*
                }
                impl ::core::default::Default for Wire {
                    fn default() -> Self {
                        Wire { $( $ofield: $odefault, )* $( $( $gfield: $gdefault, )* )* }
                    }
                }
                let wire = <Wire as ::serde::Deserialize>::deserialize(de)?;
                ::core::result::Result::Ok($name {
                    $( $ofield: wire.$ofield, )*
                    // (A `path` fragment cannot name a struct literal; an alias can.)
                    $( $gname: {
                        type Group = $gty;
                        Group { $( $gfield: wire.$gfield, )* }
                    }, )*
                })
            }
        }

        impl $name {
            /// Parse a stage's `[params]` table (one strict pass) and check every group's ranges.
            pub(crate) fn parse(params: &::toml::Table) -> ::core::result::Result<Self, ::pipeline_engine::StageError> {
                let p: Self = ::pipeline_engine::stage::parse_params(params)?;
                $( $crate::training::CheckParams::check(&p.$gname)?; )*
                ::core::result::Result::Ok(p)
            }
        }
    };
    (
        $(#[$meta:meta])* $vis:vis struct $name:ident { $($own:tt)* }
        groups { $($groups:tt)* }
    ) => {
        $crate::training::stage_params! {
            @next head { $(#[$meta])* $vis struct $name } own { $($own)* } done { } todo { $($groups)* }
        }
    };
}
pub(crate) use stage_params;

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

/// The error for a CUDA device in a build without the `cuda` feature: it says how to get one.
pub fn cuda_not_built(device: pipeline_engine::Device) -> StageError {
    StageError::failed(format!(
        "--device {device}: this pipeline binary was built without CUDA support; rebuild with `cargo build --release --features cuda` (see scripts/gpu/README.md)"
    ))
}

/// The run's device (`RunCtx::device`, parsed once from `--device`), checked against this build.
pub(crate) fn require_device(device: pipeline_engine::Device) -> Result<pipeline_engine::Device, StageError> {
    if device.is_cuda() && !cfg!(feature = "cuda") {
        return Err(cuda_not_built(device));
    }
    Ok(device)
}

/// The CUDA device `ordinal`, or an error naming the cause (no GPU, no driver).
#[cfg(feature = "cuda")]
pub fn cuda_device(ordinal: usize) -> Result<dfdx::prelude::Cuda, StageError> {
    let device = pipeline_engine::Device::Cuda { ordinal };
    dfdx::prelude::Cuda::try_build(ordinal, 0)
        .map_err(|e| StageError::failed(format!("--device {device}: cannot open GPU {ordinal}: {e}")))
}

/// `on_device!(ctx, |dev| body)`: evaluates `body` with `dev` bound to the device the run asked
/// for (`Cpu`, or `Cuda` when built with the `cuda` feature); `body` is usually a call of a
/// function generic over `D: Device<f32>`.
macro_rules! on_device {
    ($ctx:expr, |$dev:ident| $body:expr) => {
        match $crate::training::require_device($ctx.device())? {
            #[cfg(feature = "cuda")]
            pipeline_engine::Device::Cuda { ordinal } => {
                let $dev = $crate::training::cuda_device(ordinal)?;
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

/// Reports a training run through a stage's [`RunCtx`]:
/// a progress bar over optimizer steps, `ctx.metric` for `loss`, `learning_rate`, `grad_norm`,
/// `tokens_per_second`, `eval_loss` and every objective figure (DPO rewards...), a message per
/// resume / early stop / best-checkpoint load, and a checkpoint-then-stop on Ctrl-C.
struct RunCtxCallbacks<'a> {
    ctx: &'a RunCtx,
    /// Progress-bar label, e.g. `"sft"`.
    label: String,
}

impl Callbacks for RunCtxCallbacks<'_> {
    fn on_start(&mut self, plan: &TrainPlan) {
        self.ctx.progress_start(self.label.clone(), Some(plan.total_steps));
        if let Some(step) = plan.resumed_from {
            self.ctx.progress_set(step);
        }
    }
    fn on_step(&mut self, step: u64, _total: u64) {
        self.ctx.progress_set(step);
    }
    fn on_record(&mut self, record: &Record) {
        match record {
            Record::Train(t) => {
                self.ctx.metric("loss", t.step, t.loss);
                self.ctx.metric("learning_rate", t.step, t.learning_rate);
                self.ctx.metric("grad_norm", t.step, t.grad_norm);
                self.ctx.metric("tokens_per_second", t.step, t.tokens_per_second);
                for (k, v) in &t.metrics {
                    self.ctx.metric(k, t.step, *v);
                }
            }
            Record::Eval(e) => {
                self.ctx.metric("eval_loss", e.step, e.eval_loss);
                for (k, v) in &e.metrics {
                    self.ctx.metric(&format!("eval_{k}"), e.step, *v);
                }
            }
        }
    }
    fn on_message(&mut self, message: &str) {
        self.ctx.message(message.to_string());
    }
    fn control(&mut self, _next_step: u64) -> Control {
        if self.ctx.is_cancelled() {
            Control::Interrupt
        } else {
            Control::Continue
        }
    }
}

/// Checkpoints under the stage's scratch directory (so a killed run resumes), report files in
/// `report_dir` (an output).
fn train_paths(ctx: &RunCtx, report_dir: &Path) -> TrainPaths {
    TrainPaths { checkpoints: ctx.scratch_dir().join("checkpoints"), report: report_dir.to_path_buf() }
}

/// A training error as the stage reports it.
pub(crate) fn stage_error(e: TrainError) -> StageError {
    match e {
        TrainError::Config(m) => StageError::Params(m),
        TrainError::Io { path, source } => StageError::Io { path, source },
        other => StageError::failed(other),
    }
}

/// `Err(Cancelled)` when the loop stopped on Ctrl-C (its checkpoint is in the scratch
/// directory, so the next run resumes); `Ok` otherwise.
fn check_stopped(outcome: &TrainOutcome) -> Result<(), StageError> {
    if outcome.stop == StopReason::Interrupted {
        Err(StageError::Cancelled)
    } else {
        Ok(())
    }
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
    mut model: Qwen2<D, S>,
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
    pipeline_model::set_tf32(dev, cfg.tf32);
    // torch_dtype unset: bf16 for checkpoints from disk (runtime dimensions), f32 for the preset
    let from_disk = std::any::TypeId::of::<S>() == std::any::TypeId::of::<pipeline_model::RuntimeDims>();
    let dtype = match cfg.torch_dtype {
        Some(pipeline_train::TorchDtype::Bfloat16) => pipeline_model::FrozenDtype::Bf16,
        Some(pipeline_train::TorchDtype::Float32) => pipeline_model::FrozenDtype::F32,
        None if from_disk => pipeline_model::FrozenDtype::Bf16,
        None => pipeline_model::FrozenDtype::F32,
    };
    model.set_frozen_dtype(dtype).map_err(|e| StageError::failed(format!("{label}: torch_dtype: {e}")))?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    let mut tm = TrainModel(model);
    let mut cb = RunCtxCallbacks { ctx, label: label.into() };
    let outcome = train(cfg, seed, dev, &mut tm, objective, train_set, eval, &train_paths(ctx, metrics_dir), &mut cb)
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

/// The stage report: sizes, steps, final/best losses, why it stopped, the metrics and loss-curve
/// files relative to `metrics_dir` (the output that holds them), throughput and `extra` (the
/// stage's own figures).
pub(crate) fn report(
    ctx: &RunCtx,
    outcome: &TrainOutcome,
    metrics_dir: &Path,
    model_dir: &Path,
    extra: serde_json::Value,
) -> serde_json::Value {
    let rel = |p: &Path| p.strip_prefix(metrics_dir).unwrap_or(p).display().to_string();
    let last_eval = outcome.history.iter().rev().find_map(|r| match r {
        Record::Eval(e) => Some(e.eval_loss),
        Record::Train(_) => None,
    });
    let tps = outcome.history.iter().rev().find_map(|rec| match rec {
        Record::Train(t) => Some(t.tokens_per_second),
        Record::Eval(_) => None,
    });
    let mut r = serde_json::json!({
        "train_examples": outcome.plan.train_examples,
        "eval_examples": outcome.plan.eval_examples,
        "trainable_params": outcome.plan.trainable_params,
        "total_steps": outcome.plan.total_steps,
        "global_step": outcome.global_step,
        "resumed_from": outcome.plan.resumed_from,
        "stop": outcome.stop,
        "final_train_loss": outcome.final_train_loss,
        "final_eval_loss": last_eval,
        "best_eval_loss": outcome.best_eval_loss,
        "best_step": outcome.best_step,
        "metrics": rel(&outcome.metrics_path),
        "loss_curve": rel(&outcome.loss_curve_path),
        "tokens_per_second": tps,
    });
    // No `model` / `metrics_dir` paths: they are the run's scratch folders, gone once the cache
    // entry is committed (the outputs' final paths are listed with the entry, `pipeline cache ls`).
    let _ = model_dir;
    if let (Some(o), Some(e)) = (r.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
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

/// [`stage_params!`] and the messages a training stage's `[params]` give.
#[cfg(test)]
mod params_tests {
    use pipeline_engine::{plan_source, Source};

    use super::*;

    stage_params! {
        /// Own fields and both groups, as `align` has them.
        struct Both {
            beta: f64 = 0.1,
            #[serde(alias = "rpo")]
            rpo_alpha: Option<f64> = None,
        }
        groups {
            tuner: TunerParams = with_tuner_args,
            train: TrainConfig = pipeline_train::with_train_args,
        }
    }

    fn parse(text: &str) -> Result<Both, StageError> {
        Both::parse(&toml::from_str(text).unwrap())
    }

    #[test]
    fn an_empty_table_gives_every_groups_defaults() {
        let p = parse("").unwrap();
        assert_eq!((p.beta, p.rpo_alpha), (0.1, None));
        assert_eq!(p.tuner, TunerParams::default());
        assert_eq!(p.train, TrainConfig::default());
        assert_eq!(p.tuner.target_modules, vec!["all-linear".to_string()]);
        assert_eq!((p.tuner.train_type, p.tuner.lora_rank, p.tuner.lora_alpha), (TrainType::Lora, 8, 32.0));
    }

    #[test]
    fn one_flat_table_fills_own_fields_and_groups_with_their_aliases() {
        let p = parse(
            "beta = 0.2\nrpo = 0.5\ntuner_type = \"full\"\nlora_rank = 4\nsplit_dataset_ratio = 0.2\n\
             learning_rate = 3e-3\nnum_train_epochs = 15\nlr_scheduler_type = \"linear\"",
        )
        .unwrap();
        assert_eq!((p.beta, p.rpo_alpha), (0.2, Some(0.5)));
        assert_eq!((p.tuner.train_type, p.tuner.lora_rank), (TrainType::Full, 4));
        let want = TrainConfig {
            learning_rate: 3e-3,
            num_train_epochs: 15.0,
            split_ratio: 0.2,
            lr_scheduler_type: pipeline_train::SchedulerType::Linear,
            ..Default::default()
        };
        assert_eq!(p.train, want);
    }

    #[test]
    fn an_unknown_key_lists_every_key_of_every_group() {
        let msg = parse("lerning_rate = 1e-3").unwrap_err().to_string();
        assert!(msg.contains("unknown field `lerning_rate`"), "{msg}");
        for key in
            ["beta", "rpo_alpha", "rpo", "model", "tuner_type", "lora_rank", "learning_rate", "split_dataset_ratio"]
        {
            assert!(msg.contains(&format!("`{key}`")), "{key} missing from {msg}");
        }
    }

    #[test]
    fn a_wrong_type_names_the_key_and_ranges_are_checked_per_group() {
        let msg = parse("learning_rate = \"fast\"").unwrap_err().to_string();
        assert!(msg.contains("learning_rate") && msg.contains("invalid type"), "{msg}");
        let msg = parse("learning_rate = 0.0").unwrap_err().to_string();
        assert!(msg.contains("`learning_rate` must be a positive number"), "{msg}");
        let msg = parse("lora_dropout = 1.0").unwrap_err().to_string();
        assert!(msg.contains("`lora_dropout = 1` must be in [0, 1)"), "{msg}");
        let msg = parse("target_modules = [\"nope\"]").unwrap_err().to_string();
        assert!(msg.contains("target_modules"), "{msg}");
    }

    /// Plans a recipe whose stage `s` of kind `kind` has `params`, through the real registry.
    fn plan_error(kind: &str, params: &str) -> String {
        let text =
            format!("[pipeline]\nname = \"t\"\n\n[stages.s]\nkind = \"{kind}\"\ninputs.data = \"s.data\"\n{params}\n");
        let src = Source { path: PathBuf::from("r.toml"), text };
        match plan_source(&src, &crate::registry()) {
            Ok(_) => panic!("`{params}` planned"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_typo_in_a_training_stage_names_file_line_stage_and_every_key() {
        let msg = plan_error("sft", "params.lora_rank = 8\nparams.lerning_rate = 1e-4");
        assert!(msg.starts_with("error: stage `s` (kind `sft`): unknown param `lerning_rate`\n"), "{msg}");
        assert!(msg.contains("--> r.toml:8:1"), "{msg}");
        let hint = msg.split("= hint: known params: ").nth(1).unwrap_or_else(|| panic!("no hint in {msg}"));
        for key in ["model", "tuner_type", "lora_rank", "target_modules", "system", "learning_rate", "seed"] {
            assert!(hint.split(", ").any(|k| k.trim() == key), "{key} missing from {hint}");
        }

        // align lists its own keys, the tuner keys and (unlike when its table was split in three)
        // the training arguments.
        let msg = plan_error("align", "params.bta = 0.1");
        assert!(msg.contains("stage `s` (kind `align`): unknown param `bta`") && msg.contains("r.toml:7:1"), "{msg}");
        for key in ["rlhf_type", "beta", "undesirable_weight", "lora_rank", "learning_rate", "max_length"] {
            assert!(msg.contains(&format!(" {key},")) || msg.ends_with(&format!(" {key}")), "{key} missing from {msg}");
        }

        let msg = plan_error("pretrain", "params.train_typ = \"full\"");
        assert!(msg.contains("(kind `pretrain`): unknown param `train_typ`"), "{msg}");
        assert!(msg.contains("train_type, tuner_type, system, learning_rate"), "{msg}");
        assert!(!msg.contains("lora_rank"), "pretrain takes no LoRA keys: {msg}");

        let msg = plan_error("pretrain", "params.train_type = \"lora\"");
        assert!(msg.contains("pretrain trains every weight"), "{msg}");
        let msg = plan_error("align", "params.beta = 0.0");
        assert!(msg.contains("`beta` must be > 0"), "{msg}");
        let msg = plan_error("sft", "params.gradient_accumulation_steps = 0");
        assert!(msg.contains("(kind `sft`): `gradient_accumulation_steps` must be at least 1"), "{msg}");
    }
}

/// The loop reported through a hand-built `RunCtx`: progress, metrics, Ctrl-C, resume, report.
#[cfg(test)]
mod glue_tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use dfdx::prelude::*;
    use pipeline_engine::{EventSink, RunParts, StageEvent};
    use pipeline_train::{masked_mean_nll, token_logprobs, LmBatch, LossOutput, StepInfo, TokenDataset, TokenExample};

    use super::*;

    const VOCAB: usize = 16;
    type Arch = (Embedding<VOCAB, 8>, Linear<8, VOCAB>);
    type Bigram = <Arch as BuildOnDevice<Cpu, f32>>::Built;

    /// Next-token cross-entropy of a bigram model (the loop does not care what it trains).
    struct CausalLm;

    impl Objective<Bigram, Cpu> for CausalLm {
        type Batch = LmBatch;
        fn loss<T: Tape<f32, Cpu>>(
            &mut self,
            m: &Bigram,
            b: &LmBatch,
            tape: T,
            _info: &StepInfo,
        ) -> Result<LossOutput<Cpu, T>, TrainError> {
            let ids = m.0.weight.device().tensor_from_vec(b.input_ids.clone(), (b.batch, b.seq)).put_tape(tape);
            let logits = m.forward(ids).reshape_like(&(b.batch, b.seq, VOCAB));
            Ok(LossOutput {
                loss: masked_mean_nll(token_logprobs(logits, &b.targets)?, &b.loss_mask)?,
                metrics: vec![],
            })
        }
    }

    /// Collects events, and presses Ctrl-C once step `.2` is reported (0: never).
    struct Collect(Mutex<Vec<StageEvent>>, Arc<AtomicBool>, u64);

    impl EventSink for Collect {
        fn stage_event(&self, _: &str, e: StageEvent) {
            if let StageEvent::ProgressSet { pos } = &e {
                if self.2 > 0 && *pos == self.2 {
                    self.1.store(true, Ordering::Relaxed);
                }
            }
            self.0.lock().unwrap().push(e);
        }
    }

    fn ctx(root: &Path, ctrl_c_at: u64) -> (RunCtx, Arc<Collect>) {
        let sink = Arc::new(Collect(Mutex::new(Vec::new()), Arc::new(AtomicBool::new(false)), ctrl_c_at));
        let ctx = RunCtx::new(RunParts {
            stage_id: "sft".into(),
            params: toml::Table::new(),
            seed: 1,
            recipe_dir: root.to_path_buf(),
            inputs: BTreeMap::new(),
            outputs: [("metrics".to_string(), root.join("metrics"))].into(),
            scratch: root.join("scratch"),
            cancel: sink.1.clone(),
            sink: sink.clone(),
        });
        (ctx, sink)
    }

    /// One run of the loop as [`fit`] makes it, on a freshly initialised model.
    fn run(ctx: &RunCtx, cfg: &TrainConfig, data: &TokenDataset) -> Result<TrainOutcome, StageError> {
        let dev = Cpu::seed_from_u64(1);
        let mut m = dev.build_module::<Arch, f32>();
        let mut cb = RunCtxCallbacks { ctx, label: "sft".into() };
        let paths = train_paths(ctx, ctx.output("metrics")?);
        let outcome = train(cfg, 1, &dev, &mut m, &mut CausalLm, data, None, &paths, &mut cb).map_err(stage_error)?;
        check_stopped(&outcome)?;
        Ok(outcome)
    }

    #[test]
    fn progress_metrics_and_ctrl_c_resume() {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            TrainConfig { max_steps: 6, logging_steps: 2, save_steps: 100, split_ratio: 0.0, ..Default::default() };
        let examples = (0..8)
            .map(|i| TokenExample::all_targets((0..3 + i % 5).map(|t| ((i + t) % 15 + 1) as u32).collect()))
            .collect();
        let data = TokenDataset::new(examples, 0, 64).unwrap();

        // First run: Ctrl-C after step 3 → checkpoint at 3 in the scratch directory, Cancelled.
        let (c, sink) = ctx(dir.path(), 3);
        assert!(matches!(run(&c, &cfg, &data), Err(StageError::Cancelled)));
        assert!(c.scratch_dir().join("checkpoints/checkpoint-3").is_dir());
        let events = sink.0.lock().unwrap().clone();
        assert_eq!(events[0], StageEvent::ProgressStart { label: "sft".into(), total: Some(6) });
        let metric_steps = |name: &str| -> Vec<u64> {
            events
                .iter()
                .filter_map(|e| match e {
                    StageEvent::Metric { name: n, step, .. } if n == name => Some(*step),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(metric_steps("loss"), vec![2]);
        assert_eq!(metric_steps("learning_rate"), vec![2]);
        assert_eq!(metric_steps("grad_norm"), vec![2]);

        // Second run resumes at 3 and finishes; the report's files are relative to `metrics`.
        let (c2, sink2) = ctx(dir.path(), 0);
        let out = run(&c2, &cfg, &data).unwrap();
        assert_eq!(out.plan.resumed_from, Some(3));
        let events = sink2.0.lock().unwrap().clone();
        assert!(
            events.iter().any(
                |e| matches!(e, StageEvent::Message(m) if m.contains("resuming from") && m.contains("checkpoint-3"))
            ),
            "{events:?}"
        );
        assert!(events.contains(&StageEvent::ProgressSet { pos: 3 }), "{events:?}");
        let metrics = c2.output("metrics").unwrap();
        let r = report(&c2, &out, metrics, Path::new("model"), serde_json::json!({ "rows": 8 }));
        assert_eq!(r["global_step"], 6);
        assert_eq!(r["resumed_from"], 3);
        assert_eq!(r["stop"], "completed");
        assert_eq!(r["metrics"], "metrics.jsonl");
        assert_eq!(r["loss_curve"], "loss_curve.png");
        assert_eq!(r["rows"], 8);
        assert!(r["tokens_per_second"].as_f64().is_some_and(|t| t > 0.0), "{r}");
        assert!(metrics.join("loss_curve.png").is_file());
        // Regression (issue 15, point 9): the report kept paths to scratch folders that are
        // gone once the entry is committed.
        assert!(r.get("model").is_none() && r.get("metrics_dir").is_none(), "{r}");
    }

    #[test]
    fn train_errors_become_stage_errors_of_the_right_kind() {
        assert!(matches!(stage_error(TrainError::Config("`x` bad".into())), StageError::Params(m) if m == "`x` bad"));
        let io = TrainError::Io { path: "p".into(), source: std::io::Error::other("boom") };
        assert!(matches!(stage_error(io), StageError::Io { path, .. } if path == Path::new("p")));
        let e = stage_error(TrainError::NonFinite("loss is NaN at step 3".into()));
        assert_eq!(e.to_string(), "training diverged: loss is NaN at step 3");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use pipeline_engine::{NullSink, RunParts};

    use super::*;

    fn ctx_on(device: Option<pipeline_engine::Device>) -> RunCtx {
        let ctx = RunCtx::new(RunParts {
            stage_id: "sft".into(),
            params: toml::Table::new(),
            seed: 1,
            recipe_dir: PathBuf::from("."),
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            scratch: PathBuf::from("scratch"),
            sink: Arc::new(NullSink),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        match device {
            Some(d) => ctx.with_device(d),
            None => ctx,
        }
    }

    #[test]
    fn device_option_selects_the_device_or_says_how_to_get_cuda() {
        use pipeline_engine::Device;
        assert_eq!(require_device(ctx_on(None).device()).unwrap(), Device::Cpu, "CPU unless the run asks otherwise");
        assert_eq!(require_device(ctx_on(Some(Device::Cpu)).device()).unwrap(), Device::Cpu);
        for (device, name) in [(Device::Cuda { ordinal: 0 }, "cuda"), (Device::Cuda { ordinal: 1 }, "cuda:1")] {
            let got = require_device(ctx_on(Some(device)).device());
            if cfg!(feature = "cuda") {
                assert_eq!(got.unwrap(), device);
            } else {
                let msg = got.unwrap_err().to_string();
                assert!(
                    msg.starts_with(&format!("--device {name}: this pipeline binary was built without CUDA")),
                    "{msg}"
                );
                assert!(msg.contains("--features cuda"), "{msg}");
            }
        }
    }
}
