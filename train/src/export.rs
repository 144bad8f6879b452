//! A trained model back to a complete HF model directory.
//!
//! The weights are written as one f32 `model.safetensors` in the transformers 5.x key
//! layout (`model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
//! `lm_head.*`), LoRA adapters merged into their base weights. Tensors of the base
//! checkpoint that the Burn model does not hold (vision layers deeper than the deepest
//! selected one, `post_layernorm`) are copied from the base so that transformers finds
//! every weight. `config.json` (with `dtype: float32`), the tokenizer, chat template,
//! processor and generation files are copied from the base directory.
//!
//! Everything is written through a [`StagedDir`] that merges into the output directory
//! ([`Landing::Merge`]): the files land only when all are written, next to what the
//! directory already holds (a training run's checkpoints), and a sharded model left there
//! is removed so that it cannot shadow the new single file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use serde_json::Value;
use vipllava_convert::output::{Landing, StagedDir};
use vipllava_convert::{Checkpoint, KeyLayout, canonical_key};
use vipllava_model::VipLlava;

use crate::checkpoint::{read_state, read_trainable};
use crate::config::Trainable;
use crate::error::{TrainError, io_err};
use crate::params::write_params;
use crate::setup::build_model;
use crate::tensors::{RawF32, f32_bytes, serialize_f32, snapshot_f32, to_f32};

/// Files copied verbatim from the base model directory when present.
pub const COPIED_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
];

fn bad(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |reason| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    }
}

/// Writes `model` (no autodiff, adapters merged) as a HF model directory `out`, taking
/// the config, tokenizer and processor files and the tensors the model does not hold from
/// `base`. The files land together when all are written; other files in `out` stay.
pub fn write_hf_model(model: &VipLlava, base: &Path, out: &Path) -> Result<(), TrainError> {
    let staged = StagedDir::create(out, base, Landing::Merge)?;
    let dir = staged.path();
    let checkpoint = Checkpoint::open(base)?;
    let tensors = hf_tensors(model, &checkpoint, out)?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = serialize_f32(&tensors, Some(metadata)).map_err(bad(out))?;
    drop(tensors);
    let weights = dir.join("model.safetensors");
    std::fs::write(&weights, bytes).map_err(io_err(&weights))?;
    let cfg = hf_config(base, &checkpoint, out)?;
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| bad(out)(e.to_string()))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, json).map_err(io_err(&cfg_path))?;
    for name in COPIED_FILES {
        let src = base.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name)).map_err(io_err(&src))?;
        }
    }
    staged.commit()?;
    Ok(())
}

/// The model's tensors (PyTorch layout, 5.x file keys) and the float tensors of `base`
/// it does not hold, as f32.
fn hf_tensors(model: &VipLlava, checkpoint: &Checkpoint, out: &Path) -> Result<Vec<RawF32>, TrainError> {
    let bad = bad(out);
    let mut raw: Vec<RawF32> = Vec::new();
    let mut have = BTreeSet::new();
    for snap in model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false) {
        let v = snapshot_f32(&snap).ok_or_else(|| bad(format!("{}: cannot read as f32", snap.name)))?;
        let key = KeyLayout::Hf5.file_key(&snap.name);
        have.insert(key.clone());
        raw.push((key, snap.shape.to_vec(), f32_bytes(&v)));
    }
    let mut file_bytes: HashMap<usize, Vec<u8>> = HashMap::new();
    for (file_key, entry) in &checkpoint.tensors {
        let Some(canonical) = canonical_key(file_key) else {
            continue;
        };
        let key = KeyLayout::Hf5.file_key(&canonical);
        if have.contains(&key) || !entry.dtype.is_float() {
            continue;
        }
        let bytes = match file_bytes.entry(entry.file) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let f = &checkpoint.files[entry.file];
                e.insert(std::fs::read(f).map_err(io_err(f))?)
            }
        };
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let view = st.tensor(file_key).map_err(|e| bad(format!("{file_key}: {e}")))?;
        let v = to_f32(view.dtype(), view.data())
            .ok_or_else(|| bad(format!("{file_key}: dtype {:?}", view.dtype())))?;
        have.insert(key.clone());
        raw.push((key, view.shape().to_vec(), f32_bytes(&v)));
    }
    Ok(raw)
}

/// The base `config.json`, marked float32, with the feature layers as resolved against the
/// weights (the 7B hub file's stray scalar `vision_feature_layer: -2` means five layers to
/// transformers 4.x but one to 5.x): the list under the 5.x key, and under the 4.x plural
/// key when the base has it.
fn hf_config(base: &Path, checkpoint: &Checkpoint, out: &Path) -> Result<Value, TrainError> {
    let cfg_path = base.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?)
            .map_err(|e| bad(out)(format!("config.json: {e}")))?;
    let mut resolved = vipllava_convert::read_config(base)?;
    vipllava_convert::reconcile_config(base, &mut resolved, checkpoint)?;
    let layers = Value::from(resolved.vision_feature_layers.clone());
    if let Value::Object(m) = &mut cfg {
        m.insert("vision_feature_layer".into(), layers.clone());
        if m.contains_key("vision_feature_layers") {
            m.insert("vision_feature_layers".into(), layers);
        }
        m.insert("dtype".into(), Value::String("float32".into()));
        if m.contains_key("torch_dtype") {
            m.insert("torch_dtype".into(), Value::String("float32".into()));
        }
        for sub in ["text_config", "vision_config"] {
            if let Some(Value::Object(s)) = m.get_mut(sub) {
                for k in ["dtype", "torch_dtype"] {
                    if s.contains_key(k) {
                        s.insert(k.into(), Value::String("float32".into()));
                    }
                }
            }
        }
    }
    Ok(cfg)
}

/// Loads `base`, applies the trained parameters of a checkpoint written by
/// [`crate::checkpoint::save_checkpoint`] (LoRA adapters merged into their base weights),
/// and returns the plain model.
pub fn merged_model(base: &Path, checkpoint: &Path, device: &Device) -> Result<VipLlava, TrainError> {
    let bad = bad(checkpoint);
    let mut config = read_state(checkpoint)?.config;
    config.model = base.to_path_buf();
    let plain = device.clone().without_autodiff();
    let (model, _) = build_model(&config, &plain)?;
    let values = read_trainable(checkpoint)?;
    let (model, applied) = write_params(model, &values).map_err(&bad)?;
    if applied.len() != values.len() {
        let missing: Vec<&String> = values.keys().filter(|k| !applied.contains(k)).take(3).collect();
        return Err(bad(format!(
            "{} of its {} tensors do not fit the base model (e.g. {missing:?})",
            values.len() - applied.len(),
            values.len()
        )));
    }
    Ok(match config.trainable {
        Trainable::Lora => model.valid().materialize(),
        Trainable::Projector | Trainable::All => model.valid(),
    })
}

/// `vipllava export`: base + checkpoint -> a complete HF model directory.
pub fn export(base: &Path, checkpoint: &Path, out: &Path, device: &Device) -> Result<(), TrainError> {
    crate::checkpoint::check_out_dir(base, out)?;
    let model = merged_model(base, checkpoint, device)?;
    write_hf_model(&model, base, out)
}

/// Tensors of a model by canonical (Burn path) name, PyTorch layout, f32 — for tests.
pub fn pytorch_tensors(model: &VipLlava) -> BTreeMap<String, Vec<f32>> {
    model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), false)
        .into_iter()
        .filter_map(|s| Some((s.name.clone(), snapshot_f32(&s)?)))
        .collect()
}
