//! Learning-rate schedules (Burn's own schedulers) and gradient clipping by global norm.
//!
//! # Schedules
//!
//! `constant` (the default) uses `lr` at every step. `cosine` with `w = ceil(warmup_ratio *
//! total)` warmup steps is Burn's [`SequentialLrSchedulerConfig`] of a linear warmup
//! ([`LinearLrSchedulerConfig`], constant when `w = 1`) and a
//! [`CosineAnnealingLrSchedulerConfig`] decay to 0; for step `k` (from 0):
//!
//! - `k < w`: `lr * (k + 1) / w` (the warmup reaches `lr` at its last step; transformers'
//!   warmup starts at 0 instead, which wastes a step);
//! - `k >= w`: `lr * (1 + cos(pi * (k - w) / (total - w))) / 2`.
//!
//! [`cosine_lr`] is that closed form (tests compare Burn's values with it). Burn's schedulers
//! take learning rates in `(0, 1]`. Resuming steps a fresh scheduler to the checkpoint's step.
//!
//! # Clipping
//!
//! Burn's `GradientClipping::Norm` clips each parameter's gradient by its own norm. What
//! fine-tuning recipes mean by `max_grad_norm` (PyTorch's `clip_grad_norm_`) is the norm of
//! all gradients together: [`clip_global_norm`] computes it over the trainable parameters'
//! gradients (in f32) and scales every gradient by `min(1, max / (norm + 1e-6))`.

use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::SetupError;

/// How the learning rate evolves over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `--lr` at every step.
    #[default]
    Constant,
    /// Linear warmup over `--warmup-ratio` of the steps, then cosine decay to 0.
    Cosine,
}

/// Warmup steps of a run of `total` steps: `ceil(ratio * total)`, as transformers.
pub fn warmup_steps(total: usize, ratio: f64) -> usize {
    ((ratio * total as f64).ceil() as usize).min(total)
}

/// The learning rate of step `k` (from 0) of a `total`-step cosine schedule with `warmup`
/// warmup steps (see the module docs).
pub fn cosine_lr(lr: f64, warmup: usize, total: usize, k: usize) -> f64 {
    if k < warmup {
        return lr * (k + 1) as f64 / warmup as f64;
    }
    let n = total.saturating_sub(warmup).max(1);
    lr * 0.5 * (1.0 + (std::f64::consts::PI * (k - warmup) as f64 / n as f64).cos())
}

/// The learning rate per step: Burn's scheduler for `cosine`, nothing (use `lr`) for
/// `constant`.
pub struct LrPlan {
    scheduler: Option<ModuleLrScheduler>,
    lr: f64,
}

impl LrPlan {
    /// The schedule of a `total`-step run.
    pub fn new(schedule: LrSchedule, lr: f64, warmup_ratio: f64, total: usize) -> Result<Self, SetupError> {
        let scheduler = match schedule {
            LrSchedule::Constant => None,
            LrSchedule::Cosine => Some(cosine_scheduler(lr, warmup_ratio, total)?),
        };
        Ok(Self { scheduler, lr })
    }

    /// The learning rate of the next step (advancing the schedule).
    pub fn next_lr(&mut self) -> f64 {
        match &mut self.scheduler {
            Some(s) => s.step().base(),
            None => self.lr,
        }
    }

    /// Advances the schedule past `steps` steps already done (resume).
    pub fn skip(&mut self, steps: usize) {
        for _ in 0..steps {
            self.next_lr();
        }
    }
}

fn cosine_scheduler(lr: f64, warmup_ratio: f64, total: usize) -> Result<ModuleLrScheduler, SetupError> {
    let total = total.max(1);
    let w = warmup_steps(total, warmup_ratio);
    let decay = CosineAnnealingLrSchedulerConfig::new(lr, (total - w).max(1)).with_min_lr(0.0);
    let result = if w == 0 {
        decay.init()
    } else {
        let warm = if w == 1 {
            LrSchedulerConfig::Constant(lr)
        } else {
            LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(lr / w as f64, lr, w - 1))
        };
        SequentialLrSchedulerConfig::new(vec![warm, LrSchedulerConfig::Cosine(decay)], vec![w]).init()
    };
    result.map_err(SetupError::LrSchedule)
}

/// A trainable parameter's id and rank (the gradients are stored by rank).
pub type ParamRank = (ParamId, usize);

macro_rules! by_rank {
    ($rank:expr, $d:ident => $body:expr) => {
        match $rank {
            1 => {
                const $d: usize = 1;
                $body
            }
            2 => {
                const $d: usize = 2;
                $body
            }
            3 => {
                const $d: usize = 3;
                $body
            }
            4 => {
                const $d: usize = 4;
                $body
            }
            _ => None,
        }
    };
}

fn sum_squares<const D: usize>(g: Tensor<D>) -> Tensor<1> {
    let g = if g.dtype() == DType::F32 {
        g
    } else {
        g.cast(DType::F32)
    };
    g.square().sum()
}

/// The L2 norm of all gradients of `params` together (f32 accumulation, one read-back).
pub fn global_norm(grads: &GradientsParams, params: &[ParamRank]) -> f64 {
    let mut total: Option<Tensor<1>> = None;
    for &(id, rank) in params {
        let part = by_rank!(rank, D => grads.get::<D>(id).map(sum_squares));
        if let Some(p) = part {
            total = Some(match total {
                Some(t) => t + p,
                None => p,
            });
        }
    }
    total
        .and_then(|t| t.into_data().convert::<f32>().try_to_vec::<f32>().ok())
        .and_then(|v| v.first().copied())
        .map_or(0.0, |s| f64::from(s).sqrt())
}

/// Scales the gradients of `params` so that their global norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: factor `min(1, max / (norm + 1e-6))`). Returns the norm
/// before clipping.
pub fn clip_global_norm(grads: &mut GradientsParams, params: &[ParamRank], max_norm: f64) -> f64 {
    let norm = global_norm(grads, params);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for &(id, rank) in params {
            let _ = by_rank!(rank, D => {
                grads.remove::<D>(id).map(|g| grads.register::<D>(id, g.mul_scalar(coef)))
            });
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn burns_cosine_schedule_is_the_closed_form() {
        for (lr, ratio, total) in [
            (1e-3, 0.0, 10),
            (2e-4, 0.1, 25),
            (0.5, 0.3, 7),
            (1e-2, 0.05, 1),
            (1e-3, 0.5, 2),
        ] {
            let w = warmup_steps(total, ratio);
            let mut plan = LrPlan::new(LrSchedule::Cosine, lr, ratio, total).unwrap();
            for k in 0..total {
                let got = plan.next_lr();
                let want = cosine_lr(lr, w, total, k);
                assert!(
                    (got - want).abs() <= 1e-12 * lr,
                    "lr {lr} ratio {ratio} total {total} step {k}: burn {got}, closed form {want}"
                );
            }
        }
        // A few values by hand: 10 steps, 2 of warmup.
        let lr = 1e-3;
        assert_eq!(warmup_steps(10, 0.2), 2);
        assert!((cosine_lr(lr, 2, 10, 0) - 5e-4).abs() < 1e-15);
        assert!((cosine_lr(lr, 2, 10, 1) - 1e-3).abs() < 1e-15);
        assert!((cosine_lr(lr, 2, 10, 2) - 1e-3).abs() < 1e-15);
        assert!((cosine_lr(lr, 2, 10, 6) - 5e-4).abs() < 1e-15, "half way down");
        let mut constant = LrPlan::new(LrSchedule::Constant, 3.0, 0.5, 4).unwrap();
        assert!(
            (0..4).all(|_| constant.next_lr() == 3.0),
            "constant: any lr, exactly"
        );
        // Resuming: skipping k steps gives step k's rate.
        let mut resumed = LrPlan::new(LrSchedule::Cosine, lr, 0.2, 10).unwrap();
        resumed.skip(6);
        assert!((resumed.next_lr() - cosine_lr(lr, 2, 10, 6)).abs() < 1e-15);
        assert!(
            LrPlan::new(LrSchedule::Cosine, 2.0, 0.0, 10).is_err(),
            "burn: lr in (0, 1]"
        );
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let device = Device::flex();
        let mut grads = GradientsParams::new();
        let (a, b) = (ParamId::new(), ParamId::new());
        grads.register::<1>(
            a,
            Tensor::from_data(TensorData::new(vec![3.0f32, 0.0], [2]), &device),
        );
        grads.register::<2>(
            b,
            Tensor::from_data(TensorData::new(vec![0.0f32, 4.0], [1, 2]), &device),
        );
        let params = [(a, 1), (b, 2)];
        assert!((global_norm(&grads, &params) - 5.0).abs() < 1e-6);
        // Within the bound: untouched.
        assert!((clip_global_norm(&mut grads, &params, 10.0) - 5.0).abs() < 1e-6);
        assert!((global_norm(&grads, &params) - 5.0).abs() < 1e-6);
        // Above: scaled together, directions kept.
        let before = clip_global_norm(&mut grads, &params, 1.0);
        assert!((before - 5.0).abs() < 1e-6);
        let after = global_norm(&grads, &params);
        assert!(after <= 1.0 && after > 0.999, "{after}");
        let ga = grads
            .get::<1>(a)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-5, "{ga:?}");
    }
}
