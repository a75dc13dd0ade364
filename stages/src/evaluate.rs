//! `evaluate`: score a model on a general_mcq or general_qa folder the way evalscope's "Native"
//! backend does (SPECS.md §3), or its perplexity on held-out text the way llama.cpp's
//! `perplexity` tool does.
//!
//! ## What it does
//! Loads the dataset folder, asks the model (through a [`Predictor`]) in batches, and scores:
//! `general_mcq` → `AverageAccuracy` per subset (answers by generation + evalscope's answer
//! extraction, or by log-likelihood of the option letters); `general_qa` → `bleu-1..4` and
//! `rouge-{1,2,l}-{r,p,f}` per subset, equal to evalscope's numbers; `text` (scorer
//! `perplexity`) → `perplexity` per `{subset}.txt`: windows of `n_ctx` tokens, the second half of
//! each scored with the first half as context, `exp` of the mean negative log-likelihood
//! (llama.cpp's method, [`pipeline_metrics::perplexity`]). Any model the stage loads works,
//! quantised `.gguf` files included (they run on the quantised kernels).
//!
//! ## Inputs
//! `model` (unless the `model` param is set): a model artifact — a HF folder (base or merged, e.g.
//! `sft.model`), a directory holding one `.gguf` file (quantised), or a peft LoRA adapter folder
//! (`adapter_config.json` + `adapter_model.safetensors`, no full weights). An adapter is merged
//! into its base for inference; the base is the `base_model` param, else the adapter's
//! `base_model_name_or_path` (absolute, or relative to the adapter folder). A prompt without a
//! system message gets the model's trained-with system prompt (`chat_defaults.json`).
//!
//! ## Outputs
//! `report`: `report.json` and `report.csv` (the `Model | Dataset | Metric | Subset | Num |
//! Score | Cat.0` table) and `predictions.jsonl` (one record per sample: prompt, completion,
//! extracted answer or scores; for `text`, one per window: its token range, tokens scored, summed
//! negative log-likelihood).
//!
//! ## Parameters
//! | key | default | meaning |
//! |---|---|---|
//! | `dataset` | — | `general_mcq`, `general_qa` or `text` (a folder of `{subset}.txt`) |
//! | `model` | input `model` | a model path instead of the input (relative to the recipe, `${VAR}` expanded): HF folder, `.gguf`, adapter folder |
//! | `base_model` | from `adapter_config.json` | the base model of an adapter `model` (path, like `model`) |
//! | `local_path` | — | the dataset folder (relative to the recipe) |
//! | `subsets` | all | subset names to run |
//! | `few_shot_num` | 0 | general_mcq: first N rows of `{subset}_dev.csv` as examples |
//! | `scorer` | `generate` / `perplexity` | general_mcq: `generate` or `loglik`; text: `perplexity` (the only one) |
//! | `n_ctx` | 512 | text: tokens per perplexity window (at least 4; a text needs `2 · n_ctx` tokens) |
//! | `batch_size` | 8 | prompts per generation call |
//! | `limit` | none | at most N samples per subset (text: N windows) |
//! | `max_new_tokens` | 256 | generation length |
//! | `model_name` | input name | the table's Model column |
//! | `report_to` | `["tensorboard"]` | also write the scores as TensorBoard scalars (`<dataset>/<subset>/<metric>`, step 0) and the params as text, in `report/tensorboard/`; `"none"`: not |
//! | `logging_dir` | `<cache>/runs/<name>/tensorboard/<stage>` | where `pipeline run` copies those event files |
//!
//! ## Cache key
//! Kind, version, params, the model artifact's digest and the dataset folder's content; with the
//! `model` / `base_model` params, the content of those paths (and of the base an adapter `model`
//! names). The base named inside an adapter *artifact* enters only by its path, as written in the
//! artifact's `adapter_config.json`.
//!
//! ## Example
//! ```toml
//! [stages.eval]
//! kind = "evaluate"
//! inputs.model = "sft.model"
//! params = { dataset = "general_mcq", local_path = "data/mcq", few_shot_num = 2 }
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use pipeline_engine::{Declared, PlanCtx, RunCtx, Stage, StageError, StageEvent};
use pipeline_metrics::eval::{run_mcq, run_qa, EvalError, McqScorer, Predictor, RunOptions};
use pipeline_metrics::perplexity::run_perplexity;
use pipeline_metrics::report::{write_atomic, Report};
use pipeline_model::pretrained::ModelSource;
use serde::Deserialize;

use crate::training::shellexpand_env;

/// Which evalscope dataset layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    GeneralMcq,
    GeneralQa,
    /// Plain held-out text (`{subset}.txt`), scored by perplexity.
    Text,
}

/// How answers are scored: general_mcq's two ways, or text's perplexity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scorer {
    Generate,
    Loglik,
    Perplexity,
}

/// The stage's params.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    pub dataset: DatasetKind,
    /// A model path used instead of the `model` input.
    #[serde(default)]
    pub model: Option<String>,
    /// The base model of an adapter folder (default: its `base_model_name_or_path`).
    #[serde(default)]
    pub base_model: Option<String>,
    pub local_path: PathBuf,
    #[serde(default)]
    pub subsets: Vec<String>,
    #[serde(default)]
    pub few_shot_num: usize,
    /// `None`: `generate` for general_mcq, `perplexity` for text.
    #[serde(default)]
    pub scorer: Option<Scorer>,
    #[serde(default = "default_n_ctx")]
    pub n_ctx: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub model_name: Option<String>,
    /// `["tensorboard"]` (default): the scores also as TensorBoard scalars; `"none"`: not.
    #[serde(default)]
    pub report_to: crate::training::ReportTo,
    /// Where `pipeline run` puts the run's copy of the event files (see `training.rs`).
    #[serde(default)]
    pub logging_dir: Option<String>,
}

fn default_batch() -> usize {
    8
}
fn default_max_new_tokens() -> usize {
    256
}
fn default_n_ctx() -> usize {
    512
}

impl EvaluateConfig {
    /// general_mcq's scorer (`generate` unless `loglik` is set).
    pub fn mcq_scorer(&self) -> McqScorer {
        match self.scorer {
            Some(Scorer::Loglik) => McqScorer::Loglik,
            _ => McqScorer::Generate,
        }
    }
}

/// What a predictor loader is told.
#[derive(Debug, Clone)]
pub struct PredictorSpec<'a> {
    /// The model: the `model` input artifact directory or the `model` param's path.
    pub model_dir: &'a Path,
    /// An adapter model's explicit base (the `base_model` param).
    pub base_model: Option<&'a Path>,
    pub max_new_tokens: usize,
    /// Where the model runs (`--device`).
    pub device: pipeline_engine::Device,
    /// Shown in the table's Model column unless the loader has a better name.
    pub model_name: Option<&'a str>,
    /// The run's Ctrl-C flag: generation polls it between tokens.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Opens a model artifact as a [`Predictor`]. The model crate provides the real one.
pub type LoadPredictor = fn(&PredictorSpec<'_>) -> Result<Box<dyn Predictor>, StageError>;

/// The `evaluate` stage, parameterised by how it opens models.
pub struct Evaluate {
    load: LoadPredictor,
}

impl Evaluate {
    pub fn new(load: LoadPredictor) -> Self {
        Evaluate { load }
    }
}

fn eval_error(e: EvalError) -> StageError {
    match e {
        EvalError::Data(d) => StageError::Input { path: d.path, line: d.line, message: d.message },
        EvalError::Predict(m) => StageError::failed(format!("model failed: {m}")),
        EvalError::Cancelled => StageError::Cancelled,
    }
}

impl Stage for Evaluate {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        // 2: prompts without a system message get the model's chat_defaults.json system prompt.
        // 3: the scores also as TensorBoard scalars in `report/tensorboard/`.
        // 4: on CUDA a bf16 checkpoint is scored with its matrices in bf16 (as transformers'
        //    `torch_dtype="auto"` loads it), no longer widened to f32.
        4
    }
    fn summary(&self) -> &'static str {
        "Score a model on general_mcq (accuracy) or general_qa (BLEU/ROUGE) exactly as evalscope does, or its perplexity on text as llama.cpp does"
    }
    fn declare(&self, ctx: &PlanCtx<'_>) -> Result<Declared, StageError> {
        let cfg: EvaluateConfig = ctx.params()?;
        ctx.check_inputs(&[], &["model"])?;
        let mut files = Vec::new();
        let base = cfg.base_model.as_deref().map(|b| ctx.resolve(shellexpand_env(b)));
        if let Some(b) = &base {
            if !b.exists() {
                return Err(StageError::Params(format!("base_model `{}` does not exist", b.display())));
            }
        }
        match cfg.model.as_deref().map(|m| ctx.resolve(shellexpand_env(m))) {
            Some(m) => {
                if !m.exists() {
                    return Err(StageError::Params(format!("model `{}` does not exist", m.display())));
                }
                // An adapter's base (explicit or named in adapter_config.json) is read too: its
                // content enters the key, and a missing base is a plan error.
                let src = ModelSource::resolve(&m, base.as_deref())
                    .map_err(|e| StageError::Params(format!("model `{}`: {e}", m.display())))?;
                files.push(m);
                let mut s = &src;
                while let ModelSource::Adapter { base, .. } = s {
                    files.push(base.path().to_path_buf());
                    s = base;
                }
            }
            None if !ctx.input_names.contains(&"model") => {
                return Err(StageError::Params(
                    "no model: bind input `model` (e.g. `inputs.model = \"sft.model\"`) or set the `model` param"
                        .into(),
                ))
            }
            None => files.extend(base),
        }
        if cfg.batch_size == 0 {
            return Err(StageError::Params("batch_size must be at least 1".into()));
        }
        match cfg.dataset {
            DatasetKind::GeneralQa if cfg.few_shot_num > 0 || cfg.scorer.is_some_and(|s| s != Scorer::Generate) => {
                return Err(StageError::Params("few_shot_num and scorer apply to general_mcq only".into()));
            }
            DatasetKind::GeneralMcq if cfg.scorer == Some(Scorer::Perplexity) => {
                return Err(StageError::Params(
                    "scorer = \"perplexity\" applies to dataset = \"text\" (general_mcq: \"generate\" or \"loglik\")"
                        .into(),
                ));
            }
            DatasetKind::Text if cfg.scorer.is_some_and(|s| s != Scorer::Perplexity) || cfg.few_shot_num > 0 => {
                return Err(StageError::Params(
                    "dataset = \"text\" is scored by scorer = \"perplexity\" only (few_shot_num does not apply)".into(),
                ));
            }
            _ => {}
        }
        if cfg.dataset == DatasetKind::Text && cfg.n_ctx < 4 {
            return Err(StageError::Params(format!(
                "n_ctx = {}: a perplexity window needs at least 4 tokens",
                cfg.n_ctx
            )));
        }
        let dir = ctx.resolve(&cfg.local_path);
        if !dir.is_dir() {
            return Err(StageError::Params(format!("local_path `{}` is not a directory", dir.display())));
        }
        files.push(dir);
        Ok(Declared { outputs: vec!["report".into()], files })
    }
    fn run(&self, ctx: &RunCtx) -> Result<(), StageError> {
        let cfg: EvaluateConfig = ctx.params()?;
        let dir = ctx.resolve(&cfg.local_path);
        let out = ctx.output("report")?;
        let model = match &cfg.model {
            Some(m) => ctx.resolve(shellexpand_env(m)),
            None => ctx.input("model")?.to_path_buf(),
        };
        let base = cfg.base_model.as_deref().map(|b| ctx.resolve(shellexpand_env(b)));
        let spec = PredictorSpec {
            model_dir: &model,
            base_model: base.as_deref(),
            max_new_tokens: cfg.max_new_tokens,
            device: ctx.device(),
            model_name: cfg.model_name.as_deref(),
            cancel: Some(ctx.cancel_flag()),
        };
        let mut predictor = (self.load)(&spec)?;
        match evaluate_with(ctx, &cfg, &dir, out, predictor.as_mut()) {
            // A generation stopped by Ctrl-C fails its batch: the stage was interrupted.
            Err(_) if ctx.is_cancelled() => Err(StageError::Cancelled),
            other => other,
        }
    }
}

/// The stage body with the model already open (tests call it with a scripted predictor).
pub fn evaluate_with(
    ctx: &RunCtx,
    cfg: &EvaluateConfig,
    dir: &Path,
    out: &Path,
    predictor: &mut dyn Predictor,
) -> Result<(), StageError> {
    let started = Instant::now();
    let mut started_bar = false;
    let mut progress = |done: usize, total: usize| {
        if !started_bar {
            ctx.progress_start("samples", Some(total as u64));
            started_bar = true;
        }
        ctx.progress_set(done as u64);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        ctx.emit(StageEvent::Metric { name: "samples_per_s".into(), step: done as u64, value: rate });
        !ctx.is_cancelled()
    };
    let opts = RunOptions {
        subsets: cfg.subsets.clone(),
        limit: cfg.limit,
        batch_size: cfg.batch_size,
        progress: &mut progress,
    };
    let (rows, predictions, scorer) = match cfg.dataset {
        DatasetKind::GeneralMcq => {
            let scorer = cfg.mcq_scorer();
            let (rows, recs) = run_mcq(dir, cfg.few_shot_num, scorer, opts, predictor).map_err(eval_error)?;
            let recs: Vec<serde_json::Value> =
                recs.iter().map(|r| serde_json::to_value(r).unwrap_or_default()).collect();
            (rows, recs, Some(scorer.as_str().to_string()))
        }
        DatasetKind::Text => {
            let (rows, recs) = run_perplexity(dir, cfg.n_ctx, opts, predictor).map_err(eval_error)?;
            let recs = recs.iter().map(|r| serde_json::to_value(r).unwrap_or_default()).collect();
            (rows, recs, Some("perplexity".to_string()))
        }
        DatasetKind::GeneralQa => {
            let (rows, recs) = run_qa(dir, opts, predictor).map_err(eval_error)?;
            (rows, recs.iter().map(|r| serde_json::to_value(r).unwrap_or_default()).collect(), None)
        }
    };
    ctx.progress_finish();
    let mut rows = rows;
    if let Some(name) = &cfg.model_name {
        for r in &mut rows {
            r.model = name.clone();
        }
    }
    let report = Report { rows, scorer };
    if cfg.report_to.tensorboard() {
        use pipeline_train::tensorboard::{now, write_events, Event, Value};
        let wall_time = now();
        let mut events = vec![Event {
            wall_time,
            step: 0,
            tag: "hparams".into(),
            value: Value::Text(crate::training::hparams_text(ctx, "evaluate")),
        }];
        events.extend(report.rows.iter().map(|r| Event {
            wall_time,
            step: 0,
            tag: format!("{}/{}/{}", r.dataset, r.subset, r.metric),
            value: Value::Scalar(r.score as f32),
        }));
        write_events(&out.join(crate::training::TENSORBOARD_DIR), wall_time, &events)
            .map_err(crate::training::stage_error)?;
    }
    report.write(out).map_err(write_error)?;
    let mut lines = String::new();
    for p in &predictions {
        lines.push_str(&p.to_string());
        lines.push('\n');
    }
    let pred_path = out.join("predictions.jsonl");
    write_atomic(&pred_path, lines.as_bytes()).map_err(write_error)?;
    let secs = started.elapsed().as_secs_f64();
    // One line while running; the whole table is in the report (the CLI's run summary prints it,
    // for cached runs too) and in report.csv.
    let headline: Vec<String> = report
        .rows
        .iter()
        .filter(|r| ["AverageAccuracy", "bleu-1", "bleu-4", "rouge-l-f", "perplexity"].contains(&r.metric.as_str()))
        .map(|r| format!("{} {} {:.4}", r.subset, r.metric, r.score))
        .collect();
    ctx.message(format!("{} samples in {secs:.1}s: {}", predictions.len(), headline.join(", ")));
    let mut json = serde_json::to_value(&report).unwrap_or_default();
    if let Some(o) = json.as_object_mut() {
        o.insert("table".into(), report.table().into());
        o.insert("samples".into(), predictions.len().into());
        o.insert("seconds".into(), secs.into());
        o.insert("samples_per_s".into(), (predictions.len() as f64 / secs.max(1e-9)).into());
    }
    ctx.set_report(json);
    Ok(())
}

/// A failed write of one of this stage's output files (a full disk, a read-only cache): it names
/// the file being written, never as a malformed input (issue 14, defect 9).
fn write_error(e: pipeline_metrics::DataError) -> StageError {
    StageError::failed(format!("writing {}: {}", e.path.display(), e.message))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use pipeline_engine::{EventSink, RunParts};
    use pipeline_metrics::eval::{PredictError, Prompt};

    use super::*;

    struct Collect(Mutex<Vec<StageEvent>>);
    impl EventSink for Collect {
        fn stage_event(&self, _: &str, e: StageEvent) {
            self.0.lock().unwrap().push(e);
        }
    }

    /// Answers C to everything.
    struct AlwaysC;
    impl Predictor for AlwaysC {
        fn name(&self) -> String {
            "always-c".into()
        }
        fn generate(&mut self, prompts: &[Prompt]) -> Result<Vec<String>, PredictError> {
            Ok(prompts.iter().map(|_| "答案：C".to_string()).collect())
        }
        fn loglik(&mut self, _: &Prompt, c: &[String]) -> Result<Vec<f64>, PredictError> {
            Ok(c.iter().map(|x| if x == "C" { 0.0 } else { -1.0 }).collect())
        }
    }

    fn load_always_c(_: &PredictorSpec<'_>) -> Result<Box<dyn Predictor>, StageError> {
        Ok(Box::new(AlwaysC))
    }

    #[test]
    fn runs_the_seed_mcq_rows_end_to_end() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("metrics/tests/fixtures");
        let tmp = tempfile::tempdir().unwrap();
        let (model, out) = (tmp.path().join("model"), tmp.path().join("out"));
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let params: toml::Table =
            toml::from_str("dataset = \"general_mcq\"\nlocal_path = \"mcq\"\nfew_shot_num = 1\nbatch_size = 1")
                .unwrap();
        let stage = Evaluate::new(load_always_c);
        let pctx = PlanCtx { stage_id: "eval", params: &params, input_names: vec!["model"], recipe_dir: &fixtures };
        let declared = stage.declare(&pctx).unwrap();
        assert_eq!(declared.outputs, ["report"]);
        let sink = Arc::new(Collect(Mutex::new(Vec::new())));
        let ctx = RunCtx::new(RunParts {
            stage_id: "eval".into(),
            params,
            seed: 0,
            recipe_dir: fixtures.clone(),
            inputs: BTreeMap::from([("model".to_string(), vec![model])]),
            outputs: BTreeMap::from([("report".to_string(), out.clone())]),
            scratch: tmp.path().join("scratch"),
            sink: sink.clone(),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        stage.run(&ctx).unwrap();
        let report = Report::read(&out).unwrap();
        assert_eq!(report.rows.len(), 1);
        assert_eq!((report.rows[0].model.as_str(), report.rows[0].num, report.rows[0].score), ("always-c", 2, 1.0));
        assert_eq!(report.scorer.as_deref(), Some("generate"));
        let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
        assert_eq!(preds.lines().count(), 2);
        assert!(out.join("report.csv").exists());
        let events = sink.0.lock().unwrap();
        assert!(events.contains(&StageEvent::ProgressStart { label: "samples".into(), total: Some(2) }));
        assert!(events
            .iter()
            .any(|e| matches!(e, StageEvent::Message(m) if m.starts_with("2 samples in ") && m.ends_with(": example AverageAccuracy 1.0000"))));
        let json = ctx.take_report().unwrap();
        assert!(json["samples_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(json["table"].as_str().unwrap(), report.table());
    }

    #[test]
    fn unknown_param_and_qa_only_misuse_are_plan_errors() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("metrics/tests/fixtures");
        let stage = Evaluate::new(load_always_c);
        for (src, want) in [
            ("dataset = \"general_mcq\"\nlocal_path = \"mcq\"\nfewshot = 1", "fewshot"),
            ("dataset = \"general_qa\"\nlocal_path = \"qa\"\nscorer = \"loglik\"", "general_mcq only"),
            ("dataset = \"general_qa\"\nlocal_path = \"nope\"", "not a directory"),
            (
                "dataset = \"general_mcq\"\nlocal_path = \"mcq\"\nscorer = \"perplexity\"",
                "applies to dataset = \"text\"",
            ),
            ("dataset = \"text\"\nlocal_path = \"qa\"\nscorer = \"loglik\"", "scorer = \"perplexity\" only"),
            ("dataset = \"text\"\nlocal_path = \"qa\"\nn_ctx = 2", "n_ctx = 2"),
            ("dataset = \"text\"\nlocal_path = \"qa\"\nscorer = \"bleu\"", "bleu"),
        ] {
            let params: toml::Table = toml::from_str(src).unwrap();
            let pctx = PlanCtx { stage_id: "eval", params: &params, input_names: vec!["model"], recipe_dir: &fixtures };
            let err = stage.declare(&pctx).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
