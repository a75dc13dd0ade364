//! The `pipeline` command line.

mod cmd_eval;
mod cmd_generate;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "pipeline", version, about = "Run the whole LLM training workflow from one TOML recipe")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Generate text with a model.
    Generate(cmd_generate::GenerateArgs),
    /// Score predictions against references (evalscope's BLEU/ROUGE) and compare evaluation runs.
    Eval(cmd_eval::EvalArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::Generate(a)) => cmd_generate::run(a),
        Some(Cmd::Eval(a)) => cmd_eval::run(a),
        None => {
            for kind in pipeline_stages::registry().kinds() {
                println!("{kind}");
            }
            Ok(())
        }
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
