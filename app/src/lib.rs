//! # vipllava-app
//!
//! The VipLlava desktop app: open a model and a photo, draw a box, an arrow or a scribble
//! on it with the mouse, ask about it and watch the answer stream. Built on eframe/egui
//! (drawn with wgpu) and the `vipllava` library alone: the marks are the processor's own
//! visual prompts in original-image pixels, drawn by the same code as `vipllava draw`, and
//! answers come from the same [`Conversation`](vipllava::Conversation) API as `vipllava chat`.
//!
//! - [`app`]: the window ([`VipApp`], an [`eframe::App`]);
//! - [`canvas`]: image placement, the crop/pad overlay, outlines;
//! - [`marks`]: tools, the marks with selection and undo/redo;
//! - [`worker`]: the model thread (loading, asking, stopping);
//! - [`export`]: the equivalent `vipllava generate` command line;
//! - [`settings`]: what is remembered between runs and what the command line sets.

pub mod app;
pub mod canvas;
pub mod export;
pub mod marks;
pub mod settings;
pub mod worker;

pub use app::VipApp;
pub use settings::{Launch, ModelSettings, Settings};
