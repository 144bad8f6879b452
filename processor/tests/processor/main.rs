//! The processor's integration tests, one binary: image parity with transformers' PIL
//! backend, text vectors, visual prompts and the fuzz corpora.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod fuzz_corpus_replay;
mod image_parity;
mod text_vectors;
mod visual_prompt;
