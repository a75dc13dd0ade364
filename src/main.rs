//! The `pipeline` command line. Adding a subcommand: write `src/cmd_<name>.rs` with
//! `#[derive(clap::Args)] pub struct <Name>Args` and `pub fn run(args) -> anyhow::Result<()>`,
//! then add one `Command` variant and one match arm below.

mod cmd_cache;
mod cmd_chat;
mod cmd_eval;
mod cmd_generate;
mod cmd_plan;
mod cmd_report;
mod cmd_run;
mod common;
mod graph;
mod html_report;
mod launch;
mod report;
mod run_outputs;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pipeline",
    version,
    about = "Run an LLM training workflow from one TOML recipe, with a content-hashed cache."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// `human` (progress bars, tables, text) or `json`: every command prints JSON objects, one per
    /// line on stdout (`run`: one event per stage; other commands: their result), and an error
    /// as `{"event": "error", "message", "exit_code"}`.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: report::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe's stages in topological order, reusing cached results.
    Run(cmd_run::RunArgs),
    /// Print the validated DAG in execution order with each stage's cache status.
    Plan(cmd_plan::PlanArgs),
    /// Write the run's report.html (DAG, curves, tables) and TensorBoard logs from the cache.
    Report(cmd_report::ReportArgs),
    /// Show why a stage will run: which key fields changed since its cached entry.
    Explain(cmd_plan::ExplainArgs),
    /// Inspect or clean the cache.
    #[command(subcommand)]
    Cache(cmd_cache::CacheCommand),
    /// Evaluate models and score predictions (evalscope-compatible BLEU/ROUGE, MCQ accuracy).
    Eval(cmd_eval::EvalArgs),
    /// Generate text with a model: a HF folder, a .gguf file, or a recipe's trained stage.
    Generate(cmd_generate::GenerateArgs),
    /// Chat with a model in the terminal, streaming (`/clear` starts over, `/exit` quits).
    Chat(cmd_chat::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streaming).
    Serve(serve::ServeArgs),
    /// List the stage kinds this build knows.
    Stages,
}

fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn main() -> ExitCode {
    pipeline_stages::data::tune_allocator();
    let cli = Cli::parse();
    init_tracing();
    let fmt = cli.log_format;
    let result = match cli.command {
        Command::Run(a) => cmd_run::run(a, fmt),
        Command::Plan(a) => cmd_plan::plan(a, fmt),
        Command::Explain(a) => cmd_plan::explain(a, fmt),
        Command::Report(a) => cmd_report::run(a),
        Command::Cache(c) => cmd_cache::run(c, fmt),
        Command::Eval(a) => cmd_eval::run(a, fmt),
        Command::Generate(a) => cmd_generate::run(a, fmt),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => cmd_chat::run(a),
        Command::Stages => {
            for s in common::registry().iter() {
                match fmt {
                    report::LogFormat::Json => report::print_json(serde_json::json!({
                        "event": "stage_kind", "kind": s.kind(), "version": s.version(), "summary": s.summary(),
                    })),
                    report::LogFormat::Human => println!("{:<10} v{:<3} {}", s.kind(), s.version(), s.summary()),
                }
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let (code, message) = if let Some(common::Exit(code)) = e.downcast_ref() {
                // already reported (a failed stage, a failed check)
                return ExitCode::from(*code);
            } else if let Some(r) = e.downcast_ref::<pipeline_engine::RecipeError>() {
                eprintln!("{r}");
                (2, r.to_string())
            } else if let Some(u) = e.downcast_ref::<common::Usage>() {
                eprintln!("error: {u}");
                (2, u.to_string())
            } else {
                let m = chain(&e);
                eprintln!("error: {m}");
                (1, m)
            };
            if fmt == report::LogFormat::Json {
                report::print_json(serde_json::json!({"event": "error", "message": message, "exit_code": code}));
            }
            ExitCode::from(code)
        }
    }
}

/// The error and its causes, `: `-separated like `{:#}`, except that a cause whose text already
/// ends the message is not repeated (most library errors print their source in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(pipeline_engine::StageError::io("data/x.txt", io)).context("evaluating");
        assert_eq!(super::chain(&e), "evaluating: data/x.txt: no such file");
    }
}
