//! Pad mode (ViP-LLaVA training preprocessing) versus crop mode (transformers).

use crate::common::fixture;
use vipllava::processor::image::{ImageMode, ImageProcessorConfig, load_image, preprocess_with_mode};

#[test]
fn pad_mode_keeps_the_whole_image_with_mean_colour_bands() {
    let dir = fixture("tiny-5x-f32");
    let config = ImageProcessorConfig::from_model_dir(&dir).expect("config");
    // 160x53: crop mode keeps only the middle third, pad mode keeps everything.
    let image = load_image(&fixture("images/coffee_wide.png")).expect("image");
    let crop = preprocess_with_mode(&image, &config, ImageMode::Crop).expect("crop");
    let pad = preprocess_with_mode(&image, &config, ImageMode::Pad).expect("pad");
    assert_eq!((pad.channels, pad.height, pad.width), (3, 56, 56));
    assert_ne!(crop.data, pad.data);
    // The top rows are the pad colour (122, 116, 104), normalised with CLIP's mean/std.
    let expected = [122.0f32, 116.0, 104.0];
    for (c, colour) in expected.iter().enumerate() {
        let want = (colour / 255.0 - config.image_mean[c]) / config.image_std[c];
        for x in 0..56 {
            let got = pad.data[c * 56 * 56 + x];
            assert!((got - want).abs() <= 1e-4, "channel {c} x {x}: {got} vs {want}");
        }
    }
    // The middle row is image content, not pad colour.
    let mid = 28 * 56 + 28;
    let want = (expected[0] / 255.0 - config.image_mean[0]) / config.image_std[0];
    assert!((pad.data[mid] - want).abs() > 1e-3);
    assert_eq!(ImageMode::parse("pad"), Some(ImageMode::Pad));
    assert_eq!(ImageMode::parse("zoom"), None);
}
