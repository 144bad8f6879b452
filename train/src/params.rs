//! Parameter paths, stable ids, and reading/writing parameter values by path.
//!
//! Paths are the module field paths (`multi_modal_projector.linear_1.weight`,
//! `language_model.layers.0.self_attn.q_proj.weight`, LoRA factors
//! `language_model.layers.0.self_attn.q_proj.weight.lora.a`). Values are stored as Burn
//! holds them (a `Linear` weight is `[in, out]`).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Tensor, TensorData};

/// One float parameter as seen by a visitor.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Dotted path.
    pub path: String,
    /// Id.
    pub id: ParamId,
    /// Shape.
    pub shape: Vec<usize>,
}

#[derive(Default)]
struct PathTracker(Vec<String>);

impl PathTracker {
    fn path(&self) -> String {
        self.0.join(".")
    }
}

struct Lister {
    path: PathTracker,
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for Lister {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(ParamInfo {
            path: self.path.path(),
            id: param.id,
            shape: param.lazy_shape().to_vec(),
        });
    }
}

/// Every float parameter with its path, in traversal order.
pub fn list_params<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut v = Lister {
        path: PathTracker::default(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// A stable id from a path (FNV-1a), so that optimizer state saved by one run matches the
/// parameters of the next.
pub fn path_id(path: &str) -> ParamId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ParamId::from(h)
}

struct Reid {
    path: PathTracker,
}

impl ModuleMapper for Reid {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(path_id(&self.path.path()), tensor, mapper)
    }
}

/// Gives every parameter the id [`path_id`] of its path.
pub fn canonical_ids<M: Module>(module: M) -> M {
    module.map(&mut Reid {
        path: PathTracker::default(),
    })
}

struct Reader<'a, F: Fn(&str) -> bool> {
    path: PathTracker,
    keep: &'a F,
    out: BTreeMap<String, TensorData>,
}

impl<F: Fn(&str) -> bool> ModuleVisitor for Reader<'_, F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.path();
        if (self.keep)(&path) {
            let t = param.base();
            let t = if t.dtype() == DType::F32 {
                t
            } else {
                t.cast(DType::F32)
            };
            self.out.insert(path, t.into_data());
        }
    }
}

/// Values (as f32) of the parameters whose path `keep` accepts. A reparameterized
/// parameter gives its stored base value; its LoRA factors are parameters of their own.
pub fn read_params<M: Module>(module: &M, keep: impl Fn(&str) -> bool) -> BTreeMap<String, TensorData> {
    let mut r = Reader {
        path: PathTracker::default(),
        keep: &keep,
        out: BTreeMap::new(),
    };
    module.visit(&mut r);
    r.out
}

struct Writer<'a> {
    path: PathTracker,
    values: &'a BTreeMap<String, TensorData>,
    applied: Vec<String>,
    errors: Vec<String>,
}

impl ModuleMapper for Writer<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.path();
        let Some(data) = self.values.get(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        if data.shape().to_vec() != tensor.dims().to_vec() {
            self.errors.push(format!(
                "{path}: shape {:?} in the file, {:?} in the model",
                data.shape(),
                tensor.dims()
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let device = tensor.device();
        let dtype = tensor.dtype();
        let require_grad = tensor.is_require_grad();
        let new = Tensor::<D>::from_data(data.clone(), &device);
        let new = if new.dtype() == dtype {
            new
        } else {
            new.cast(dtype)
        };
        let new = if require_grad {
            new.set_require_grad(true)
        } else {
            new
        };
        self.applied.push(path);
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Replaces the values of the parameters named in `values`; returns the module and the
/// paths applied, or the shape mismatches.
pub fn write_params<M: Module>(
    module: M,
    values: &BTreeMap<String, TensorData>,
) -> Result<(M, Vec<String>), String> {
    let mut w = Writer {
        path: PathTracker::default(),
        values,
        applied: Vec::new(),
        errors: Vec::new(),
    };
    let module = module.map(&mut w);
    if !w.errors.is_empty() {
        return Err(w.errors.join("; "));
    }
    Ok((module, w.applied))
}
