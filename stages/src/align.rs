//! # align
//!
//! ## What it does
//! Preference alignment (ms-swift's `swift rlhf`): `rlhf_type = "dpo"` (sigmoid DPO, optional
//! label smoothing and RPO's NLL term) on rows with a `rejected_response`, or `"kto"` on rows with a
//! boolean `label` (desirable / undesirable). The prompt is the conversation up to its last
//! assistant turn, rendered with the chat template (`system` as the default system prompt); the
//! completions are the tokens of that assistant turn (chosen, and the rejected response for DPO).
//! Reference log-probabilities are computed once before training: with LoRA the reference is the
//! model with its adapters disabled, with full fine-tuning the initial weights.
//!
//! ## Inputs
//! `data` (required): a canonical dataset. `model` (optional): a model folder from an upstream
//! stage, used when the `model` param is absent.
//!
//! ## Outputs
//! `model` (the same folder layout as `sft`), `metrics` (`metrics.jsonl` with `rewards/*`,
//! `loss_curve.png`, TensorBoard event files in `tensorboard/` with `train/rewards/*`).
//!
//! ## Parameters
//! The `sft` model/tuner keys (`model`, `train_type`, `lora_rank`, `lora_alpha`, `lora_dropout`,
//! `target_modules`, `system`), `report_to` / `logging_dir` (as `sft`), every `TrainConfig` key, and the keys below. Like TRL
//! (`disable_dropout = True`), the DPO/KTO forwards run without dropout; `lora_dropout` is only
//! recorded in the adapter's config.
//! | name | default | meaning |
//! |---|---|---|
//! | `rlhf_type` | `"dpo"` | `"dpo"` or `"kto"` |
//! | `beta` | 0.1 | KL strength |
//! | `label_smoothing` | 0 | DPO: conservative DPO's ε |
//! | `rpo_alpha` | unset | DPO: weight of the chosen NLL term |
//! | `desirable_weight`, `undesirable_weight` | 1, 1 | KTO: λ_D, λ_U |
//!
//! ## Cache key
//! Params, the recipe seed, the input artifacts and the content of a `model` path param.
//!
//! ## Example
//! ```toml
//! [stages.align]
//! kind = "align"
//! inputs = { data = "prefs.data", model = "sft.model" }
//! params = { rlhf_type = "dpo", beta = 0.1, train_type = "lora", lora_rank = 8, lora_alpha = 32, learning_rate = 5e-5 }
//! ```

use std::time::Instant;

use dfdx::prelude::Device;
use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use pipeline_model::pretrained::Pretrained;
use pipeline_train::lm::{
    precompute_dpo_reference, precompute_kto_reference, DpoObjective, KtoDataset, KtoObjective, PairDataset,
    PairExample,
};
use pipeline_train::{DpoConfig, KtoConfig, TrainConfig, TrainOutcome};

use crate::data::{read_dataset, Message, Sample};
use crate::training::{self, stage_error, TunerParams};

pub(crate) struct Align;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum RlhfType {
    Dpo,
    Kto,
}

training::stage_params! {
    /// `align`'s `[params]`: its own keys, the tuner keys and the training arguments (see the
    /// module docs).
    struct Params {
        rlhf_type: RlhfType = RlhfType::Dpo,
        /// KL strength.
        beta: f64 = 0.1,
        /// DPO: conservative DPO's ε, in [0, 0.5).
        label_smoothing: f64 = 0.0,
        /// DPO: weight of the chosen NLL term (RPO).
        rpo_alpha: Option<f64> = None,
        /// KTO: λ_D.
        desirable_weight: f64 = 1.0,
        /// KTO: λ_U.
        undesirable_weight: f64 = 1.0,
    }
    groups {
        tuner: TunerParams = training::with_tuner_args,
        train: TrainConfig = pipeline_train::with_train_args,
        report: training::ReportParams = training::with_report_args,
    }
}

/// The stage's params, parsed and checked.
fn parse(params: &toml::Table) -> Result<Params, StageError> {
    let p = Params::parse(params)?;
    if p.beta <= 0.0 || !p.beta.is_finite() {
        return Err(StageError::Params("`beta` must be > 0".into()));
    }
    if !(0.0..0.5).contains(&p.label_smoothing) {
        return Err(StageError::Params("`label_smoothing` must be in [0, 0.5)".into()));
    }
    Ok(p)
}

/// Prompt ids and completion ids, in model ids.
type PromptCompletion = (Vec<u32>, Vec<u32>);

/// (prompt ids, completion ids) in model ids: the conversation up to its last assistant turn, and
/// the assistant tokens of that turn with `content` as its text.
fn prompt_completion<D: Device<f32>>(
    pre: &Pretrained<D>,
    s: &Sample,
    content: &str,
    system: Option<&str>,
) -> Result<Option<PromptCompletion>, StageError> {
    let chat = training::chat_template(pre)?;
    let Some(last) = s.messages.iter().rposition(|m| m.role == "assistant") else { return Ok(None) };
    let mut msgs: Vec<Message> = s.messages[..last].to_vec();
    let err = |e: pipeline_model::chat::ChatError| StageError::failed(format!("row {}: {e}", s.id));
    let prompt = chat.encode_prompt(&pre.tokenizer, &msgs, system).map_err(err)?;
    msgs.push(Message::new("assistant", content));
    let full = chat.encode_chat(&pre.tokenizer, &msgs, system).map_err(err)?;
    if !full.ids.starts_with(&prompt) {
        return Err(StageError::failed(format!(
            "row {}: the prompt's tokens are not a prefix of the conversation",
            s.id
        )));
    }
    let end = full.assistant_mask.iter().rposition(|&m| m).map_or(full.ids.len(), |i| i + 1).max(prompt.len());
    let completion = full.ids[prompt.len()..end].to_vec();
    if completion.is_empty() {
        return Ok(None);
    }
    Ok(Some((pre.to_model_ids(&prompt), pre.to_model_ids(&completion))))
}

impl Stage for Align {
    fn kind(&self) -> &'static str {
        "align"
    }
    fn version(&self) -> u32 {
        // 2: TensorBoard event files in `metrics/tensorboard/` (`report_to`);
        // the adapter's `base_model_name_or_path` is relative to the cache (issue 14, defect 5).
        // 3: gradient accumulation sums every micro-batch's gradient (it kept only the last one's:
        // issue 17); data-parallel training.
        // 4: a model trained over a bf16 base (CUDA) is written in bf16, as its base was held
        // (issue 11); f32 bases are written as before.
        4
    }
    fn distributed_params(&self, params: &toml::Table, world_size: usize) -> Option<toml::Table> {
        Some(training::distributed_params(params, world_size))
    }
    fn summary(&self) -> &'static str {
        "Preference alignment: DPO on chosen/rejected pairs or KTO on labelled completions"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &["model"])?;
        let p = parse(ctx.params)?;
        let files = training::declared_model_files(ctx, p.tuner.model.as_deref())?;
        Ok(Declared { outputs: vec!["model".into(), "metrics".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        training::on_device!(ctx, |dev| run_on(ctx, &dev))
    }
}

fn run_on<D: Device<f32>>(ctx: &RunCtx, dev: &D) -> Result<(), StageError> {
    let t0 = Instant::now();
    let p = parse(ctx.raw_params())?;
    let (cfg, t) = (&p.train, &p.tuner);
    let seed = cfg.seed_or(ctx.seed());
    let src = training::model_path(ctx, t.model.as_deref())?;
    let mut pre = training::load_for_training(&src, dev, cfg)?;
    let system = t.system.clone().or_else(|| training::trained_system(&src));
    let mut rows = read_dataset(ctx.input("data")?)?;
    let media_dropped = training::text_only_rows(&mut rows, t.drop_media, &src)?;
    let pad = pre.to_model_ids(&pre.tokenizer.pad_id().or(pre.tokenizer.eos_id()).into_iter().collect::<Vec<_>>());
    let pad = pad.first().copied().unwrap_or(0);
    if t.train_type == training::TrainType::Lora {
        let c = &pre.model.cfg;
        training::check_lora_rank(t.lora_rank, c.hidden_size, c.intermediate_size)?;
    }
    pre.model.set_trainable(t.trainable()?, seed).map_err(StageError::failed)?;
    let metrics_dir = ctx.output("metrics")?.to_path_buf();
    let model_dir = ctx.output("model")?.to_path_buf();
    let used: usize;
    let label = format!("align ({:?})", p.rlhf_type).to_lowercase();
    let (outcome, model): (TrainOutcome, _) = match p.rlhf_type {
        RlhfType::Dpo => {
            let mut examples = Vec::new();
            for s in &rows {
                let (Some(rej), Some(chosen)) =
                    (&s.rejected_response, s.messages.iter().rev().find(|m| m.role == "assistant"))
                else {
                    continue;
                };
                let c = prompt_completion(&pre, s, &chosen.content, system.as_deref())?;
                let r = prompt_completion(&pre, s, rej, system.as_deref())?;
                if let (Some((prompt, chosen)), Some((_, rejected))) = (c, r) {
                    examples.push(PairExample { prompt, chosen, rejected, reference: None });
                }
            }
            used = examples.len();
            if examples.is_empty() {
                return Err(StageError::failed(
                    "input `data` has no preference pair (rows with an assistant turn and a `rejected_response`)",
                ));
            }
            let mut data = PairDataset { examples, pad_id: pad, max_length: cfg.max_length };
            precompute_dpo_reference(&mut pre.model, &mut data, cfg.per_device_eval_batch_size.max(4))
                .map_err(stage_error)?;
            let mut obj = DpoObjective {
                cfg: DpoConfig { beta: p.beta, label_smoothing: p.label_smoothing, rpo_alpha: p.rpo_alpha },
            };
            training::fit(ctx, &label, cfg, seed, dev, pre.model, &mut obj, &data, None)?
        }
        RlhfType::Kto => {
            let mut kto_rows = Vec::new();
            for s in &rows {
                let (Some(ok), Some(a)) = (
                    s.label.as_ref().and_then(|l| l.as_bool()),
                    s.messages.iter().rev().find(|m| m.role == "assistant"),
                ) else {
                    continue;
                };
                if let Some((prompt, completion)) = prompt_completion(&pre, s, &a.content, system.as_deref())? {
                    kto_rows.push((prompt, completion, ok));
                }
            }
            used = kto_rows.len();
            if kto_rows.len() < 2 {
                return Err(StageError::failed(
                    "KTO needs at least 2 rows with an assistant turn and a boolean `label`",
                ));
            }
            let mut data = KtoDataset::new(kto_rows, pad, cfg.max_length);
            precompute_kto_reference(&mut pre.model, &mut data, cfg.per_device_eval_batch_size.max(4))
                .map_err(stage_error)?;
            let mut obj = KtoObjective {
                cfg: KtoConfig {
                    beta: p.beta,
                    desirable_weight: p.desirable_weight,
                    undesirable_weight: p.undesirable_weight,
                },
            };
            training::fit(ctx, &label, cfg, seed, dev, pre.model, &mut obj, &data, None)?
        }
    };
    training::write_model(&model_dir, model, Some(&src), Some(&pre.tokenizer), system.as_deref())?;
    ctx.set_report(training::report(
            ctx,
            &outcome,
            &metrics_dir,
            &model_dir,
            serde_json::json!({ "rlhf_type": p.rlhf_type, "rows": rows.len(), "used_rows": used, "media_dropped": media_dropped, "seconds": t0.elapsed().as_secs_f64() }),
        ));
    Ok(())
}
