//! The facade's integration tests, linked into one binary: each test file used to be its
//! own binary of ~200 MB (Burn is statically linked into every one), which filled CI disks
//! and spent minutes linking. Run one area with a filter, e.g.
//! `cargo test --test integration generation::`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

mod backends;
mod bad_inputs;
mod batch;
mod conversation;
mod dtype;
mod generation;
mod image_mode;
mod loading;
mod parity;
mod remote;
mod scheduler;
mod serve;
mod train_cli;
mod train_scale;
mod visual_prompts_cli;
mod wgpu;
