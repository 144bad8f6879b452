//! `vipllava train` / `vipllava export` on the tiny fixtures: JSON progress, atomic
//! checkpoints, resume, refusing the model directory, bad samples, export, and `generate`
//! on the result.

use std::path::Path;

use crate::common::{fixture, run_cli};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

fn train_args<'a>(model: &'a Path, data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--out",
        s(out),
        "--trainable",
        "projector",
        "--optimizer",
        "adamw",
        "--lr",
        "0.01",
        "--json",
    ]
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("out dir") {
        let name = e.expect("entry").file_name().to_string_lossy().to_string();
        assert!(
            !name.starts_with(".tmp") && !name.starts_with(".old"),
            "left behind: {name}"
        );
    }
}

#[test]
fn train_json_checkpoints_and_generate_with_the_result() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("run");
    let model = fixture("tiny-5x-f32");
    let data = fixture("train/data.json");
    let mut args = train_args(&model, &data, &out);
    args.extend(["--epochs", "2", "--save-every", "3"]);
    let r = run_cli(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lines = json_lines(&r.stdout);
    let steps: Vec<&Value> = lines.iter().filter(|l| l.get("step").is_some()).collect();
    assert_eq!(steps.len(), 8);
    for (i, l) in steps.iter().enumerate() {
        assert_eq!(l["step"], i + 1);
        assert!(l["loss"].as_f64().expect("loss").is_finite());
        assert_eq!(l["lr"], 0.01);
        assert!(l["tokens"].as_u64().expect("tokens") > 16);
    }
    assert_eq!(lines.last().expect("summary")["done"], true);
    for c in ["checkpoint-3", "checkpoint-6", "checkpoint-8"] {
        for f in ["trainable.safetensors", "optimizer.bpk", "train_state.json"] {
            assert!(out.join(c).join(f).is_file(), "{c}/{f}");
        }
    }
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    no_temp_files(&out);
    // The fine-tuned model loads directly in `generate`.
    let image = fixture("images/astronaut.png");
    let r = run_cli(&[
        "generate",
        "--model",
        s(&out),
        "--image",
        s(&image),
        "--prompt",
        "What is in the red box?",
        "--max-new-tokens",
        "4",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn resume_continues_like_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-gqa-f16");
    let data = fixture("train/data.json");
    let full = tmp.path().join("full");
    let mut args = train_args(&model, &data, &full);
    args.extend(["--epochs", "2", "--momentum", "0.5"]);
    let r = run_cli(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let full_losses: Vec<f64> = json_lines(&r.stdout)
        .iter()
        .filter_map(|l| l.get("loss").and_then(Value::as_f64))
        .collect();
    assert_eq!(full_losses.len(), 8);

    let part = tmp.path().join("part");
    let mut args = train_args(&model, &data, &part);
    args.extend(["--epochs", "2", "--momentum", "0.5", "--max-steps", "5"]);
    let r = run_cli(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ckpt = part.join("checkpoint-5");
    let mut args = train_args(&model, &data, &part);
    args.extend(["--epochs", "2", "--momentum", "0.5", "--resume", s(&ckpt)]);
    let r = run_cli(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let resumed: Vec<(u64, f64)> = json_lines(&r.stdout)
        .iter()
        .filter_map(|l| Some((l.get("step")?.as_u64()?, l.get("loss")?.as_f64()?)))
        .collect();
    assert_eq!(resumed.iter().map(|r| r.0).collect::<Vec<_>>(), [6, 7, 8]);
    for (step, loss) in resumed {
        assert_eq!(loss, full_losses[step as usize - 1], "step {step}");
    }
    let a = std::fs::read(full.join("checkpoint-8/trainable.safetensors")).expect("full");
    let b = std::fs::read(part.join("checkpoint-8/trainable.safetensors")).expect("resumed");
    assert!(a == b, "resumed weights differ from the uninterrupted run's");
}

#[test]
fn refuses_to_write_into_the_model_directory() {
    let model = crate::common::copy_fixture("tiny-5x-f32");
    let data = fixture("train/data.json");
    let before = std::fs::read(model.path().join("model.safetensors")).expect("weights");
    let r = run_cli(&train_args(model.path(), &data, model.path()));
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("model directory"));
    let after = std::fs::read(model.path().join("model.safetensors")).expect("weights");
    assert!(before == after);
    no_temp_files(model.path());
}

#[test]
fn bad_samples_skip_or_fail_with_their_id() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("run");
    let model = fixture("tiny-5x-f32");
    let data = fixture("train/bad.jsonl");
    let mut args = train_args(&model, &data, &out);
    args.extend(["--max-steps", "1"]);
    let r = run_cli(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    for id in ["missing-image", "no-tag", "empty-answer"] {
        assert!(err.contains(id), "{id} not reported: {err}");
    }
    let out2 = tmp.path().join("run2");
    let mut args = train_args(&model, &data, &out2);
    args.extend(["--on-bad-sample", "fail"]);
    let r = run_cli(&args);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("missing-image"));
    assert!(!out2.join("model.safetensors").exists());
}

#[test]
fn lora_export_loads_in_generate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("run");
    let model = fixture("tiny-5x-f32");
    let data = fixture("train/data.json");
    let r = run_cli(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--trainable",
        "lora",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj,mlp",
        "--lr",
        "0.01",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--gradient-checkpointing",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let exported = tmp.path().join("export");
    let r = run_cli(&[
        "export",
        "--model",
        s(&model),
        "--adapter",
        s(&out.join("checkpoint-1")),
        "--out",
        s(&exported),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let a = std::fs::read(exported.join("model.safetensors")).expect("export");
    let b = std::fs::read(out.join("model.safetensors")).expect("train output");
    assert!(a == b, "export and the train command's final model differ");
    let image = fixture("images/coffee.png");
    let r = run_cli(&[
        "generate",
        "--model",
        s(&exported),
        "--image",
        s(&image),
        "--prompt",
        "What is this?",
        "--max-new-tokens",
        "3",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn dtypes_and_divergence() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-5x-f32");
    let data = fixture("train/data.json");
    // bf16 parameters train (LoRA + AdamW) and the result loads.
    let out = tmp.path().join("bf16");
    // (and without --json: the progress bar and a summary line on stderr, nothing on stdout)
    let mut args: Vec<&str> = train_args(&model, &data, &out)
        .into_iter()
        .filter(|a| *a != "--json")
        .collect();
    args.extend(["--dtype", "bf16", "--max-steps", "2"]);
    let r = run_cli(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("model.safetensors").is_file());
    assert!(r.stdout.is_empty());
    assert!(String::from_utf8_lossy(&r.stderr).contains("2 steps; checkpoint"));
    // AdamW on f16 parameters would underflow: refused up front.
    let out = tmp.path().join("f16");
    let mut args = train_args(&model, &data, &out);
    args.extend(["--dtype", "f16"]);
    let r = run_cli(&args);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("bf16"));
    // A diverging run stops with an error and leaves no model behind.
    let out = tmp.path().join("div");
    let r = run_cli(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--trainable",
        "all",
        "--optimizer",
        "sgd",
        "--lr",
        "1e12",
        "--json",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("diverged"));
    assert!(!out.join("model.safetensors").exists());
}
