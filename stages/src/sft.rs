//! # sft
//!
//! ## What it does
//! Supervised fine-tuning (ms-swift's `swift sft`): every conversation of the input dataset is
//! rendered with the model's chat template (the `system` param is the default system prompt of
//! rows that have none), tokenised, and trained with the causal-LM loss on the assistant tokens
//! only. `train_type = "lora"` trains LoRA adapters on a frozen base; `"full"` trains every weight.
//! Checkpoints go to the stage's scratch directory, so an interrupted run resumes exactly.
//!
//! ## Inputs
//! `data` (required): a canonical dataset (`data.parquet`); rows without an assistant message are
//! skipped and counted. `model` (optional): a model folder from an upstream stage (`pretrain`,
//! `sft`), used when the `model` param is absent. `eval` (optional): a held-out dataset (else
//! `split_ratio` of `data` is held out).
//!
//! ## Outputs
//! `model`: a complete HF folder (see `training.rs`: merged weights, tokenizer, `vocab_map.json`
//! for the tiny preset, `chat_defaults.json`, and the peft adapter under `adapter/` for LoRA).
//! `metrics`: `metrics.jsonl` + `loss_curve.png` + TensorBoard event files in `tensorboard/`.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `model` | input `model` | HF folder or `.gguf` path (`${VAR}` expanded) |
//! | `train_type` / `tuner_type` | `"lora"` | `"lora"` or `"full"` |
//! | `lora_rank`, `lora_alpha` | 8, 32 | LoRA shape and scale `alpha/rank` |
//! | `lora_dropout` | 0 | peft's dropout on the LoRA branch's input during training, in [0, 1) (ms-swift's default is 0.05); masks are drawn from the step's seed, so a resumed run draws the same ones |
//! | `target_modules` | `["all-linear"]` | or e.g. `["q_proj", "v_proj"]` |
//! | `system` | unset | default system prompt |
//! | `drop_media` | false | rows with images / audio / video (files or `<image>` tags) fail on a text-only model unless this strips them (counted as `media_dropped`) |
//! | `report_to`, `logging_dir` | `["tensorboard"]`, see `training.rs` | TensorBoard event files (`"none"`: off) and where `pipeline run` puts the run's copy |
//! | every `TrainConfig` key | see pipeline-train | `learning_rate`, `num_train_epochs`, `gradient_accumulation_steps`, `max_length`, ... |
//!
//! ## Cache key
//! Params, the recipe seed, the `data` / `model` / `eval` artifacts, and the content of the
//! `model` path when given as a param.
//!
//! ## Example
//! ```toml
//! [stages.sft]
//! kind = "sft"
//! inputs = { data = "clean.data", model = "pretrain.model" }
//! params = { train_type = "lora", lora_rank = 8, lora_alpha = 32, target_modules = ["all-linear"], system = "You are a helpful assistant.", learning_rate = 1e-4, num_train_epochs = 1, gradient_accumulation_steps = 16 }
//! ```

use std::time::Instant;

use dfdx::prelude::Device;
use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use pipeline_model::pretrained::Pretrained;
use pipeline_train::lm::CausalLmObjective;
use pipeline_train::{split_indices, Subset, TokenDataset, TokenExample, TrainConfig};

use crate::data::{read_dataset, Sample};
use crate::training::{self, stage_error, TunerParams};

pub(crate) struct Sft;

training::stage_params! {
    /// `sft`'s `[params]`: the tuner keys and the training arguments (see the module docs).
    struct Params {}
    groups {
        tuner: TunerParams = training::with_tuner_args,
        train: TrainConfig = pipeline_train::with_train_args,
        report: training::ReportParams = training::with_report_args,
    }
}

/// Token examples (model ids, assistant-token labels) of the rows that have an assistant turn;
/// returns them, the number of rows skipped and the tokenizer tokens outside the model's
/// restricted vocabulary (re-encoded as byte-level tokens; 0 without one).
pub(crate) fn encode_rows<D: Device<f32>>(
    p: &Pretrained<D>,
    rows: &[Sample],
    system: Option<&str>,
) -> Result<(Vec<TokenExample>, usize, usize), StageError> {
    let chat = training::chat_template(p)?;
    let mut out = Vec::with_capacity(rows.len());
    let (mut skipped, mut outside) = (0, 0);
    for s in rows {
        if !s.messages.iter().any(|m| m.role == "assistant") {
            skipped += 1;
            continue;
        }
        let enc = chat
            .encode_chat(&p.tokenizer, &s.messages, system)
            .map_err(|e| StageError::failed(format!("row {}: {e}", s.id)))?;
        let ids = p.to_model_ids_counted(&enc.ids);
        outside += ids.outside;
        let labels = if ids.outside == 0 { enc.assistant_mask } else { remap_mask(p, &enc.ids, &enc.assistant_mask) };
        out.push(TokenExample { input_ids: ids.ids, labels });
    }
    Ok((out, skipped, outside))
}

/// The assistant mask of tokenizer ids `ids` stretched over their model ids: a token re-encoded
/// as several byte-level tokens gives each of them its mask value.
fn remap_mask<D: Device<f32>>(p: &Pretrained<D>, ids: &[u32], mask: &[bool]) -> Vec<bool> {
    ids.iter().zip(mask).flat_map(|(&t, &m)| std::iter::repeat_n(m, p.to_model_ids(&[t]).len())).collect()
}

impl Stage for Sft {
    fn kind(&self) -> &'static str {
        "sft"
    }
    fn version(&self) -> u32 {
        // 2: tokens outside a restricted vocabulary train as byte-level tokens, not as unknown;
        // TensorBoard event files in `metrics/tensorboard/` (`report_to`);
        // the adapter's `base_model_name_or_path` is relative to the cache (issue 14, defect 5).
        // 3: gradient accumulation sums every micro-batch's gradient (it kept only the last one's:
        // issue 17); data-parallel training.
        3
    }
    fn distributed_params(&self, params: &toml::Table, world_size: usize) -> Option<toml::Table> {
        Some(training::distributed_params(params, world_size))
    }
    fn summary(&self) -> &'static str {
        "Supervised fine-tuning (LoRA or full) on chat data, assistant tokens only"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &["model", "eval"])?;
        let p = Params::parse(ctx.params)?;
        let files = training::declared_model_files(ctx, p.tuner.model.as_deref())?;
        Ok(Declared { outputs: vec!["model".into(), "metrics".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        training::on_device!(ctx, |dev| run_on(ctx, &dev))
    }
}

fn run_on<D: Device<f32>>(ctx: &RunCtx, dev: &D) -> Result<(), StageError> {
    let t0 = Instant::now();
    let Params { tuner: p, train: cfg, report: _ } = Params::parse(ctx.raw_params())?;
    let seed = cfg.seed_or(ctx.seed());
    let src = training::model_path(ctx, p.model.as_deref())?;
    let mut pre = training::load(&src, dev)?;
    let system = p.system.clone().or_else(|| training::trained_system(&src));
    let mut rows = read_dataset(ctx.input("data")?)?;
    let media_dropped = training::text_only_rows(&mut rows, p.drop_media, &src)?;
    let (examples, skipped, outside) = encode_rows(&pre, &rows, system.as_deref())?;
    let pad = pre.to_model_ids(&pre.tokenizer.pad_id().or(pre.tokenizer.eos_id()).into_iter().collect::<Vec<_>>());
    let pad = pad.first().copied().unwrap_or(0);
    let data = TokenDataset::new(examples, pad, cfg.max_length).map_err(stage_error)?;
    let eval_data = match ctx.input_opt("eval") {
        Some(dir) => {
            let mut rows = read_dataset(dir)?;
            training::text_only_rows(&mut rows, p.drop_media, &src)?;
            let (e, _, _) = encode_rows(&pre, &rows, system.as_deref())?;
            Some(TokenDataset::new(e, pad, cfg.max_length).map_err(stage_error)?)
        }
        None => None,
    };
    let (tr_idx, ev_idx) = if eval_data.is_some() {
        ((0..data.examples.len()).collect(), Vec::new())
    } else {
        split_indices(data.examples.len(), cfg.split_ratio, seed)
    };
    let train_set = Subset { inner: &data, indices: tr_idx };
    let held = Subset { inner: &data, indices: ev_idx };
    let eval_ref: Option<&dyn pipeline_train::Dataset<Batch = _>> = match &eval_data {
        Some(e) => Some(e),
        None if !held.indices.is_empty() => Some(&held),
        None => None,
    };
    if p.train_type == training::TrainType::Lora {
        let c = &pre.model.cfg;
        training::check_lora_rank(p.lora_rank, c.hidden_size, c.intermediate_size)?;
    }
    pre.model.set_trainable(p.trainable()?, seed).map_err(|e| StageError::failed(e.to_string()))?;
    let metrics_dir = ctx.output("metrics")?.to_path_buf();
    let model_dir = ctx.output("model")?.to_path_buf();
    let (outcome, model) =
        training::fit(ctx, "sft", &cfg, seed, dev, pre.model, &mut CausalLmObjective, &train_set, eval_ref)?;
    training::write_model(&model_dir, model, Some(&src), Some(&pre.tokenizer), system.as_deref())?;
    ctx.set_report(training::report(
            ctx,
            &outcome,
            &metrics_dir,
            &model_dir,
            serde_json::json!({ "rows": rows.len(), "skipped_rows": skipped, "tokens_outside_vocab": outside, "media_dropped": media_dropped, "train_type": p.train_type, "seconds": t0.elapsed().as_secs_f64() }),
        ));
    Ok(())
}
