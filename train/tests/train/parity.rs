//! Fine-tuning against PyTorch references recorded by `scripts/make_train_fixtures.py`
//! (tests/fixtures/train), plus LoRA, resume and export checks on the tiny fixtures.

use std::collections::BTreeMap;

use burn::tensor::TensorData;
use serde_json::Value;
use vipllava_train::data::OnBadSample;
use vipllava_train::export::{export, merged_model};
use vipllava_train::trainer::{LoraTarget, OptimizerKind, TrainConfig, Trainable, Trainer};
use vipllava_train::{TrainError, train};

use super::{device, f32s, fixtures, keep_export_for_python};

fn reference() -> Value {
    let p = fixtures().join("train/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn config(model: &str, trainable: Trainable, out: &std::path::Path) -> TrainConfig {
    let r = reference();
    let mut c = TrainConfig::new(fixtures().join(model), fixtures().join("train/data.json"), out);
    c.trainable = trainable;
    c.epochs = r["epochs"].as_u64().unwrap() as usize;
    let key = match trainable {
        Trainable::All => "all",
        _ => "projector",
    };
    c.lr = r["lr"][key].as_f64().unwrap();
    c
}

#[test]
fn labels_follow_the_rule_as_recorded_with_transformers() {
    let r = reference();
    for model in ["tiny-5x-f32", "tiny-gqa-f16"] {
        let tmp = tempfile::tempdir().unwrap();
        let t = Trainer::new(config(model, Trainable::Projector, tmp.path()), &device()).unwrap();
        let want = r["models"][model]["samples"].as_array().unwrap();
        assert_eq!(t.samples.len(), want.len());
        for (got, want) in t.samples.iter().zip(want) {
            let ids: Vec<u64> = want["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let labels: Vec<i64> = want["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let got_ids: Vec<u64> = got.input_ids.iter().map(|&i| i as u64).collect();
            assert_eq!(got_ids, ids, "{model} {}", got.id);
            assert_eq!(got.labels, labels, "{model} {}", got.id);
        }
        // The multi-turn sample has two answers, both targets, the question between not.
        let multi = &t.samples[1];
        let runs = multi
            .labels
            .windows(2)
            .filter(|w| w[0] == -100 && w[1] != -100)
            .count();
        assert_eq!(runs, 2, "two target spans in the multi-turn sample");
    }
}

fn check_losses(model: &str, trainable: Trainable) {
    let r = reference();
    let key = match trainable {
        Trainable::All => "losses_all",
        _ => "losses_projector",
    };
    let want: Vec<f64> = r["models"][model][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(config(model, trainable, tmp.path()), &device()).unwrap();
    assert_eq!(t.total_steps(), want.len());
    let mut worst: f64 = 0.0;
    for (i, w) in want.iter().enumerate() {
        let rep = t.step().unwrap().unwrap();
        let rel = (rep.loss - w).abs() / w.abs();
        worst = worst.max(rel);
        assert!(
            rel < 1e-4,
            "{model} {key} step {}: ours {} torch {w} (rel {rel:e})",
            i + 1,
            rep.loss
        );
    }
    eprintln!(
        "{model} {key}: {} steps, worst relative difference {worst:e}",
        want.len()
    );
    assert!(t.step().unwrap().is_none());
}

#[test]
fn projector_sgd_losses_match_pytorch_5x() {
    check_losses("tiny-5x-f32", Trainable::Projector);
}

#[test]
fn projector_sgd_losses_match_pytorch_gqa() {
    check_losses("tiny-gqa-f16", Trainable::Projector);
}

#[test]
fn full_sgd_losses_match_pytorch_5x() {
    check_losses("tiny-5x-f32", Trainable::All);
}

#[test]
fn full_sgd_losses_match_pytorch_gqa() {
    check_losses("tiny-gqa-f16", Trainable::All);
}

#[test]
fn projector_gradients_match_pytorch() {
    for model in ["tiny-5x-f32", "tiny-gqa-f16"] {
        let tmp = tempfile::tempdir().unwrap();
        let t = Trainer::new(config(model, Trainable::Projector, tmp.path()), &device()).unwrap();
        let grads = t.gradients(&[0]).unwrap();
        let bytes = std::fs::read(fixtures().join(format!("train/{model}_grads.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(grads.len(), st.len(), "{model}: {:?}", grads.keys());
        let mut worst: f32 = 0.0;
        for (name, view) in st.tensors() {
            let want: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // Burn's LayerNorm names its parameters gamma/beta.
            let burn_name = match name.as_str() {
                "multi_modal_projector.projector_layernorm.weight" => {
                    "multi_modal_projector.projector_layernorm.gamma".to_string()
                }
                "multi_modal_projector.projector_layernorm.bias" => {
                    "multi_modal_projector.projector_layernorm.beta".to_string()
                }
                n => n.to_string(),
            };
            let got = grads
                .get(&burn_name)
                .unwrap_or_else(|| panic!("{burn_name} not in {:?}", grads.keys()));
            let mut g = f32s(got);
            // Burn keeps Linear weights as [in, out]; PyTorch as [out, in].
            if view.shape().len() == 2 {
                let (o, i) = (view.shape()[0], view.shape()[1]);
                assert_eq!(got.shape().to_vec(), vec![i, o]);
                let mut t = vec![0.0; g.len()];
                for a in 0..i {
                    for b in 0..o {
                        t[b * i + a] = g[a * o + b];
                    }
                }
                g = t;
            }
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let diff = g.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(diff / scale);
            assert!(
                diff <= 1e-4 * scale,
                "{model} {name}: max diff {diff} (scale {scale})"
            );
        }
        eprintln!("{model}: projector gradients, worst max-diff / max-abs {worst:e}");
    }
}

#[test]
fn bad_samples_are_reported_or_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config("tiny-5x-f32", Trainable::Projector, tmp.path());
    c.data = fixtures().join("train/bad.jsonl");
    let t = Trainer::new(c.clone(), &device()).unwrap();
    assert_eq!(t.samples.len(), 1);
    let ids: Vec<&str> = t.bad_samples.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["missing-image", "no-tag", "empty-answer"]);
    assert!(
        t.bad_samples[0].reason.to_string().contains("not found"),
        "{}",
        t.bad_samples[0].reason
    );
    assert!(
        t.bad_samples[1].reason.to_string().contains("<image>"),
        "{}",
        t.bad_samples[1].reason
    );
    assert!(
        t.bad_samples[2].reason.to_string().contains("empty answer"),
        "{}",
        t.bad_samples[2].reason
    );
    c.on_bad_sample = OnBadSample::Fail;
    let e = Trainer::new(c, &device()).err().unwrap();
    assert!(matches!(e, TrainError::BadSample(_)), "{e}");
    assert!(e.to_string().contains("missing-image"), "{e}");
}

fn lora_config(out: &std::path::Path) -> TrainConfig {
    let mut c = config("tiny-5x-f32", Trainable::Lora, out);
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.lora_targets = vec![LoraTarget::Attn, LoraTarget::Mlp];
    c.optimizer = OptimizerKind::Adamw;
    c.lr = 1e-2;
    c.epochs = 4;
    c
}

#[test]
fn lora_trains_only_adapters_and_the_loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(lora_config(tmp.path()), &device()).unwrap();
    let paths = t.trainable_paths();
    // 2 layers x 7 projections x (a, b)
    assert_eq!(paths.len(), 28, "{paths:?}");
    assert!(paths.iter().all(|p| p.contains(".lora.")), "{paths:?}");
    let before = vipllava_train::params::read_params(&t.model, |_| true);
    let mut losses = Vec::new();
    while let Some(r) = t.step().unwrap() {
        losses.push(r.loss);
    }
    let after = vipllava_train::params::read_params(&t.model, |_| true);
    let mut changed = Vec::new();
    for (k, v) in &before {
        if f32s(v) != f32s(&after[k]) {
            changed.push(k.clone());
        }
    }
    assert!(!changed.is_empty());
    // LoRA `b` starts at zero and `a` random, so both move under AdamW.
    assert!(
        changed.iter().all(|k| k.contains(".lora.")),
        "non-adapter params changed: {changed:?}"
    );
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(last < first * 0.9, "loss did not fall: {losses:?}");
}

fn values_close(a: &BTreeMap<String, TensorData>, b: &BTreeMap<String, TensorData>, tol: f32) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in a {
        let (x, y) = (f32s(v), f32s(&b[k]));
        let d = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(d <= tol, "{k}: differs by {d}");
    }
}

#[test]
fn resume_gives_the_uninterrupted_result() {
    for (trainable, optimizer) in [
        (Trainable::Lora, OptimizerKind::Adamw),
        (Trainable::Projector, OptimizerKind::Sgd),
    ] {
        let a = tempfile::tempdir().unwrap();
        let mut c = lora_config(a.path());
        c.trainable = trainable;
        c.optimizer = optimizer;
        c.momentum = if optimizer == OptimizerKind::Sgd { 0.9 } else { 0.0 };
        c.weight_decay = 0.01;
        c.epochs = 2;
        c.batch_size = 2;
        // Uninterrupted.
        let mut full = Trainer::new(c.clone(), &device()).unwrap();
        let mut full_losses = Vec::new();
        while let Some(r) = full.step().unwrap() {
            full_losses.push(r.loss);
        }
        assert_eq!(full_losses.len(), 4);
        // Two steps, checkpoint, a fresh process state, resume.
        let b = tempfile::tempdir().unwrap();
        c.out = b.path().to_path_buf();
        let mut first = Trainer::new(c.clone(), &device()).unwrap();
        first.step().unwrap();
        first.step().unwrap();
        let ckpt = first.save_checkpoint().unwrap();
        drop(first);
        let mut resumed = Trainer::resume(c.clone(), &ckpt, &device()).unwrap();
        assert_eq!(resumed.step, 2);
        let mut losses = resumed.losses.clone();
        while let Some(r) = resumed.step().unwrap() {
            losses.push(r.loss);
        }
        assert_eq!(losses, full_losses, "{trainable:?}");
        values_close(&resumed.trainable_values(), &full.trainable_values(), 1e-6);
        // Other data, or other settings, cannot resume this checkpoint.
        let mut other = c.clone();
        other.data = fixtures().join("train/bad.jsonl");
        let e = Trainer::resume(other, &ckpt, &device()).err().unwrap();
        assert!(e.to_string().contains("other samples"), "{e}");
        let mut other = c.clone();
        other.trainable = Trainable::All;
        let e = Trainer::resume(other, &ckpt, &device()).err().unwrap();
        assert!(e.to_string().contains("--trainable"), "{e}");
    }
}

#[test]
fn export_round_trip_gives_the_merged_model_logits() {
    use burn::tensor::{Int, Tensor};
    use vipllava_model::{ForwardInput, KvCache};
    let tmp = tempfile::tempdir().unwrap();
    let mut c = lora_config(&tmp.path().join("runs/nested/run"));
    c.max_steps = Some(3);
    let summary = train(&c, &device(), |_| {}).unwrap();
    assert_eq!(summary.steps, 3);
    let merged = merged_model(&c.model, &summary.checkpoint, &device()).unwrap();
    let out = tmp.path().join("export");
    export(&c.model, &summary.checkpoint, &out, &device()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "processor_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let loaded = vipllava_convert::load_model(&out, &device(), &Default::default()).unwrap();
    // The train command's own final model (in `out`) is the same merge.
    let direct = vipllava_convert::load_model(&summary.model_dir, &device(), &Default::default()).unwrap();
    let t = Trainer::new(c.clone(), &device()).unwrap();
    let s = &t.samples[1];
    let n = s.input_ids.len();
    let ids: Vec<i64> = s.input_ids.iter().map(|&i| i as i64).collect();
    let p = &s.pixel_values;
    let logits = |m: &vipllava_model::VipLlava| -> Vec<f32> {
        let input = ForwardInput::new(Tensor::<2, Int>::from_data(
            TensorData::new(ids.clone(), [1, n]),
            &device(),
        ))
        .with_pixels(Tensor::from_data(
            TensorData::new(p.data.clone(), [1, 3, p.height, p.width]),
            &device(),
        ));
        f32s(&m.forward(input, &mut KvCache::new()).unwrap().into_data())
    };
    let want = logits(&merged);
    let base = vipllava_convert::load_model(&c.model, &device(), &Default::default()).unwrap();
    let base_logits = logits(&base.model);
    for (name, m) in [("export", &loaded.model), ("train out", &direct.model)] {
        let got = logits(m);
        let d = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 1e-5, "{name}: logits differ by {d}");
    }
    let moved = base_logits
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 1e-3, "the adapters changed nothing ({moved})");
    keep_export_for_python("VIPLLAVA_EXPORT_CHECK_DIR", &out, s, &want);
}

#[test]
fn out_dir_must_not_be_the_model_dir() {
    let c = config(
        "tiny-5x-f32",
        Trainable::Projector,
        &fixtures().join("tiny-5x-f32"),
    );
    let e = train(&c, &device(), |_| {}).err().unwrap();
    assert!(e.to_string().contains("model directory"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let e = export(&c.model, tmp.path(), &fixtures().join("tiny-5x-f32"), &device())
        .err()
        .unwrap();
    assert!(e.to_string().contains("model directory"), "{e}");
}

#[test]
fn padded_batch_loss_matches_pytorch() {
    let r = reference();
    for model in ["tiny-5x-f32", "tiny-gqa-f16"] {
        let tmp = tempfile::tempdir().unwrap();
        let t = Trainer::new(config(model, Trainable::Projector, tmp.path()), &device()).unwrap();
        let rows: Vec<usize> = r["models"][model]["batch_loss_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_ne!(
            t.samples[rows[0]].input_ids.len(),
            t.samples[rows[1]].input_ids.len(),
            "needs padding"
        );
        let want = r["models"][model]["batch_loss"].as_f64().unwrap();
        let (loss, _, _) = t.loss(&rows).unwrap().unwrap();
        let got = f64::from(f32s(&loss.into_data())[0]);
        let rel = (got - want).abs() / want;
        eprintln!("{model}: padded batch loss ours {got} torch {want} (rel {rel:e})");
        assert!(rel < 1e-5, "{model}: ours {got} torch {want}");
    }
}

#[test]
fn grad_accum_steps_on_the_mean_of_micro_batch_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config("tiny-5x-f32", Trainable::Projector, tmp.path());
    c.grad_accum = 2;
    c.lr = 0.1;
    let mut t = Trainer::new(c, &device()).unwrap();
    let before = t.trainable_values();
    let g0 = t.gradients(&[0]).unwrap();
    let g1 = t.gradients(&[1]).unwrap();
    let l0 = f64::from(f32s(&t.loss(&[0]).unwrap().unwrap().0.into_data())[0]);
    let l1 = f64::from(f32s(&t.loss(&[1]).unwrap().unwrap().0.into_data())[0]);
    let rep = t.step().unwrap().unwrap();
    assert!(
        (rep.loss - (l0 + l1) / 2.0).abs() < 1e-6,
        "{} vs {}",
        rep.loss,
        (l0 + l1) / 2.0
    );
    assert_eq!(t.total_steps(), 6); // 4 samples / 2 per step x 3 epochs
    let after = t.trainable_values();
    for (k, b) in &before {
        let (b, a, x, y) = (f32s(b), f32s(&after[k]), f32s(&g0[k]), f32s(&g1[k]));
        for i in 0..b.len() {
            let want = b[i] - 0.1 * (x[i] + y[i]) / 2.0;
            assert!(
                (a[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{k}[{i}]: {} vs {want}",
                a[i]
            );
        }
    }
}

#[test]
fn gradient_checkpointing_and_seeds_do_not_change_results() {
    let run = |checkpointing: bool| {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = lora_config(tmp.path());
        c.gradient_checkpointing = checkpointing;
        c.max_steps = Some(3);
        c.seed = 7;
        let mut t = Trainer::new(c, &device()).unwrap();
        let mut losses = Vec::new();
        while let Some(r) = t.step().unwrap() {
            losses.push(r.loss);
        }
        (losses, t.trainable_values())
    };
    let (a, va) = run(false);
    let (b, vb) = run(true);
    let (c, vc) = run(false);
    assert_eq!(a, c, "same seed, same run");
    values_close(&va, &vc, 0.0);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-6 * x.abs(),
            "checkpointing changed the loss: {a:?} vs {b:?}"
        );
    }
    values_close(&va, &vb, 1e-6);
}

#[test]
fn image_folder_and_visual_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let sample = |id: &str, prompts: &str| {
        format!(
            r#"{{"id": "{id}", "image": "astronaut.png", "conversations": [{{"from": "human", "value": "<image>\nWhat is in the red box?"}}, {{"from": "gpt", "value": "A person."}}]{prompts}}}"#
        )
    };
    std::fs::write(
        &data,
        [
            sample("plain", ""),
            sample(
                "boxed",
                r#", "visual_prompts": [{"shape": "box", "spec": "10,10,80,80:red"}]"#,
            ),
            sample(
                "bad-shape",
                r#", "visual_prompts": [{"shape": "box", "spec": "80,10,10,80"}]"#,
            ),
        ]
        .join("\n"),
    )
    .unwrap();
    let mut c = config("tiny-5x-f32", Trainable::Projector, &tmp.path().join("out"));
    c.data = data;
    // Without --image-folder the images are looked up next to the data file: all missing.
    let e = Trainer::new(c.clone(), &device()).err().unwrap();
    assert!(e.to_string().contains("no usable samples"), "{e}");
    c.image_folder = Some(fixtures().join("images"));
    let t = Trainer::new(c, &device()).unwrap();
    assert_eq!(t.samples.len(), 2);
    assert_eq!(t.bad_samples.len(), 1);
    assert_eq!(t.bad_samples[0].id, "bad-shape");
    assert_eq!(t.samples[0].input_ids, t.samples[1].input_ids);
    assert_ne!(
        t.samples[0].pixel_values.data, t.samples[1].pixel_values.data,
        "the box was drawn"
    );
}

#[test]
fn exports_of_every_fixture_reload_with_the_trained_logits() {
    use burn::tensor::{Int, Tensor};
    use vipllava_model::{ForwardInput, KvCache};
    for model in ["tiny-hub-bf16-sharded", "tiny-gqa-f16", "tiny-hub-tied-dynamic"] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = config(model, Trainable::All, &tmp.path().join("out"));
        c.max_steps = Some(1);
        let mut t = Trainer::new(c.clone(), &device()).unwrap();
        t.step().unwrap();
        let trained = t.inference_model();
        // f32 asked for: by default the export takes the base checkpoint's dtype, which
        // would round the trained weights (tested in scale.rs).
        let f32_export =
            vipllava_train::export::ExportOptions::default().with_dtype(vipllava_train::ExportDtype::F32);
        vipllava_train::export::write_hf_model_with(&trained, &c.model, &c.out, &f32_export).unwrap();
        let loaded = vipllava_convert::load_model(&c.out, &device(), &Default::default()).unwrap();
        let s = &t.samples[0];
        let n = s.input_ids.len();
        let ids: Vec<i64> = s.input_ids.iter().map(|&i| i as i64).collect();
        let p = &s.pixel_values;
        let logits = |m: &vipllava_model::VipLlava| -> Vec<f32> {
            let input = ForwardInput::new(Tensor::<2, Int>::from_data(
                TensorData::new(ids.clone(), [1, n]),
                &device(),
            ))
            .with_pixels(Tensor::from_data(
                TensorData::new(p.data.clone(), [1, 3, p.height, p.width]),
                &device(),
            ));
            f32s(&m.forward(input, &mut KvCache::new()).unwrap().into_data())
        };
        let (a, b) = (logits(&trained), logits(&loaded.model));
        let d = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // The trained model multiplies weights in Burn's `[in, out]` order, the reloaded one
        // reads the f32 file's `[out, in]` rows in place: the same values summed in another
        // order, a few f32 roundings of the largest logit apart (1.05e-5 at 10.0 measured).
        // A weight that did not survive the export (rounded, transposed, dropped) moves them
        // by orders of magnitude more.
        let scale = a.iter().fold(1f32, |m, x| m.max(x.abs()));
        assert!(
            d <= 1e-5 * scale,
            "{model}: reloaded logits differ by {d} (max |logit| {scale})"
        );
        assert_eq!(
            loaded.config.vision_feature_layers, t.model_config.vision_feature_layers,
            "{model}"
        );
    }
}
