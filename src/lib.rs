//! # vipllava
//!
//! VipLlava (ViP-LLaVA) on Burn: ask about a red box, an arrow or a scribble drawn on a
//! photo. This facade wires the crates together:
//! - [`model`] (`vipllava-model`): configs, CLIP tower, projector, Llama, KV cache;
//! - [`convert`] (`vipllava-convert`): HF checkpoints (any published layout) into Burn,
//!   Burn-native checkpoints, and model directories written atomically;
//! - [`processor`] (`vipllava-processor`): PIL-exact image preprocessing, visual prompts,
//!   tokenizer, chat template, `<image>` expansion;
//! - [`pipeline`]: load -> prepare (images + question -> inputs) -> prefill;
//! - [`generation`]: the decode loop, sampling, streaming detokenization, left padding;
//! - [`conversation`]: multi-turn chat that reuses the KV cache;
//! - [`device`]: `--device` names (cpu, ndarray, wgpu, vulkan, metal, cuda, remote) opened at run time;
//! - [`hub`]: `--model` as a local directory or a HuggingFace hub id;
//! - [`train`] (`vipllava-train`): fine-tuning (projector, LoRA, all) and export.
//!
//! The `vipllava` binary (benchmarks, `info`, every command) is built on this API alone.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use vipllava::processor::image::load_image;
//! use vipllava::processor::visual_prompt::{Colour, DrawOptions, Shape, VisualPrompt, draw_image};
//! use vipllava::{LoadOptions, Pipeline, Prompt};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pipeline = Pipeline::load("model_dir".as_ref(), &Device::flex(), &LoadOptions::default())?;
//! let red_box = VisualPrompt::new(Shape::Rectangle { x0: 40.0, y0: 20.0, x1: 110.0, y1: 90.0 }, Colour::RED);
//! let marked = draw_image(&load_image("photo.jpg".as_ref())?, &[red_box], &DrawOptions::default())?;
//! let input = pipeline.prepare(&[marked], &Prompt::User("What is inside the red rectangle?".into()))?;
//! pipeline.generate(&input, pipeline.generation_defaults(), |text| print!("{text}"))?;
//! # Ok(()) }
//! ```

pub mod conversation;
pub mod device;
pub mod generation;
pub mod hub;
pub mod pipeline;

pub use vipllava_convert as convert;
pub use vipllava_model as model;
pub use vipllava_processor as processor;
pub use vipllava_train as train;

pub use conversation::Conversation;
pub use device::{DeviceError, DeviceSpec, open_device};
pub use generation::{Generation, GenerationOptions, StopReason};
pub use pipeline::{Pipeline, PipelineError, PipelineOptions, PreparedInput, Prompt};
pub use vipllava_convert::{LoadOptions, LoadedModel, Quantization, load_model};
pub use vipllava_model::{ForwardInput, KvCache, LogitsMode, Precision, VipLlava, VipLlavaConfig};
