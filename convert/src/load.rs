//! HF model directory -> `VipLlava` module, and Burn-native (burnpack) checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue};
use burn::tensor::{AllocationProperty, Bytes, DType, Device, Shape, Tensor, TensorData};
use burn_store::burn_pack::{Error as PackError, Reader, Tensor as PackTensor, Writer};
use burn_store::{BurnpackStore, ModuleAdapter, ModuleContext, ModuleSnapshot, PathFilter, bridge};
use vipllava_model::{Precision, VipLlava, VipLlavaConfig};

use crate::checkpoint::{Checkpoint, DiskDType, KeyLayout, TensorEntry};
use crate::error::ConvertError;
use crate::quantize::{
    FileWeight, QUANTIZED_LINEARS, Quantization, WeightPacker, WeightQuantizer, quantize_file_weight,
    quantize_lm_head, quantize_model, quantized_parameter_count, quantized_parameter_count_of,
};
use crate::stored_packing::{self, SetPacked, StoredWeights};

/// File name of the resolved config written beside a burnpack checkpoint.
pub const BURNPACK_CONFIG: &str = "vipllava_config.json";
/// File name of the burnpack weights.
pub const BURNPACK_WEIGHTS: &str = "model.bpk";

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Float precision of the loaded parameters: f32 (the default), f16 or bf16, whatever
    /// the file holds.
    pub precision: Precision,
    /// Quantize the linear-layer weights after loading (see [`crate::quantize`]).
    pub quantize: Option<Quantization>,
    /// Quantize `lm_head` too, to this level (`--quantize-lm-head`; independent of
    /// `quantize`). Off by default, as in transformers; llama.cpp's quantized files quantize
    /// it. Refused for checkpoints that tie `lm_head` to the token embeddings.
    pub quantize_lm_head: Option<Quantization>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            quantize: None,
            quantize_lm_head: None,
        }
    }
}

/// Where the weights came from.
#[derive(Debug, Clone, serde::Serialize)]
pub enum WeightFormat {
    /// HF safetensors in the given key layout.
    Safetensors(KeyLayout),
    /// A Burn-native burnpack file.
    Burnpack,
}

/// What was loaded.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Format and key layout.
    pub format: WeightFormat,
    /// Weight files read.
    pub files: Vec<PathBuf>,
    /// On-disk float dtypes.
    pub disk_dtypes: Vec<DiskDType>,
    /// Tensors applied to the model.
    pub tensors_loaded: usize,
    /// Tensors in the files that the model does not use (e.g. `post_layernorm`, vision
    /// layers deeper than the deepest selected hidden state, `position_ids` buffers).
    pub unused: Vec<String>,
}

/// A loaded model with its resolved config.
#[derive(Debug)]
pub struct LoadedModel {
    /// The module, ready for inference.
    pub model: VipLlava,
    /// Resolved config (feature layers reconciled with the weights).
    pub config: VipLlavaConfig,
    /// Loading details.
    pub report: LoadReport,
}

/// Reads and resolves `config.json` of a HF model directory.
pub fn read_config(dir: &Path) -> Result<VipLlavaConfig, ConvertError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ConvertError::NoConfig {
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ConvertError::Io {
        path: path.clone(),
        source,
    })?;
    VipLlavaConfig::from_json_str(&text).map_err(|source| ConvertError::Config { path, source })
}

/// Resolves the config against the weights' headers: the projector width decides the
/// stray scalar `vision_feature_layer` and must agree with the layers otherwise.
pub fn reconcile_config(
    dir: &Path,
    config: &mut VipLlavaConfig,
    checkpoint: &Checkpoint,
) -> Result<KeyLayout, ConvertError> {
    let layout = checkpoint.layout()?;
    let key = "multi_modal_projector.projector_layernorm.weight";
    let Some((_, entry)) = checkpoint.find(layout, key) else {
        return Err(ConvertError::MissingTensor {
            key: layout.file_key(key),
            expected: vec![config.projector_input_width()],
            hint: String::new(),
        });
    };
    let width = entry.shape.first().copied().unwrap_or(0);
    config
        .reconcile_projector_width(width)
        .map_err(|source| ConvertError::Config {
            path: dir.join("config.json"),
            source,
        })?;
    Ok(layout)
}

/// Loads a model directory: a HF directory (`config.json` + safetensors, single or
/// sharded, any known key layout, f32/f16/bf16) or a burnpack directory written by
/// [`save_burnpack`].
pub fn load_model(dir: &Path, device: &Device, options: &LoadOptions) -> Result<LoadedModel, ConvertError> {
    if !(dir.join(BURNPACK_WEIGHTS).is_file() && dir.join(BURNPACK_CONFIG).is_file()) {
        // Quantizes layer by layer while loading.
        return load_safetensors(dir, device, options);
    }
    let mut loaded = load_burnpack(dir, device)?;
    check_lm_head_option(&loaded.config, options)?;
    // A burnpack written by `convert --quantize` is already quantized (and packed as it
    // loaded): keep it as saved.
    // (`lm_head` quantized alone by `convert --quantize-lm-head` does not count.)
    let head = usize::from(lm_head_quantized(&loaded.model));
    if let Some(level) = options.quantize
        && quantized_parameter_count(&loaded.model) == head
    {
        loaded.model = quantize_model(loaded.model, level);
    }
    if let Some(level) = options.quantize_lm_head {
        loaded.model = quantize_lm_head(loaded.model, level);
    }
    Ok(loaded)
}

/// Whether `lm_head` is quantized (packed or not).
fn lm_head_quantized(model: &VipLlava) -> bool {
    model
        .lm_head
        .as_ref()
        .is_some_and(|head| quantized_parameter_count_of(head) > 0)
}

/// `--quantize-lm-head` needs an `lm_head` of its own.
fn check_lm_head_option(config: &VipLlavaConfig, options: &LoadOptions) -> Result<(), ConvertError> {
    if options.quantize_lm_head.is_some() && config.text.tie_word_embeddings {
        return Err(ConvertError::TiedLmHead);
    }
    Ok(())
}

fn load_safetensors(dir: &Path, device: &Device, options: &LoadOptions) -> Result<LoadedModel, ConvertError> {
    let mut config = read_config(dir)?;
    check_lm_head_option(&config, options)?;
    let checkpoint = Checkpoint::open(dir)?;
    let layout = reconcile_config(dir, &mut config, &checkpoint)?;
    let mut model = VipLlava::new(&config, device);

    // Check every tensor the model needs before reading any data, so that errors name
    // the file key with expected and found shapes.
    let expected = expected_tensors(&model);
    let mut needed: BTreeSet<String> = BTreeSet::new();
    for tensor in &expected {
        let shape = tensor.shape.clone();
        let Some((key, entry)) = checkpoint.find(layout, &tensor.name) else {
            let hint = if tensor.name == "lm_head.weight" {
                " (if the checkpoint ties lm_head to the embeddings, set `tie_word_embeddings: true` in config.json)"
                    .to_string()
            } else {
                String::new()
            };
            return Err(ConvertError::MissingTensor {
                key: layout.file_key(&tensor.name),
                expected: shape,
                hint,
            });
        };
        if entry.shape != shape {
            return Err(ConvertError::ShapeMismatch {
                key,
                expected: shape,
                found: entry.shape.clone(),
            });
        }
        if !entry.dtype.is_float() {
            return Err(ConvertError::UnsupportedDtype {
                key,
                dtype: entry.dtype.name().to_string(),
                file: checkpoint.files[entry.file].clone(),
            });
        }
        needed.insert(key);
    }

    // Tensors whose dtype is the load dtype are used in place from a map of their file
    // (plain CPU device only): nothing is copied or written, and pages are read from the
    // page cache when first used. Linear weights keep the file's `[out, in]` order, seen
    // transposed; the kernels read that order (`vipllava_model::kernels::rows`). On the
    // same device, tensors stored in another dtype are converted in that order too, and
    // the weights the load quantizes are quantized and packed where they lie, one at a
    // time (the peak of a 7B q4 load is its final form plus one tensor's file pages).
    let mut maps = FileMaps::new(&checkpoint.files, is_plain_flex(device));
    let mut in_place: BTreeMap<String, InPlaceTensor> = BTreeMap::new();
    let mut packed_tensors: BTreeMap<String, FileWeight> = BTreeMap::new();
    for tensor in &expected {
        let Some((key, entry)) = checkpoint.find(layout, &tensor.name) else {
            continue; // checked above
        };
        if let Some(level) = load_quantization(tensor, options) {
            // Quantized and packed where it lies in the map (plain CPU device), else read
            // and quantized with its group of layers below.
            if maps.enabled
                && tensor.transposed
                && let Some(weight) = maps.quantized(&key, entry, options.precision.dtype(), level)?
            {
                packed_tensors.insert(tensor.burn_path.clone(), weight);
            }
            continue;
        }
        let data = match maps.view(entry, options.precision.dtype())? {
            Some(data) => data,
            // Converted (another dtype on disk): read once and converted in the file's
            // order, so that a linear weight is seen transposed like one used in place
            // instead of being transposed into Burn's `[in, out]` (the transpose was most
            // of a converting load's time).
            None if maps.enabled => maps.converted(&key, entry, options.precision.dtype())?,
            None => continue,
        };
        in_place.insert(
            tensor.burn_path.clone(),
            InPlaceTensor {
                data,
                transposed: tensor.transposed && entry.shape.len() == 2,
            },
        );
    }
    let mut used_in_place = UseInPlace {
        path: Vec::new(),
        tensors: in_place,
        packed: packed_tensors,
        device: device.clone(),
        applied: BTreeSet::new(),
    };
    model = model.map(&mut used_in_place);

    // Apply the other tensors group by group (everything outside the layer stacks, then one
    // layer at a time), quantizing each group as soon as it is loaded (other devices, and
    // weights the packed form does not fit): the peak is the model in its final form plus
    // one layer, never the unquantized model.
    let mut groups: BTreeMap<LoadGroup, Vec<PackTensor>> = BTreeMap::new();
    for tensor in &expected {
        let Some((key, entry)) = checkpoint.find(layout, &tensor.name) else {
            continue; // checked above
        };
        if used_in_place.applied.contains(&tensor.burn_path) {
            continue;
        }
        let file = checkpoint.files[entry.file].clone();
        groups
            .entry(LoadGroup::of(&tensor.name))
            .or_default()
            .push(file_tensor(file, tensor, key, entry, options.precision.dtype()));
    }
    let mut loaded = used_in_place.applied.len();
    for (group, tensors) in groups {
        // The read buffer (as large as the group's largest tensor) is freed after each group:
        // the embeddings' (263 MB at 7B) would otherwise stay through every layer.
        let _scratch = crate::read::ScratchGuard;
        // The tensors arrive in Burn's names, layout and dtype: no adapter.
        let result = model.apply(tensors, None, None, false);
        if let Some(err) = result.errors.first() {
            return Err(ConvertError::Store {
                file: dir.to_path_buf(),
                message: format!("{err} ({} error(s) loading {group:?})", result.errors.len()),
            });
        }
        loaded += result.applied.len();
        if let Some(level) = options.quantize {
            group.quantize(&mut model, level);
        }
        if let (LoadGroup::Rest, Some(level)) = (group, options.quantize_lm_head) {
            model = quantize_lm_head(model, level);
        }
    }
    if loaded != expected.len() {
        return Err(ConvertError::Store {
            file: dir.to_path_buf(),
            message: format!("{loaded} tensors applied but the model has {}", expected.len()),
        });
    }
    let unused = checkpoint
        .tensors
        .keys()
        .filter(|k| !needed.contains(*k))
        .cloned()
        .collect();
    Ok(LoadedModel {
        model,
        config,
        report: LoadReport {
            format: WeightFormat::Safetensors(layout),
            files: checkpoint.files.clone(),
            disk_dtypes: checkpoint.float_dtypes(),
            tensors_loaded: loaded,
            unused,
        },
    })
}

/// A model parameter as checkpoints name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// Model path in PyTorch spelling (`vision_tower.pre_layrnorm.weight`).
    pub name: String,
    /// Shape in PyTorch layout (linear weights `[out, in]`).
    pub shape: Vec<usize>,
    /// The parameter's Burn path (`gamma`/`beta` for norms).
    pub burn_path: String,
    /// Whether Burn stores it transposed (linear weights, `[in, out]`).
    pub transposed: bool,
}

/// The model's parameters as the checkpoint names them (PyTorch spelling: norm `weight` /
/// `bias` for Burn's `gamma` / `beta`, linear weights `[out, in]`), read from the lazy
/// parameters without initialising them. Burn's `collect` would materialise every
/// placeholder: a 7B model's worth of f32 zeros held through the whole load.
pub fn expected_tensors<M: Module>(model: &M) -> Vec<ExpectedTensor> {
    let mut visitor = ExpectedTensors::default();
    model.visit(&mut visitor);
    visitor.out
}

#[derive(Default)]
struct ExpectedTensors {
    path: Vec<String>,
    containers: Vec<String>,
    out: Vec<ExpectedTensor>,
}

impl ModuleVisitor for ExpectedTensors {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // The same rules as burn-store's PyTorch adapters, keyed on the innermost module type.
        let module = self
            .containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"))
            .map(String::as_str);
        let mut shape = param.lazy_shape().to_vec();
        let burn_path = self.path.join(".");
        let mut transposed = false;
        let mut path = self.path.clone();
        if let Some(last) = path.last_mut() {
            if module == Some("Struct:Linear") && last == "weight" && shape.len() == 2 {
                shape.swap(0, 1);
                transposed = true;
            }
            let norm = matches!(
                module,
                Some("Struct:LayerNorm" | "Struct:RmsNorm" | "Struct:BatchNorm" | "Struct:GroupNorm")
            );
            if norm {
                match last.as_str() {
                    "gamma" => *last = "weight".to_string(),
                    "beta" => *last = "bias".to_string(),
                    _ => {}
                }
            }
        }
        self.out.push(ExpectedTensor {
            name: path.join("."),
            shape,
            burn_path,
            transposed,
        });
    }
}

/// A unit of loading: the tensors outside the layer stacks, or one encoder/decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LoadGroup {
    Rest,
    VisionLayer(usize),
    LanguageLayer(usize),
}

impl LoadGroup {
    /// The group of a model (canonical) tensor path.
    fn of(name: &str) -> Self {
        let layer = |prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|rest| rest.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
        };
        if let Some(i) = layer("language_model.layers.") {
            Self::LanguageLayer(i)
        } else if let Some(i) = layer("vision_tower.encoder.layers.") {
            Self::VisionLayer(i)
        } else {
            Self::Rest
        }
    }

    /// Quantizes the linear weights of this group's modules (the projector for `Rest`).
    fn quantize(self, model: &mut VipLlava, level: Quantization) {
        self.map(model, &mut WeightQuantizer::new(level));
    }

    /// Packs the quantized weights of this group's modules for the CPU kernels.
    fn pack(self, model: &mut VipLlava) {
        self.map(model, &mut WeightPacker);
    }

    /// Maps this group's modules (the projector and `lm_head` for `Rest`) with `mapper`.
    /// [`WeightQuantizer`] leaves `lm_head` alone (it is not among the [`QUANTIZED_LINEARS`];
    /// `--quantize-lm-head` quantizes it); [`WeightPacker`] packs it when a burnpack holds it
    /// quantized.
    fn map(self, model: &mut VipLlava, mapper: &mut impl ModuleMapper) {
        match self {
            Self::Rest => {
                model.multi_modal_projector = model.multi_modal_projector.clone().map(mapper);
                model.lm_head = model.lm_head.take().map(|head| head.map(mapper));
            }
            Self::VisionLayer(i) => {
                if let Some(layer) = model.vision_tower.encoder.layers.get_mut(i) {
                    *layer = layer.clone().map(mapper);
                }
            }
            Self::LanguageLayer(i) => {
                if let Some(layer) = model.language_model.layers.get_mut(i) {
                    *layer = layer.clone().map(mapper);
                }
            }
        }
    }
}

/// The level the load quantizes this tensor to, if it does (`--quantize`: the
/// [`QUANTIZED_LINEARS`] of the layer stacks and the projector; `--quantize-lm-head`:
/// `lm_head`). Those are never used in place: on the plain CPU device they are quantized and
/// packed from the map, whose pages are then dropped; elsewhere they are read and copied.
/// Either way the file pages read for them do not stay resident beside their quantized form.
fn load_quantization(tensor: &ExpectedTensor, options: &LoadOptions) -> Option<Quantization> {
    if tensor.burn_path == "lm_head.weight" {
        return options.quantize_lm_head;
    }
    let level = options.quantize?;
    let parts: Vec<&str> = tensor.burn_path.split('.').collect();
    let [.., module, last] = parts.as_slice() else {
        return None;
    };
    let quantized = *last == "weight"
        && QUANTIZED_LINEARS.contains(module)
        && (LoadGroup::of(&tensor.name) != LoadGroup::Rest
            || tensor.burn_path.starts_with("multi_modal_projector."));
    quantized.then_some(level)
}

/// Whether `device` is the plain Flex CPU device (not autodiff, not a GPU).
fn is_plain_flex(device: &Device) -> bool {
    vipllava_model::kernels::is_plain_flex(device)
}

/// The maps of a checkpoint's files, made on first use.
struct FileMaps<'a> {
    files: &'a [PathBuf],
    maps: Vec<Option<Arc<memmap2::Mmap>>>,
    enabled: bool,
}

impl<'a> FileMaps<'a> {
    /// Maps of `files`; `enabled: false` (another device) maps nothing.
    fn new(files: &'a [PathBuf], enabled: bool) -> Self {
        Self {
            files,
            maps: vec![None; files.len()],
            enabled: enabled && cfg!(target_endian = "little"),
        }
    }

    /// `entry`'s values in place, in its file's shape, when they are stored as `dtype` and
    /// aligned for it; `None` when they must be converted (or mapping is off).
    fn view(&mut self, entry: &TensorEntry, dtype: DType) -> Result<Option<TensorData>, ConvertError> {
        let size = match (entry.dtype, dtype) {
            (DiskDType::F32, DType::F32) => 4,
            (DiskDType::BF16, DType::BF16) | (DiskDType::F16, DType::F16) => 2,
            _ => return Ok(None),
        };
        if !self.enabled || !entry.bytes.start.is_multiple_of(size) {
            return Ok(None);
        }
        let map = self.map(entry.file)?;
        let Some((start, end)) = span_in(entry, &map) else {
            return Ok(None);
        };
        let bytes = bytes::Bytes::from_owner(SharedMap(map)).slice(start..end);
        Ok(Some(TensorData::from_bytes(
            Bytes::from_shared(bytes, AllocationProperty::File),
            entry.shape.clone(),
            dtype,
        )))
    }

    /// `entry`'s values converted to `dtype`, in its file's shape: read from the map by all
    /// workers, whose pages are then dropped (they are the file's, clean), so that the
    /// file bytes do not stay resident beside the copy. Only for enabled maps.
    fn converted(
        &mut self,
        key: &str,
        entry: &TensorEntry,
        dtype: DType,
    ) -> Result<TensorData, ConvertError> {
        let map = self.map(entry.file)?;
        let Some((start, end)) = span_in(entry, &map) else {
            return Err(self.outside(key, entry, &map));
        };
        // Each piece's pages are dropped as soon as it is converted: a 7B embedding's file
        // pages (263 MB) would otherwise be resident beside the whole converted model.
        let consumed =
            |piece: &[u8]| drop_pages(&map, piece.as_ptr() as usize - map.as_ptr() as usize, piece.len());
        let data = crate::read::convert_bytes(
            &map[start..end],
            entry.dtype,
            &entry.shape,
            crate::read::Layout::FileOrder(&consumed),
            dtype,
        )
        .map_err(|e| ConvertError::Io {
            path: self.files[entry.file].clone(),
            source: std::io::Error::other(format!("tensor {key}: {e}")),
        })?;
        drop_tensor_pages(&map, start, end);
        Ok(data)
    }

    /// The error for a tensor whose bytes lie outside its file.
    fn outside(&self, key: &str, entry: &TensorEntry, map: &memmap2::Mmap) -> ConvertError {
        ConvertError::Io {
            path: self.files[entry.file].clone(),
            source: std::io::Error::other(format!(
                "tensor {key}: bytes {:?} lie outside the file ({} bytes)",
                entry.bytes,
                map.len()
            )),
        }
    }

    /// A linear weight (`[out, in]` on disk) quantized to `level` and packed from where it
    /// lies in the map ([`quantize_file_weight`]), as a tensor loaded as `dtype` would be;
    /// its pages are then dropped, so that only the packed form stays resident. `None` where
    /// the packed form does not apply (the caller reads and quantizes it the general way).
    fn quantized(
        &mut self,
        key: &str,
        entry: &TensorEntry,
        dtype: DType,
        level: Quantization,
    ) -> Result<Option<FileWeight>, ConvertError> {
        let [n, k] = entry.shape[..] else {
            return Ok(None);
        };
        let map = self.map(entry.file)?;
        let Some((start, end)) = span_in(entry, &map) else {
            return Err(self.outside(key, entry, &map));
        };
        let weight = quantize_file_weight(&map[start..end], entry.dtype, dtype, [n, k], level);
        drop_tensor_pages(&map, start, end);
        Ok(weight)
    }

    /// The map of file `index`, made on first use.
    fn map(&mut self, index: usize) -> Result<Arc<memmap2::Mmap>, ConvertError> {
        if let Some(map) = &self.maps[index] {
            return Ok(Arc::clone(map));
        }
        let path = &self.files[index];
        let io = |source| ConvertError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is only read. As with any memory-mapped checkpoint (PyTorch's and
        // safetensors' loaders map theirs too), truncating or rewriting the file while the
        // model is alive is not supported.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?);
        self.maps[index] = Some(Arc::clone(&map));
        Ok(map)
    }
}

/// Drops the pages of `map[offset..offset + len]` from this process (they stay in the page
/// cache).
fn drop_pages(map: &memmap2::Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        debug_assert!(offset + len <= map.len(), "pages outside the map");
        // SAFETY: `Mmap::map` is a shared, read-only map of the file: none of its pages was
        // written (no private copies to lose), and a reader of a dropped page (the next
        // piece, or a tensor used in place) maps it again from the file with the same
        // bytes. Callers stay inside the map. Failing only leaves the pages resident.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// Drops the pages of a tensor read from `map[start..end]` and of its margins: the kernel
/// maps the neighbours of a faulting page too (fault-around, 64 KiB by default), some in
/// pieces already dropped (140 MB of such pages at the end of a 1.1B f32 -> bf16 load
/// without this last pass).
fn drop_tensor_pages(map: &memmap2::Mmap, start: usize, end: usize) {
    const FAULT_AROUND: usize = 1 << 16;
    let first = start.saturating_sub(FAULT_AROUND);
    drop_pages(map, first, (end + FAULT_AROUND).min(map.len()) - first);
}

/// `entry`'s byte range as indices into `map`, when it lies inside it.
fn span_in(entry: &TensorEntry, map: &memmap2::Mmap) -> Option<(usize, usize)> {
    let start = usize::try_from(entry.bytes.start).ok()?;
    let end = usize::try_from(entry.bytes.end).ok()?;
    (start <= end && end <= map.len()).then_some((start, end))
}

/// A tensor used in place: its file's values and shape, and whether Burn's parameter is
/// its transpose (a linear weight).
struct InPlaceTensor {
    data: TensorData,
    transposed: bool,
}

/// Sets the parameters found in `tensors` (by Burn path) to their values in place,
/// without initialising the lazy placeholders first.
struct UseInPlace {
    path: Vec<String>,
    tensors: BTreeMap<String, InPlaceTensor>,
    /// Linear weights quantized and packed from their file, by Burn path.
    packed: BTreeMap<String, FileWeight>,
    device: Device,
    /// Burn paths of the parameters set.
    applied: BTreeSet<String>,
}

impl ModuleMapper for UseInPlace {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        if let Some(weight) = self.packed.remove(&path) {
            // Shapes were checked against the model's before any data was read: `D` is 2.
            let Some(packed) = weight.into_param() else {
                return param;
            };
            self.applied.insert(path);
            return packed;
        }
        let Some(tensor) = self.tensors.remove(&path) else {
            return param;
        };
        let dtype = tensor.data.dtype();
        let value = Tensor::<D>::from_data(tensor.data, (&self.device, dtype));
        let value = if tensor.transposed && D == 2 {
            value.swap_dims(0, 1)
        } else {
            value
        };
        self.applied.insert(path);
        Param::initialized(param.id, value)
    }
}

/// A checkpoint tensor under its Burn path, in Burn's layout and the load `dtype`, read
/// from its file by one positioned read when the model asks for it (see [`crate::read`]):
/// the tensors that the load quantizes, and on devices other than the plain CPU those it
/// converts. Their file pages are read into a buffer rather than mapped, so that they do
/// not stay resident beside the copy.
fn file_tensor(
    file: PathBuf,
    tensor: &ExpectedTensor,
    key: String,
    entry: &TensorEntry,
    dtype: DType,
) -> PackTensor {
    // f32, f16 or bf16 (checked by `load_safetensors`).
    let disk_shape = entry.shape.clone();
    let transposed = tensor.transposed && disk_shape.len() == 2;
    let mut shape = disk_shape.clone();
    if transposed {
        shape.reverse();
    }
    let range = entry.bytes.clone();
    let disk = entry.dtype;
    bridge::deferred(
        tensor.burn_path.clone(),
        dtype,
        Shape::from(shape),
        None,
        move || {
            crate::read::read_tensor(&file, range.clone(), disk, &disk_shape, transposed, dtype)
                .map_err(|e| PackError::IoError(format!("{}: tensor {key}: {e}", file.display())))
        },
    )
}

/// Writes a Burn-native checkpoint: `model.bpk` (burnpack, loaded memory-mapped) and the
/// resolved config as `vipllava_config.json` beside it.
pub fn save_burnpack(model: &VipLlava, config: &VipLlavaConfig, out_dir: &Path) -> Result<(), ConvertError> {
    std::fs::create_dir_all(out_dir).map_err(|source| ConvertError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let weights = out_dir.join(BURNPACK_WEIGHTS);
    let write_error = |message: String| ConvertError::Write {
        path: weights.clone(),
        message,
    };
    // Packed q8/q4 weights are stored in the kernels' layout (see `stored_packing`), not
    // through Burn: collecting them would unpack each into a quantized tensor first.
    let packed = stored_packing::packed_params(model);
    let filter = (!packed.is_empty()).then(|| {
        let others = expected_tensors(model)
            .into_iter()
            .map(|t| t.burn_path)
            .filter(|path| !packed.contains_key(path));
        PathFilter::new().with_full_paths(others)
    });
    let mut tensors = model.collect(filter, Some(Box::new(Q4TwoPerByte)), false);
    let mut writer_metadata = BurnpackStore::default_metadata();
    for (path, param) in &packed {
        let (stored, (key, value)) = stored_packing::stored_tensors(path, param);
        tensors.extend(stored);
        writer_metadata.insert(key, value);
    }
    let mut writer = Writer::new(tensors).overwrite(true);
    for (key, value) in &writer_metadata {
        writer = writer.with_metadata(key, value);
    }
    writer
        .write_to_file(&weights)
        .map_err(|e| write_error(e.to_string()))?;
    let config_path = out_dir.join(BURNPACK_CONFIG);
    let json = serde_json::to_string_pretty(config).map_err(|e| ConvertError::Write {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&config_path, json).map_err(|source| ConvertError::Io {
        path: config_path,
        source,
    })
}

/// Writes q4 weights two values per byte (Burn's `PackedU32` store, eight values per
/// little-endian word) instead of the one byte per value Flex keeps: a q4 burnpack is then
/// about half a q8 one. Burn unpacks them on load, and the CPU loader packs them again for
/// the kernels. Weights whose rows are not whole words stay as they are.
#[derive(Debug, Clone, Copy)]
struct Q4TwoPerByte;

impl ModuleAdapter for Q4TwoPerByte {
    fn adapt(&self, tensor: PackTensor, _ctx: ModuleContext<'_>) -> PackTensor {
        let DType::QFloat(scheme) = tensor.dtype else {
            return tensor;
        };
        let q4 = matches!(scheme.value, QuantValue::Q4S | QuantValue::Q4F);
        let whole_words = tensor.shape.last().is_some_and(|&n| n % 8 == 0);
        if !q4 || scheme.store != QuantStore::Native || !whole_words {
            return tensor;
        }
        let packed = scheme.with_store(QuantStore::PackedU32(0));
        let (name, shape) = (tensor.name.clone(), tensor.shape.clone());
        bridge::map_data(tensor, name, DType::QFloat(packed), shape, move |data| {
            q4_words(data, packed)
        })
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// Flex's q4 tensor data (one `i8` per value, then the scales) as `PackedU32` data of
/// `scheme`: the values eight per word, the scale bytes as they were.
fn q4_words(data: TensorData, scheme: QuantScheme) -> TensorData {
    let shape = data.shape().clone();
    let count = shape.num_elements();
    let bytes = data.into_bytes();
    let words: Vec<u8> = bytes[..count]
        .chunks(8)
        .flat_map(|values| {
            let word = values
                .iter()
                .enumerate()
                .fold(0u32, |w, (i, &v)| w | (u32::from(v & 0x0F) << (4 * i)));
            word.to_le_bytes()
        })
        .chain(bytes[count..].iter().copied())
        .collect();
    TensorData::from_bytes_vec(words, shape, DType::QFloat(scheme))
}

/// `path` memory-mapped as Burn bytes: tensors loaded from it on the CPU use the mapped
/// pages in place (burnpack aligns every tensor for this) and are read from disk only when
/// first used; a tensor that is written to is copied first (copy on write). Also returns the
/// map itself, for [`release_loaded_pages`].
fn map_file(path: &Path) -> Result<(Bytes, Arc<memmap2::Mmap>), ConvertError> {
    let io = |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is only read. As with any memory-mapped checkpoint (PyTorch's and
    // safetensors' loaders map theirs too), truncating or rewriting the file while the model
    // is alive is not supported.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?);
    let bytes = Bytes::from_shared(
        bytes::Bytes::from_owner(SharedMap(Arc::clone(&map))),
        AllocationProperty::File,
    );
    Ok((bytes, map))
}

/// A shared handle on a map, as the owner of `bytes::Bytes`.
struct SharedMap(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Takes the pages read while loading out of this process's resident memory. Tensors that
/// the load copied (quantized ones: Flex keeps its own int8 values and scales) would
/// otherwise be counted twice, once in their copy and once in the file pages read for it
/// (a q8 burnpack of `clip-l-llama-1b` peaked at 3.2 GB against 2.0 GB from safetensors).
/// Tensors used in place read their pages again from the page cache when first used.
fn release_loaded_pages(map: &memmap2::Mmap) {
    #[cfg(unix)]
    {
        // SAFETY: the map is read-only (`Mmap::map`), so none of its pages was written:
        // dropping them loses nothing, and the next read maps them again from the file.
        // Failing only leaves the pages resident.
        let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
    #[cfg(not(unix))]
    let _ = map;
}

/// Loads a checkpoint written by [`save_burnpack`], memory-mapped.
pub fn load_burnpack(dir: &Path, device: &Device) -> Result<LoadedModel, ConvertError> {
    let config_path = dir.join(BURNPACK_CONFIG);
    let text = std::fs::read_to_string(&config_path).map_err(|source| ConvertError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: VipLlavaConfig = serde_json::from_str(&text).map_err(|e| ConvertError::Config {
        path: config_path,
        source: vipllava_model::ConfigError::Json(e.to_string()),
    })?;
    let mut model = VipLlava::new(&config, device);
    let weights = dir.join(BURNPACK_WEIGHTS);
    let expected = expected_tensors(&model).len();
    let (bytes, map) = map_file(&weights)?;
    let store_error = |message: String| ConvertError::Store {
        file: weights.clone(),
        message,
    };
    let reader = Reader::from_bytes(bytes).map_err(|e| store_error(e.to_string()))?;
    let mut stored = StoredWeights::declared(reader.metadata()).map_err(store_error)?;
    let tensors = reader.into_tensors().map_err(|e| store_error(e.to_string()))?;
    // Group by group (as the safetensors loader), the file pages read for each group
    // released after it: a quantized tensor of an older file is copied, and its pages would
    // otherwise stay resident beside the copy until the end of the load. Packed weights
    // stored in the kernels' layout are used in place.
    let mut groups: BTreeMap<LoadGroup, Vec<PackTensor>> = BTreeMap::new();
    for tensor in tensors {
        if let Some(tensor) = stored.take(tensor).map_err(store_error)? {
            groups
                .entry(LoadGroup::of(&tensor.name))
                .or_default()
                .push(tensor);
        }
    }
    let mut set_packed = SetPacked::new(stored.into_weights().map_err(store_error)?, device);
    model = model.map(&mut set_packed);
    if let Some(path) = set_packed.unmatched().first() {
        return Err(store_error(format!(
            "the packed weight {path} matches no parameter of the model"
        )));
    }
    let (mut applied, mut unused) = (set_packed.applied, Vec::new());
    for (group, tensors) in groups {
        let result = model.apply(tensors, None, None, false);
        if let Some(err) = result.errors.first() {
            return Err(store_error(format!(
                "{err} ({} error(s) loading {group:?})",
                result.errors.len()
            )));
        }
        applied += result.applied.len();
        unused.extend(result.unused);
        group.pack(&mut model);
        release_loaded_pages(&map);
    }
    if applied != expected {
        return Err(ConvertError::Store {
            file: weights,
            message: format!("{applied} tensors applied but the model has {expected}"),
        });
    }
    Ok(LoadedModel {
        model,
        config,
        report: LoadReport {
            format: WeightFormat::Burnpack,
            files: vec![weights],
            disk_dtypes: Vec::new(),
            tensors_loaded: applied,
            unused,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_store::BurnToPyTorchAdapter;

    struct Initialized(usize);

    impl ModuleVisitor for Initialized {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_initialized() {
                self.0 += 1;
            }
        }
    }

    #[test]
    fn expected_tensors_match_burn_collect_without_initialising() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-5x-f32");
        let config = read_config(&dir).expect("config");
        let model = VipLlava::new(&config, &Device::flex());
        let mut ours: Vec<(String, Vec<usize>)> = expected_tensors(&model)
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        let layouts = expected_tensors(&model);
        assert!(
            layouts
                .iter()
                .any(|t| t.transposed && t.burn_path.ends_with("q_proj.weight"))
        );
        assert!(layouts.iter().any(|t| t.burn_path.ends_with("layer_norm1.gamma")));
        assert!(
            !layouts
                .iter()
                .any(|t| t.transposed && !t.name.ends_with(".weight"))
        );
        let mut initialized = Initialized(0);
        model.visit(&mut initialized);
        assert_eq!(initialized.0, 0, "expected_tensors initialised parameters");
        let mut burn: Vec<(String, Vec<usize>)> = model
            .collect(None, Some(Box::new(BurnToPyTorchAdapter)), false)
            .into_iter()
            .map(|t| (t.name.clone(), t.shape.to_vec()))
            .collect();
        ours.sort();
        burn.sort();
        assert!(ours.iter().any(|(n, _)| n.ends_with("layer_norm1.weight")));
        assert!(ours.len() > 50);
        assert_eq!(ours, burn);
    }

    /// Each packed weight's stored values and scales, and whether it is used in place.
    fn packed_parts(model: &VipLlava) -> BTreeMap<String, (Vec<u8>, Vec<f32>, bool)> {
        stored_packing::packed_params(model)
            .into_iter()
            .map(|(path, p)| {
                (
                    path,
                    (
                        p.weight.values().to_vec(),
                        p.weight.scales(),
                        p.weight.is_mapped(),
                    ),
                )
            })
            .collect()
    }

    /// `save_burnpack` stores packed weights in the kernels' layout, which loads in place
    /// with the same bits; a burnpack of the older layout (Burn's quantized tensors, q4 as
    /// `PackedU32` words) still loads, packed again, to the same bits.
    #[test]
    fn packed_burnpacks_load_in_place_and_older_ones_as_before() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-5x-f32");
        let device = Device::flex();
        for level in [Quantization::Q8, Quantization::Q4] {
            let options = LoadOptions {
                quantize: Some(level),
                ..LoadOptions::default()
            };
            let loaded = load_model(&dir, &device, &options).expect("load");
            let original = packed_parts(&loaded.model);
            assert!(original.len() > 10 && original.values().all(|(_, _, mapped)| !mapped));

            let new = tempfile::tempdir().expect("tempdir");
            save_burnpack(&loaded.model, &loaded.config, new.path()).expect("save");
            // Saving read no packed weight back (that would have unpacked it for good).
            assert_eq!(
                packed_parts(&loaded.model),
                original,
                "{level:?}: saving unpacked"
            );
            let reloaded = load_burnpack(new.path(), &device).expect("reload");
            assert_eq!(
                reloaded.report.tensors_loaded,
                expected_tensors(&reloaded.model).len()
            );
            let in_place = packed_parts(&reloaded.model);
            assert_eq!(in_place.len(), original.len(), "{level:?}");
            for (path, (values, scales, mapped)) in &in_place {
                let (v, s, _) = &original[path];
                assert!(*mapped, "{level:?} {path}: not in place");
                assert!(values == v && scales == s, "{level:?} {path}: other bits");
            }

            let old = tempfile::tempdir().expect("tempdir");
            std::fs::copy(new.path().join(BURNPACK_CONFIG), old.path().join(BURNPACK_CONFIG))
                .expect("config");
            let mut store = BurnpackStore::from_file(old.path().join(BURNPACK_WEIGHTS))
                .overwrite(true)
                .with_to_adapter(Q4TwoPerByte);
            loaded.model.save_into(&mut store).expect("save the older layout");
            let repacked = packed_parts(&load_burnpack(old.path(), &device).expect("older").model);
            assert_eq!(repacked.len(), original.len(), "{level:?}");
            for (path, (values, scales, mapped)) in &repacked {
                let (v, s, _) = &original[path];
                assert!(!*mapped, "{level:?} {path}: an older file is packed again");
                assert!(
                    values == v && scales == s,
                    "{level:?} {path}: older layout, other bits"
                );
            }
        }
    }

    /// A burnpack that declares a packed weight it does not hold, or one whose bytes do not
    /// fit its shape, is an error naming the weight.
    #[test]
    fn broken_packed_weights_are_errors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-5x-f32");
        let device = Device::flex();
        let options = LoadOptions {
            quantize: Some(Quantization::Q4),
            ..LoadOptions::default()
        };
        let loaded = load_model(&dir, &device, &options).expect("load");
        let packed = stored_packing::packed_params(&loaded.model);
        let (path, param) = packed.iter().next().expect("a packed weight");
        let (tensors, (key, value)) = stored_packing::stored_tensors(path, param);
        let write = |tensors: Vec<PackTensor>, metadata: &str| {
            let out = tempfile::tempdir().expect("tempdir");
            let config = serde_json::to_string(&loaded.config).expect("config");
            std::fs::write(out.path().join(BURNPACK_CONFIG), config).expect("write config");
            Writer::new(tensors)
                .with_metadata(&key, metadata)
                .write_to_file(out.path().join(BURNPACK_WEIGHTS))
                .expect("write");
            match load_burnpack(out.path(), &device) {
                Ok(_) => panic!("a broken packed weight loaded"),
                Err(err) => err.to_string(),
            }
        };
        let [values, scales] = tensors;
        let missing = write(vec![values.clone()], &value);
        assert!(
            missing.contains(path) && missing.contains("packed_scales"),
            "{missing}"
        );
        let wrong_shape = value.replace(&format!("\"k\":{}", param.weight.k()), "\"k\":64000");
        assert_ne!(wrong_shape, value);
        let short = write(vec![values, scales], &wrong_shape);
        assert!(short.contains(path) && short.contains("bytes"), "{short}");
    }
}
