//! The `pipeline` command line.

mod cmd_eval;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "pipeline", about = "Run the whole LLM training workflow from one TOML recipe")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Score predictions against references (evalscope's BLEU/ROUGE) and compare evaluation runs.
    Eval(cmd_eval::EvalArgs),
    /// List the stage kinds.
    Stages,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::Eval(args)) => cmd_eval::run(args),
        Some(Cmd::Stages) | None => {
            for kind in pipeline_stages::registry().kinds() {
                println!("{kind}");
            }
            Ok(())
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
