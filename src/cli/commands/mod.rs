//! One file per subcommand: its arguments (clap) and its body.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod draw;
pub mod eval;
pub mod export;
pub mod generate;
pub mod info;
pub mod logits;
pub mod preprocess;
pub mod serve;
pub mod serve_device;
pub mod train;
