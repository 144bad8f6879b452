//! Export that fits where the model fits (tensor by tensor, base dtype, hub shards),
//! evaluation with the training labels, and the learning-rate / clipping recipes, on the
//! tiny fixtures.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value;
use vipllava_model::{ForwardInput, KvCache, VipLlava};
use vipllava_train::export::{ExportOptions, write_hf_model_with};
use vipllava_train::shards::INDEX_FILE;
use vipllava_train::trainer::{LoraTarget, OptimizerKind, TrainConfig, Trainable, Trainer};
use vipllava_train::{EncodedSample, ExportDtype};

use super::{device, f32s, fixtures, keep_export_for_python};

fn lora_config(model: &str, out: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(fixtures().join(model), fixtures().join("train/data.json"), out);
    c.trainable = Trainable::Lora;
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.lora_targets = vec![LoraTarget::Attn, LoraTarget::Mlp];
    c.optimizer = OptimizerKind::Adamw;
    c.lr = 1e-2;
    c
}

fn logits(m: &VipLlava, s: &EncodedSample) -> Vec<f32> {
    let n = s.input_ids.len();
    let ids: Vec<i64> = s.input_ids.iter().map(|&i| i as i64).collect();
    let p = &s.pixel_values;
    let input = ForwardInput::new(Tensor::<2, Int>::from_data(
        TensorData::new(ids, [1, n]),
        &device(),
    ))
    .with_pixels(Tensor::from_data(
        TensorData::new(p.data.clone(), [1, 3, p.height, p.width]),
        &device(),
    ));
    f32s(&m.forward(input, &mut KvCache::new()).unwrap().into_data())
}

/// Dtypes of the tensors of a directory's weight files.
fn weight_dtypes(dir: &Path) -> BTreeMap<String, safetensors::Dtype> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (k, v) in st.tensors() {
                out.insert(k, v.dtype());
            }
        }
    }
    out
}

#[test]
fn sharded_export_reloads_with_the_unsharded_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = lora_config("tiny-5x-f32", &tmp.path().join("run"));
    c.max_steps = Some(2);
    let mut t = Trainer::new(c.clone(), &device()).unwrap();
    t.step().unwrap();
    t.step().unwrap();
    let merged = t.inference_model().materialize();
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    let a = write_hf_model_with(&merged, &c.model, &single, &ExportOptions::default()).unwrap();
    assert_eq!(a.weights.files, ["model.safetensors"]);
    assert!(!single.join(INDEX_FILE).exists());
    let options = ExportOptions {
        max_shard_bytes: 200_000,
        ..ExportOptions::default()
    };
    let b = write_hf_model_with(&merged, &c.model, &sharded, &options).unwrap();
    assert!(b.weights.files.len() >= 3, "{:?}", b.weights.files);
    assert_eq!(a.weights.total_size, b.weights.total_size);
    assert!(!sharded.join("model.safetensors").exists());
    // The index as the hub writes it: every key of the single file, each in a listed shard,
    // and the total size of the tensor data.
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], a.weights.total_size);
    let map = index["weight_map"].as_object().unwrap();
    let single_keys = weight_dtypes(&single);
    assert_eq!(
        map.keys().cloned().collect::<Vec<_>>(),
        single_keys.keys().cloned().collect::<Vec<_>>()
    );
    let mut per_shard: BTreeMap<&str, u64> = BTreeMap::new();
    for f in map.values() {
        *per_shard.entry(f.as_str().unwrap()).or_default() += 1;
    }
    assert_eq!(per_shard.len(), b.weights.files.len());
    for f in &b.weights.files {
        // Tensor data at most the limit (the file adds its header), unless one tensor alone exceeds it.
        let len = std::fs::metadata(sharded.join(f)).unwrap().len();
        assert!(
            len <= 200_000 + 16_384 || per_shard[f.as_str()] == 1,
            "{f}: {len} bytes"
        );
    }
    let want = logits(&merged, &t.samples[1]);
    for dir in [&single, &sharded] {
        let loaded = vipllava_convert::load_model(dir, &device(), &Default::default()).unwrap();
        assert_eq!(logits(&loaded.model, &t.samples[1]), want, "{}", dir.display());
    }
    // Writing one layout over the other leaves nothing that loaders would mix in.
    write_hf_model_with(&merged, &c.model, &single, &options).unwrap();
    assert!(!single.join("model.safetensors").exists());
    assert!(single.join(INDEX_FILE).exists());
    write_hf_model_with(&merged, &c.model, &sharded, &ExportOptions::default()).unwrap();
    let left: Vec<String> = std::fs::read_dir(&sharded)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("safetensors"))
        .collect();
    assert_eq!(left, ["model.safetensors"]);
    let loaded = vipllava_convert::load_model(&single, &device(), &Default::default()).unwrap();
    assert_eq!(logits(&loaded.model, &t.samples[1]), want);
    keep_export_for_python("VIPLLAVA_SHARDED_EXPORT_CHECK_DIR", &single, &t.samples[1], &want);
}

#[test]
fn export_dtype_follows_the_base_checkpoint_unless_asked() {
    for (model, want, torch) in [
        ("tiny-5x-f32", safetensors::Dtype::F32, "float32"),
        ("tiny-gqa-f16", safetensors::Dtype::F16, "float16"),
        ("tiny-hub-bf16-sharded", safetensors::Dtype::BF16, "bfloat16"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let c = lora_config(model, &tmp.path().join("run"));
        let t = Trainer::new(c.clone(), &device()).unwrap();
        let merged = t.inference_model().materialize();
        let out = tmp.path().join("out");
        let report = write_hf_model_with(&merged, &c.model, &out, &ExportOptions::default()).unwrap();
        let dtypes = weight_dtypes(&out);
        assert!(dtypes.values().all(|d| *d == want), "{model}: {dtypes:?}");
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["dtype"], torch, "{model}");
        assert_eq!(report.dtype.torch_name(), torch);
        // Reloads, and the logits are those of the model rounded to that dtype.
        let loaded = vipllava_convert::load_model(&out, &device(), &Default::default()).unwrap();
        let (a, b) = (
            logits(&merged, &t.samples[0]),
            logits(&loaded.model, &t.samples[0]),
        );
        let d = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(d < 1e-5, "{model}: the base weights were already in {torch}: {d}");
        // --export-dtype overrides.
        let out32 = tmp.path().join("out32");
        write_hf_model_with(
            &merged,
            &c.model,
            &out32,
            &ExportOptions::default().with_dtype(ExportDtype::F32),
        )
        .unwrap();
        assert!(
            weight_dtypes(&out32)
                .values()
                .all(|d| *d == safetensors::Dtype::F32)
        );
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out32.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["dtype"], "float32");
    }
}

fn projector_config(out: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(
        fixtures().join("tiny-5x-f32"),
        fixtures().join("train/data.json"),
        out,
    );
    c.trainable = Trainable::Projector;
    c.optimizer = OptimizerKind::Sgd;
    c.lr = 0.05;
    c
}

#[test]
fn eval_loss_is_the_training_loss_of_the_same_samples() {
    use vipllava_train::eval::evaluate;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = projector_config(tmp.path());
    // One micro-batch of every sample: step 1's loss is the mean over all their targets.
    c.batch_size = 4;
    c.max_steps = Some(1);
    c.eval_data = Some(c.data.clone());
    let mut t = Trainer::new(c.clone(), &device()).unwrap();
    assert_eq!(t.samples.len(), 4);
    let before = t.evaluate().unwrap().unwrap();
    let pad = vipllava_train::batch::pad_id(&t.encoder, &t.model_config);
    let targets: usize = t.samples.iter().map(EncodedSample::num_targets).sum();
    assert_eq!((before.samples, before.targets), (4, targets));
    assert!((before.perplexity - before.loss.exp()).abs() <= 1e-12 * before.perplexity);
    // Whatever the batch size.
    for batch in [1, 3] {
        let model = t.inference_model();
        let r = evaluate(
            &model,
            &t.eval_samples,
            pad,
            burn::tensor::DType::F32,
            batch,
            &device(),
            |_| {},
        )
        .unwrap();
        let rel = (r.loss - before.loss).abs() / before.loss;
        assert!(
            rel < 1e-6,
            "batch {batch}: {} vs {} ({rel:e})",
            r.loss,
            before.loss
        );
        assert_eq!(r.targets, targets);
    }
    let rep = t.step().unwrap().unwrap();
    let rel = (rep.loss - before.loss).abs() / rep.loss;
    eprintln!("eval {} vs train step 1 {} (rel {rel:e})", before.loss, rep.loss);
    assert!(rel < 1e-6, "eval {} vs train {} ({rel:e})", before.loss, rep.loss);
    // The last step reports the evaluation of the updated model.
    let after = rep.eval.expect("evaluated after the last step");
    assert!(after.loss < before.loss, "{} -> {}", before.loss, after.loss);
}

#[test]
fn eval_every_n_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = projector_config(tmp.path());
    c.epochs = 2;
    c.eval_data = Some(c.data.clone());
    c.eval_every = Some(3);
    let mut t = Trainer::new(c, &device()).unwrap();
    let mut evaluated = Vec::new();
    while let Some(r) = t.step().unwrap() {
        if r.eval.is_some() {
            evaluated.push(r.step);
        }
    }
    assert_eq!(evaluated, [3, 6, 8]);
}

/// Global L2 norm of `(a - b) / scale` over every tensor.
fn diff_norm(a: &BTreeMap<String, TensorData>, b: &BTreeMap<String, TensorData>, scale: f64) -> f64 {
    let mut sum = 0.0f64;
    for (k, v) in a {
        for (x, y) in f32s(v).iter().zip(f32s(&b[k])) {
            let d = f64::from(x - y) / scale;
            sum += d * d;
        }
    }
    sum.sqrt()
}

#[test]
fn clipping_bounds_the_global_norm_of_the_update() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = projector_config(tmp.path());
    c.lr = 0.1;
    let free = Trainer::new(c.clone(), &device()).unwrap();
    let grads = free.gradients(&[0]).unwrap();
    let norm: f64 = grads
        .values()
        .flat_map(f32s)
        .map(|x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let max = norm / 10.0;
    c.max_grad_norm = Some(max);
    let mut t = Trainer::new(c, &device()).unwrap();
    let before = t.trainable_values();
    let rep = t.step().unwrap().unwrap();
    let reported = rep.grad_norm.expect("grad norm reported");
    assert!((reported - norm).abs() <= 1e-4 * norm, "{reported} vs {norm}");
    // Plain SGD: the update is lr times the clipped gradient.
    let step = diff_norm(&before, &t.trainable_values(), 0.1);
    eprintln!("gradient norm {norm:.4}, max {max:.4}, update norm / lr {step:.6}");
    assert!(step <= max * (1.0 + 1e-4), "{step} > {max}");
    assert!(step >= max * (1.0 - 1e-3), "{step} clipped too much (max {max})");
}

#[test]
fn cosine_schedule_drives_the_steps() {
    use vipllava_train::recipes::{LrSchedule, cosine_lr, warmup_steps};
    let tmp = tempfile::tempdir().unwrap();
    let mut c = projector_config(tmp.path());
    c.epochs = 3;
    c.lr_schedule = LrSchedule::Cosine;
    c.warmup_ratio = 0.2;
    let mut t = Trainer::new(c.clone(), &device()).unwrap();
    let total = t.total_steps();
    assert_eq!(total, 12);
    let w = warmup_steps(total, 0.2);
    assert_eq!(w, 3);
    let mut lrs = Vec::new();
    while let Some(r) = t.step().unwrap() {
        lrs.push(r.lr);
    }
    for (k, lr) in lrs.iter().enumerate() {
        let want = cosine_lr(c.lr, w, total, k);
        assert!((lr - want).abs() <= 1e-12, "step {k}: {lr} vs {want}");
    }
    // Resuming continues the schedule.
    let mut c2 = c.clone();
    c2.out = tmp.path().join("part");
    let mut first = Trainer::new(c2.clone(), &device()).unwrap();
    for _ in 0..5 {
        first.step().unwrap();
    }
    let ckpt = first.save_checkpoint().unwrap();
    let mut resumed = Trainer::resume(c2, &ckpt, &device()).unwrap();
    let r = resumed.step().unwrap().unwrap();
    assert_eq!(r.lr, lrs[5]);
}

#[test]
fn prefetched_images_give_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = projector_config(tmp.path());
    c.epochs = 2;
    c.shuffle = true;
    c.batch_size = 2;
    let run = |c: &TrainConfig| {
        let mut t = Trainer::new(c.clone(), &device()).unwrap();
        let mut losses = Vec::new();
        while let Some(r) = t.step().unwrap() {
            losses.push(r.loss);
        }
        (losses, t.trainable_values())
    };
    let (eager, eager_values) = run(&c);
    c.prefetch = 2;
    let t = Trainer::new(c.clone(), &device()).unwrap();
    assert!(
        t.samples.iter().all(|s| s.pixel_values.data.is_empty()),
        "nothing decoded up front"
    );
    // Out-of-schedule use decodes on the spot and the schedule still gets its images.
    let mut t = t;
    let g = t.gradients(&[3]).unwrap();
    assert!(!g.is_empty());
    let mut losses = Vec::new();
    while let Some(r) = t.step().unwrap() {
        losses.push(r.loss);
    }
    assert_eq!(losses, eager);
    for (k, v) in &eager_values {
        assert_eq!(f32s(v), f32s(&t.trainable_values()[k]), "{k}");
    }
    // Resume restarts the background decoding where the checkpoint stopped.
    c.out = tmp.path().join("part");
    let mut first = Trainer::new(c.clone(), &device()).unwrap();
    first.step().unwrap();
    let ckpt = first.save_checkpoint().unwrap();
    let mut resumed = Trainer::resume(c, &ckpt, &device()).unwrap();
    let mut rest = resumed.losses.clone();
    while let Some(r) = resumed.step().unwrap() {
        rest.push(r.loss);
    }
    assert_eq!(rest, eager);
}

/// QLoRA: LoRA adapters trained over a frozen q8/q4 base follow the unquantized run's
/// losses closely, and the final export merges them into the unquantized base (layers
/// without adapters come out bit for bit as the base has them).
#[test]
fn qlora_trains_over_a_quantized_base_and_exports_it_unquantized() {
    use vipllava_convert::Quantization;
    let tmp = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (name, quantize) in [
        ("plain", None),
        ("q8", Some(Quantization::Q8)),
        ("q4", Some(Quantization::Q4)),
    ] {
        let mut c = lora_config("tiny-5x-f32", &tmp.path().join(name));
        c.quantize = quantize;
        c.max_steps = Some(3);
        let summary = vipllava_train::trainer::run(Trainer::new(c, &device()).unwrap(), |_| {}).unwrap();
        runs.push((name, summary));
    }
    let plain = &runs[0].1.losses;
    for (name, summary) in &runs[1..] {
        let bound = if *name == "q8" { 0.01 } else { 0.1 };
        for (step, (q, p)) in summary.losses.iter().zip(plain).enumerate() {
            let rel = ((q - p) / p).abs();
            println!("{name} step {step}: loss {q:.6} vs {p:.6} unquantized ({rel:.2e} relative)");
            assert!(rel < bound, "{name} step {step}: {q} vs {p}");
        }
        assert_ne!(&summary.losses, plain, "{name}: the base really was quantized");
    }
    // In bf16 too (Burn dequantizes to f32; the product must be in the activations' dtype).
    let mut losses = Vec::new();
    for (name, quantize) in [("bf16", None), ("bf16-q8", Some(Quantization::Q8))] {
        let mut c = lora_config("tiny-5x-f32", &tmp.path().join(name));
        c.dtype = vipllava_model::Precision::Bf16;
        c.quantize = quantize;
        c.max_steps = Some(2);
        let mut t = Trainer::new(c, &device()).unwrap();
        losses.push([t.step().unwrap().unwrap().loss, t.step().unwrap().unwrap().loss]);
    }
    for (q, p) in losses[1].iter().zip(&losses[0]) {
        println!("bf16-q8 loss {q:.6} vs {p:.6} bf16");
        assert!(q.is_finite() && ((q - p) / p).abs() < 0.02, "{q} vs {p}");
    }
    // The q8 export: unquantized base weights where no adapter was trained.
    let base = vipllava_convert::load_model(&fixtures().join("tiny-5x-f32"), &device(), &Default::default())
        .unwrap();
    let exported =
        vipllava_convert::load_model(&runs[1].1.model_dir, &device(), &Default::default()).unwrap();
    let (base_t, out_t) = (
        vipllava_train::export::pytorch_tensors(&base.model),
        vipllava_train::export::pytorch_tensors(&exported.model),
    );
    let mut untouched = 0;
    let mut adapted = 0;
    for (key, want) in &base_t {
        let got = &out_t[key];
        if key.contains("language_model")
            && (key.contains("self_attn.") || key.contains("mlp."))
            && key.ends_with("weight")
        {
            adapted += usize::from(got != want);
        } else {
            assert_eq!(got, want, "{key}: not the unquantized base");
            untouched += 1;
        }
    }
    assert!(
        untouched > 10 && adapted > 0,
        "{untouched} untouched, {adapted} adapted"
    );
    // A quantized base does not train: --quantize needs --trainable lora.
    let mut c = lora_config("tiny-5x-f32", &tmp.path().join("projector"));
    c.trainable = Trainable::Projector;
    c.quantize = Some(Quantization::Q8);
    let err = Trainer::new(c, &device()).err().unwrap().to_string();
    assert!(err.contains("--trainable lora"), "{err}");
}
