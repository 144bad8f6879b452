//! Any bytes as `model.safetensors.index.json`: parsed or refused without panicking, and no
//! accepted shard name may leave the model directory.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vipllava_convert::checkpoint::parse_index;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(entries) = parse_index(text, Path::new("model.safetensors.index.json")) {
        for (_, shard) in entries {
            assert!(!shard.contains('/') && !shard.contains('\\') && !shard.starts_with(".."));
        }
    }
});
