//! # sft
//!
//! ## What it does
//! Supervised fine-tuning (ms-swift's `swift sft`): every conversation of the input dataset is
//! rendered with the model's chat template (the `system` param is the default system prompt of
//! rows that have none), tokenised, and trained with the causal-LM loss on the assistant tokens
//! only. `train_type = "lora"` trains LoRA adapters on a frozen base; `"full"` trains every weight.
//! Checkpoints go to the stage's scratch directory, so an interrupted run resumes exactly.
//!
//! `task_type` (ms-swift's `--task_type`) picks what is trained:
//! - `"causal_lm"` (the default): the above.
//! - `"seq_cls"`: sequence classification, transformers' `Qwen2ForSequenceClassification`. Rows
//!   are `messages` (e.g. one user turn) + an integer `label` (the seed's classification rows; a
//!   `query,label` CSV collects to the same). Each conversation is rendered with the chat
//!   template (no generation prompt); a head `score` `[num_labels, hidden]` without bias reads
//!   the final hidden state of its last token; cross-entropy against the label. `num_labels` is
//!   the largest label + 1 unless the param says more (it must cover every label). The head is
//!   trained in full with LoRA too (peft's `modules_to_save = ["score"]`). The eval split's
//!   accuracy is logged with each evaluation (the `eval_accuracy` metric) and reported.
//! - `"embedding"`: sentence embeddings. Rows are the seed's embedding pairs — `messages` (the
//!   first text) + `rejected_response` (the second) + a float `label` — or a query/response pair
//!   with a float `label`. Each text is tokenised as is and ended with the end-of-text token
//!   (`<|endoftext|>`, as Qwen embedding models encode), pooled (`pooling = "last"`: the last
//!   token's hidden state, the default as in ms-swift / Qwen3-Embedding; `"mean"`: the mean over
//!   the tokens), and trained with ms-swift's `cosine_similarity` loss, `MSE(cos(u, v), label)`.
//!   The report has the Spearman correlation of `cos(u, v)` with the labels on the eval split.
//!
//! A row that does not fit the task (no `label`, a non-integer or out-of-range class, no second
//! text) fails the stage with an error naming the row (`file:line`) and the task.
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
//! With `seq_cls` it is a `Qwen2ForSequenceClassification` folder (`score.weight` beside the
//! decoder's tensors; `config.json` with `architectures`, `num_labels`, `id2label` / `label2id`
//! (`LABEL_0`, ...), `problem_type = "single_label_classification"`, `pad_token_id`), and the
//! adapter holds the head as peft saves `modules_to_save` (`base_model.model.score.weight`,
//! `task_type = "SEQ_CLS"`). With `embedding` it also has sentence-transformers' `modules.json` +
//! `1_Pooling/config.json` (the pooling). The report adds `task_type`, `num_labels` /
//! `eval_accuracy` or `pooling` / `eval_spearman`.
//! `metrics`: `metrics.jsonl` + `loss_curve.png` + TensorBoard event files in `tensorboard/`.
//!
//! ## Parameters
//! | name | default | meaning |
//! |---|---|---|
//! | `task_type` | `"causal_lm"` | `"causal_lm"`, `"seq_cls"` or `"embedding"` (see above) |
//! | `num_labels` | largest label + 1 | `seq_cls` only: the number of classes (at least 2, covering every label) |
//! | `pooling` | `"last"` | `embedding` only: `"last"` or `"mean"` |
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
//!
//! [stages.classify]   # recipes/tiny-seq-cls.toml
//! kind = "sft"
//! inputs = { data = "reviews.data", model = "pretrain.model" }
//! params = { task_type = "seq_cls", train_type = "lora", learning_rate = 5e-3, max_steps = 30 }
//!
//! [stages.embed]      # recipes/tiny-embedding.toml
//! kind = "sft"
//! inputs = { data = "pairs.data", model = "pretrain.model" }
//! params = { task_type = "embedding", pooling = "last", learning_rate = 5e-3, max_steps = 30 }
//! ```

use std::time::Instant;

use dfdx::prelude::Device;
use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError};
use pipeline_model::pretrained::Pretrained;
use pipeline_train::cls::{
    self, ClsDataset, ClsExample, EmbeddingDataset, EmbeddingExample, EmbeddingObjective, HeadModel, Pooling,
    SeqClsObjective,
};
use pipeline_train::lm::CausalLmObjective;
use pipeline_train::{split_indices, Dataset, Subset, TokenDataset, TokenExample, TrainConfig};

use crate::data::{read_dataset, Label, Sample};
use crate::training::{self, stage_error, TunerParams};

pub(crate) struct Sft;

/// `task_type` (ms-swift's `swift sft --task_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TaskType {
    /// Next-token cross-entropy on the assistant tokens.
    CausalLm,
    /// A classification head on the last token (`Qwen2ForSequenceClassification`).
    SeqCls,
    /// Pooled sentence embeddings, cosine-similarity loss.
    Embedding,
}

impl TaskType {
    fn name(self) -> &'static str {
        match self {
            TaskType::CausalLm => "causal_lm",
            TaskType::SeqCls => "seq_cls",
            TaskType::Embedding => "embedding",
        }
    }
}

training::stage_params! {
    /// `sft`'s `[params]`: the task, the tuner keys and the training arguments (see the module docs).
    struct Params {
        task_type: TaskType = TaskType::CausalLm,
        /// seq_cls: the number of classes (default: the largest label + 1).
        num_labels: Option<usize> = None,
        /// embedding: how a text's hidden states become one vector (default `"last"`).
        pooling: Option<Pooling> = None,
    }
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
        let enc = chat.encode_chat(&p.tokenizer, &s.messages, system).map_err(|e| {
            // Regression (issue 15, point 1): the seed's embedding row (one assistant turn,
            // `rejected_response`, a float label) failed here as a template error.
            if s.rejected_response.is_some() && matches!(s.label, Some(Label::Float(_))) {
                row_error(
                    s,
                    TaskType::CausalLm,
                    "it is an embedding pair (`rejected_response` and a float `label`); set task_type = \"embedding\"",
                )
            } else {
                StageError::failed(format!("row {}: {e}", s.id))
            }
        })?;
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
        // 4: a model trained over a bf16 base (CUDA) is written in bf16, as its base was held
        // (issue 11); f32 bases are written as before.
        4
    }
    fn distributed_params(&self, params: &toml::Table, world_size: usize) -> Option<toml::Table> {
        Some(training::distributed_params(params, world_size))
    }
    fn summary(&self) -> &'static str {
        "Supervised fine-tuning (LoRA or full): chat data on the assistant tokens, sequence classification or embeddings"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        ctx.check_inputs(&["data"], &["model", "eval"])?;
        let p = Params::parse(ctx.params)?;
        p.check_task()?;
        let files = training::declared_model_files(ctx, p.tuner.model.as_deref())?;
        Ok(Declared { outputs: vec!["model".into(), "metrics".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        training::on_device!(ctx, |dev| run_on(ctx, &dev))
    }
}

impl Params {
    /// The task's own keys only with their task; `num_labels` at least 2.
    fn check_task(&self) -> Result<(), StageError> {
        let task = self.task_type.name();
        if self.num_labels.is_some() && self.task_type != TaskType::SeqCls {
            return Err(StageError::Params(format!(
                "`num_labels` is a `task_type = \"seq_cls\"` param (this stage has task_type = \"{task}\")"
            )));
        }
        if self.pooling.is_some() && self.task_type != TaskType::Embedding {
            return Err(StageError::Params(format!(
                "`pooling` is a `task_type = \"embedding\"` param (this stage has task_type = \"{task}\")"
            )));
        }
        if let Some(n) = self.num_labels.filter(|&n| n < 2) {
            return Err(StageError::Params(format!("`num_labels = {n}`: a classifier needs at least 2 classes")));
        }
        Ok(())
    }
}

/// What every task of the stage starts from: the loaded model, its system prompt, the rows.
struct Start<D: Device<f32>> {
    params: Params,
    seed: u64,
    src: std::path::PathBuf,
    pre: Pretrained<D>,
    system: Option<String>,
    rows: Vec<Sample>,
    /// The `eval` input's rows, when bound.
    eval_rows: Option<Vec<Sample>>,
    media_dropped: usize,
    pad: u32,
}

fn run_on<D: Device<f32>>(ctx: &RunCtx, dev: &D) -> Result<(), StageError> {
    let t0 = Instant::now();
    let params = Params::parse(ctx.raw_params())?;
    params.check_task()?;
    let seed = params.train.seed_or(ctx.seed());
    let src = training::model_path(ctx, params.tuner.model.as_deref())?;
    let pre = training::load_for_training(&src, dev, &params.train)?;
    let system = params.tuner.system.clone().or_else(|| training::trained_system(&src));
    let mut rows = read_dataset(ctx.input("data")?)?;
    let media_dropped = training::text_only_rows(&mut rows, params.tuner.drop_media, &src)?;
    let eval_rows = match ctx.input_opt("eval") {
        Some(dir) => {
            let mut rows = read_dataset(dir)?;
            training::text_only_rows(&mut rows, params.tuner.drop_media, &src)?;
            Some(rows)
        }
        None => None,
    };
    let pad = pre.to_model_ids(&pre.tokenizer.pad_id().or(pre.tokenizer.eos_id()).into_iter().collect::<Vec<_>>());
    let pad = pad.first().copied().unwrap_or(0);
    let start = Start { params, seed, src, pre, system, rows, eval_rows, media_dropped, pad };
    match start.params.task_type {
        TaskType::CausalLm => run_causal_lm(ctx, dev, start, t0),
        TaskType::SeqCls => run_seq_cls(ctx, dev, start, t0),
        TaskType::Embedding => run_embedding(ctx, dev, start, t0),
    }
}

fn run_causal_lm<D: Device<f32>>(ctx: &RunCtx, dev: &D, start: Start<D>, t0: Instant) -> Result<(), StageError> {
    let Start { params, seed, src, mut pre, system, rows, eval_rows, media_dropped, pad } = start;
    let Params { tuner: p, train: cfg, .. } = params;
    let (examples, skipped, outside) = encode_rows(&pre, &rows, system.as_deref())?;
    if examples.is_empty() {
        // Regression (issue 15, point 1): classification rows were skipped without a word.
        let classes = rows.iter().filter(|s| matches!(s.label, Some(Label::Int(_)))).count();
        if classes > 0 {
            return Err(StageError::failed(format!(
                "task_type = \"causal_lm\": none of the {} rows has an assistant turn to train on, and {classes} carry an \
                 integer `label` (sequence-classification rows); set task_type = \"seq_cls\"",
                rows.len()
            )));
        }
    }
    let data = TokenDataset::new(examples, pad, cfg.max_length).map_err(stage_error)?;
    let eval_data = match &eval_rows {
        Some(rows) => {
            let (e, _, _) = encode_rows(&pre, rows, system.as_deref())?;
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

/// The error for a row that does not fit the stage's task: names the row (`file:line`) and the task.
fn row_error(s: &Sample, task: TaskType, msg: impl std::fmt::Display) -> StageError {
    StageError::failed(format!("row `{}` does not fit task_type = \"{}\": {msg}", s.id, task.name()))
}

/// A label as the row wrote it, for messages (`0.5`, `true`, `"pos"`).
fn label_shown(l: &Label) -> String {
    match l {
        Label::Text(t) => format!("{t:?}"),
        other => other.text(),
    }
}

/// `seq_cls`: a row's class index, an integer `label` ≥ 0.
fn class_label(s: &Sample) -> Result<usize, StageError> {
    let task = TaskType::SeqCls;
    match &s.label {
        Some(Label::Int(i)) => usize::try_from(*i)
            .map_err(|_| row_error(s, task, format!("`label = {i}` is negative; a class index is 0, 1, 2, ..."))),
        Some(other) => Err(row_error(
            s,
            task,
            format!(
                "`label = {}` is a {}; a class index is an integer 0, 1, 2, ...",
                label_shown(other),
                other.type_name()
            ),
        )),
        None => Err(row_error(s, task, "the row has no `label` (an integer class index)")),
    }
}

/// `seq_cls` examples: each row's conversation through the chat template (no generation
/// prompt), its class; and the tokens outside a restricted vocabulary.
fn encode_cls_rows<D: Device<f32>>(
    p: &Pretrained<D>,
    rows: &[Sample],
    system: Option<&str>,
) -> Result<(Vec<ClsExample>, usize), StageError> {
    let chat = training::chat_template(p)?;
    let mut out = Vec::with_capacity(rows.len());
    let mut outside = 0;
    for s in rows {
        let label = class_label(s)?;
        if s.messages.iter().all(|m| m.role == "system") {
            return Err(row_error(s, TaskType::SeqCls, "the row has no `messages` to classify"));
        }
        let enc = chat
            .encode_chat(&p.tokenizer, &s.messages, system)
            .map_err(|e| StageError::failed(format!("row `{}`: {e}", s.id)))?;
        let ids = p.to_model_ids_counted(&enc.ids);
        outside += ids.outside;
        out.push(ClsExample { input_ids: ids.ids, label });
    }
    Ok((out, outside))
}

/// `embedding`: a row's two texts. The seed's form is `messages` (the first text) +
/// `rejected_response` (the second); a query/response row (one user and one assistant turn)
/// pairs its two turns. System turns are not part of either text.
fn pair_texts(s: &Sample) -> Result<(String, String), StageError> {
    let turns: Vec<&str> = s.messages.iter().filter(|m| m.role != "system").map(|m| m.content.as_str()).collect();
    match (&s.rejected_response, turns.as_slice()) {
        (Some(second), [_, ..]) => Ok((turns.join("\n"), second.clone())),
        (None, [a, b]) => Ok((a.to_string(), b.to_string())),
        (Some(_), []) => Err(row_error(s, TaskType::Embedding, "the row has no first text (`messages`)")),
        (None, _) => Err(row_error(
            s,
            TaskType::Embedding,
            format!(
                "the row has no second text: give `rejected_response` beside `messages` (or a query/response pair); \
                 it has {} non-system message(s)",
                turns.len()
            ),
        )),
    }
}

/// `embedding`: a row's similarity target, a number `label`.
fn similarity_label(s: &Sample) -> Result<f32, StageError> {
    let task = TaskType::Embedding;
    match &s.label {
        Some(Label::Float(f)) if f.is_finite() => Ok(*f as f32),
        Some(Label::Int(i)) => Ok(*i as f32),
        Some(other) => Err(row_error(
            s,
            task,
            format!("`label = {}` is a {}; the similarity target is a number", label_shown(other), other.type_name()),
        )),
        None => Err(row_error(s, task, "the row has no `label` (the cosine-similarity target, a float)")),
    }
}

/// `embedding` examples: each text's tokens followed by the end-of-text token (`pad`, Qwen's
/// `<|endoftext|>`, as Qwen embedding models encode a text); the tokens outside a restricted
/// vocabulary.
fn encode_pair_rows<D: Device<f32>>(
    p: &Pretrained<D>,
    rows: &[Sample],
    end: Option<u32>,
) -> Result<(Vec<EmbeddingExample>, usize), StageError> {
    let mut out = Vec::with_capacity(rows.len());
    let mut outside = 0;
    for s in rows {
        let (a, b) = pair_texts(s)?;
        let label = similarity_label(s)?;
        let mut encode = |text: &str| -> Result<Vec<u32>, StageError> {
            let mut ids =
                p.tokenizer.encode(text, false).map_err(|e| StageError::failed(format!("row `{}`: {e}", s.id)))?;
            ids.extend(end);
            let enc = p.to_model_ids_counted(&ids);
            outside += enc.outside;
            Ok(enc.ids)
        };
        let (first, second) = (encode(&a)?, encode(&b)?);
        out.push(EmbeddingExample { first, second, label });
    }
    Ok((out, outside))
}

/// The training set and the evaluation set: the `eval` input when bound, else `split_ratio` of
/// the data held out (as the causal-LM path does).
fn split<'a, T: Dataset>(
    data: &'a T,
    eval: Option<&'a T>,
    ratio: f64,
    seed: u64,
) -> (Subset<'a, T>, Option<Subset<'a, T>>) {
    let n = data.len();
    match eval {
        Some(e) => (
            Subset { inner: data, indices: (0..n).collect() },
            Some(Subset { inner: e, indices: (0..e.len()).collect() }),
        ),
        None => {
            let (tr, ev) = split_indices(n, ratio, seed);
            (Subset { inner: data, indices: tr }, (!ev.is_empty()).then_some(Subset { inner: data, indices: ev }))
        }
    }
}

fn run_seq_cls<D: Device<f32>>(ctx: &RunCtx, dev: &D, start: Start<D>, t0: Instant) -> Result<(), StageError> {
    let Start { params, seed, src, pre, system, rows, eval_rows, media_dropped, pad } = start;
    let (p, cfg) = (&params.tuner, &params.train);
    let (examples, outside) = encode_cls_rows(&pre, &rows, system.as_deref())?;
    let eval_examples = match &eval_rows {
        Some(r) => Some(encode_cls_rows(&pre, r, system.as_deref())?.0),
        None => None,
    };
    // num_labels: the param (which must cover every label) or the largest label + 1.
    let all = rows.iter().zip(&examples).chain(eval_rows.iter().flatten().zip(eval_examples.iter().flatten()));
    let num_labels = match params.num_labels {
        Some(n) => {
            for (s, e) in all {
                if e.label >= n {
                    return Err(row_error(
                        s,
                        TaskType::SeqCls,
                        format!("`label = {}` is outside `num_labels = {n}` (classes 0..={})", e.label, n - 1),
                    ));
                }
            }
            n
        }
        None => {
            let max = all.map(|(_, e)| e.label).max().unwrap_or(0);
            if max == 0 {
                return Err(StageError::failed(
                    "task_type = \"seq_cls\": every row has `label = 0`; a classifier needs at least 2 classes \
                     (set `num_labels` if the data lacks some)",
                ));
            }
            max + 1
        }
    };
    let data = ClsDataset::new(examples, pad, cfg.max_length).map_err(stage_error)?;
    let eval_data = eval_examples.map(|e| ClsDataset::new(e, pad, cfg.max_length)).transpose().map_err(stage_error)?;
    let (train_set, eval_set) = split(&data, eval_data.as_ref(), cfg.split_ratio, seed);
    let eval_ref = eval_set.as_ref().map(|e| e as &dyn Dataset<Batch = _>);

    let mut lm = pre.model;
    if p.train_type == training::TrainType::Lora {
        training::check_lora_rank(p.lora_rank, lm.cfg.hidden_size, lm.cfg.intermediate_size)?;
    }
    lm.set_trainable(p.trainable()?, seed).map_err(|e| StageError::failed(e.to_string()))?;
    training::prepare("sft", cfg, dev, &mut lm)?;
    // A head saved beside the model (an upstream seq_cls stage) with the same classes goes on training.
    let init = if src.is_dir() { cls::read_seq_cls_head(&src).map_err(stage_error)? } else { None };
    let init = init.filter(|t| t.shape == [num_labels, lm.cfg.hidden_size]);
    let mut model = HeadModel::new(lm, num_labels, seed, init.as_ref()).map_err(stage_error)?;
    let outcome =
        training::fit_collection(ctx, "sft", cfg, seed, dev, &mut model, &mut SeqClsObjective, &train_set, eval_ref)?;
    let accuracy = match eval_ref {
        Some(e) => {
            let preds = cls::classify(&model, e, cfg.per_device_eval_batch_size).map_err(stage_error)?;
            Some(preds.iter().filter(|(p, l)| p == l).count() as f64 / preds.len().max(1) as f64)
        }
        None => None,
    };
    let score = model.score_host();
    let lora = model.lm.lora_config().is_some();
    let metrics_dir = ctx.output("metrics")?.to_path_buf();
    let model_dir = ctx.output("model")?.to_path_buf();
    training::write_model(&model_dir, model.lm, Some(&src), Some(&pre.tokenizer), system.as_deref())?;
    let id2label: Vec<String> = (0..num_labels).map(|i| format!("LABEL_{i}")).collect();
    cls::save_seq_cls_head(&model_dir, &score, &id2label, pad).map_err(stage_error)?;
    if lora {
        cls::save_seq_cls_adapter_head(&model_dir.join("adapter"), &score).map_err(stage_error)?;
    }
    ctx.set_report(training::report(
        ctx,
        &outcome,
        &metrics_dir,
        &model_dir,
        serde_json::json!({
            "task_type": "seq_cls", "rows": rows.len(), "num_labels": num_labels, "eval_accuracy": accuracy,
            "tokens_outside_vocab": outside, "media_dropped": media_dropped, "train_type": p.train_type,
            "seconds": t0.elapsed().as_secs_f64(),
        }),
    ));
    Ok(())
}

fn run_embedding<D: Device<f32>>(ctx: &RunCtx, dev: &D, start: Start<D>, t0: Instant) -> Result<(), StageError> {
    let Start { params, seed, src, mut pre, system, rows, eval_rows, media_dropped, pad } = start;
    let (p, cfg) = (&params.tuner, &params.train);
    let pooling = params.pooling.unwrap_or(Pooling::Last);
    let end = pre.tokenizer.pad_id();
    let (examples, outside) = encode_pair_rows(&pre, &rows, end)?;
    let data = EmbeddingDataset::new(examples, pad, cfg.max_length).map_err(stage_error)?;
    let eval_data = match &eval_rows {
        Some(r) => {
            Some(EmbeddingDataset::new(encode_pair_rows(&pre, r, end)?.0, pad, cfg.max_length).map_err(stage_error)?)
        }
        None => None,
    };
    let (train_set, eval_set) = split(&data, eval_data.as_ref(), cfg.split_ratio, seed);
    let eval_ref = eval_set.as_ref().map(|e| e as &dyn Dataset<Batch = _>);
    if p.train_type == training::TrainType::Lora {
        let c = &pre.model.cfg;
        training::check_lora_rank(p.lora_rank, c.hidden_size, c.intermediate_size)?;
    }
    pre.model.set_trainable(p.trainable()?, seed).map_err(|e| StageError::failed(e.to_string()))?;
    let hidden = pre.model.cfg.hidden_size;
    let mut objective = EmbeddingObjective { pooling };
    let (outcome, model) = training::fit(ctx, "sft", cfg, seed, dev, pre.model, &mut objective, &train_set, eval_ref)?;
    let spearman = match eval_ref {
        Some(e) => {
            let sims =
                cls::embedding_similarities(&model, e, pooling, cfg.per_device_eval_batch_size).map_err(stage_error)?;
            cls::spearman(&sims)
        }
        None => None,
    };
    let metrics_dir = ctx.output("metrics")?.to_path_buf();
    let model_dir = ctx.output("model")?.to_path_buf();
    training::write_model(&model_dir, model, Some(&src), Some(&pre.tokenizer), system.as_deref())?;
    write_sentence_transformers_pooling(&model_dir, hidden, pooling)?;
    ctx.set_report(training::report(
        ctx,
        &outcome,
        &metrics_dir,
        &model_dir,
        serde_json::json!({
            "task_type": "embedding", "rows": rows.len(), "pooling": pooling, "eval_spearman": spearman,
            "tokens_outside_vocab": outside, "media_dropped": media_dropped, "train_type": p.train_type,
            "seconds": t0.elapsed().as_secs_f64(),
        }),
    ));
    Ok(())
}

/// sentence-transformers' description of the embedding model (`modules.json` + the pooling
/// module's `1_Pooling/config.json`, as Qwen3-Embedding ships them), so the folder says how its
/// vectors are read off the hidden states.
fn write_sentence_transformers_pooling(
    dir: &std::path::Path,
    hidden: usize,
    pooling: Pooling,
) -> Result<(), StageError> {
    let modules = serde_json::json!([
        { "idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer" },
        { "idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling" },
    ]);
    crate::data::write_json(&dir.join("modules.json"), &modules)?;
    let cfg = serde_json::json!({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": pooling == Pooling::Mean,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": pooling == Pooling::Last,
        "include_prompt": true,
    });
    crate::data::write_json(&dir.join("1_Pooling").join("config.json"), &cfg)
}

/// `task_type = "seq_cls"` / `"embedding"` end to end on the 2-layer Qwen2 GGUF fixture (a
/// 305-token byte-level vocabulary): training, what is written, and the rows that do not fit.
#[cfg(test)]
mod task_tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use pipeline_engine::{plan_source, NullSink, RunParts, Source};

    use super::*;
    use crate::data::{write_dataset, Message};

    fn gguf() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/gguf/tiny_qwen2.gguf")
    }

    struct Ran {
        report: serde_json::Value,
        model: PathBuf,
        metrics: PathBuf,
        _tmp: tempfile::TempDir,
    }

    /// Runs `sft` with `params` (plus `model` = the fixture) on `rows` (and `eval` rows).
    fn run(params: &str, rows: &[Sample], eval: Option<&[Sample]>) -> Result<Ran, StageError> {
        let tmp = tempfile::tempdir().unwrap();
        let mut table: toml::Table = toml::from_str(params).unwrap();
        table.insert("model".into(), gguf().display().to_string().into());
        let mut inputs = BTreeMap::new();
        write_dataset(&tmp.path().join("data"), rows).unwrap();
        inputs.insert("data".to_string(), vec![tmp.path().join("data")]);
        if let Some(e) = eval {
            write_dataset(&tmp.path().join("eval"), e).unwrap();
            inputs.insert("eval".to_string(), vec![tmp.path().join("eval")]);
        }
        let outputs: BTreeMap<String, PathBuf> =
            ["model", "metrics"].iter().map(|o| (o.to_string(), tmp.path().join(o))).collect();
        let ctx = RunCtx::new(RunParts {
            stage_id: "sft".into(),
            params: table,
            seed: 3,
            recipe_dir: tmp.path().to_path_buf(),
            inputs,
            outputs: outputs.clone(),
            scratch: tmp.path().join("scratch"),
            sink: Arc::new(NullSink),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        Sft.run(&ctx)?;
        let report = ctx.take_report().expect("a report");
        Ok(Ran { report, model: outputs["model"].clone(), metrics: outputs["metrics"].clone(), _tmp: tmp })
    }

    fn losses(metrics: &Path) -> Vec<f64> {
        std::fs::read_to_string(metrics.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
            .collect()
    }

    fn json(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// The seed's classification rows: one user turn, an integer label (1 = positive).
    fn review(i: usize) -> Sample {
        const POS: [&str; 4] = ["great", "wonderful", "lovely", "excellent"];
        const NEG: [&str; 4] = ["terrible", "boring", "awful", "dreadful"];
        const THING: [&str; 6] = ["film", "book", "meal", "song", "game", "show"];
        let label = i % 2;
        let adj = if label == 1 { POS[i / 2 % 4] } else { NEG[i / 2 % 4] };
        Sample {
            id: format!("cls.jsonl:{}", i + 1),
            messages: vec![Message::new("user", format!("The {} was {adj}.", THING[i / 3 % 6]))],
            label: Some(Label::Int(label as i64)),
            ..Default::default()
        }
    }

    /// The seed's embedding rows: `messages` (one turn), `rejected_response`, a float label.
    fn pair(i: usize) -> Sample {
        const PETS: [&str; 4] = [
            "The dog runs in the park.",
            "A cat sleeps on the sofa.",
            "The puppy chases a ball.",
            "My kitten drinks milk.",
        ];
        const MONEY: [&str; 4] = [
            "Stock prices fell sharply.",
            "The bank raised its rates.",
            "Markets rallied on Friday.",
            "Bond yields went up.",
        ];
        let (a, b) = (i % 2, (i / 2) % 2);
        let text = |topic: usize, k: usize| if topic == 0 { PETS[k % 4] } else { MONEY[k % 4] };
        Sample {
            id: format!("pairs.jsonl:{}", i + 1),
            messages: vec![Message::new("assistant", text(a, i / 4))],
            rejected_response: Some(text(b, i / 4 + 1 + i % 3).into()),
            label: Some(Label::Float(if a == b { 0.9 } else { 0.1 })),
            ..Default::default()
        }
    }

    const FAST: &str = "learning_rate = 5e-3\nper_device_train_batch_size = 8\nwarmup_ratio = 0.0\nlogging_steps = 1\n\
                        lr_scheduler_type = \"constant\"\nreport_to = \"none\"\n";

    #[test]
    fn seq_cls_trains_a_head_and_writes_a_sequence_classification_folder_with_its_adapter() {
        let rows: Vec<Sample> = (0..48).map(review).collect();
        let eval: Vec<Sample> = (48..64).map(review).collect();
        let ran = run(&format!("task_type = \"seq_cls\"\nmax_steps = 30\n{FAST}"), &rows, Some(&eval)).unwrap();
        let l = losses(&ran.metrics);
        assert!(l[l.len() - 3..].iter().sum::<f64>() < l[..3].iter().sum::<f64>() * 0.5, "{l:?}");
        let acc = ran.report["eval_accuracy"].as_f64().unwrap();
        assert!(acc >= 0.8, "eval accuracy {acc} (chance 0.5): {}", ran.report);
        assert_eq!(ran.report["num_labels"], 2);
        assert!(ran.report["final_eval_loss"].as_f64().is_some(), "{}", ran.report);

        let cfg = json(&ran.model.join("config.json"));
        assert_eq!(cfg["architectures"], serde_json::json!(["Qwen2ForSequenceClassification"]));
        assert_eq!(cfg["num_labels"], 2);
        assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"}));
        assert_eq!(cfg["label2id"], serde_json::json!({"LABEL_0": 0, "LABEL_1": 1}));
        assert_eq!(cfg["problem_type"], "single_label_classification");
        assert!(cfg["pad_token_id"].is_u64(), "{cfg}");
        let head = cls::read_seq_cls_head(&ran.model).unwrap().expect("score.weight");
        assert_eq!(head.shape, vec![2, 64]);
        // The adapter folder as peft writes one with modules_to_save = ["score"].
        let ad = json(&ran.model.join("adapter/adapter_config.json"));
        assert_eq!(ad["modules_to_save"], serde_json::json!(["score"]));
        assert_eq!(ad["task_type"], "SEQ_CLS");
        let tensors =
            pipeline_model::checkpoint::read_safetensors(&ran.model.join("adapter/adapter_model.safetensors")).unwrap();
        assert_eq!(tensors[cls::PEFT_SEQ_CLS_HEAD], head);

        // The folder loads back (the decoder ignores `score.weight`) and classifies as trained.
        let dev = dfdx::prelude::Cpu::default();
        let back = training::load(&ran.model, &dev).unwrap();
        let model = HeadModel::new(back.model, 2, 0, Some(&head)).unwrap();
        let (examples, _) = encode_cls_rows(&back_pretrained_view(&ran.model), &eval, None).unwrap();
        let data = ClsDataset::new(examples, 0, 512).unwrap();
        let preds = cls::classify(&model, &data, 4).unwrap();
        let acc_back = preds.iter().filter(|(p, l)| p == l).count() as f64 / preds.len() as f64;
        assert!((acc_back - acc).abs() < 1e-9, "{acc_back} vs {acc}");
    }

    /// The written folder's tokenizer and chat template (the model itself is loaded separately).
    fn back_pretrained_view(dir: &Path) -> Pretrained<dfdx::prelude::Cpu> {
        training::load(dir, &dfdx::prelude::Cpu::default()).unwrap()
    }

    #[test]
    fn embedding_trains_on_cosine_similarity_and_reports_spearman() {
        let rows: Vec<Sample> = (0..48).map(pair).collect();
        let ran = run(&format!("task_type = \"embedding\"\nmax_steps = 30\nsplit_ratio = 0.25\n{FAST}"), &rows, None)
            .unwrap();
        let l = losses(&ran.metrics);
        assert!(l[l.len() - 3..].iter().sum::<f64>() < l[..3].iter().sum::<f64>() * 0.5, "{l:?}");
        let rho = ran.report["eval_spearman"].as_f64().unwrap();
        assert!(rho > 0.5, "eval Spearman {rho}: {}", ran.report);
        assert_eq!(ran.report["pooling"], "last");
        let pool = json(&ran.model.join("1_Pooling/config.json"));
        assert_eq!(pool["pooling_mode_lasttoken"], true);
        assert_eq!(pool["word_embedding_dimension"], 64);
        assert!(ran.model.join("config.json").is_file() && ran.model.join("modules.json").is_file());
    }

    #[test]
    fn a_row_that_does_not_fit_the_task_names_file_line_and_task() {
        let err = |params: &str, rows: Vec<Sample>| match run(params, &rows, None) {
            Ok(_) => panic!("{params} trained"),
            Err(e) => e.to_string(),
        };
        let mut rows: Vec<Sample> = (0..6).map(review).collect();
        rows[2].label = None;
        let e = err("task_type = \"seq_cls\"", rows);
        assert!(e.contains("row `cls.jsonl:3` does not fit task_type = \"seq_cls\": the row has no `label`"), "{e}");

        let mut rows: Vec<Sample> = (0..6).map(review).collect();
        rows[4].label = Some(Label::Float(0.5));
        let e = err("task_type = \"seq_cls\"", rows);
        assert!(e.contains("row `cls.jsonl:5` does not fit task_type = \"seq_cls\": `label = 0.5` is a float"), "{e}");

        let mut rows: Vec<Sample> = (0..6).map(review).collect();
        rows[1].label = Some(Label::Int(3));
        let e = err("task_type = \"seq_cls\"\nnum_labels = 2", rows);
        assert!(
            e.contains(
                "row `cls.jsonl:2` does not fit task_type = \"seq_cls\": `label = 3` is outside `num_labels = 2`"
            ),
            "{e}"
        );

        let mut rows: Vec<Sample> = (0..6).map(pair).collect();
        rows[3].rejected_response = None;
        let e = err("task_type = \"embedding\"", rows);
        assert!(
            e.contains("row `pairs.jsonl:4` does not fit task_type = \"embedding\": the row has no second text"),
            "{e}"
        );

        let mut rows: Vec<Sample> = (0..6).map(pair).collect();
        rows[0].label = None;
        let e = err("task_type = \"embedding\"", rows);
        assert!(
            e.contains("row `pairs.jsonl:1` does not fit task_type = \"embedding\": the row has no `label`"),
            "{e}"
        );

        // Regression (issue 15, point 1): classification rows (no assistant turn) were skipped
        // without a word under the default task.
        let e = err("", (0..4).map(review).collect());
        assert!(e.contains("task_type = \"seq_cls\""), "causal_lm on rows with a class label: {e}");
    }

    /// Writes what `scripts/check_seq_cls.sh` hands to transformers + peft: a trained seq_cls
    /// folder (LoRA), the untrained base as an HF folder, and our logits on the eval rows.
    #[test]
    #[ignore = "run by scripts/check_seq_cls.sh (needs transformers + peft)"]
    fn seq_cls_folder_for_transformers() {
        let Ok(out) = std::env::var("PIPELINE_SEQ_CLS_CHECK_DIR") else { return };
        let out = PathBuf::from(out);
        let rows: Vec<Sample> = (0..32).map(review).collect();
        let eval: Vec<Sample> = (32..40).map(review).collect();
        let ran = run(&format!("task_type = \"seq_cls\"\nmax_steps = 10\n{FAST}"), &rows, None).unwrap();
        let dev = dfdx::prelude::Cpu::default();
        training::load(&gguf(), &dev).unwrap().model.save_pretrained(&out.join("base")).unwrap();
        let copy = |from: &Path, to: &Path| {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                if e.path().is_file() {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        };
        copy(&ran.model, &out.join("cls"));
        copy(&ran.model.join("adapter"), &out.join("cls/adapter"));
        let back = training::load(&ran.model, &dev).unwrap();
        let head = cls::read_seq_cls_head(&ran.model).unwrap().unwrap();
        let (examples, _) = encode_cls_rows(&back, &eval, None).unwrap();
        let pad = json(&ran.model.join("config.json"))["pad_token_id"].as_u64().unwrap() as u32;
        let model = HeadModel::new(back.model, 2, 0, Some(&head)).unwrap();
        let ids: Vec<&[u32]> = examples.iter().map(|e| e.input_ids.as_slice()).collect();
        let logits = model.logits(&cls::PaddedRows::new(&ids, pad), dfdx::prelude::NoneTape, None).unwrap().as_vec();
        let golden = serde_json::json!({ "rows": examples.iter().map(|e| &e.input_ids).collect::<Vec<_>>(), "pad": pad, "logits": logits });
        std::fs::write(out.join("golden.json"), golden.to_string()).unwrap();
    }

    fn plan_error(params: &str) -> String {
        let text = format!(
            "[pipeline]\nname = \"t\"\n\n[stages.s]\nkind = \"sft\"\ninputs.data = \"s.data\"\nparams.model = \"m\"\n{params}\n"
        );
        match plan_source(&Source { path: PathBuf::from("r.toml"), text }, &crate::registry()) {
            Ok(_) => panic!("`{params}` planned"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn task_params_are_checked_at_plan_time() {
        let e = plan_error("params.task_type = \"classification\"");
        assert!(e.contains("unknown variant `classification`"), "{e}");
        assert!(e.contains("causal_lm, seq_cls, embedding"), "the allowed values: {e}");
        assert!(e.contains("r.toml:8"), "{e}");
        let e = plan_error("params.num_labels = 3");
        assert!(e.contains("`num_labels` is a `task_type = \"seq_cls\"` param"), "{e}");
        let e = plan_error("params.task_type = \"seq_cls\"\nparams.num_labels = 1");
        assert!(e.contains("`num_labels = 1`: a classifier needs at least 2 classes"), "{e}");
        let e = plan_error("params.task_type = \"seq_cls\"\nparams.pooling = \"mean\"");
        assert!(e.contains("`pooling` is a `task_type = \"embedding\"` param"), "{e}");
        let e = plan_error("params.task_type = \"embedding\"\nparams.pooling = \"max\"");
        assert!(e.contains("unknown variant `max`") && e.contains("last") && e.contains("mean"), "{e}");
    }
}
