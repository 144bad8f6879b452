//! Any bytes as a safetensors file: the header parser must refuse or accept without
//! panicking, and every tensor it accepts must lie inside the file with the byte length
//! its shape and dtype need.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vipllava_convert::checkpoint::parse_safetensors_bytes;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = parse_safetensors_bytes(data, Path::new("fuzz.safetensors")) {
        for (_, tensor) in header {
            let needed = tensor
                .shape
                .iter()
                .try_fold(tensor.dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
                .expect("accepted shapes have a byte length");
            assert_eq!(needed, tensor.bytes.end - tensor.bytes.start);
            assert!(tensor.bytes.end <= data.len() as u64);
        }
    }
});
