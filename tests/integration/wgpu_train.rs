//! Training on wgpu (in CI: Mesa's lavapipe) against the CPU: the tiny fixture's SGD losses
//! step for step, for the projector and for LoRA adapters.

use std::path::Path;

use burn::tensor::Device;
use vipllava::train::trainer::{LoraTarget, OptimizerKind, TrainConfig, Trainable, Trainer};

use crate::common::{fixture, wgpu_device_or_skip};

/// GPU reductions run in another order than the CPU's; the bound.
const LOSS_BOUND: f64 = 1e-4;

fn losses(trainable: Trainable, device: &Device, out: &Path) -> Vec<f64> {
    let mut c = TrainConfig::new(fixture("tiny-5x-f32"), fixture("train/data.json"), out);
    c.trainable = trainable;
    c.optimizer = OptimizerKind::Sgd;
    c.lr = 0.05;
    c.max_steps = Some(6);
    if trainable == Trainable::Lora {
        c.lora_rank = 4;
        c.lora_alpha = 8.0;
        c.lora_targets = vec![LoraTarget::Attn, LoraTarget::Mlp];
    }
    let mut t = Trainer::new(c, device).expect("trainer");
    let mut out = Vec::new();
    while let Some(r) = t.step().expect("step") {
        out.push(r.loss);
    }
    out
}

#[test]
fn sgd_losses_on_wgpu_match_cpu() {
    let Some(gpu) = wgpu_device_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    for trainable in [Trainable::Projector, Trainable::Lora] {
        let cpu = losses(trainable, &Device::flex(), &tmp.path().join("cpu"));
        let wgpu = losses(trainable, &gpu, &tmp.path().join("wgpu"));
        assert_eq!(cpu.len(), wgpu.len());
        let worst = cpu
            .iter()
            .zip(&wgpu)
            .map(|(a, b)| (a - b).abs() / a.abs())
            .fold(0f64, f64::max);
        println!(
            "{trainable:?}: wgpu vs cpu SGD losses over {} steps, worst relative difference {worst:e}",
            cpu.len()
        );
        assert!(worst <= LOSS_BOUND, "{trainable:?}: cpu {cpu:?} wgpu {wgpu:?}");
    }
}
