//! A trained model back to a complete HF model directory.
//!
//! The weights are written in the transformers 5.x key layout (`model.language_model.*`,
//! `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.*`), LoRA adapters
//! merged into their base weights, **tensor by tensor** ([`crate::shards`]): the export
//! needs the loaded model plus one tensor, not a second copy of the weights. They are
//! written in the base checkpoint's dtype unless [`ExportOptions::dtype`] says otherwise,
//! as one `model.safetensors` or, past [`ExportOptions::max_shard_bytes`] (5 GB by default,
//! as the hub), as `model-0000i-of-0000n.safetensors` shards with the hub's
//! `model.safetensors.index.json`. Tensors of the base checkpoint that the Burn model does
//! not hold (vision layers deeper than the deepest selected one, `post_layernorm`) are copied
//! from the base so that transformers finds every weight. `config.json` (its `dtype` set to
//! the written one), the tokenizer, chat template, processor and generation files are
//! copied from the base directory.
//!
//! Everything is written through a [`StagedDir`] that merges into the output directory
//! ([`Landing::Merge`]): the files land only when all are written, next to what the
//! directory already holds (a training run's checkpoints). Weights of an earlier export
//! there that would shadow or mix with the new ones (a single file when shards arrive,
//! shards when a single file arrives) are removed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use burn::module::Module;
use burn::tensor::{DType, Device, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use serde_json::Value;
use vipllava_convert::output::{Landing, StagedDir};
use vipllava_convert::{Checkpoint, DiskDType, KeyLayout, canonical_key};
use vipllava_model::VipLlava;

use crate::checkpoint::{read_state, read_trainable};
use crate::config::{ExportDtype, Trainable};
use crate::error::{TrainError, io_err};
use crate::params::write_params;
use crate::setup::build_model;
use crate::shards::{MAX_SHARD_BYTES, PendingTensor, WrittenWeights, write_weights};
use crate::tensors::snapshot_f32;

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

/// How the weights are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// Dtype of the weights; `None`: the base checkpoint's ([`base_dtype`]).
    pub dtype: Option<ExportDtype>,
    /// Largest weight file in bytes; a bigger model is sharded.
    pub max_shard_bytes: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: MAX_SHARD_BYTES,
        }
    }
}

impl ExportOptions {
    /// The options of a training run's settings (`--export-dtype`, `--max-shard-size`).
    pub fn of(config: &crate::config::TrainConfig) -> Self {
        Self {
            dtype: config.export_dtype,
            max_shard_bytes: config.max_shard_size.unwrap_or(MAX_SHARD_BYTES),
        }
    }

    /// These options with another dtype.
    pub fn with_dtype(mut self, dtype: ExportDtype) -> Self {
        self.dtype = Some(dtype);
        self
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// Dtype of the weights.
    pub dtype: ExportDtype,
    /// The weight files.
    pub weights: WrittenWeights,
}

fn bad(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |reason| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    }
}

/// The dtype that holds most of the base checkpoint's float weights (by bytes); f64
/// checkpoints export as f32.
pub fn base_dtype(checkpoint: &Checkpoint) -> ExportDtype {
    let mut bytes: BTreeMap<DiskDType, u64> = BTreeMap::new();
    for e in checkpoint.tensors.values().filter(|e| e.dtype.is_float()) {
        *bytes.entry(e.dtype).or_default() += e.bytes.end - e.bytes.start;
    }
    match bytes.into_iter().max_by_key(|(_, b)| *b).map(|(d, _)| d) {
        Some(DiskDType::F16) => ExportDtype::F16,
        Some(DiskDType::BF16) => ExportDtype::Bf16,
        _ => ExportDtype::F32,
    }
}

/// [`write_hf_model_with`] with the default options (the base checkpoint's dtype, 5 GB
/// shards).
pub fn write_hf_model(model: &VipLlava, base: &Path, out: &Path) -> Result<ExportReport, TrainError> {
    write_hf_model_with(model, base, out, &ExportOptions::default())
}

/// Writes `model` (no autodiff, adapters merged) as a HF model directory `out`, taking
/// the config, tokenizer and processor files and the tensors the model does not hold from
/// `base`. The files land together when all are written; other files in `out` stay, but
/// weights of an earlier export that the new ones replace are removed.
pub fn write_hf_model_with(
    model: &VipLlava,
    base: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportReport, TrainError> {
    let staged = StagedDir::create(out, base, Landing::Merge)?;
    let dir = staged.path();
    let checkpoint = Checkpoint::open(base)?;
    let dtype = options.dtype.unwrap_or_else(|| base_dtype(&checkpoint));
    let tensors = hf_tensors(model, &checkpoint, dtype.dtype())?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let weights = write_weights(dir, tensors, options.max_shard_bytes, &metadata)?;
    let cfg = hf_config(base, &checkpoint, out, dtype)?;
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| bad(out)(e.to_string()))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, json).map_err(io_err(&cfg_path))?;
    for name in COPIED_FILES {
        let src = base.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name)).map_err(io_err(&src))?;
        }
    }
    // Landing::Merge also removes the earlier weights that would shadow or mix with these.
    staged.commit()?;
    Ok(ExportReport { dtype, weights })
}

/// The model's tensors (PyTorch layout, 5.x file keys) and the float tensors of `base` it
/// does not hold, in `dtype`, each produced only when written.
fn hf_tensors<'a>(
    model: &VipLlava,
    checkpoint: &'a Checkpoint,
    dtype: DType,
) -> Result<Vec<PendingTensor<'a>>, TrainError> {
    let mut out: Vec<PendingTensor<'a>> = Vec::new();
    let mut have = BTreeSet::new();
    for snap in model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false) {
        let key = KeyLayout::Hf5.file_key(&snap.name);
        have.insert(key.clone());
        let shape = snap.shape.to_vec();
        out.push(PendingTensor {
            key,
            shape: shape.clone(),
            dtype,
            produce: Box::new(move || {
                let bytes = snap.to_bytes().map_err(|e| format!("{e:?}"))?;
                let data = TensorData::try_from_bytes(bytes, shape.clone(), snap.dtype)
                    .map_err(|e| e.to_string())?;
                cast(data, dtype)
            }),
        });
    }
    for (file_key, entry) in &checkpoint.tensors {
        let Some(canonical) = canonical_key(file_key) else {
            continue;
        };
        let key = KeyLayout::Hf5.file_key(&canonical);
        if have.contains(&key) || !entry.dtype.is_float() {
            continue;
        }
        have.insert(key.clone());
        let file = &checkpoint.files[entry.file];
        let source = match entry.dtype {
            DiskDType::F32 => DType::F32,
            DiskDType::F16 => DType::F16,
            DiskDType::BF16 => DType::BF16,
            DiskDType::F64 => DType::F64,
            DiskDType::Integer(_) => continue,
        };
        let (range, shape) = (entry.bytes.clone(), entry.shape.clone());
        out.push(PendingTensor {
            key,
            shape: entry.shape.clone(),
            dtype,
            produce: Box::new(move || {
                let bytes =
                    read_range(file, range.clone()).map_err(|e| format!("{}: {e}", file.display()))?;
                let data =
                    TensorData::try_from_bytes_vec(from_le(bytes, source.size()), shape.clone(), source)
                        .map_err(|e| e.to_string())?;
                cast(data, dtype)
            }),
        });
    }
    Ok(out)
}

/// `data` in `dtype`.
fn cast(data: TensorData, dtype: DType) -> Result<TensorData, String> {
    data.try_cast(dtype).map_err(|e| e.to_string())
}

/// Bytes `range` of a file.
fn read_range(path: &Path, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(range.start))?;
    let len = usize::try_from(range.end - range.start).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Little-endian elements of `size` bytes in native order.
fn from_le(mut bytes: Vec<u8>, size: usize) -> Vec<u8> {
    if cfg!(target_endian = "big") {
        for c in bytes.chunks_exact_mut(size) {
            c.reverse();
        }
    }
    bytes
}

/// The base `config.json`, its dtype fields set to `dtype`, with the feature layers as resolved against the
/// weights (the 7B hub file's stray scalar `vision_feature_layer: -2` means five layers to
/// transformers 4.x but one to 5.x): the list under the 5.x key, and under the 4.x plural
/// key when the base has it.
fn hf_config(
    base: &Path,
    checkpoint: &Checkpoint,
    out: &Path,
    dtype: ExportDtype,
) -> Result<Value, TrainError> {
    let name = || Value::String(dtype.torch_name().into());
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
        m.insert("dtype".into(), name());
        if m.contains_key("torch_dtype") {
            m.insert("torch_dtype".into(), name());
        }
        for sub in ["text_config", "vision_config"] {
            if let Some(Value::Object(s)) = m.get_mut(sub) {
                for k in ["dtype", "torch_dtype"] {
                    if s.contains_key(k) {
                        s.insert(k.into(), name());
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
    // QLoRA trained over a quantized base; the adapters merge into the unquantized one.
    config.quantize = None;
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

/// `vipllava export`: base + checkpoint -> a complete HF model directory, with the
/// default options (the base checkpoint's dtype, 5 GB shards).
pub fn export(
    base: &Path,
    checkpoint: &Path,
    out: &Path,
    device: &Device,
) -> Result<ExportReport, TrainError> {
    export_with(base, checkpoint, out, device, &ExportOptions::default())
}

/// [`export`] with the given options.
pub fn export_with(
    base: &Path,
    checkpoint: &Path,
    out: &Path,
    device: &Device,
    options: &ExportOptions,
) -> Result<ExportReport, TrainError> {
    crate::checkpoint::check_out_dir(base, out)?;
    let model = merged_model(base, checkpoint, device)?;
    write_hf_model_with(&model, base, out, options)
}

/// Tensors of a model by canonical (Burn path) name, PyTorch layout, f32 — for tests.
pub fn pytorch_tensors(model: &VipLlava) -> BTreeMap<String, Vec<f32>> {
    model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), false)
        .into_iter()
        .filter_map(|s| Some((s.name.clone(), snapshot_f32(&s)?)))
        .collect()
}
