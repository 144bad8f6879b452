//! A trained model back to a complete HF model directory.
//!
//! The weights are written as one f32 `model.safetensors` in the transformers 5.x key
//! layout (`model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
//! `lm_head.*`), LoRA adapters merged into their base weights. Tensors of the base
//! checkpoint that the Burn model does not hold (vision layers deeper than the deepest
//! selected one, `post_layernorm`) are copied from the base so that transformers finds
//! every weight. `config.json` (with `dtype: float32`), the tokenizer, chat template,
//! processor and generation files are copied from the base directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use serde_json::Value;
use vipllava_convert::{Checkpoint, KeyLayout, canonical_key};
use vipllava_model::VipLlava;

use crate::params::write_params;
use crate::trainer::{
    STATE_FILE, TRAINABLE_FILE, TrainState, Trainable, atomic_write, build_model, check_out_dir,
    read_safetensors,
};
use crate::{TrainError, io_err};

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

/// Writes `model` (no autodiff, adapters merged) as a HF model directory `out`, taking
/// the config, tokenizer and processor files and the tensors the model does not hold from
/// `base`. Every file goes through a temporary file and a rename.
pub fn write_hf_model(model: &VipLlava, base: &Path, out: &Path) -> Result<(), TrainError> {
    check_out_dir(base, out)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: out.to_path_buf(),
        reason,
    };
    // Model tensors, PyTorch layout, canonical names -> 5.x file keys.
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut have = std::collections::BTreeSet::new();
    for snap in model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false) {
        let v = snapshot_f32(&snap).ok_or_else(|| bad(format!("{}: cannot read as f32", snap.name)))?;
        let key = KeyLayout::Hf5.file_key(&snap.name);
        have.insert(key.clone());
        raw.push((
            key,
            snap.shape.to_vec(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    // Base tensors the model does not hold.
    let checkpoint = Checkpoint::open(base)?;
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
        raw.push((
            key,
            view.shape().to_vec(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| bad(format!("{n}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| bad(e.to_string()))?;
    remove_stale_shards(out)?;
    atomic_write(&out.join("model.safetensors"), &bytes)?;
    // config.json, marked float32.
    let cfg_path = base.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?)
            .map_err(|e| bad(format!("config.json: {e}")))?;
    // The feature layers as resolved against the weights (the 7B hub file's stray scalar
    // `vision_feature_layer: -2` means five layers to transformers 4.x but one to 5.x): the
    // list under the 5.x key, and under the 4.x plural key when the base has it.
    let mut resolved = vipllava_convert::read_config(base)?;
    vipllava_convert::reconcile_config(base, &mut resolved, &checkpoint)?;
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
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| bad(e.to_string()))?;
    atomic_write(&out.join("config.json"), json.as_bytes())?;
    for name in COPIED_FILES {
        let src = base.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(io_err(&src))?;
            atomic_write(&out.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// A sharded model previously in `out` (index + shards) must not shadow the new single file.
fn remove_stale_shards(out: &Path) -> Result<(), TrainError> {
    let index = out.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&text)
        && let Some(Value::Object(map)) = m.get("weight_map")
    {
        let shards: std::collections::BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        for shard in shards {
            let p = out.join(shard);
            // Only plain file names inside `out`.
            if Path::new(shard).components().count() == 1 && p.is_file() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
    }
    std::fs::remove_file(&index).map_err(io_err(&index))
}

fn snapshot_f32(snap: &burn_store::burn_pack::Tensor) -> Option<Vec<f32>> {
    use burn::tensor::DType;
    let bytes = snap.to_bytes().ok()?;
    let st = match snap.dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => return None,
    };
    to_f32(st, &bytes)
}

fn to_f32(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        _ => return None,
    })
}

fn half_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let mut e: i32 = -14;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Loads `base`, applies the trained parameters of a checkpoint written by
/// [`crate::trainer::Trainer::save_checkpoint`] (LoRA adapters merged into their base
/// weights), and returns the plain model.
pub fn merged_model(base: &Path, checkpoint: &Path, device: &Device) -> Result<VipLlava, TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: checkpoint.to_path_buf(),
        reason,
    };
    let state_path = checkpoint.join(STATE_FILE);
    let state: TrainState =
        serde_json::from_str(&std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?)
            .map_err(|e| bad(e.to_string()))?;
    let mut config = state.config;
    config.model = base.to_path_buf();
    let plain = device.clone().without_autodiff();
    let (model, _) = build_model(&config, &plain)?;
    let values = read_safetensors(&checkpoint.join(TRAINABLE_FILE))?;
    let (model, applied) = write_params(model, &values).map_err(bad)?;
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
    check_out_dir(base, out)?;
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
