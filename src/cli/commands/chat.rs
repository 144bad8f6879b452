//! `vipllava chat`: an interactive conversation about images; follow-up questions reuse
//! the KV cache.

use std::io::{BufRead, Write};

use clap::Args;

use crate::cli::args::{ImageArgs, ModelArgs, RuntimeArgs, SamplingArgs, VisualPromptArgs, load_pipeline};

/// Chat about an image: follow-up questions reuse the KV cache. Commands: /image (print
/// the image path(s)), /reset, /quit.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    marks: VisualPromptArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Runs the command.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let mut images = args.images.load()?;
    let pipeline = load_pipeline(&args.model, &args.runtime, args.images.mode.mode())?;
    let options = args.sampling.options(&pipeline)?;
    if let Some(first) = images.first_mut() {
        *first = args
            .marks
            .apply(first.clone(), pipeline.image_config(), pipeline.image_mode())?;
    }
    let mut conversation = vipllava::Conversation::new(&pipeline, images);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("Ask about the image. Commands: /image, /reset, /quit.");
    loop {
        let _ = write!(out, "> ");
        let _ = out.flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                conversation.reset();
                eprintln!("(conversation reset)");
            }
            "/image" => {
                for p in &args.images.image {
                    let _ = writeln!(out, "{}", p.display());
                }
            }
            question => {
                let result = conversation.ask(question, &options, |text| {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                });
                let _ = writeln!(out);
                if let Err(e) = result {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    Ok(())
}
