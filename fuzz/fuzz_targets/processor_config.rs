//! Any JSON as preprocessor settings: parse and validate, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vipllava_processor::image::ImageProcessorConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ImageProcessorConfig::from_json_str(text);
    }
});
