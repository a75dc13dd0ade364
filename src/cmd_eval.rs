//! `pipeline eval`: score (prediction, reference) pairs without a model, and compare two runs.
//!
//! * `pipeline eval score --input pairs.jsonl --output scores.jsonl [--report DIR]`
//! * `pipeline eval --compare RUN_A RUN_B` (each a `report.json` or a directory holding one,
//!   e.g. an `evaluate` stage's `report` artifact)

use std::path::PathBuf;

use anyhow::Context;
use pipeline_metrics::eval::{qa_rows, score_jsonl};
use pipeline_metrics::report::{compare, Report};

/// Evaluation tools that need no model.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    /// Show two reports side by side with deltas (b - a).
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<PathBuf>>,
    #[command(subcommand)]
    pub cmd: Option<EvalCmd>,
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

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match (args.compare, args.cmd) {
        (Some(paths), _) => {
            let a = Report::read(&paths[0])?;
            let b = Report::read(&paths[1])?;
            print!("{}", compare(&a, &b, &paths[0].display().to_string(), &paths[1].display().to_string()));
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
            print!("{}", report.table());
            eprintln!("scored {} pairs -> {}", scored.len(), s.output.display());
            Ok(())
        }
        (None, None) => anyhow::bail!("nothing to do: use `pipeline eval score ...` or `pipeline eval --compare A B`"),
    }
}
