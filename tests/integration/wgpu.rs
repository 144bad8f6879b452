//! The model on wgpu (in CI: Mesa's lavapipe, a software Vulkan driver) against the CPU:
//! the same greedy tokens and logits within a stated bound. Needs `--features wgpu` and a
//! Vulkan driver (skipped without an adapter unless `VIPLLAVA_REQUIRE_WGPU` is set); slow, so it uses the smallest fixtures.
#![cfg(feature = "wgpu")]

use crate::common::{logits_and_tokens, max_slice_diff, wgpu_device_or_skip};
use burn::tensor::Device;

/// GPU reductions run in another order than the CPU's: allow float noise, not more.
const LOGIT_BOUND: f32 = 1e-3;

#[test]
fn wgpu_matches_cpu() {
    let Some(gpu) = wgpu_device_or_skip() else {
        return;
    };
    for name in ["tiny-5x-f32", "tiny-gqa-f16"] {
        let (cpu_logits, cpu_tokens) = logits_and_tokens(name, &Device::flex(), 8);
        let (gpu_logits, gpu_tokens) = logits_and_tokens(name, &gpu, 8);
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

/// Training on wgpu against the CPU (`wgpu::train::`).
#[path = "wgpu_train.rs"]
mod train;
