//! # vipllava-model
//!
//! The VipLlava (ViP-LLaVA) vision-language model in Burn: HF config dialects, the CLIP
//! vision tower, the multi-modal projector, the Llama decoder with a KV cache, and the
//! merge of image features into the token sequence.
//!
//! This crate knows nothing of files or tokenizers: `vipllava-convert` loads checkpoints
//! into these modules and `vipllava-processor` prepares inputs. Every constructor takes a
//! `&Device`, so the same code runs on any Burn backend compiled in.

pub mod cache;
pub mod clip;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod input;
pub mod kernels;
pub mod layers;
pub mod llama;
pub mod lora;
pub mod precision;
pub mod training_attention;
pub mod vipllava;

pub use cache::KvCache;
pub use config::{
    Activation, ClipVisionConfig, ConfigError, DEFAULT_VISION_FEATURE_LAYERS, FeatureLayerSource,
    FeatureSelectStrategy, LlamaConfig, RopeScaling, UnknownFeatureSelectStrategy, VipLlavaConfig,
};
pub use input::{ForwardInput, LogitsMode};
pub use precision::{Precision, UnknownPrecision};
pub use vipllava::{ForwardError, VipLlava};

/// Re-export of the Burn version this crate is built against.
pub use burn;
