//! Devices, quantization and Burn-native conversion on the CPU: quantized logits against
//! f32 with explicit bounds, `vipllava convert` round trips, and clear errors for devices
//! this binary was built without.

use crate::common::{FIXTURES, copy_fixture, fixture, max_slice_diff, run_cli};
use burn::tensor::Device;
use vipllava::convert::quantized_parameter_count;
use vipllava::generation::GenerationOptions;
use vipllava::model::KvCache;
use vipllava::model::kernels::packed::{self, Int8Kernel};
use vipllava::model::kernels::with_int8_activations;
use vipllava::pipeline::{Pipeline, PreparedInput, Prompt};
use vipllava::processor::image::load_image;
use vipllava::{LoadOptions, Quantization};

const IMAGE: &str = "images/astronaut.png";
const QUESTION: &str = "What is in the red box?";

/// Last-position logits and 10 greedy tokens.
fn run(dir: &std::path::Path, options: &LoadOptions) -> (Vec<f32>, Vec<u32>, Pipeline) {
    let pipeline = Pipeline::load(dir, &Device::flex(), options).expect("pipeline");
    let prepared = prepared(&pipeline);
    let (logits, _) = pipeline.prefill(&prepared).expect("prefill");
    let tokens = greedy_tokens(&pipeline, &prepared);
    (logits, tokens, pipeline)
}

/// The fixture image and question, prepared for `pipeline`.
fn prepared(pipeline: &Pipeline) -> PreparedInput {
    let image = load_image(&fixture(IMAGE)).expect("image");
    pipeline
        .prepare(&[image], &Prompt::User(QUESTION.into()))
        .expect("prepare")
}

/// 10 greedy tokens.
fn greedy_tokens(pipeline: &Pipeline, prepared: &PreparedInput) -> Vec<u32> {
    let greedy = GenerationOptions {
        max_new_tokens: 10,
        ..pipeline.generation_defaults().clone()
    };
    pipeline
        .generate(prepared, &greedy, |_| {})
        .expect("generate")
        .token_ids
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Replaces every quantized parameter by its dequantized f32 value.
struct Dequantize;

impl burn::module::ModuleMapper for Dequantize {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        param.map(|t| {
            if matches!(t.dtype(), burn::tensor::DType::QFloat(_)) {
                t.dequantize()
            } else {
                t
            }
        })
    }
}

/// Measured on the tiny random fixtures (whose logits react strongly to weight noise: 14+
/// random layers, no training), with a 2x margin; the per-value error itself is bounded
/// in `vipllava-convert`'s unit tests (half a quantization step).
const Q8_LOGIT_BOUND: f32 = 0.6;
const Q4_LOGIT_BOUND: f32 = 10.0;

/// Largest logit change of a decode step from int8 activations measured on the fixtures
/// (q8 0.074-0.117, q4 0.125-0.132 at logit scales 6.3-9.8 after an f32-activation prefill;
/// after a q4 prefill through the int8 gemm, AVX2 without VNNI: q8 0.115-0.187, q4
/// 0.105-0.195; after q8 and q4 prefills through the AMX-INT8 gemm: q8 0.084-0.183, q4
/// 0.105-0.195; the q8 weights' own error there is 0.13-0.26), with a 1.5-2x margin.
const INT8_ACTIVATION_LOGIT_BOUND: f32 = 0.3;

/// Largest prefill logit change from int8 activations measured on the fixtures (q4
/// weights through the int8 gemm on an AVX2 CPU without VNNI: 0.092-0.259 at logit scales
/// 7.4-8.4, the same greedy token; q8 and q4 through the AMX-INT8 gemm: q8 0.153-0.199,
/// q4 0.092-0.259; q8 prefills of at most 16 rows, which take the decode kernel:
/// 0.055-0.064; the q4 weights' own error is bounded by 10), with a 2x margin.
const INT8_ACTIVATION_PREFILL_LOGIT_BOUND: f32 = 0.5;

/// Whether an f32 prefill with `level` weights (blocks of 32) takes the int8 gemm on this
/// CPU (AMX-INT8; q4 on AVX2 without AVX-512 VNNI).
fn int8_gemm_runs(level: Quantization) -> bool {
    let bits = match level {
        Quantization::Q8 => packed::Bits::Eight,
        Quantization::Q4 => packed::Bits::Four,
    };
    packed::PackedWeight::int8_gemm_runs(bits, 32)
}

/// The prefill of each fixture with int8 activations against f32 ones (where the weights
/// take the int8 gemm), then decode steps with int8 activations (the VNNI or AVX2 kernel,
/// on CPUs that have one)
/// against the same steps with f32 activations, over the same quantized weights: the logits
/// of five steps stay within [`INT8_ACTIVATION_LOGIT_BOUND`], and the run reports how many
/// greedy tokens agree. Where the CPU has neither, both runs take the f32 path (reported,
/// not failed).
#[test]
fn int8_activations_add_a_bounded_error() {
    // VNNI or AVX2: an int8 kernel runs here.
    let int8_kernel = Int8Kernel::best() != Int8Kernel::Plain;
    println!(
        "| fixture | quantize | max abs logit | prefill: max |diff| int8 vs f32 activations | prefill: same greedy token | decode: max |diff| | decode: greedy tokens equal (5 steps) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for name in FIXTURES {
        for level in [Quantization::Q8, Quantization::Q4] {
            let options = LoadOptions {
                quantize: Some(level),
                ..LoadOptions::default()
            };
            let pipeline = Pipeline::load(&fixture(name), &Device::flex(), &options).expect("pipeline");
            let image = load_image(&fixture(IMAGE)).expect("image");
            let prepared = pipeline
                .prepare(&[image], &Prompt::User(QUESTION.into()))
                .expect("prepare");
            let (first, cache) =
                with_int8_activations(true, || pipeline.prefill(&prepared)).expect("prefill");
            // The prefill: int8 activations where the weights' many rows take the int8
            // gemm (AMX-INT8; q4 on AVX2 without VNNI), f32 activations elsewhere.
            let (first_f32, _) =
                with_int8_activations(false, || pipeline.prefill(&prepared)).expect("prefill");
            let prefill_diff = max_slice_diff(&first, &first_f32);
            let prefill_agree = argmax(&first) == argmax(&first_f32);
            assert!(
                prefill_diff <= INT8_ACTIVATION_PREFILL_LOGIT_BOUND,
                "{name} {level}: int8 activations moved the prefill's logits by {prefill_diff}"
            );
            // (A prefill of at most 16 rows, as the tiny towers' can be, takes the decode
            // kernel and so int8 activations too, q8 as well.)
            if int8_gemm_runs(level) {
                assert!(
                    prefill_diff > 0.0,
                    "{name} {level}: the prefill kept f32 activations"
                );
            }
            // Five greedy decode steps, each from the same cache state in both modes.
            let steps = |int8: bool| -> (Vec<Vec<f32>>, Vec<u32>) {
                with_int8_activations(int8, || {
                    let mut cache: KvCache = cache.clone();
                    let mut token = argmax(&first);
                    let (mut all, mut tokens) = (Vec::new(), Vec::new());
                    for _ in 0..5 {
                        let logits = pipeline.extend_cache(&[token], &[], &mut cache).expect("step");
                        token = argmax(&logits);
                        tokens.push(token);
                        all.push(logits);
                    }
                    (all, tokens)
                })
            };
            let (int8, int8_tokens) = steps(true);
            let (f32s, f32_tokens) = steps(false);
            // The first step has the same input in both modes.
            let diff = max_slice_diff(&int8[0], &f32s[0]);
            let scale = max_abs(&f32s[0]);
            let agree = int8_tokens
                .iter()
                .zip(&f32_tokens)
                .filter(|(a, b)| a == b)
                .count();
            println!(
                "| {name} | {level} | {scale:.3} | {prefill_diff:.2e} | {prefill_agree} | {diff:.2e} | {agree}/5 |"
            );
            assert!(
                diff <= INT8_ACTIVATION_LOGIT_BOUND,
                "{name} {level}: int8 activations moved the logits by {diff}"
            );
            if int8_kernel {
                assert!(diff > 0.0, "{name} {level}: the int8 path did not run");
            } else {
                assert_eq!(
                    diff, 0.0,
                    "{name} {level}: int8 activations without an int8 kernel"
                );
            }
        }
    }
    if !int8_kernel {
        println!("this CPU has neither AVX-512 VNNI nor AVX2: both runs used f32 activations");
    }
}

fn argmax(values: &[f32]) -> u32 {
    values
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        )
        .0 as u32
}

#[test]
fn quantized_weights_stay_close_to_f32() {
    use burn::module::Module;
    println!(
        "| fixture | quantize | max abs logit | max |diff| vs f32 | greedy tokens equal | vs dequantized f32 |"
    );
    println!("|---|---|---|---|---|---|");
    for name in FIXTURES {
        let (reference, ref_tokens, _) = run(&fixture(name), &LoadOptions::default());
        let scale = max_abs(&reference);
        for (level, bound) in [
            (Quantization::Q8, Q8_LOGIT_BOUND),
            (Quantization::Q4, Q4_LOGIT_BOUND),
        ] {
            let options = LoadOptions {
                quantize: Some(level),
                ..LoadOptions::default()
            };
            // f32 activations: the weights' error alone (int8 activations are measured in
            // `int8_activations_add_a_bounded_error`).
            let (logits, tokens, mut pipeline) =
                with_int8_activations(false, || run(&fixture(name), &options));
            assert!(
                quantized_parameter_count(pipeline.model()) > 0,
                "{name}: nothing was quantized"
            );
            // The quantized forward pass computes exactly what f32 weights equal to the
            // dequantized values compute: the inference path adds no error of its own.
            *pipeline.model_mut() = pipeline.model().clone().map(&mut Dequantize);
            assert_eq!(quantized_parameter_count(pipeline.model()), 0);
            let image = load_image(&fixture(IMAGE)).expect("image");
            let prepared = pipeline
                .prepare(&[image], &Prompt::User(QUESTION.into()))
                .expect("prepare");
            let (dequantized, _) = pipeline.prefill(&prepared).expect("prefill");
            let path_diff = max_slice_diff(&logits, &dequantized);
            // Decode steps run the int8 streaming kernel: the same greedy tokens.
            let dequantized_tokens = greedy_tokens(&pipeline, &prepared);
            assert_eq!(
                tokens, dequantized_tokens,
                "{name} {level}: the quantized decode path chose other tokens than dequantized weights"
            );

            let diff = max_slice_diff(&logits, &reference);
            println!(
                "| {name} | {level} | {scale:.3} | {diff:.2e} | {} | {path_diff:.1e} |",
                tokens == ref_tokens
            );
            assert!(
                path_diff <= 1e-4,
                "{name} {level}: quantized path differs from dequantized weights by {path_diff}"
            );
            assert!(
                diff <= bound,
                "{name} {level}: logits differ from f32 by {diff} (scale {scale})"
            );
        }
    }
}

/// Counts the parameters held packed, and their values, without unpacking them.
#[derive(Default)]
struct PackedCounter {
    params: usize,
    values: usize,
    /// Packed parameters used in place from a burnpack's map.
    mapped: usize,
}

impl burn::module::ModuleVisitor for PackedCounter {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
        if let Some(weight) = packed::packed_weight(param) {
            self.params += 1;
            self.values += param.lazy_shape().num_elements();
            self.mapped += usize::from(weight.is_mapped());
        }
    }
}

fn packed(pipeline: &Pipeline) -> PackedCounter {
    let mut counter = PackedCounter::default();
    burn::module::Module::visit(pipeline.model(), &mut counter);
    counter
}

fn packed_count(pipeline: &Pipeline) -> usize {
    packed(pipeline).params
}

/// Reads every parameter, as any Burn operation on it would: packed weights unpack.
struct ReadEvery;

impl burn::module::ModuleMapper for ReadEvery {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        param.map(|t| t)
    }
}

/// `--quantize q8|q4` on the CPU holds every quantized weight packed (q4 two values per
/// byte), and computing with the packed weights gives the bits of the unpacked ones: prefill
/// logits and greedy tokens, with int8 and with f32 activations.
#[test]
fn packed_weights_compute_the_bits_of_unpacked_ones() {
    use burn::module::Module;
    for name in FIXTURES {
        for level in [Quantization::Q8, Quantization::Q4] {
            let options = LoadOptions {
                quantize: Some(level),
                ..LoadOptions::default()
            };
            for int8 in [true, false] {
                let case = format!("{name} {level} (int8 activations: {int8})");
                let (logits, tokens, mut pipeline) =
                    with_int8_activations(int8, || run(&fixture(name), &options));
                let quantized = quantized_parameter_count(pipeline.model());
                assert!(quantized > 0);
                assert_eq!(
                    packed_count(&pipeline),
                    quantized,
                    "{case}: every weight is packed"
                );
                *pipeline.model_mut() = pipeline.model().clone().map(&mut ReadEvery);
                assert_eq!(packed_count(&pipeline), 0, "{case}: reading a weight unpacks it");
                assert_eq!(quantized_parameter_count(pipeline.model()), quantized);
                let image = load_image(&fixture(IMAGE)).expect("image");
                let prepared = pipeline
                    .prepare(&[image], &Prompt::User(QUESTION.into()))
                    .expect("prepare");
                let (unpacked, unpacked_tokens) = with_int8_activations(int8, || {
                    let (logits, _) = pipeline.prefill(&prepared).expect("prefill");
                    (logits, greedy_tokens(&pipeline, &prepared))
                });
                assert_eq!(logits, unpacked, "{case}: prefill logits");
                assert_eq!(tokens, unpacked_tokens, "{case}: greedy tokens");
            }
        }
    }
}

#[test]
fn only_linear_weights_are_quantized() {
    let options = LoadOptions {
        quantize: Some(Quantization::Q8),
        ..LoadOptions::default()
    };
    let (_, _, pipeline) = run(&fixture("tiny-gqa-f16"), &options);
    let config = pipeline.config();
    // Per Llama layer 7 projections, per CLIP layer 6 (q, k, v, out, fc1, fc2), and the
    // projector's two linear layers.
    let llama = config.text.num_hidden_layers * 7;
    let clip = pipeline.model().vision_tower.encoder.layers.len() * 6;
    assert_eq!(quantized_parameter_count(pipeline.model()), llama + clip + 2);
}

/// `--quantize-lm-head`: `lm_head` is quantized too (one more quantized parameter, packed
/// where the CPU kernels read it), the logits stay within the weights' bound of f32 and
/// within the q8 bound of the same load without it, the quantized path computes what the
/// dequantized weights compute, and a checkpoint that ties `lm_head` to the embeddings is
/// refused with a message that says so.
#[test]
fn quantized_lm_head_stays_close_and_is_refused_when_tied() {
    use burn::module::Module;
    println!(
        "| fixture | quantize | lm_head | max |diff| vs f32 | vs lm_head in f32 | greedy tokens equal |"
    );
    println!("|---|---|---|---|---|---|");
    for name in ["tiny-5x-f32", "tiny-gqa-f16"] {
        let (reference, _, _) = run(&fixture(name), &LoadOptions::default());
        for (level, head, bound) in [
            (Quantization::Q8, Quantization::Q8, Q8_LOGIT_BOUND),
            (Quantization::Q4, Quantization::Q8, Q4_LOGIT_BOUND),
            (Quantization::Q4, Quantization::Q4, Q4_LOGIT_BOUND),
        ] {
            let body = LoadOptions {
                quantize: Some(level),
                ..LoadOptions::default()
            };
            let with_head = LoadOptions {
                quantize_lm_head: Some(head),
                ..body.clone()
            };
            let (without, without_tokens, plain) =
                with_int8_activations(false, || run(&fixture(name), &body));
            let (logits, tokens, mut pipeline) =
                with_int8_activations(false, || run(&fixture(name), &with_head));
            assert_eq!(
                quantized_parameter_count(pipeline.model()),
                quantized_parameter_count(plain.model()) + 1,
                "{name}: lm_head was not quantized"
            );
            let head_weight = &pipeline.model().lm_head.as_ref().expect("lm_head").weight;
            assert!(packed::is_packed(head_weight), "{name}: lm_head is not packed");
            let diff = max_slice_diff(&logits, &reference);
            let head_diff = max_slice_diff(&logits, &without);
            let head_bound = match head {
                Quantization::Q8 => Q8_LOGIT_BOUND,
                Quantization::Q4 => Q4_LOGIT_BOUND,
            };
            println!(
                "| {name} | {level} | {head} | {diff:.2e} | {head_diff:.2e} | {} |",
                tokens == without_tokens
            );
            assert!(
                diff <= bound,
                "{name} {level}/{head}: logits differ from f32 by {diff}"
            );
            assert!(
                head_diff > 0.0 && head_diff <= head_bound,
                "{name} {level}/{head}: the quantized lm_head moved the logits by {head_diff}"
            );
            *pipeline.model_mut() = pipeline.model().clone().map(&mut Dequantize);
            let (dequantized, _) = pipeline.prefill(&prepared(&pipeline)).expect("prefill");
            let path_diff = max_slice_diff(&logits, &dequantized);
            assert!(
                path_diff <= 1e-4,
                "{name} {level}/{head}: quantized path off by {path_diff}"
            );
        }
    }
    // `convert` keeps the quantized head; the burnpack loads it packed, as it was.
    let options = LoadOptions {
        quantize: Some(Quantization::Q8),
        quantize_lm_head: Some(Quantization::Q8),
        ..LoadOptions::default()
    };
    let out_root = tempfile::tempdir().expect("tempdir");
    let out = out_root.path().join("gqa-q8-head");
    vipllava::convert::output::convert_model_dir(&fixture("tiny-gqa-f16"), &out, &Device::flex(), &options)
        .expect("convert");
    let (direct, _, _) = with_int8_activations(false, || run(&fixture("tiny-gqa-f16"), &options));
    let (reloaded, _, pipeline) = with_int8_activations(false, || run(&out, &LoadOptions::default()));
    let head_weight = &pipeline.model().lm_head.as_ref().expect("lm_head").weight;
    assert!(
        packed::packed_weight(head_weight).is_some_and(|w| w.is_mapped()),
        "the burnpack's lm_head is not packed in place"
    );
    let diff = max_slice_diff(&direct, &reloaded);
    assert!(diff <= 1e-4, "the burnpack's logits differ by {diff}");

    let tied = LoadOptions {
        quantize_lm_head: Some(Quantization::Q8),
        ..LoadOptions::default()
    };
    let err = match Pipeline::load(&fixture("tiny-hub-tied-dynamic"), &Device::flex(), &tied) {
        Ok(_) => panic!("a tied lm_head must be refused"),
        Err(err) => err,
    };
    assert!(format!("{err:#}").contains("ties lm_head"), "{err:#}");
}

#[test]
fn convert_writes_a_burnpack_directory_that_generates_the_same() {
    let out_root = tempfile::tempdir().expect("tempdir");
    let input = fixture("tiny-5x-f32");
    let (mut file_sizes, mut quantized_values) = (Vec::new(), 0);
    for (dtype, quantize) in [("bf16", None), ("f32", Some("q8")), ("f32", Some("q4"))] {
        let out = out_root
            .path()
            .join(format!("{dtype}-{}", quantize.unwrap_or("none")));
        let mut args = vec![
            "convert",
            "--model",
            input.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
            "--dtype",
            dtype,
        ];
        if let Some(q) = quantize {
            args.extend(["--quantize", q]);
        }
        let output = run_cli(&args);
        assert!(
            output.status.success(),
            "convert failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(out.join("model.bpk").is_file());
        assert!(out.join("tokenizer.json").is_file());
        assert!(!out.join("model.safetensors").exists());

        let options = LoadOptions {
            precision: dtype.parse().expect("precision"),
            quantize: quantize.map(|q| q.parse().expect("level")),
            quantize_lm_head: None,
        };
        let (direct, direct_tokens, _) = run(&input, &options);
        let (converted, converted_tokens, pipeline) = run(&out, &LoadOptions::default());
        file_sizes.push(std::fs::metadata(out.join("model.bpk")).expect("size").len() as usize);
        let counted = packed(&pipeline);
        quantized_values = counted.values;
        // `convert` stores them in the kernels' layout: the load uses the map in place.
        assert_eq!(
            counted.mapped, counted.params,
            "{quantize:?}: packed weights mapped"
        );
        assert_eq!(
            quantized_parameter_count(pipeline.model()) > 0,
            quantize.is_some(),
            "{dtype}: quantization kept across the burnpack"
        );
        assert_eq!(
            packed_count(&pipeline),
            quantized_parameter_count(pipeline.model()),
            "{quantize:?}: quantized weights from a burnpack are packed"
        );
        let diff = max_slice_diff(&direct, &converted);
        // The direct load uses weights stored in the load dtype in place, in the file's
        // `[out, in]` order (the f32 `lm_head` here); the burnpack holds them in Burn's
        // order, and the two orders' kernels add the products in different orders.
        assert!(
            diff <= 1e-5,
            "{dtype}/{quantize:?}: converted logits differ by {diff}"
        );
        assert_eq!(direct_tokens, converted_tokens);
    }
    // Nothing but the finished directories is left behind.
    let names: Vec<String> = std::fs::read_dir(out_root.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    // q4 values are written two per byte: the q4 file is smaller than the q8 one by half a
    // byte per quantized value (up to the tensors' alignment padding).
    let saved = file_sizes[1] - file_sizes[2];
    assert!(
        saved * 100 >= quantized_values / 2 * 95 && saved <= quantized_values / 2 + 64 * 1024,
        "q8 {} bytes, q4 {} bytes, {quantized_values} quantized values",
        file_sizes[1],
        file_sizes[2]
    );
}

#[test]
fn convert_refuses_to_overwrite_and_leaves_nothing_on_error() {
    let model = copy_fixture("tiny-5x-f32");
    let before: Vec<_> = std::fs::read_dir(model.path()).expect("dir").collect();
    let model_path = model.path().to_str().expect("utf-8").to_string();
    let output = run_cli(&["convert", "--model", &model_path, "--out", &model_path]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("input model"), "{stderr}");
    let after: Vec<_> = std::fs::read_dir(model.path()).expect("dir").collect();
    assert_eq!(before.len(), after.len(), "the input directory is unchanged");

    // A model that fails to load half-way: no output directory, no staging leftovers.
    let broken = copy_fixture("tiny-5x-f32");
    let weights = broken.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    let out_root = tempfile::tempdir().expect("tempdir");
    let out = out_root.path().join("converted");
    let output = run_cli(&[
        "convert",
        "--model",
        broken.path().to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(!output.status.success());
    assert_eq!(
        std::fs::read_dir(out_root.path()).expect("dir").count(),
        0,
        "no partial output after an error"
    );
}

#[test]
fn devices_not_compiled_in_or_unknown_are_clear_errors() {
    let model = fixture("tiny-5x-f32");
    let model = model.to_str().expect("utf-8");
    let image = fixture(IMAGE);
    let image = image.to_str().expect("utf-8");
    let mut cases = vec![("tpu", "unknown device `tpu`".to_string())];
    for (device, feature) in [("wgpu", "wgpu"), ("cuda:0", "cuda"), ("ndarray", "ndarray")] {
        let spec: vipllava::DeviceSpec = device.parse().expect("spec");
        if !spec.is_compiled() {
            cases.push((device, format!("--features {feature}")));
        }
    }
    for (device, expected) in cases {
        let output = run_cli(&[
            "generate", "--model", model, "--image", image, "--prompt", "hi", "--device", device,
        ]);
        assert!(!output.status.success(), "{device}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&expected), "{device}: {stderr}");
        assert!(!stderr.contains("panicked"), "{device}: {stderr}");
    }
}

/// A packed weight's `k`, `n`, block, values and scales.
type PackedContents = (usize, usize, usize, Vec<i8>, Vec<f32>);

/// Every packed weight of a module, in visiting order.
struct PackedWeights(Vec<PackedContents>);

impl burn::module::ModuleVisitor for PackedWeights {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
        if let Some(weight) = packed::packed_weight(param) {
            self.0.push((
                weight.k(),
                weight.n(),
                weight.block(),
                weight.unpack(),
                weight.scales(),
            ));
        }
    }
}

/// Quantizing at load (on the CPU each weight is quantized and packed where it lies in its
/// file, without a copy in the load dtype) gives what loading the model unquantized and then
/// quantizing it gives: every packed weight equal, value for value and scale for scale, in
/// f32 and bf16, for both levels, on fixtures with f32 and f16 files.
#[test]
fn quantizing_at_load_equals_quantizing_the_loaded_model() {
    use burn::module::Module;
    use vipllava::convert::{load_model, quantize_model};
    use vipllava::model::Precision;
    let packed_of = |model: &vipllava::model::VipLlava| {
        let mut weights = PackedWeights(Vec::new());
        model.visit(&mut weights);
        weights.0
    };
    for name in ["tiny-5x-f32", "tiny-gqa-f16"] {
        for precision in [Precision::F32, Precision::Bf16] {
            for level in [Quantization::Q8, Quantization::Q4] {
                let case = format!("{name} {precision:?} {level}");
                let plain = LoadOptions {
                    precision,
                    ..LoadOptions::default()
                };
                let at_load = LoadOptions {
                    quantize: Some(level),
                    ..plain.clone()
                };
                let dir = fixture(name);
                let loaded = load_model(&dir, &Device::flex(), &at_load).expect("quantized load");
                let later = load_model(&dir, &Device::flex(), &plain).expect("plain load");
                let later = quantize_model(later.model, level);
                let (ours, general) = (packed_of(&loaded.model), packed_of(&later));
                assert!(!ours.is_empty(), "{case}: nothing packed");
                assert_eq!(ours.len(), quantized_parameter_count(&loaded.model), "{case}");
                assert_eq!(ours.len(), general.len(), "{case}: packed weights");
                for (i, (a, b)) in ours.iter().zip(&general).enumerate() {
                    assert!(a == b, "{case}: packed weight {i} differs");
                }
            }
        }
    }
}
