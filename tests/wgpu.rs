//! The model on wgpu (in CI: Mesa's lavapipe, a software Vulkan driver) against the CPU:
//! the same greedy tokens and logits within a stated bound. Needs `--features wgpu` and a
//! Vulkan driver; slow, so it uses the smallest fixtures.
#![cfg(feature = "wgpu")]

mod common;

use burn::tensor::Device;
use common::{fixture, max_slice_diff};
use vipllava::generate::GenerationOptions;
use vipllava::pipeline::{Pipeline, Prompt};
use vipllava::processor::image::load_image;
use vipllava::{LoadOptions, open_device};

/// GPU reductions run in another order than the CPU's: allow float noise, not more.
const LOGIT_BOUND: f32 = 1e-3;

fn logits_and_tokens(name: &str, device: &Device) -> (Vec<f32>, Vec<u32>) {
    let pipeline = Pipeline::load(&fixture(name), device, &LoadOptions::default()).expect("load");
    let image = load_image(&fixture("images/astronaut.png")).expect("image");
    let prepared = pipeline
        .prepare(&[image], &Prompt::User("What is in the red box?".into()))
        .expect("prepare");
    let (logits, _) = pipeline.prefill(&prepared).expect("prefill");
    let options = GenerationOptions {
        max_new_tokens: 8,
        ..pipeline.generation_defaults.clone()
    };
    let tokens = pipeline
        .generate(&prepared, &options, |_| {})
        .expect("generate")
        .token_ids;
    (logits, tokens)
}

#[test]
fn wgpu_matches_cpu() {
    let gpu = open_device("wgpu").expect("wgpu device (is a Vulkan driver installed?)");
    for name in ["tiny-5x-f32", "tiny-gqa-f16"] {
        let (cpu_logits, cpu_tokens) = logits_and_tokens(name, &Device::flex());
        let (gpu_logits, gpu_tokens) = logits_and_tokens(name, &gpu);
        let diff = max_slice_diff(&gpu_logits, &cpu_logits);
        println!(
            "{name}: wgpu vs cpu max |diff| of logits {diff:e}, tokens equal: {}",
            gpu_tokens == cpu_tokens
        );
        assert!(
            diff <= LOGIT_BOUND,
            "{name}: wgpu logits differ from cpu by {diff}"
        );
        assert_eq!(gpu_tokens, cpu_tokens, "{name}: greedy tokens");
    }
}
