//! # vipllava-processor
//!
//! Everything between a user's image + question and the model's inputs, usable without
//! the model crate: CLIP image preprocessing reproducing transformers' PIL backend
//! bit for bit, with ViP-LLaVA's pad mode ([`image`]); visual prompts drawn on the image
//! as the model was trained ([`visual_prompt`]); the checkpoint's tokenizer, Jinja chat
//! template and `<image>` expansion ([`text`]).

pub mod image;
mod json;
pub mod text;
pub mod visual_prompt;

pub use text::{
    ChatMessage, ChatTemplate, ContentPart, ImageTokenConfig, TextError, TextTokenizer,
    VisionFeatureSelectStrategy, VisionInput,
};
