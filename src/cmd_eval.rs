//! `pipeline eval`: evaluate a model without a recipe, score (prediction, reference) pairs without
//! a model, and compare two runs.
//!
//! * `pipeline eval --model M [--base B] --dataset general_qa|general_mcq|text --local-path DIR
//!   [--output DIR] [...]`: the `evaluate` stage run once, outside a recipe and the cache. `M` is a
//!   HF folder, a `.gguf` file or a peft LoRA adapter folder (merged into `--base`, else the base
//!   its `adapter_config.json` names). Prints the table; `--output` keeps `report.json`,
//!   `report.csv` and `predictions.jsonl`.
//! * `pipeline eval score --input pairs.jsonl --output scores.jsonl [--report DIR]`
//! * `pipeline eval --compare RUN_A RUN_B` (each a `report.json` or a directory holding one,
//!   e.g. an `evaluate` stage's `report` artifact)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use pipeline_engine::{Device, EventSink, PlanCtx, RunCtx, RunParts, Stage, StageError, StageEvent};
use pipeline_metrics::eval::{qa_rows, score_jsonl};
use pipeline_metrics::report::{column_names, compare, Report};
use pipeline_stages::evaluate::Evaluate;
use pipeline_stages::evaluate_model::load_model_predictor;

use crate::common::Usage;
use crate::report::{print_json, LogFormat};

/// Evaluate a model (evalscope's general_mcq / general_qa), score pairs, compare reports.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    /// Show two reports side by side with deltas (b - a).
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with = "model")]
    pub compare: Option<Vec<PathBuf>>,
    #[command(flatten)]
    pub model: ModelEvalArgs,
    #[command(subcommand)]
    pub cmd: Option<EvalCmd>,
}

/// `pipeline eval --model ...`: the `evaluate` stage's params as flags.
#[derive(clap::Args, Debug)]
pub struct ModelEvalArgs {
    /// The model: a HF folder, a .gguf file, or a peft LoRA adapter folder (adapter_config.json +
    /// adapter_model.safetensors).
    #[arg(long, requires_all = ["dataset", "local_path"])]
    pub model: Option<PathBuf>,
    /// With an adapter folder as --model: its base model (overrides `base_model_name_or_path`).
    #[arg(long, requires = "model")]
    pub base: Option<PathBuf>,
    /// `text`: perplexity of `{subset}.txt` files, as llama.cpp's `perplexity` tool measures it.
    #[arg(long, value_parser = ["general_mcq", "general_qa", "text"], requires = "model")]
    pub dataset: Option<String>,
    /// The dataset folder (`{subset}_val.csv` / `{subset}.jsonl` / `{subset}.txt`).
    #[arg(long, requires = "model")]
    pub local_path: Option<PathBuf>,
    /// Subsets to run [default: all] (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', requires = "model")]
    pub subsets: Vec<String>,
    /// general_mcq: few-shot examples from `{subset}_dev.csv`.
    #[arg(long, requires = "model")]
    pub few_shot_num: Option<usize>,
    /// general_mcq: `generate` (answer extraction) or `loglik` (option-letter log-likelihood);
    /// text: `perplexity`.
    #[arg(long, value_parser = ["generate", "loglik", "perplexity"], requires = "model")]
    pub scorer: Option<String>,
    /// text: tokens per perplexity window [default: 512].
    #[arg(long, requires = "model")]
    pub n_ctx: Option<usize>,
    #[arg(long, requires = "model")]
    pub batch_size: Option<usize>,
    /// At most N samples per subset.
    #[arg(long, requires = "model")]
    pub limit: Option<usize>,
    #[arg(long, requires = "model")]
    pub max_new_tokens: Option<usize>,
    /// The table's Model column [default: the model path's name].
    #[arg(long, requires = "model")]
    pub model_name: Option<String>,
    /// Keep report.json, report.csv and predictions.jsonl in this directory.
    #[arg(long, requires = "model")]
    pub output: Option<PathBuf>,
    /// Where the model runs: `cpu`, `cuda` (GPU 0) or `cuda:<N>` (`cuda` needs a binary built
    /// with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE", requires = "model")]
    pub device: Device,
}

#[derive(clap::Subcommand, Debug)]
pub enum EvalCmd {
    /// BLEU-1..4 and ROUGE-1/2/L of {"id", "prediction", "reference"} rows, as evalscope computes them.
    Score(ScoreArgs),
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// JSONL rows {"id", "prediction", "reference"}.
    #[arg(long)]
    pub input: PathBuf,
    /// JSONL output: one row per input with `id` and `bleu-1` ... `rouge-l-f`.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write report.json / report.csv (the summary table) into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Name for the table's Model column.
    #[arg(long, default_value = "-")]
    pub model: String,
}

/// Prints the stage's one-line messages on stderr, or as JSON `message` events on stdout.
struct MessageSink(LogFormat);
impl EventSink for MessageSink {
    fn stage_event(&self, _: &str, event: StageEvent) {
        if let StageEvent::Message(m) = event {
            match self.0 {
                LogFormat::Human => eprintln!("{m}"),
                LogFormat::Json => print_json(serde_json::json!({"event": "message", "text": m})),
            }
        }
    }
}

/// The report: its table (human) or one `event` with its rows (JSON).
fn print_report(report: &Report, fmt: LogFormat, event: &str, extra: serde_json::Value) -> anyhow::Result<()> {
    match fmt {
        LogFormat::Human => print!("{}", report.table()),
        LogFormat::Json => {
            let mut v = serde_json::json!({"event": event, "report": report});
            if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                o.extend(e);
            }
            print_json(v);
        }
    }
    Ok(())
}

fn run_model(model: &Path, a: &ModelEvalArgs, fmt: LogFormat) -> anyhow::Result<()> {
    let abs = |p: &Path| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
    let cwd = std::env::current_dir().context("the current directory")?;
    let mut params = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        params.insert(k.to_string(), v);
    };
    set("model", abs(model)?.display().to_string().into());
    if let Some(b) = &a.base {
        set("base_model", abs(b)?.display().to_string().into());
    }
    set("dataset", a.dataset.clone().unwrap_or_default().into());
    set("local_path", abs(a.local_path.as_deref().unwrap_or(Path::new(".")))?.display().to_string().into());
    if !a.subsets.is_empty() {
        set("subsets", toml::Value::Array(a.subsets.iter().map(|s| s.clone().into()).collect()));
    }
    for (k, v) in [
        ("few_shot_num", a.few_shot_num),
        ("batch_size", a.batch_size),
        ("limit", a.limit),
        ("max_new_tokens", a.max_new_tokens),
        ("n_ctx", a.n_ctx),
    ] {
        if let Some(v) = v {
            set(k, toml::Value::Integer(v as i64));
        }
    }
    for (k, v) in [("scorer", &a.scorer), ("model_name", &a.model_name)] {
        if let Some(v) = v {
            set(k, v.clone().into());
        }
    }
    let stage = Evaluate::new(load_model_predictor);
    let usage = |e: StageError| -> anyhow::Error {
        match e {
            StageError::Params(m) => Usage(m).into(),
            other => other.into(),
        }
    };
    stage
        .declare(&PlanCtx { stage_id: "eval", params: &params, input_names: Vec::new(), recipe_dir: &cwd })
        .map_err(usage)?;
    let tmp = std::env::temp_dir().join(format!("pipeline-eval-{}", std::process::id()));
    let out = a.output.clone().unwrap_or_else(|| tmp.join("report"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let ctx = RunCtx::new(RunParts {
        stage_id: "eval".into(),
        params,
        seed: 0,
        recipe_dir: cwd,
        inputs: BTreeMap::new(),
        outputs: BTreeMap::from([("report".to_string(), out.clone())]),
        scratch: tmp.join("scratch"),
        sink: Arc::new(MessageSink(fmt)),
        cancel: Arc::new(AtomicBool::new(false)),
    })
    .with_device(a.device);
    let result = stage.run(&ctx).map_err(usage).and_then(|()| Ok(Report::read(&out)?));
    let _ = std::fs::remove_dir_all(&tmp);
    let output = a.output.as_ref().map(|_| out.display().to_string());
    print_report(&result?, fmt, "eval_finished", serde_json::json!({ "output": output }))?;
    if a.output.is_some() && fmt == LogFormat::Human {
        eprintln!("report.json, report.csv, predictions.jsonl -> {}", out.display());
    }
    Ok(())
}

pub fn run(args: EvalArgs, fmt: LogFormat) -> anyhow::Result<()> {
    if let Some(model) = &args.model.model {
        return run_model(model, &args.model, fmt);
    }
    match (args.compare, args.cmd) {
        (Some(paths), _) => {
            let a = Report::read(&paths[0])?;
            let b = Report::read(&paths[1])?;
            let (na, nb) = column_names(&a, &b, &paths[0].display().to_string(), &paths[1].display().to_string());
            match fmt {
                LogFormat::Human => print!("{}", compare(&a, &b, &na, &nb)),
                LogFormat::Json => print_json(serde_json::json!({
                    "event": "eval_compare",
                    "runs": [{"name": na, "path": paths[0], "report": a}, {"name": nb, "path": paths[1], "report": b}],
                })),
            }
            Ok(())
        }
        (None, Some(EvalCmd::Score(s))) => {
            let scored = score_jsonl(&s.input, &s.output)?;
            let subset = s.input.file_stem().and_then(|n| n.to_str()).unwrap_or("default").to_string();
            let scores: Vec<_> = scored.iter().map(|p| p.scores).collect();
            let report = Report { rows: qa_rows(&s.model, &subset, &scores), scorer: None };
            if let Some(dir) = &s.report {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                report.write(dir)?;
            }
            let extra = serde_json::json!({"pairs": scored.len(), "output": s.output});
            print_report(&report, fmt, "eval_scored", extra)?;
            if fmt == LogFormat::Human {
                eprintln!("scored {} pairs -> {}", scored.len(), s.output.display());
            }
            Ok(())
        }
        (None, None) => anyhow::bail!(
            "nothing to do: use `pipeline eval --model M --dataset D --local-path DIR`, `pipeline eval score ...` or `pipeline eval --compare A B`"
        ),
    }
}
