//! `vipllava eval`, `train --eval-data`, the learning-rate / clipping flags and sharded
//! exports, through the command line on the tiny fixtures.

use std::path::Path;

use crate::common::{fixture, run_cli};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn ok(r: &std::process::Output) {
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn eval_json_is_the_training_loss_and_generate_matches_the_generate_command() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-5x-f32");
    let images = fixture("images");
    // Two samples, one with a visual prompt drawn as `generate --box` draws it.
    let data = tmp.path().join("eval.jsonl");
    let sample = |id: &str, image: &str, q: &str, a: &str, prompts: &str| {
        format!(
            r#"{{"id": "{id}", "image": "{image}", "conversations": [{{"from": "human", "value": "<image>\n{q}"}}, {{"from": "gpt", "value": "{a}"}}]{prompts}}}"#
        )
    };
    std::fs::write(
        &data,
        [
            sample("plain", "coffee.png", "What is this?", "A cup of coffee.", ""),
            sample(
                "boxed",
                "astronaut.png",
                "What is in the red box?",
                "A person.",
                r#", "visual_prompts": [{"shape": "box", "spec": "10,10,80,80:red"}]"#,
            ),
        ]
        .join("\n"),
    )
    .expect("data");
    let answers = tmp.path().join("answers.jsonl");
    let r = run_cli(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--image-folder",
        s(&images),
        "--json",
        "--generate",
        s(&answers),
        "--max-new-tokens",
        "5",
        "--batch-size",
        "2",
    ]);
    ok(&r);
    let out = json_lines(&r.stdout);
    assert_eq!(out.len(), 1, "one JSON object");
    let e = &out[0];
    let loss = e["loss"].as_f64().expect("loss");
    assert!((e["perplexity"].as_f64().expect("ppl") - loss.exp()).abs() < 1e-9 * loss.exp());
    assert_eq!(e["samples"], 2);
    assert!(e["targets"].as_u64().expect("targets") > 2);
    // The loss `train` reports for one step over the same samples in one micro-batch.
    let r = run_cli(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--image-folder",
        s(&images),
        "--out",
        s(&tmp.path().join("run")),
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--json",
    ]);
    ok(&r);
    let train_loss = json_lines(&r.stdout)[0]["loss"].as_f64().expect("train loss");
    let rel = (train_loss - loss).abs() / loss;
    assert!(rel < 1e-6, "eval {loss} vs train {train_loss} ({rel:e})");
    // Answers: the same text as `vipllava generate` on each sample.
    let lines = json_lines(&std::fs::read(&answers).expect("answers"));
    assert_eq!(lines.len(), 2);
    for (line, (image, prompt, marks)) in lines.iter().zip([
        ("coffee.png", "What is this?", vec![]),
        (
            "astronaut.png",
            "What is in the red box?",
            vec!["--box", "10,10,80,80:red"],
        ),
    ]) {
        let img = images.join(image);
        let mut args = vec![
            "generate",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "5",
            "--json",
        ];
        args.extend(marks);
        let r = run_cli(&args);
        ok(&r);
        let want = &json_lines(&r.stdout)[0]["text"];
        assert_eq!(&line["answer"], want, "{line}");
        assert_eq!(line["question"], prompt);
        assert!(line["reference"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(line["id"].is_string());
    }
}

#[test]
fn train_reports_eval_loss_and_clips_and_exports_sharded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-gqa-f16");
    let data = fixture("train/data.json");
    let out = tmp.path().join("run");
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
        "2",
        "--optimizer",
        "adamw",
        "--lr",
        "0.01",
        "--lr-schedule",
        "cosine",
        "--warmup-ratio",
        "0.25",
        "--max-grad-norm",
        "0.5",
        "--eval-data",
        s(&data),
        "--eval-every",
        "2",
        "--max-shard-size",
        "100KB",
        "--prefetch",
        "2",
        "--json",
    ]);
    ok(&r);
    let lines = json_lines(&r.stdout);
    let steps: Vec<&Value> = lines.iter().filter(|l| l.get("step").is_some()).collect();
    assert_eq!(steps.len(), 4);
    let evals: Vec<u64> = steps
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .map(|l| l["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(evals, [2, 4]);
    for l in &steps {
        assert!(l["grad_norm"].as_f64().expect("grad_norm") > 0.0);
    }
    // Cosine with one warmup step: 0.01 at step 1, then decaying.
    let lrs: Vec<f64> = steps.iter().map(|l| l["lr"].as_f64().expect("lr")).collect();
    assert!(
        (lrs[0] - 0.01).abs() < 1e-12 && lrs[1] == lrs[0] && lrs[2] < lrs[1] && lrs[3] < lrs[2],
        "{lrs:?}"
    );
    // The final model: f16 like its base, sharded, and `eval --adapter` on the run scores
    // what `eval` scores on the export.
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("index json");
    assert!(index["weight_map"].as_object().expect("map").len() > 10);
    assert!(!out.join("model.safetensors").exists());
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config"))
        .expect("json");
    assert_eq!(cfg["dtype"], "float16");
    let exported = tmp.path().join("export");
    let r = run_cli(&[
        "export",
        "--model",
        s(&model),
        "--adapter",
        s(&out.join("checkpoint-4")),
        "--out",
        s(&exported),
        "--export-dtype",
        "f32",
    ]);
    ok(&r);
    assert!(exported.join("model.safetensors").is_file());
    let eval = |args: &[&str]| -> f64 {
        let mut all = vec!["eval", "--data", s(&data), "--json"];
        all.extend(args);
        let r = run_cli(&all);
        ok(&r);
        json_lines(&r.stdout)[0]["loss"].as_f64().expect("loss")
    };
    let with_adapter = eval(&["--model", s(&model), "--adapter", s(&out)]);
    let on_export = eval(&["--model", s(&exported)]);
    let last_eval = steps[3]["eval_loss"].as_f64().expect("eval loss");
    assert!(
        (with_adapter - on_export).abs() < 1e-5 * on_export,
        "{with_adapter} vs {on_export}"
    );
    assert!(
        (with_adapter - last_eval).abs() < 1e-5 * last_eval,
        "{with_adapter} vs {last_eval}"
    );
}
