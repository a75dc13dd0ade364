//! The `pipeline` command line.

use clap::{Parser, Subcommand};

mod cmd_generate;

#[derive(Parser)]
#[command(name = "pipeline", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a model.
    Generate(cmd_generate::GenerateArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Generate(a)) => match cmd_generate::run(a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        },
        None => {
            let registry = pipeline_stages::registry();
            for kind in registry.kinds() {
                println!("{kind}");
            }
            std::process::ExitCode::SUCCESS
        }
    }
}
