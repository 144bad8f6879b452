//! Any bytes: decode (with the pixel limit) and, if that works, preprocess at 56 px.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vipllava_processor::image::{ImageProcessorConfig, decode_image_with_limit, preprocess};

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = decode_image_with_limit(data, 4_000_000) {
        let config = ImageProcessorConfig::from_json_str(
            r#"{"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}"#,
        )
        .expect("static config");
        let _ = preprocess(&img, &config);
    }
});
