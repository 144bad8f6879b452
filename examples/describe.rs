//! Draw a red box on a photo, ask VipLlava about it, and stream the answer.
//!
//! ```sh
//! cargo run --release --example describe                       # tiny committed checkpoint
//! cargo run --release --example describe -- path/to/vip-llava-7b-hf photo.png 120,40,300,260
//! ```

use std::path::PathBuf;

use burn::tensor::Device;
use vipllava::processor::image::load_image;
use vipllava::processor::visual_prompt::{Colour, DrawOptions, Shape, VisualPrompt, draw_image};
use vipllava::{LoadOptions, Pipeline, Prompt};

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(root.join("tests/fixtures/tiny-5x-f32"));
    let image = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(root.join("tests/fixtures/images/astronaut.png"));
    let corners: Vec<f32> = args
        .next()
        .unwrap_or_else(|| "40,20,110,90".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(corners.len() == 4, "the box is x0,y0,x1,y1");

    let pipeline = Pipeline::load(&model, &Device::flex(), &LoadOptions::default())?;
    let photo = load_image(&image)?;
    let red_box = VisualPrompt::new(
        Shape::Rectangle {
            x0: corners[0],
            y0: corners[1],
            x1: corners[2],
            y1: corners[3],
        },
        Colour::RED,
    );
    let marked = draw_image(&photo, &[red_box], &DrawOptions::default())?;
    let input = pipeline.prepare(
        &[marked],
        &Prompt::User("What is inside the red rectangle?".into()),
    )?;
    let options = vipllava::generation::GenerationOptions {
        max_new_tokens: 40,
        ..pipeline.generation_defaults().clone()
    };
    pipeline.generate(&input, &options, |text| print!("{text}"))?;
    println!();
    Ok(())
}
