//! # vipllava-convert
//!
//! Loads HuggingFace VipLlava checkpoints into `vipllava-model` modules with
//! `burn-store`: single or sharded safetensors, f32/f16/bf16 on disk, and every key
//! layout in the wild (hub transformers 4.x, transformers 5.x, and 5.x's
//! original-format save), detected from the tensor names. Missing, wrongly shaped and
//! unreadable tensors are errors that name the key; tensors the model does not use
//! (`post_layernorm`, unused deep vision layers) are reported and skipped.
//!
//! Also saves and loads Burn-native burnpack checkpoints with their resolved config, and
//! owns the one model-directory writer ([`output`]): staged, renamed into place when
//! complete, never over or nested with the input model.

pub mod checkpoint;
pub mod error;
pub mod load;
pub mod output;
pub mod quantize;
mod read;
mod stored_packing;

pub use checkpoint::{Checkpoint, DiskDType, KeyLayout, canonical_key};
pub use error::ConvertError;
pub use load::{
    BURNPACK_CONFIG, BURNPACK_WEIGHTS, LoadOptions, LoadReport, LoadedModel, WeightFormat, load_burnpack,
    load_model, read_config, reconcile_config, save_burnpack,
};
pub use quantize::{
    Quantization, pack_quantized_weights, quantize_lm_head, quantize_model, quantized_parameter_count,
};
