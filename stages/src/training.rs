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
//! # TensorBoard
//! With `report_to = ["tensorboard"]` (the default, as in ms-swift; `"none"` or `[]` turns it
//! off) the stage writes one event file into its `metrics` output under `tensorboard/`, made from
//! the same records as `metrics.jsonl` once the loop ends (so a resumed run's file holds the
//! whole history): the tags transformers' Trainer writes (`train/loss`, `train/learning_rate`,
//! `train/grad_norm`, `train/tokens_per_second`, `eval/loss`, DPO/KTO `train/rewards/*`,
//! `train/logps/*`; see `pipeline_train::tensorboard`) and the stage's `[params]` as the text
//! `hparams`. `pipeline run` copies the files of every stage of the run to
//! `<cache dir>/runs/<pipeline name>/tensorboard/<stage id>/` (or the stage's `logging_dir`), so
//! `tensorboard --logdir .pipeline/runs/<name>/tensorboard` shows the whole run.
//!
//! # The output `model` folder
//! Always a complete Hugging Face folder that `load_pretrained` (and so `pipeline generate`)
//! reads on its own: `config.json` + `model.safetensors` (F32, or BF16 when the base was held in
//! bf16 on CUDA, `torch_dtype = "bfloat16"`; with LoRA the adapters are merged
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
    Callbacks, Control, Dataset, Objective, Record, StopReason, TrainConfig, TrainError, TrainOutcome, TrainPaths,
    TrainPlan,
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
            /// Strip images / audio / video (the files and their `<image>`-style tags) from rows
            /// for a text-only model instead of failing on them; the report counts what was dropped.
            drop_media: bool = false,
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

/// The `<image>`-style placeholders of multimodal rows.
const MEDIA_TAGS: [&str; 3] = ["<image>", "<audio>", "<video>"];

/// Multimodal rows on a text-only model (every model this build trains is one): an error naming
/// the first such row, what it holds and the model, unless `drop` (`drop_media = true`), which
/// removes the media files and their tags from every row. Returns how many media items (files or
/// tags without a file) were dropped.
pub(crate) fn text_only_rows(rows: &mut [crate::data::Sample], drop: bool, model: &Path) -> Result<usize, StageError> {
    let mut dropped = 0usize;
    for s in rows.iter_mut() {
        let files = s.images.len() + s.audios.len() + s.videos.len();
        let texts = s
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .chain(s.text.as_deref())
            .chain(s.rejected_response.as_deref());
        let tags: usize = texts.map(|t| MEDIA_TAGS.iter().map(|tag| t.matches(tag).count()).sum::<usize>()).sum();
        if files == 0 && tags == 0 {
            continue;
        }
        if !drop {
            let what: Vec<String> = [("image", s.images.len()), ("audio", s.audios.len()), ("video", s.videos.len())]
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{n} {k} file(s)"))
                .chain((tags > 0).then(|| format!("{tags} media tag(s) such as `<image>`")))
                .collect();
            return Err(StageError::Params(format!(
                "row `{}` has {}, but the model {} is text-only (Qwen2/Llama causal LM); remove the media, or set \
                 `drop_media = true` on this stage to strip it from every row (the report counts what is dropped)",
                s.id,
                what.join(" and "),
                model.display()
            )));
        }
        dropped += files.max(tags);
        s.images.clear();
        s.audios.clear();
        s.videos.clear();
        let strip = |t: &mut String| {
            for tag in MEDIA_TAGS {
                *t = t.replace(tag, "");
            }
            *t = t.trim().to_string();
        };
        s.messages.iter_mut().for_each(|m| strip(&mut m.content));
        s.text.as_mut().map(strip);
        s.rejected_response.as_mut().map(strip);
    }
    Ok(dropped)
}

/// `report_to`: where a stage's logs go besides `metrics.jsonl` (transformers' `report_to`; a
/// string or a list). `"tensorboard"` (the default, as in ms-swift) writes TensorBoard event
/// files; `"none"` or `[]` writes none; `"all"` is every integration this build has.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReportTo(pub Vec<String>);

/// The integrations `report_to` may name.
pub(crate) const REPORT_INTEGRATIONS: &[&str] = &["tensorboard"];

impl Default for ReportTo {
    fn default() -> Self {
        ReportTo(vec!["tensorboard".into()])
    }
}

impl<'de> serde::Deserialize<'de> for ReportTo {
    fn deserialize<De: serde::Deserializer<'de>>(de: De) -> Result<Self, De::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let names = match OneOrMany::deserialize(de)
            .map_err(|_| serde::de::Error::custom("`report_to` must be a string or a list of strings"))?
        {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        let mut out = Vec::new();
        for n in names {
            match n.as_str() {
                "none" => {}
                "all" => out.extend(REPORT_INTEGRATIONS.iter().map(|s| s.to_string())),
                other if REPORT_INTEGRATIONS.contains(&other) => out.push(n),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "`report_to`: unknown integration `{other}`; this build writes {} (or \"none\")",
                        REPORT_INTEGRATIONS.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
        out.dedup();
        Ok(ReportTo(out))
    }
}

impl ReportTo {
    pub fn tensorboard(&self) -> bool {
        self.0.iter().any(|s| s == "tensorboard")
    }
}

/// The logging parameters every training and evaluate stage takes, in the field-list form of
/// `pipeline_train::with_train_args!`.
macro_rules! with_report_args {
    ({ $($callback:tt)* } $($args:tt)*) => {
        $($callback)*! { $($args)* [
            /// Where logs go besides `metrics.jsonl`: `["tensorboard"]` (default) or `"none"`.
            report_to: $crate::training::ReportTo = $crate::training::ReportTo::default(),
            /// Where the run's copy of the TensorBoard event files goes (relative to the recipe);
            /// default `<cache dir>/runs/<pipeline name>/tensorboard/<stage id>/`. The files are
            /// also in the stage's output (`tensorboard/`). Read by `pipeline run`, not the stage.
            logging_dir: Option<String> = None,
        ] }
    };
}
pub(crate) use with_report_args;

with_report_args! {
    { pipeline_train::params_group }
    /// `report_to` and `logging_dir` (fields: [`with_report_args!`]).
    pub(crate) struct ReportParams
}

impl CheckParams for ReportParams {
    fn check(&self) -> Result<(), StageError> {
        Ok(())
    }
}

impl ReportParams {
    /// The stage's report params, read from its raw `[params]` (its strict parse, which takes
    /// these keys through its `report` group, has accepted them at plan time).
    pub(crate) fn of(params: &toml::Table) -> Result<ReportParams, StageError> {
        let mut p = ReportParams::default();
        if let Some(v) = params.get("report_to") {
            p.report_to = v.clone().try_into().map_err(|e: toml::de::Error| StageError::Params(e.to_string()))?;
        }
        if let Some(v) = params.get("logging_dir") {
            p.logging_dir =
                Some(v.as_str().ok_or_else(|| StageError::Params("`logging_dir` must be a path".into()))?.into());
        }
        Ok(p)
    }
}

/// The stage's `[params]` as the markdown the TensorBoard `hparams` text shows.
pub(crate) fn hparams_text(ctx: &RunCtx, kind: &str) -> String {
    let params: Vec<(String, String)> = ctx.raw_params().iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
    pipeline_train::tensorboard::hparams_markdown(&format!("{} ({kind})", ctx.stage_id()), &params)
}

/// TensorBoard event files of `events` in `<out>/tensorboard/` when `report_to` asks for them;
/// returns the directory relative to `out` (for the report).
pub(crate) fn write_tensorboard(
    ctx: &RunCtx,
    out: &Path,
    events: impl FnOnce(f64) -> Vec<pipeline_train::tensorboard::Event>,
) -> Result<Option<String>, StageError> {
    if !ReportParams::of(ctx.raw_params())?.report_to.tensorboard() {
        return Ok(None);
    }
    let now = pipeline_train::tensorboard::now();
    pipeline_train::tensorboard::write_events(&out.join(TENSORBOARD_DIR), now, &events(now)).map_err(stage_error)?;
    Ok(Some(TENSORBOARD_DIR.to_string()))
}

/// The folder of an output artifact that holds a stage's TensorBoard event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// The largest LoRA rank a recipe may ask for (the hidden size of the widest models).
const MAX_LORA_RANK: usize = 16_384;

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / f64::from(1u32 << 30))
}

/// Refuse a LoRA rank above the smaller side of every matrix of the model (it would add
/// parameters and memory, and nothing a lower rank cannot express), naming the model's sizes.
pub(crate) fn check_lora_rank(rank: usize, hidden: usize, intermediate: usize) -> Result<(), StageError> {
    if rank > hidden.max(intermediate) {
        return Err(StageError::Params(format!(
            "`lora_rank = {rank}` exceeds every dimension of the model (hidden_size {hidden}, intermediate_size {intermediate}); use at most {hidden}"
        )));
    }
    Ok(())
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
        // Regression (issue 14, defect 6): `lora_rank = 100000000` aborted on a 25.6 GB
        // allocation. No supported model is wider than MAX_LORA_RANK, and a rank above a matrix's
        // smaller side adds nothing (the run-time check against the model is in `check_lora_rank`).
        if self.train_type == TrainType::Lora && self.lora_rank > MAX_LORA_RANK {
            return Err(StageError::Params(format!(
                "`lora_rank = {}` is absurd: its A and B matrices alone take {} per 1024-wide linear layer; at most {MAX_LORA_RANK}",
                self.lora_rank,
                gib(self.lora_rank as f64 * 2048.0 * 4.0)
            )));
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

/// [`load`] for a training stage: the frozen base comes in the dtype `cfg` asks for
/// ([`frozen_dtype`]), so on CUDA a bf16 base is read and uploaded as bf16 (a 7B model's f32 copy,
/// 30 GB, would not fit the seed's 24 GB card even for a moment).
pub(crate) fn load_for_training<D: Device<f32>>(
    path: &Path,
    dev: &D,
    cfg: &TrainConfig,
) -> Result<Pretrained<D>, StageError> {
    ModelSource::resolve(path, None)
        .and_then(|src| src.load_for_training(dev, frozen_dtype(cfg, true)))
        .map_err(|e| StageError::failed(format!("loading {}: {e}", path.display())))
}

/// The frozen base's precision `cfg` asks for: its `torch_dtype`, or unset bf16 for a checkpoint
/// from disk and f32 for the built-in preset (on the CPU every dtype is f32).
fn frozen_dtype(cfg: &TrainConfig, from_disk: bool) -> pipeline_model::FrozenDtype {
    match cfg.torch_dtype {
        Some(pipeline_train::TorchDtype::Bfloat16) => pipeline_model::FrozenDtype::Bf16,
        Some(pipeline_train::TorchDtype::Float32) => pipeline_model::FrozenDtype::F32,
        None if from_disk => pipeline_model::FrozenDtype::Bf16,
        None => pipeline_model::FrozenDtype::F32,
    }
}

/// The chat template of a loaded model (Qwen2.5's when the tokenizer has none).
pub(crate) fn chat_template<D: Device<f32>>(p: &Pretrained<D>) -> Result<&ChatTemplate, StageError> {
    p.chat.as_ref().ok_or_else(|| StageError::failed("the model's tokenizer has no chat template"))
}

/// The default system prompt a model folder was trained with (`chat_defaults.json`; for an
/// adapter folder, its own or its base's).
pub(crate) fn trained_system(dir: &Path) -> Option<String> {
    let file = ModelSource::resolve(dir, None).ok()?.find_file("chat_defaults.json")?;
    let text = pipeline_cache::checked::read_to_string(&file).ok()?;
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
    fn on_resume(&mut self, step: u64, checkpoint: &str) {
        self.ctx.message(format!("resuming {} from step {step} ({checkpoint})", self.ctx.stage_id()));
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

/// The params of a training stage as they read at `world_size` ranks: the recipe's
/// `gradient_accumulation_steps` is per device (transformers' meaning: global batch =
/// `per_device_train_batch_size × gradient_accumulation_steps × world size`), the trainer's counts
/// the micro-batches of one step over all ranks. So a run on W ranks is keyed, cached and resumed
/// like one process with W times the accumulation: the same global batch, the same result.
pub(crate) fn distributed_params(params: &toml::Table, world_size: usize) -> toml::Table {
    let mut p = params.clone();
    if world_size > 1 {
        let accum = match p.get("gradient_accumulation_steps") {
            None => Some(1),
            Some(toml::Value::Integer(n)) => Some(*n),
            // Not a number: left as written, for the params check to report.
            Some(_) => None,
        };
        if let Some(n) = accum {
            p.insert("gradient_accumulation_steps".into(), toml::Value::Integer(n.saturating_mul(world_size as i64)));
        }
    }
    p
}

/// The communicator of this rank for the stage's training (world size 1: no communication). On
/// CUDA with the `cuda` feature, NCCL (its unique id exchanged over the TCP rendezvous); otherwise
/// the TCP ring. The ranks meet at `MASTER_ADDR:MASTER_PORT`, tagged with the stage id.
fn communicator(ctx: &RunCtx) -> Result<Box<dyn pipeline_train::dist::Communicator>, StageError> {
    let d = ctx.dist();
    if d.world_size == 1 {
        return Ok(Box::new(pipeline_train::dist::SingleProcess));
    }
    let rv = pipeline_train::dist::Rendezvous {
        rank: d.rank,
        world_size: d.world_size,
        master_addr: d.master_addr.clone(),
        master_port: d.master_port,
        timeout: d.timeout,
        tag: ctx.stage_id().to_string(),
    };
    let fail = |e: pipeline_train::dist::DistError| StageError::failed(format!("data-parallel training: {e}"));
    #[cfg(feature = "cuda")]
    if let pipeline_engine::Device::Cuda { ordinal } = ctx.device() {
        return Ok(Box::new(pipeline_train::dist::nccl::NcclComm::connect(&rv, ordinal).map_err(fail)?));
    }
    Ok(Box::new(pipeline_train::dist::TcpComm::connect(&rv).map_err(fail)?))
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
    prepare(label, cfg, dev, &mut model)?;
    let mut tm = TrainModel(model);
    let outcome = fit_collection(ctx, label, cfg, seed, dev, &mut tm, objective, train_set, eval)?;
    Ok((outcome, tm.0))
}

/// Sets `model` up for training as `cfg` asks (TF32, the frozen weights' dtype, gradient
/// checkpointing); [`fit`] does it, a caller of [`fit_collection`] does it first.
pub(crate) fn prepare<D: Device<f32>, S: Dims>(
    label: &str,
    cfg: &TrainConfig,
    dev: &D,
    model: &mut Qwen2<D, S>,
) -> Result<(), StageError> {
    pipeline_model::set_tf32(dev, cfg.tf32);
    // torch_dtype unset: bf16 for checkpoints from disk (runtime dimensions), f32 for the preset
    let from_disk = std::any::TypeId::of::<S>() == std::any::TypeId::of::<pipeline_model::RuntimeDims>();
    let dtype = frozen_dtype(cfg, from_disk);
    model.set_frozen_dtype(dtype).map_err(|e| StageError::failed(format!("{label}: torch_dtype: {e}")))?;
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    model.set_flash_attention(cfg.attn_impl != Some(pipeline_train::AttnImpl::Eager));
    Ok(())
}

/// [`fit`] on any trainable collection (a model with a head: `pipeline_train::cls::HeadModel`),
/// set up with [`prepare`]; `model` is trained in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit_collection<D, M, O>(
    ctx: &RunCtx,
    label: &str,
    cfg: &TrainConfig,
    seed: u64,
    dev: &D,
    model: &mut M,
    objective: &mut O,
    train_set: &dyn Dataset<Batch = O::Batch>,
    eval: Option<&dyn Dataset<Batch = O::Batch>>,
) -> Result<TrainOutcome, StageError>
where
    D: Device<f32>,
    M: dfdx::nn::tensor_collection::TensorCollection<f32, D>,
    O: Objective<M, D>,
{
    let metrics_dir = ctx.output("metrics")?;
    let mut cb = RunCtxCallbacks { ctx, label: label.into() };
    let mut comm = communicator(ctx)?;
    let outcome = pipeline_train::train_distributed(
        cfg,
        seed,
        dev,
        model,
        objective,
        train_set,
        eval,
        &train_paths(ctx, metrics_dir),
        &mut cb,
        &mut *comm,
    )
    .map_err(stage_error)?;
    check_stopped(&outcome)?;
    let hparams = hparams_text(ctx, label);
    write_tensorboard(ctx, metrics_dir, |now| {
        pipeline_train::tensorboard::training_events(&outcome.history, now, Some(&hparams))
    })?;
    Ok(outcome)
}

/// `base_model_name_or_path` for an adapter written into this stage's `model` output `out` (read
/// relative to the adapter folder, `<artifact>/adapter/`). No absolute path enters the artifact
/// (issue 14, defect 5), so a copied or moved project keeps its digests and its adapters load:
/// - a base that is a cache artifact (`.../artifacts/<digest>[/sub]`, an upstream stage's model) is
///   written `../../<digest>[/sub]`, which holds once this output is committed beside it;
/// - any other base (a model folder of the project) is written relative to where the adapter
///   folder will live once committed: `out` is a staging folder of the cache
///   (`<cache>/tmp/<name>/out/<output>`), committed as `<cache>/artifacts/<digest>`, so the path
///   is `../../../` and then the way from `<cache>` to the base. Outside a cache (a test's folder)
///   it is relative to `out/adapter` itself.
fn adapter_base_path(src: &Path, out: &Path) -> String {
    let canon = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
    };
    let abs = canon(src);
    let comps: Vec<String> = abs.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let is_digest = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(i) = (1..comps.len()).rev().find(|&i| comps[i - 1] == "artifacts" && is_digest(&comps[i])) {
        return format!("../../{}", comps[i..].join("/"));
    }
    let out = canon(out);
    let name = |p: Option<&Path>, n: &str| p.and_then(Path::file_name).is_some_and(|f| f == n);
    let staging_root = out.parent().filter(|o| name(Some(o), "out")).and_then(Path::parent);
    match staging_root.and_then(Path::parent).filter(|t| name(Some(t), "tmp")).and_then(Path::parent) {
        Some(cache) => format!("../../../{}", relative_path(cache, &abs)),
        None => relative_path(&out.join("adapter"), &abs),
    }
}

/// The `/`-separated way from directory `from` to `to` (both absolute): `..` for each component
/// of `from` past their common prefix, then the rest of `to`.
fn relative_path(from: &Path, to: &Path) -> String {
    let f: Vec<_> = from.components().collect();
    let t: Vec<_> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_string(); f.len() - common];
    parts.extend(t[common..].iter().map(|c| c.as_os_str().to_string_lossy().into_owned()));
    if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    }
}

/// Write the output model folder (see the module docs). `src` is the folder the model was loaded
/// from (tokenizer files and vocabulary map are copied from it), or `None` for the tiny preset
/// (the embedded Qwen2.5 tokenizer files are written).
pub(crate) fn write_model<D: Device<f32>, S: Dims>(
    out: &Path,
    mut model: Qwen2<D, S>,
    src: Option<&Path>,
    tokenizer: Option<&pipeline_model::tokenizer::Tokenizer>,
    system: Option<&str>,
) -> Result<(), StageError> {
    let max_len = model.cfg.max_position_embeddings;
    let merr = |e: pipeline_model::ModelError| StageError::failed(format!("writing {}: {e}", out.display()));
    if model.lora_config().is_some() {
        let base = src.map(|s| adapter_base_path(s, out)).unwrap_or_else(|| "tiny".into());
        model.save_adapter(&out.join("adapter"), &base).map_err(merr)?;
        model.merge_lora().map_err(merr)?;
    }
    model.save_pretrained_native(out).map_err(merr)?;
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
        // A `.gguf` source (issue 15, point 12: this failed after the training): its tokenizer
        // came from the file's metadata and is written out as tokenizer.json + config.
        None => {
            let t = tokenizer.ok_or_else(|| {
                StageError::failed(format!("{}: no tokenizer to write beside the model", out.display()))
            })?;
            t.write_hf_files(out, max_len).map_err(merr)?
        }
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
    if metrics_dir.join(TENSORBOARD_DIR).is_dir() {
        r["tensorboard"] = serde_json::json!(TENSORBOARD_DIR);
    }
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
            report: ReportParams = with_report_args,
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
    fn world_size_scales_the_per_device_accumulation_into_the_global_one() {
        let t: toml::Table = toml::from_str("learning_rate = 1e-3\ngradient_accumulation_steps = 4").unwrap();
        assert_eq!(distributed_params(&t, 1), t, "one process: the params as written");
        let two = distributed_params(&t, 2);
        assert_eq!(two["gradient_accumulation_steps"].as_integer(), Some(8));
        assert_eq!(two["learning_rate"], t["learning_rate"]);
        let unset = distributed_params(&toml::Table::new(), 3);
        assert_eq!(unset["gradient_accumulation_steps"].as_integer(), Some(3), "the default of 1, per device");
        let typo: toml::Table = toml::from_str("gradient_accumulation_steps = \"x\"").unwrap();
        assert_eq!(distributed_params(&typo, 2), typo, "left for the params check to report");
    }

    #[test]
    fn report_to_takes_a_string_or_a_list_and_none_turns_it_off() {
        assert!(parse("").unwrap().report.report_to.tensorboard(), "on by default, as in ms-swift");
        for off in ["report_to = \"none\"", "report_to = []", "report_to = [\"none\"]"] {
            assert_eq!(parse(off).unwrap().report.report_to, ReportTo(vec![]), "{off}");
        }
        for on in ["report_to = \"tensorboard\"", "report_to = [\"tensorboard\"]", "report_to = \"all\""] {
            assert!(parse(on).unwrap().report.report_to.tensorboard(), "{on}");
        }
        let msg = parse("report_to = [\"wandb\"]").unwrap_err().to_string();
        assert!(msg.contains("`report_to`: unknown integration `wandb`; this build writes \"tensorboard\""), "{msg}");
        let msg = parse("report_to = 3").unwrap_err().to_string();
        assert!(msg.contains("`report_to` must be a string or a list of strings"), "{msg}");
        let p = parse("logging_dir = \"tb/sft\"").unwrap();
        assert_eq!(p.report.logging_dir.as_deref(), Some("tb/sft"));
        let t: toml::Table = toml::from_str("report_to = \"none\"\nlogging_dir = \"x\"").unwrap();
        assert_eq!(
            ReportParams::of(&t).unwrap(),
            ReportParams { report_to: ReportTo(vec![]), logging_dir: Some("x".into()) }
        );
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
    use pipeline_train::{
        masked_mean_nll, token_logprobs, train, LmBatch, LossOutput, StepInfo, TokenDataset, TokenExample,
    };

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
            events
                .iter()
                .any(|e| matches!(e, StageEvent::Message(m) if m == "resuming sft from step 3 (checkpoint-3)")),
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
    fn event_files_follow_report_to() {
        let dir = tempfile::tempdir().unwrap();
        let with = |params: &str| {
            let (c, _) = ctx(dir.path(), 0);
            RunCtx::new(RunParts {
                stage_id: "sft".into(),
                params: toml::from_str(params).unwrap(),
                seed: 1,
                recipe_dir: dir.path().to_path_buf(),
                inputs: BTreeMap::new(),
                outputs: BTreeMap::new(),
                scratch: c.scratch_dir().to_path_buf(),
                cancel: Arc::new(AtomicBool::new(false)),
                sink: Arc::new(pipeline_engine::NullSink),
            })
        };
        let events = |_: f64| Vec::new();
        let on = dir.path().join("on");
        assert_eq!(write_tensorboard(&with(""), &on, events).unwrap().as_deref(), Some(TENSORBOARD_DIR));
        let files: Vec<_> =
            std::fs::read_dir(on.join(TENSORBOARD_DIR)).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(files.len() == 1 && files[0].to_string_lossy().starts_with("events.out.tfevents."), "{files:?}");
        let off = dir.path().join("off");
        assert_eq!(write_tensorboard(&with("report_to = \"none\""), &off, events).unwrap(), None);
        assert!(!off.exists());
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
mod adapter_base_tests {
    use std::path::Path;

    /// Regression (issue 14, defect 5): an sft adapter's `base_model_name_or_path` pointed into
    /// the cache by absolute path, so the artifact's digest depended on where the cache lived.
    #[test]
    fn adapter_base_in_the_cache_is_relative() {
        let d = "a".repeat(64);
        let out = Path::new("/nowhere/out");
        assert_eq!(
            super::adapter_base_path(Path::new(&format!("/home/x/p/.pipeline/v1/artifacts/{d}")), out),
            format!("../../{d}")
        );
        assert_eq!(
            super::adapter_base_path(Path::new(&format!("/y/artifacts/{d}/sub")), out),
            format!("../../{d}/sub")
        );
        // The relative form resolves from `<artifact>/adapter/` to the base artifact.
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("artifacts").join(&d);
        let adapter = root.path().join("artifacts").join("b".repeat(64)).join("adapter");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&adapter).unwrap();
        assert!(
            adapter.join(super::adapter_base_path(&base, out)).canonicalize().unwrap() == base.canonicalize().unwrap()
        );
    }

    /// Regression (issue 14, defect 5): a base model outside the cache (a model folder of the
    /// project) was still written by absolute path, so a moved project's adapters pointed at the
    /// old place and a copied project's digests depended on where it lived. It is now written
    /// relative to where the adapter lands once committed, and resolves from there.
    #[test]
    fn adapter_base_outside_the_cache_is_relative_to_the_committed_artifact() {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().join("project");
        let model = project.join("models/Qwen");
        let staged = project.join(".pipeline/v1/tmp/abc.1.2/out/model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&staged).unwrap();
        let rel = super::adapter_base_path(&model, &staged);
        assert_eq!(rel, "../../../../../models/Qwen");
        let committed = project.join(".pipeline/v1/artifacts").join("c".repeat(64)).join("adapter");
        std::fs::create_dir_all(&committed).unwrap();
        assert_eq!(committed.join(&rel).canonicalize().unwrap(), model.canonicalize().unwrap());
        // The same text wherever the project lives: a copied project keeps its digests.
        let copy = root.path().join("elsewhere/deeper/project");
        std::fs::create_dir_all(copy.join("models/Qwen")).unwrap();
        std::fs::create_dir_all(copy.join(".pipeline/v1/tmp/abc.1.2/out/model")).unwrap();
        assert_eq!(
            super::adapter_base_path(&copy.join("models/Qwen"), &copy.join(".pipeline/v1/tmp/abc.1.2/out/model")),
            rel
        );
        // Outside a cache (a plain folder): relative to `<out>/adapter`.
        let plain = root.path().join("plain/sft");
        std::fs::create_dir_all(&plain).unwrap();
        assert_eq!(super::adapter_base_path(&model, &plain), "../../../project/models/Qwen");
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

#[cfg(test)]
mod media_tests {
    use super::*;
    use crate::data::{Message, Sample};

    fn rows() -> Vec<Sample> {
        vec![
            Sample {
                id: "a.jsonl:1".into(),
                messages: vec![Message::new("user", "hi"), Message::new("assistant", "yo")],
                ..Default::default()
            },
            Sample {
                id: "a.jsonl:2".into(),
                messages: vec![
                    Message::new("user", "<image>What is in the picture?"),
                    Message::new("assistant", "A cat."),
                ],
                images: vec!["cat.png".into()],
                ..Default::default()
            },
        ]
    }

    /// Issue: multimodal rows on a text-only model were trained as plain text, `<image>` tags left in.
    #[test]
    fn multimodal_rows_on_a_text_only_model_fail_naming_row_and_model_unless_dropped() {
        let mut r = rows();
        let e = text_only_rows(&mut r, false, Path::new("models/tiny")).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:2") && e.contains("1 image file(s)") && e.contains("models/tiny"), "{e}");
        assert!(e.contains("drop_media = true"), "{e}");
        assert_eq!(r, rows(), "nothing changes on error");
        assert_eq!(text_only_rows(&mut r, true, Path::new("models/tiny")).unwrap(), 1);
        assert!(r[1].images.is_empty());
        assert_eq!(r[1].messages[0].content, "What is in the picture?");
        assert_eq!(r[0], rows()[0]);
        // A tag without a file counts too.
        let mut t = vec![Sample { id: "b:1".into(), text: Some("<video> clip".into()), ..Default::default() }];
        assert!(text_only_rows(&mut t, false, Path::new("m")).unwrap_err().to_string().contains("1 media tag(s)"));
    }
}

#[cfg(test)]
mod write_model_tests {
    use dfdx::prelude::*;
    use pipeline_model::Batch;

    use super::*;

    /// Issue 15, point 12: a model trained from a `.gguf` file failed *after* the training with
    /// "cannot be written back as a folder yet". The folder is now complete: the written model
    /// loads on its own, with the same tokenizer and the same logits.
    #[test]
    fn a_model_loaded_from_a_gguf_file_is_written_as_a_complete_folder() {
        let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/gguf/tiny_qwen2.gguf");
        let dev = Cpu::default();
        let pre = load(&gguf, &dev).unwrap();
        let ids = pre.to_model_ids(&pre.tokenizer.encode("Hello, world! 你好", false).unwrap());
        let batch = Batch::new(ids.clone(), 1, ids.len()).unwrap();
        let want = pre.model.forward(&batch).unwrap().as_vec();
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), pre.model, Some(&gguf), Some(&pre.tokenizer), Some("sys")).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_defaults.json"] {
            assert!(dir.path().join(f).is_file(), "{f} missing");
        }
        let back = load(dir.path(), &dev).unwrap();
        assert_eq!(back.to_model_ids(&back.tokenizer.encode("Hello, world! 你好", false).unwrap()), ids);
        let got = back.model.forward(&batch).unwrap().as_vec();
        let worst = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst <= 1e-5, "{worst}");
        assert_eq!(back.tokenizer.chat_template(), pre.tokenizer.chat_template());
    }
}
