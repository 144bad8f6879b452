//! # vipllava
//!
//! VipLlava (ViP-LLaVA) on Burn: ask about a red box, an arrow or a scribble drawn on a
//! photo. This facade wires the crates together:
//! - [`model`] (`vipllava-model`): configs, CLIP tower, projector, Llama, KV cache;
//! - [`convert`] (`vipllava-convert`): HF checkpoints (any published layout) into Burn;
//! - [`processor`] (`vipllava-processor`): PIL-exact image preprocessing, tokenizer,
//!   chat template, `<image>` expansion;
//! - [`pipeline`]: load -> preprocess -> prefill -> decode -> stream;
//! - [`bench`]: prefill/decode throughput per batch size;
//! - [`compare`]: one device/dtype/quantization measured on the real pipeline (backend comparison);
//! - [`conversation`]: multi-turn chat that reuses the KV cache;
//! - [`device`]: `--device` names (cpu, ndarray, wgpu, vulkan, metal, cuda, remote) opened at run time;
//! - [`generate`]: greedy/sampled token selection and streaming detokenization;
//! - [`hub`]: `--model` as a local directory or a HuggingFace hub id;
//! - [`output`]: model directories written atomically (convert, export), never over the input;
//! - [`info`]: a summary of a model directory, from `config.json` and weight headers;
//! - [`train`] (`vipllava-train`): fine-tuning (projector, LoRA, all) and export.

// Nothing derived from input may panic: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bench;
pub mod compare;
pub mod conversation;
pub mod device;
pub mod generate;
pub mod hub;
pub mod info;
pub mod output;
pub mod pipeline;

pub use vipllava_convert as convert;
pub use vipllava_model as model;
pub use vipllava_processor as processor;
pub use vipllava_train as train;

pub use conversation::Conversation;
pub use device::{DeviceError, DeviceSpec, open_device};
pub use pipeline::{Generation, Pipeline, PipelineError, Prompt, StopReason};
pub use vipllava_convert::{LoadOptions, LoadedModel, Quantization, load_model};
pub use vipllava_model::{ForwardInput, KvCache, LogitsMode, VipLlava, VipLlavaConfig};
