//! The `vipllava generate ...` command line that reproduces what the app asks: same model
//! and device, same image and marks (as `--box`/`--arrow`/... flags, in the order the CLI
//! draws them), same image mode and sampling.

use std::path::Path;

use vipllava::processor::image::ImageMode;
use vipllava::processor::visual_prompt::{MarkSpec, VisualPrompt};

use crate::settings::{ModelSettings, Sampling};

/// Everything the command line is made from.
#[derive(Debug, Clone)]
pub struct Scene<'a> {
    /// Model, device, dtype, quantization.
    pub model: &'a ModelSettings,
    /// The image file (`None`: pasted; the command then names `prompted.png`'s original).
    pub image: Option<&'a Path>,
    /// Crop or pad.
    pub image_mode: ImageMode,
    /// The marks, in the editor's (= the CLI's) order.
    pub marks: &'a [VisualPrompt],
    /// `--alpha` (`None`: the default).
    pub alpha: Option<u8>,
    /// `--line-width` (`None`: the default).
    pub line_width: Option<f32>,
    /// The question.
    pub question: &'a str,
    /// Sampling settings.
    pub sampling: &'a Sampling,
    /// Whether the checkpoint's defaults sample (then greedy needs `--top-k 1`).
    pub defaults_sample: bool,
}

/// Quotes `arg` for a POSIX shell when it needs it.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:,=+@%#".contains(&b));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The arguments of `vipllava generate` (without the program name).
pub fn generate_args(scene: &Scene<'_>) -> Vec<String> {
    let mut args: Vec<String> = vec!["generate".into()];
    let mut flag = |name: &str, value: String| {
        args.push(format!("--{name}"));
        args.push(value);
    };
    flag("model", scene.model.model.clone());
    if scene.model.device != "cpu" {
        flag("device", scene.model.device.clone());
    }
    if scene.model.dtype != "f32" {
        flag("dtype", scene.model.dtype.clone());
    }
    if !scene.model.quantize.is_empty() && scene.model.quantize != "none" {
        flag("quantize", scene.model.quantize.clone());
    }
    let image = scene
        .image
        .map_or_else(|| "pasted.png".to_string(), |p| p.display().to_string());
    flag("image", image);
    if scene.image_mode == ImageMode::Pad {
        flag("image-mode", "pad".into());
    }
    for mark in scene.marks {
        if let Some(spec) = MarkSpec::from_prompt(mark) {
            flag(&spec.shape, spec.spec);
        }
    }
    if let Some(alpha) = scene.alpha {
        flag("alpha", alpha.to_string());
    }
    if let Some(width) = scene.line_width {
        flag("line-width", width.to_string());
    }
    let s = scene.sampling;
    flag("max-new-tokens", s.max_new_tokens.to_string());
    if s.sample {
        args.push("--do-sample".into());
        args.push("--temperature".into());
        args.push(s.temperature.to_string());
        args.push("--top-p".into());
        args.push(s.top_p.to_string());
        args.push("--seed".into());
        args.push(s.seed.to_string());
    } else if scene.defaults_sample {
        // The checkpoint samples by default; keeping only the best token is greedy.
        args.push("--top-k".into());
        args.push("1".into());
    }
    args.push("--prompt".into());
    args.push(scene.question.to_string());
    args
}

/// The whole command, quoted for a shell.
pub fn command_line(scene: &Scene<'_>) -> String {
    std::iter::once("vipllava".to_string())
        .chain(generate_args(scene).iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vipllava::processor::visual_prompt::{Colour, Shape};

    #[test]
    fn marks_become_flags_and_text_is_quoted() {
        let model = ModelSettings {
            model: "llava-hf/vip-llava-7b-hf".into(),
            device: "cpu".into(),
            dtype: "bf16".into(),
            quantize: "q8".into(),
        };
        let marks = [
            VisualPrompt::new(
                Shape::Rectangle {
                    x0: 45.0,
                    y0: 15.0,
                    x1: 115.5,
                    y1: 95.0,
                },
                Colour::RED,
            ),
            VisualPrompt::new(
                Shape::Arrow {
                    x0: 155.0,
                    y0: 150.0,
                    x1: 110.0,
                    y1: 100.0,
                },
                Colour::new(255, 255, 0),
            ),
        ];
        let sampling = Sampling::default();
        let scene = Scene {
            model: &model,
            image: Some(Path::new("my photo.jpg")),
            image_mode: ImageMode::Pad,
            marks: &marks,
            alpha: Some(200),
            line_width: None,
            question: "What's inside the red rectangle?",
            sampling: &sampling,
            defaults_sample: false,
        };
        assert_eq!(
            command_line(&scene),
            "vipllava generate --model llava-hf/vip-llava-7b-hf --dtype bf16 --quantize q8 \
             --image 'my photo.jpg' --image-mode pad --box 45,15,115.5,95:red \
             --arrow 155,150,110,100:yellow --alpha 200 --max-new-tokens 256 \
             --prompt 'What'\\''s inside the red rectangle?'"
        );
    }
}
