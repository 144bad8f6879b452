//! Any bytes as `config.json`: parse and validate, then every derived size, never panic
//! (no overflow in the parameter count, no out-of-range feature layer).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vipllava_model::VipLlavaConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = VipLlavaConfig::from_json_str(text) {
        let _ = config.resolved_feature_indices();
        let _ = config.vision_layers_used();
        let _ = config.projector_input_width();
        let _ = config.image_seq_len();
        let _ = config.num_parameters();
    }
});
