//! q8/q4 weights in a burnpack in the CPU kernels' own layout, used in place from the map.
//!
//! Burn stores a quantized tensor as its integers (one byte per value, or eight q4 values
//! per `u32` word) followed by its scales; loading it unpacks the values one by one into a
//! fresh buffer, and the loader then repacks them for the kernels
//! ([`vipllava_model::kernels::packed`]): about 25 s and a second copy for a 7B q4 model.
//! A burnpack written by [`crate::save_burnpack`] instead holds every packed weight as two
//! plain tensors beside the model's own:
//! - `<path>.packed_values`: `u8 [k / block, block bytes]`, [`PackedWeight::values`];
//! - `<path>.packed_scales`: `f16 [k / block, n]`, [`PackedWeight::f16_scales`];
//!
//! and one metadata entry `vipllava.packed.<path>` with the width, shape and quantization
//! scheme. Loading wraps the two mapped windows ([`PackedWeight::from_stored`]): nothing is
//! read or copied until the kernels first touch the pages, which stay file-backed. Files
//! written before this layout (the quantized tensor under `<path>`) load as before.

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::quantization::QuantScheme;
use burn::tensor::{Bytes, DType, Device, Shape, Tensor};
use burn_store::burn_pack::Tensor as PackTensor;
use vipllava_model::kernels::packed::{self, Bits, PackedWeight};

/// Name suffix of a packed weight's values tensor.
const VALUES_SUFFIX: &str = ".packed_values";
/// Name suffix of a packed weight's scales tensor.
const SCALES_SUFFIX: &str = ".packed_scales";
/// Metadata key prefix of a packed weight's description.
const METADATA_PREFIX: &str = "vipllava.packed.";

/// What a packed weight's metadata entry records.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct StoredPacking {
    /// 8 or 4.
    bits: u8,
    /// Input dimension.
    k: usize,
    /// Output dimension.
    n: usize,
    /// Rows per scale block.
    block: usize,
    /// The scheme of the quantized tensor the weight stands for.
    scheme: QuantScheme,
}

impl StoredPacking {
    fn bits(&self) -> Option<Bits> {
        match self.bits {
            8 => Some(Bits::Eight),
            4 => Some(Bits::Four),
            _ => None,
        }
    }
}

/// A packed weight of the model being saved, with the scheme it unpacks to.
pub(crate) struct PackedParam {
    pub(crate) weight: Arc<PackedWeight>,
    pub(crate) scheme: QuantScheme,
}

/// The model's packed weights by Burn path, found without unpacking any of them.
pub(crate) fn packed_params<M: Module>(model: &M) -> BTreeMap<String, PackedParam> {
    #[derive(Default)]
    struct Find {
        path: Vec<String>,
        found: BTreeMap<String, PackedParam>,
    }
    impl ModuleVisitor for Find {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some((weight, scheme)) = packed::packed_weight_and_scheme(param) {
                self.found
                    .insert(self.path.join("."), PackedParam { weight, scheme });
            }
        }
    }
    let mut find = Find::default();
    model.visit(&mut find);
    find.found
}

/// The two tensors storing `param` under `path`, and its metadata entry. Each tensor's
/// bytes are produced when the writer reaches it (one tensor's copy at a time).
pub(crate) fn stored_tensors(path: &str, param: &PackedParam) -> ([PackTensor; 2], (String, String)) {
    let w = &param.weight;
    let block_rows = w.k() / w.block();
    let values_len = w.values().len();
    let values = {
        let w = Arc::clone(w);
        PackTensor::deferred(
            format!("{path}{VALUES_SUFFIX}"),
            DType::U8,
            Shape::from(vec![block_rows, values_len / block_rows.max(1)]),
            None,
            values_len,
            move || Ok(Bytes::from_bytes_vec(w.values().to_vec())),
        )
    };
    let scales = {
        let w = Arc::clone(w);
        PackTensor::deferred(
            format!("{path}{SCALES_SUFFIX}"),
            DType::F16,
            Shape::from(vec![block_rows, w.n()]),
            None,
            size_of_val(w.f16_scales()),
            move || Ok(Bytes::from_elems(w.f16_scales().to_vec())),
        )
    };
    let packing = StoredPacking {
        bits: match w.bits() {
            Bits::Eight => 8,
            Bits::Four => 4,
        },
        k: w.k(),
        n: w.n(),
        block: w.block(),
        scheme: param.scheme,
    };
    // A plain struct of numbers and enums: serializing it cannot fail.
    let json = serde_json::to_string(&packing).unwrap_or_default();
    ([values, scales], (format!("{METADATA_PREFIX}{path}"), json))
}

/// The packed weights a burnpack declares, gathered from its metadata and tensors.
#[derive(Default)]
pub(crate) struct StoredWeights {
    /// By Burn path: the description, then the values and scales once seen.
    entries: BTreeMap<String, (StoredPacking, Option<Bytes>, Option<Bytes>)>,
}

impl StoredWeights {
    /// The packed weights declared in a burnpack's `metadata`.
    pub(crate) fn declared(metadata: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut entries = BTreeMap::new();
        for (key, value) in metadata {
            let Some(path) = key.strip_prefix(METADATA_PREFIX) else {
                continue;
            };
            let packing: StoredPacking =
                serde_json::from_str(value).map_err(|e| format!("metadata {key}: {e}"))?;
            entries.insert(path.to_string(), (packing, None, None));
        }
        Ok(Self { entries })
    }

    /// Keeps `tensor` if it is a declared weight's values or scales (its bytes: a window of
    /// the map, nothing copied); otherwise gives it back.
    pub(crate) fn take(&mut self, tensor: PackTensor) -> Result<Option<PackTensor>, String> {
        let (path, is_values) = if let Some(path) = tensor.name.strip_suffix(VALUES_SUFFIX) {
            (path, true)
        } else if let Some(path) = tensor.name.strip_suffix(SCALES_SUFFIX) {
            (path, false)
        } else {
            return Ok(Some(tensor));
        };
        let Some(entry) = self.entries.get_mut(path) else {
            return Ok(Some(tensor));
        };
        let name = tensor.name.clone();
        let bytes = tensor.into_bytes().map_err(|e| format!("{name}: {e}"))?;
        if is_values {
            entry.1 = Some(bytes);
        } else {
            entry.2 = Some(bytes);
        }
        Ok(None)
    }

    /// The declared weights, by Burn path, each checked against its description.
    pub(crate) fn into_weights(self) -> Result<BTreeMap<String, (PackedWeight, QuantScheme)>, String> {
        self.entries
            .into_iter()
            .map(|(path, (packing, values, scales))| {
                let bits = packing.bits().ok_or_else(|| {
                    format!("{path}: {} bits per value is not a packed width", packing.bits)
                })?;
                let values = values.ok_or_else(|| format!("{path}{VALUES_SUFFIX} is missing"))?;
                let scales = scales.ok_or_else(|| format!("{path}{SCALES_SUFFIX} is missing"))?;
                let weight =
                    PackedWeight::from_stored(bits, [packing.k, packing.n], packing.block, values, scales)
                        .map_err(|e| format!("{path}: {e}"))?;
                Ok((path, (weight, packing.scheme)))
            })
            .collect()
    }
}

/// Sets the packed weights it holds (by Burn path) as the model's parameters, in place.
pub(crate) struct SetPacked {
    path: Vec<String>,
    weights: BTreeMap<String, (PackedWeight, QuantScheme)>,
    device: Device,
    /// Parameters set.
    pub(crate) applied: usize,
}

impl SetPacked {
    pub(crate) fn new(weights: BTreeMap<String, (PackedWeight, QuantScheme)>, device: &Device) -> Self {
        Self {
            path: Vec::new(),
            weights,
            device: device.clone(),
            applied: 0,
        }
    }

    /// The Burn paths of the weights that matched no 2-D parameter of the model.
    pub(crate) fn unmatched(&self) -> Vec<String> {
        self.weights.keys().cloned().collect()
    }
}

impl ModuleMapper for SetPacked {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        // A weight of another shape stays for `unmatched` to report.
        let fits = |(w, _): &(PackedWeight, QuantScheme)| param.lazy_shape().to_vec() == [w.k(), w.n()];
        if !self.weights.get(&path).is_some_and(fits) {
            return param;
        }
        let Some((weight, scheme)) = self.weights.remove(&path) else {
            return param;
        };
        // The shape is `[k, n]`: `D` is 2, and `into_param` gives the parameter.
        self.applied += 1;
        weight
            .into_param::<D>(scheme, self.device.clone())
            .unwrap_or(param)
    }
}
