//! What a run trains with: the model (base weights, LoRA adapters), the trainable set and
//! the optimizer.

use std::collections::BTreeMap;

use burn::module::{Lora, Module, ModuleMapper, Param, ParamGroup, ParamId};
use burn::optim::{
    AdamWConfig, ModuleOptimizer, SgdConfig, decay::WeightDecayConfig, momentum::MomentumConfig,
};
use burn::tensor::{Device, GradientCheckpointingStrategy, Tensor, TensorData};
use vipllava_convert::{LoadOptions, load_model};
use vipllava_model::{VipLlava, VipLlavaConfig};

use crate::config::{OptimizerKind, TrainConfig, Trainable};
use crate::error::{SetupError, TrainError};
use crate::lora_target::LoraTarget;
use crate::params::{canonical_ids, list_params, path_id, write_params};

/// Builds the model as configured: base weights, LoRA adapters when asked, stable ids.
/// Nothing is marked trainable yet.
///
/// The weights load on the plain device and are then handed to `device`'s autodiff
/// context: loaded on an autodiff device with gradient checkpointing, every dtype change
/// and quantization of the load stays referenced by the checkpointer (the 1.1B bf16 q8
/// load peaked at 4.9 GB instead of 2.0 GB, 7B ran out of memory), and the quantizer only
/// takes its fast path (blocks along the input, the layout of the int8 kernels) on the
/// plain device.
pub fn build_model(config: &TrainConfig, device: &Device) -> Result<(VipLlava, VipLlavaConfig), TrainError> {
    let loaded = load_model(
        &config.model,
        &device.clone().without_autodiff(),
        &LoadOptions {
            precision: config.dtype,
            quantize: config.quantize,
            // Training computes the loss through lm_head: keep it in the load dtype.
            quantize_lm_head: None,
        },
    )?;
    let mut model = with_autodiff_of(loaded.model, device);
    if config.trainable == Trainable::Lora {
        let group = ParamGroup::from_regex(lora_regex(&config.lora_modules()?))
            .map_err(|e| SetupError::LoraPattern(format!("{e:?}")))?;
        model = model.apply_lora(Lora::new(config.lora_rank, config.lora_alpha).set_param_group(group));
        model = init_lora_factors(canonical_ids(model), config.seed, config.lora_rank)?;
    }
    Ok((canonical_ids(model), loaded.config))
}

/// `model` with its parameters in the autodiff context of `device` (its gradient
/// checkpointing strategy included), the values themselves not copied; unchanged when
/// `device` has no autodiff.
fn with_autodiff_of(model: VipLlava, device: &Device) -> VipLlava {
    if !device.is_autodiff() {
        return model;
    }
    model.map(&mut IntoAutodiff {
        strategy: device.gradient_checkpointing_strategy(),
    })
}

/// Moves each float parameter into an autodiff context (see [`with_autodiff_of`]).
struct IntoAutodiff {
    strategy: Option<GradientCheckpointingStrategy>,
}

impl ModuleMapper for IntoAutodiff {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let strategy = self.strategy;
        param.map(|tensor| {
            let tensor = tensor.autodiff();
            match strategy {
                Some(strategy) => tensor.with_gradient_checkpointing_strategy(strategy),
                None => tensor,
            }
        })
    }
}

/// Paths of the LoRA base weights for the given projections.
fn lora_regex(modules: &[LoraTarget]) -> String {
    let names = |attention: bool| -> Vec<&str> {
        modules
            .iter()
            .filter(|m| m.is_attention() == attention)
            .map(|m| m.name())
            .collect()
    };
    let (attn, mlp) = (names(true), names(false));
    let mut alts = Vec::new();
    if !attn.is_empty() {
        alts.push(format!("self_attn\\.({})", attn.join("|")));
    }
    if !mlp.is_empty() {
        alts.push(format!("mlp\\.({})", mlp.join("|")));
    }
    format!(
        "^language_model\\.layers\\.[0-9]+\\.({})\\.weight$",
        alts.join("|")
    )
}

/// Standard LoRA initialisation, `A ~ N(0, 1/rank)` and `B = 0`, drawn from a generator
/// seeded by `seed` and each factor's path, so that it does not depend on any global random
/// state (or on other threads drawing from it).
fn init_lora_factors(model: VipLlava, seed: u64, rank: usize) -> Result<VipLlava, SetupError> {
    use rand::{RngExt, SeedableRng, rngs::StdRng};
    let std = 1.0 / rank as f64;
    let mut values = BTreeMap::new();
    for p in list_params(&model) {
        if !p.path.ends_with(".lora.a") {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(seed ^ path_id(&p.path).val());
        let n: usize = p.shape.iter().product();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller: two normals from two uniforms in (0, 1].
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let t = 2.0 * std::f64::consts::PI * u2;
            v.push((r * t.cos()) as f32);
            if v.len() < n {
                v.push((r * t.sin()) as f32);
            }
        }
        values.insert(p.path, TensorData::new(v, p.shape));
    }
    if values.is_empty() {
        return Err(SetupError::LoraMatchesNothing);
    }
    write_params(model, &values)
        .map(|(m, _)| m)
        .map_err(SetupError::LoraInit)
}

/// True for the paths that train under `trainable`.
pub fn is_trainable(trainable: Trainable, path: &str) -> bool {
    match trainable {
        Trainable::Projector => path.starts_with("multi_modal_projector."),
        Trainable::Lora => path.contains(".lora."),
        Trainable::All => true,
    }
}

/// The parameters of `model` that train under `trainable`, by path; never empty.
pub fn trainable_params(
    model: &VipLlava,
    trainable: Trainable,
) -> Result<Vec<(String, ParamId)>, SetupError> {
    let params: Vec<(String, ParamId)> = list_params(model)
        .into_iter()
        .filter(|p| is_trainable(trainable, &p.path))
        .map(|p| (p.path, p.id))
        .collect();
    if params.is_empty() {
        return Err(SetupError::NothingToTrain);
    }
    Ok(params)
}

/// Freezes every parameter of `model` but `trainable`.
pub fn mark_trainable(model: VipLlava, trainable: &[(String, ParamId)]) -> VipLlava {
    let ids: Vec<ParamId> = trainable.iter().map(|(_, id)| *id).collect();
    model.freeze().unfreeze_group(ParamGroup::from_ids(ids))
}

/// A fresh optimizer as configured.
pub fn make_optimizer(config: &TrainConfig) -> ModuleOptimizer {
    match config.optimizer {
        OptimizerKind::Sgd => {
            let mut c = SgdConfig::new();
            if config.weight_decay > 0.0 {
                c = c.with_weight_decay(Some(WeightDecayConfig::new(config.weight_decay as f32)));
            }
            if config.momentum > 0.0 {
                c = c.with_momentum(Some(
                    MomentumConfig::new()
                        .with_momentum(config.momentum)
                        .with_dampening(0.0)
                        .with_nesterov(false),
                ));
            }
            c.init()
        }
        OptimizerKind::Adamw => AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(config.weight_decay as f32)
            .init(),
    }
}

/// A stand-in model while the real one is moved through the optimizer: lazily initialised
/// parameters, nothing is allocated until read.
pub(crate) fn placeholder(config: &VipLlavaConfig, device: &Device) -> VipLlava {
    VipLlava::new(config, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_pattern_names_each_block() {
        assert_eq!(
            lora_regex(&[LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj]),
            "^language_model\\.layers\\.[0-9]+\\.(self_attn\\.(q_proj|v_proj)|mlp\\.(down_proj))\\.weight$"
        );
        assert_eq!(
            lora_regex(&LoraTarget::MLP),
            "^language_model\\.layers\\.[0-9]+\\.(mlp\\.(gate_proj|up_proj|down_proj))\\.weight$"
        );
    }
}
