//! # vipllava
//!
//! VipLlava (ViP-LLaVA) on Burn: ask about a red box, an arrow or a scribble drawn on a
//! photo. This facade wires the crates together:
//! - [`model`] (`vipllava-model`): configs, CLIP tower, projector, Llama, KV cache;
//! - [`convert`] (`vipllava-convert`): HF checkpoints (any published layout) into Burn;
//! - [`info`]: a summary of a model directory, from `config.json` and weight headers.

pub mod info;

pub use vipllava_convert as convert;
pub use vipllava_model as model;

pub use vipllava_convert::{LoadOptions, LoadedModel, load_model};
pub use vipllava_model::{ForwardInput, KvCache, LogitsMode, VipLlava, VipLlavaConfig};
