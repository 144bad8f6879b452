//! Loading every published layout, Burn-native round trips, and the error cases of
//! checkpoint loading (each must name the file key or file at fault).

use std::path::Path;

use crate::common::{Reference, copy_fixture, fixture, max_abs_diff};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use vipllava::model::kernels::weight_in_file_order;
use vipllava::{ForwardInput, KvCache, LoadOptions, Precision, VipLlava, load_model};
use vipllava_convert::{ConvertError, KeyLayout, WeightFormat, save_burnpack};

/// Rewrites a safetensors file through `edit`, which gets (name, dtype, shape, bytes).
fn rewrite(path: &Path, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(path).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    let out = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, out).expect("write");
}

fn load_err(dir: &Path) -> ConvertError {
    match load_model(dir, &Device::flex(), &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn every_layout_is_detected_and_unused_tensors_are_reported() {
    let cases = [
        ("tiny-5x-f32", KeyLayout::Hf5, 1, "F32"),
        ("tiny-hub-bf16-sharded", KeyLayout::Hub4, 2, "BF16"),
        ("tiny-gqa-f16", KeyLayout::Hf5Original, 1, "F16"),
        ("tiny-hub-tied-dynamic", KeyLayout::Hub4, 1, "F32"),
    ];
    for (name, layout, files, dtype) in cases {
        let loaded = load_model(&fixture(name), &Device::flex(), &LoadOptions::default()).expect("load");
        let r = &loaded.report;
        assert!(
            matches!(r.format, WeightFormat::Safetensors(l) if l == layout),
            "{name}: {:?}",
            r.format
        );
        assert_eq!(r.files.len(), files, "{name}");
        assert_eq!(
            r.disk_dtypes.iter().map(|d| d.name()).collect::<Vec<_>>(),
            vec![dtype],
            "{name}"
        );
        assert!(
            r.unused.iter().any(|k| k.contains("post_layernorm")),
            "{name}: {:?}",
            r.unused
        );
        println!(
            "{name}: {} tensors loaded, {} unused",
            r.tensors_loaded,
            r.unused.len()
        );
    }
    // Vision layer 11 of 12 is never used by the default feature layers: not loaded.
    let loaded = load_model(&fixture("tiny-5x-f32"), &Device::flex(), &LoadOptions::default()).expect("load");
    assert_eq!(loaded.model.vision_tower.encoder.layers.len(), 11);
    assert!(
        loaded
            .report
            .unused
            .iter()
            .any(|k| k.contains("encoder.layers.11."))
    );
}

#[test]
fn burnpack_round_trip_gives_identical_logits() {
    let device = Device::flex();
    let name = "tiny-gqa-f16";
    let loaded = load_model(&fixture(name), &device, &LoadOptions::default()).expect("load");
    let out = tempfile::tempdir().expect("tempdir");
    save_burnpack(&loaded.model, &loaded.config, out.path()).expect("save");
    let reloaded = load_model(out.path(), &device, &LoadOptions::default()).expect("reload");
    assert!(matches!(reloaded.report.format, WeightFormat::Burnpack));
    assert_eq!(reloaded.config, loaded.config);
    let reference = Reference::open(name);
    let run = |m: &vipllava::VipLlava| {
        let pixels: Tensor<4> = reference.float("pixel_values", &device);
        m.forward(
            ForwardInput::new(reference.ids(&device)).with_pixels(pixels),
            &mut KvCache::new(),
        )
        .expect("forward")
    };
    // The f16 file's linear weights are converted in the file's `[out, in]` order and
    // seen transposed; the burnpack stores Burn's `[in, out]`, whose kernels add the
    // products in another order. The same values in the same order give the same bits.
    let q_proj = |m: &VipLlava| m.language_model.layers[0].self_attn.q_proj.weight.val();
    assert!(weight_in_file_order(&q_proj(&loaded.model)));
    assert!(!weight_in_file_order(&q_proj(&reloaded.model)));
    let burn_order = loaded.model.clone().map(&mut IntoBurnOrder);
    let diff = max_abs_diff(run(&burn_order), run(&reloaded.model));
    assert_eq!(diff, 0.0, "burnpack logits differ by {diff}");
}

#[test]
fn weights_stored_in_the_load_dtype_are_used_in_place() {
    let device = Device::flex();
    let name = "tiny-hub-bf16-sharded";
    // bf16 file, bf16 load: in place, linear weights in the file's `[out, in]` order.
    let in_place = load_model(&fixture(name), &device, &AS_BF16).expect("load bf16");
    // bf16 file, f32 load: converted, in the file's order too.
    let converted = load_model(&fixture(name), &device, &LoadOptions::default()).expect("load f32");
    let q_proj = |m: &VipLlava| m.language_model.layers[0].self_attn.q_proj.weight.val();
    assert!(weight_in_file_order(&q_proj(&in_place.model)));
    assert!(weight_in_file_order(&q_proj(&converted.model)));
    let values = |t: Tensor<2>| t.cast(DType::F32).into_data().try_to_vec::<f32>().expect("f32");
    assert_eq!(values(q_proj(&in_place.model)), values(q_proj(&converted.model)));
    // The same values copied into Burn's order give the same logits up to the summation
    // order of the products (the kernels for the two orders add in different orders).
    let copied = in_place.model.clone().map(&mut IntoBurnOrder);
    assert!(!weight_in_file_order(&q_proj(&copied)));
    let reference = Reference::open(name);
    let diff = max_abs_diff(
        bf16_logits(&in_place.model, &reference),
        bf16_logits(&copied, &reference),
    );
    assert!(
        diff <= 0.05,
        "in-place and copied weights: logits differ by {diff}"
    );
}

/// A tensor stored in the load dtype at an offset not aligned for it cannot be a view of
/// the map: it takes the converting path (read from the map, in the file's order), and
/// must come out with the same values, and the same logits, as the aligned file used in
/// place.
#[test]
fn misaligned_tensors_in_the_load_dtype_are_converted_to_the_same_model() {
    let device = Device::flex();
    let name = "tiny-hub-bf16-sharded";
    let dir = copy_fixture(name);
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        // One more byte of header (a space after the JSON): every tensor's data moves to an
        // odd file offset.
        let path = dir.path().join(shard);
        let bytes = std::fs::read(&path).expect("read");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let data_start = 8 + usize::try_from(header_len).expect("header length");
        let mut shifted = (header_len + 1).to_le_bytes().to_vec();
        shifted.extend_from_slice(&bytes[8..data_start]);
        shifted.push(b' ');
        shifted.extend_from_slice(&bytes[data_start..]);
        assert_eq!(data_start % 2, 0, "the fixture's data should start aligned");
        std::fs::write(&path, shifted).expect("write");
    }
    let aligned = load_model(&fixture(name), &device, &AS_BF16).expect("load aligned");
    let misaligned = load_model(dir.path(), &device, &AS_BF16).expect("load misaligned");
    let q_proj = |m: &VipLlava| m.language_model.layers[0].self_attn.q_proj.weight.val();
    assert!(weight_in_file_order(&q_proj(&misaligned.model)));
    let bits = |t: Tensor<2>| {
        t.into_data()
            .try_to_vec::<burn::tensor::bf16>()
            .expect("bf16")
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(q_proj(&aligned.model)), bits(q_proj(&misaligned.model)));
    let reference = Reference::open(name);
    let diff = max_abs_diff(
        bf16_logits(&aligned.model, &reference),
        bf16_logits(&misaligned.model, &reference),
    );
    assert_eq!(diff, 0.0, "aligned and misaligned files: logits differ by {diff}");
}

/// bf16 loads, nothing quantized.
const AS_BF16: LoadOptions = LoadOptions {
    precision: Precision::Bf16,
    quantize: None,
    quantize_lm_head: None,
};

/// The prefill logits (as f32) of a bf16 model on `reference`'s ids and pixels.
fn bf16_logits(model: &VipLlava, reference: &Reference) -> Tensor<3> {
    let device = Device::flex();
    let pixels: Tensor<4> = reference.float("pixel_values", &device).cast(DType::BF16);
    let input = ForwardInput::new(reference.ids(&device)).with_pixels(pixels);
    model
        .forward(input, &mut KvCache::new())
        .expect("forward")
        .cast(DType::F32)
}

/// Every float parameter copied into a fresh contiguous tensor.
struct IntoBurnOrder;

impl ModuleMapper for IntoBurnOrder {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            let device = t.device();
            let dtype = t.dtype();
            Tensor::from_data(t.into_data(), (&device, dtype))
        })
    }
}

#[test]
fn missing_tensor_names_the_key_and_shape() {
    let dir = copy_fixture("tiny-5x-f32");
    rewrite(&dir.path().join("model.safetensors"), |t| {
        t.retain(|(n, ..)| n != "model.language_model.layers.1.mlp.up_proj.weight")
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("missing tensor \"model.language_model.layers.1.mlp.up_proj.weight\""),
        "{msg}"
    );
    assert!(msg.contains("[128, 64]"), "{msg}");
}

#[test]
fn wrong_shape_names_key_expected_and_found() {
    let dir = copy_fixture("tiny-hub-tied-dynamic");
    rewrite(&dir.path().join("model.safetensors"), |t| {
        for (n, _, shape, bytes) in t.iter_mut() {
            if n == "language_model.model.norm.weight" {
                *shape = vec![32];
                bytes.truncate(32 * 4);
            }
        }
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ConvertError::ShapeMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("language_model.model.norm.weight") && msg.contains("[32]") && msg.contains("[64]"),
        "{msg}"
    );
}

#[test]
fn tied_checkpoint_without_tie_flag_explains_missing_lm_head() {
    let dir = copy_fixture("tiny-hub-tied-dynamic");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("config");
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
    config["tie_word_embeddings"] = serde_json::Value::Bool(false);
    config["text_config"]["tie_word_embeddings"] = serde_json::Value::Bool(false);
    std::fs::write(&path, config.to_string()).expect("write");
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("language_model.lm_head.weight") && msg.contains("tie_word_embeddings"),
        "{msg}"
    );
}

#[test]
fn projector_width_disagreeing_with_layers_is_an_error() {
    let dir = copy_fixture("tiny-5x-f32");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).expect("config");
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
    config["vision_feature_layer"] = serde_json::json!([-1, -2]);
    std::fs::write(&path, config.to_string()).expect("write");
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("projector layernorm") && msg.contains("width 160") && msg.contains("64"),
        "{msg}"
    );
}

#[test]
fn sharded_checkpoint_errors() {
    let dir = copy_fixture("tiny-hub-bf16-sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load_err(dir.path());
    assert!(matches!(err, ConvertError::MissingShard { .. }), "{err}");
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );

    let dir = copy_fixture("tiny-hub-bf16-sharded");
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"weight_map\": 3}",
    )
    .expect("write");
    let err = load_err(dir.path());
    assert!(matches!(err, ConvertError::BadIndex { .. }), "{err}");

    // The same tensor in both shards: copy a tensor of shard 1 into shard 2.
    let dir = copy_fixture("tiny-hub-bf16-sharded");
    let first = std::fs::read(dir.path().join("model-00001-of-00002.safetensors")).expect("read");
    let first = SafeTensors::deserialize(&first).expect("parse");
    let (name, view) = first.tensors().into_iter().next().expect("a tensor");
    let copy = (
        name.clone(),
        view.dtype(),
        view.shape().to_vec(),
        view.data().to_vec(),
    );
    rewrite(&dir.path().join("model-00002-of-00002.safetensors"), |t| {
        t.push(copy.clone())
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ConvertError::DuplicateTensor { .. }), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
}

#[test]
fn corrupt_safetensors_are_reported_with_the_file() {
    let write_raw = |dir: &Path, header: &str, data: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(dir.join("model.safetensors"), bytes).expect("write");
    };
    let cases: [(&str, usize, &str); 5] = [
        ("{not json", 0, "not JSON"),
        (
            r#"{"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}"#,
            1,
            "unsupported dtype Q9",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#,
            8,
            "past the end",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}"#,
            16,
            "needs 12 bytes",
        ),
        (
            r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}"#,
            16,
            "overlap",
        ),
    ];
    for (header, data, needle) in cases {
        let dir = copy_fixture("tiny-gqa-f16");
        write_raw(dir.path(), header, data);
        let msg = load_err(dir.path()).to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains(needle),
            "{needle}: {msg}"
        );
    }
    // Header length beyond the file, and a truncated file.
    let dir = copy_fixture("tiny-gqa-f16");
    std::fs::write(dir.path().join("model.safetensors"), 1_000_000u64.to_le_bytes()).expect("write");
    assert!(load_err(dir.path()).to_string().contains("beyond the file"));
    std::fs::write(dir.path().join("model.safetensors"), [1u8, 2, 3]).expect("write");
    assert!(load_err(dir.path()).to_string().contains("too short"));
}

#[test]
fn directory_problems_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = load_err(dir.path());
    assert!(matches!(err, ConvertError::NoConfig { .. }), "{err}");
    std::fs::copy(
        fixture("tiny-5x-f32").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let err = load_err(dir.path());
    assert!(matches!(err, ConvertError::NoWeights { .. }), "{err}");
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llava\"}").expect("write");
    let err = load_err(dir.path());
    assert!(
        err.to_string().contains("config.json") && err.to_string().contains("\"llava\""),
        "{err}"
    );

    let dir = copy_fixture("tiny-gqa-f16");
    rewrite(&dir.path().join("model.safetensors"), |t| {
        for (n, ..) in t.iter_mut() {
            *n = format!("transformer.{n}");
        }
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ConvertError::UnknownLayout { .. }), "{err}");
}
