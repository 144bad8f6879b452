//! The `vipllava` command line: parse, dispatch to one command, and turn errors into one
//! readable line and a non-zero exit. Shared argument groups live in [`args`], each
//! command in its own file under [`commands`].

mod args;
mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{
    bench, chat, convert, draw, eval, export, generate, info, logits, preprocess, serve, serve_device, train,
};

/// VipLlava (ViP-LLaVA) on Burn: ask about boxes, arrows and scribbles drawn on photos.
#[derive(Parser, Debug)]
#[command(name = "vipllava", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's architecture, resolved from config.json (weights optional).
    Info(info::InfoArgs),
    /// Answer a question about an image, streaming the text.
    Generate(generate::GenerateArgs),
    /// Fine-tune on LLaVA-format data (projector, LoRA or all parameters).
    Train(train::TrainArgs),
    /// Merge a fine-tuning checkpoint into its base model and write a HF model directory.
    Export(export::ExportArgs),
    /// Loss and perplexity over a data file in the training format (optionally with a
    /// fine-tuning checkpoint), and greedy answers to score.
    Eval(eval::EvalArgs),
    /// Chat about an image: follow-up questions reuse the KV cache. Commands: /image
    /// (print the image path(s)), /reset, /quit.
    Chat(chat::ChatArgs),
    /// Measure prefill time and decode tokens/s for several batch sizes on the CPU device,
    /// or, with --devices/--dtypes/--quantize and --image, compare devices, dtypes and
    /// quantizations on the real pipeline.
    Bench(bench::BenchArgs),
    /// Draw visual prompts on an image and write it (what `generate` would show the model).
    Draw(draw::DrawArgs),
    /// Write the pixel values the model receives, float32 [1, 3, H, W], as .npy.
    Preprocess(preprocess::PreprocessArgs),
    /// Convert a model to a Burn-native directory (model.bpk in --dtype, optionally
    /// quantized, plus the tokenizer and processor files) that loads faster in `generate`.
    Convert(convert::ConvertArgs),
    /// Serve this machine's device to `--device remote:ws://HOST:PORT` clients (Burn's remote
    /// backend over WebSocket: unencrypted, for trusted networks).
    ServeDevice(serve_device::ServeDeviceArgs),
    /// Write the last prompt position's logits, float32 [vocab], as .npy.
    Logits(logits::LogitsArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions with visual
    /// prompts, streaming, continuous batching).
    Serve(serve::ServeArgs),
}

/// Parses arguments, runs, and turns errors into one readable line and a non-zero exit.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C: remove half-written output directories before exiting (no destructors run).
    let _ = ctrlc::set_handler(|| {
        vipllava::convert::output::remove_staged_on_interrupt();
        std::process::exit(130);
    });
    let result = match cli.command {
        Command::Info(args) => info::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Export(args) => export::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Draw(args) => draw::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Convert(args) => convert::run(args),
        Command::ServeDevice(args) => serve_device::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line, skipping causes whose text the previous message already
/// includes (many errors embed their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if previous.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        previous = text;
    }
    out.replace('\n', " ")
}
