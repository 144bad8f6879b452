//! Batched generation (left padding, per-row stopping) token-identical to transformers'
//! batched `generate` and to each request run alone; multi-image prompts.

use crate::common::{FIXTURES, Reference, fixture, max_slice_diff};
use burn::tensor::Device;
use serde_json::Value;
use vipllava::generation::GenerationOptions;
use vipllava::pipeline::{Pipeline, Prompt};
use vipllava::processor::image::load_image;
use vipllava::{LoadOptions, StopReason};

fn reference_json(name: &str) -> Value {
    let text =
        std::fs::read_to_string(fixture(name).join("batch_reference.json")).expect("batch_reference.json");
    serde_json::from_str(&text).expect("json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn batched_greedy_matches_transformers_and_solo_runs() {
    let device = Device::flex();
    for name in FIXTURES {
        let pipeline = Pipeline::load(&fixture(name), &device, &LoadOptions::default()).expect("pipeline");
        let reference = reference_json(name);
        let batch = &reference["batch"];
        let options = GenerationOptions {
            max_new_tokens: 20,
            ..pipeline.generation_defaults().clone()
        };
        let mut requests = Vec::new();
        for (i, row) in batch["rows"].as_array().expect("rows").iter().enumerate() {
            let image = load_image(&fixture(row["image"].as_str().expect("image"))).expect("load");
            let question = row["question"].as_str().expect("question");
            let prepared = pipeline
                .prepare(&[image], &Prompt::User(question.into()))
                .expect("prepare");
            let padded = ids(&batch["input_ids"][i]);
            let pads = row["num_left_pad"].as_u64().expect("pads") as usize;
            assert_eq!(prepared.input_ids, padded[pads..], "{name} row {i}: input ids");
            requests.push((prepared, options.clone()));
        }
        let results = pipeline.generate_batch(&requests, |_, _| {}).expect("batch");
        for (i, (result, row)) in results
            .iter()
            .zip(batch["rows"].as_array().expect("rows"))
            .enumerate()
        {
            let expected = ids(&row["generated_ids"]);
            println!(
                "{name} row {i}: {} tokens, {:?}, identical to transformers' batch: {}",
                result.token_ids.len(),
                result.stop_reason,
                result.token_ids == expected
            );
            assert_eq!(result.token_ids, expected, "{name} row {i}: batched tokens");
            let eos = row["stopped_at_eos"].as_bool().expect("flag");
            assert_eq!(
                result.stop_reason == StopReason::Eos,
                eos,
                "{name} row {i}: stop reason"
            );
            // Alone, each request gives the same tokens (transformers' dynamic rope uses the
            // batch-wide longest position, so there the batch legitimately differs).
            if row["batched_equals_solo"].as_bool() == Some(true) {
                let solo = pipeline.generate(&requests[i].0, &options, |_| {}).expect("solo");
                assert_eq!(
                    solo.token_ids, result.token_ids,
                    "{name} row {i}: solo differs from batch"
                );
            } else {
                let solo = pipeline.generate(&requests[i].0, &options, |_| {}).expect("solo");
                assert_eq!(
                    solo.token_ids,
                    ids(&row["solo_generated_ids"]),
                    "{name} row {i}: solo tokens"
                );
            }
        }
        // Batch bounded to one request per pass gives the solo results.
        assert!(results.iter().any(|r| r.stop_reason == StopReason::MaxNewTokens));
    }
}

#[test]
fn multi_image_prompt_matches_transformers() {
    let device = Device::flex();
    for name in FIXTURES {
        let pipeline = Pipeline::load(&fixture(name), &device, &LoadOptions::default()).expect("pipeline");
        let reference = reference_json(name);
        let multi = &reference["multi_image"];
        let images: Vec<_> = multi["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|p| load_image(&fixture(p.as_str().expect("path"))).expect("load"))
            .collect();
        let messages: Vec<vipllava::processor::ChatMessage> =
            serde_json::from_value(multi["messages"].clone()).expect("messages");
        let prepared = pipeline
            .prepare(&images, &Prompt::Messages(messages))
            .expect("prepare");
        assert_eq!(prepared.prompt_text, multi["prompt"].as_str().expect("prompt"));
        assert_eq!(prepared.input_ids, ids(&multi["input_ids"]));
        let (logits, _) = pipeline.prefill(&prepared).expect("prefill");
        let expected = Reference::open_file(&fixture(name).join("batch_reference.safetensors"))
            .get("multi_image_logits_last")
            .f32;
        let diff = max_slice_diff(&logits, &expected);
        println!("{name}: two-image prompt logits max|diff| {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: multi-image logits differ by {diff}");
        let options = GenerationOptions {
            max_new_tokens: multi["max_new_tokens"].as_u64().unwrap_or(10) as usize,
            ..pipeline.generation_defaults().clone()
        };
        let out = pipeline.generate(&prepared, &options, |_| {}).expect("generate");
        assert_eq!(
            out.token_ids,
            ids(&multi["generated_ids"]),
            "{name}: multi-image tokens"
        );
    }
}

#[test]
fn cli_batch_jsonl_prints_one_object_per_request_in_order() {
    let name = "tiny-gqa-f16";
    let reference = reference_json(name);
    let rows = reference["batch"]["rows"].as_array().expect("rows");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut lines = String::new();
    for row in rows {
        let image = fixture(row["image"].as_str().expect("image"));
        let line = serde_json::json!({"image": image, "prompt": row["question"], "max_new_tokens": 20});
        lines.push_str(&format!("{line}\n"));
    }
    let file = tmp.path().join("requests.jsonl");
    std::fs::write(&file, lines).expect("write");
    for batch_size in ["1", "2"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vipllava"))
            .args([
                "generate",
                "--model",
                fixture(name).to_str().expect("utf8"),
                "--batch",
            ])
            .arg(&file)
            .args(["--json", "--batch-size", batch_size])
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).expect("utf8");
        let objects: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(objects.len(), rows.len());
        for (i, (object, row)) in objects.iter().zip(rows).enumerate() {
            assert_eq!(object["index"], i);
            assert_eq!(
                ids(&object["token_ids"]),
                ids(&row["generated_ids"]),
                "batch size {batch_size} row {i}"
            );
            assert!(object["text"].is_string());
        }
    }
    std::fs::write(
        &file,
        "{\"image\": \"x.png\", \"prompt\": \"hi\", \"bogus\": 1}\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vipllava"))
        .args([
            "generate",
            "--model",
            fixture(name).to_str().expect("utf8"),
            "--batch",
        ])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("bogus"), "{err}");
}
