//! Subcommands of the `vipllava` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// VipLlava (ViP-LLaVA) on Burn.
#[derive(Parser, Debug)]
#[command(name = "vipllava", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's architecture, resolved from config.json (weights optional).
    Info {
        /// Model directory (HF layout: config.json [+ safetensors]).
        #[arg(long)]
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Parses arguments, runs, and turns errors into one readable line and a non-zero exit.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { model, json } => {
            let info = vipllava::info::model_info(&model)
                .with_context(|| format!("reading model {}", model.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.render());
            }
            Ok(())
        }
    }
}
