//! End-to-end parity with transformers: for every fixture x image, the prompt, input ids,
//! pixel values, last-position logits and 20 greedy tokens; the CLI's JSON and streamed
//! output; and the error paths of the pipeline and CLI.

use std::path::Path;
use std::process::Command;

use crate::common::{FIXTURES, Reference, fixture, max_slice_diff, run_cli};
use burn::tensor::Device;
use serde_json::Value;
use vipllava::generation::GenerationOptions;
use vipllava::pipeline::{Pipeline, PipelineError, Prompt};
use vipllava::processor::image::load_image;
use vipllava::{LoadOptions, processor::TextError};

fn inputs() -> Value {
    let text = std::fs::read_to_string(fixture("images/inputs.json")).expect("inputs.json");
    serde_json::from_str(&text).expect("json")
}

fn greedy(max_new_tokens: usize, pipeline: &Pipeline) -> GenerationOptions {
    GenerationOptions {
        max_new_tokens,
        ..pipeline.generation_defaults().clone()
    }
}

#[test]
fn every_fixture_and_image_matches_transformers() {
    let device = Device::flex();
    let inputs = inputs();
    let images = inputs["images"].as_object().expect("images");
    let pixel_reference = Reference::open_file(&fixture("images/pixel_values.safetensors"));
    for name in FIXTURES {
        let pipeline = Pipeline::load(&fixture(name), &device, &LoadOptions::default()).expect("pipeline");
        assert!(
            !pipeline.generation_defaults().do_sample,
            "vip-llava generation defaults are greedy"
        );
        assert_eq!(pipeline.generation_defaults().eos_token_ids, vec![2]);
        let reference = Reference::open_file(&fixture(name).join("generation_reference.safetensors"));
        for (image_name, info) in images {
            let image = load_image(&fixture(info["file"].as_str().expect("file"))).expect("image");
            let question = info["question"].as_str().expect("question");
            let prepared = pipeline
                .prepare(&[image], &Prompt::User(question.into()))
                .expect("prepare");
            assert_eq!(
                prepared.prompt_text,
                info["prompt"].as_str().expect("prompt"),
                "{name}/{image_name}"
            );
            let expected_ids: Vec<u32> = reference
                .get(&format!("input_ids.{image_name}"))
                .i64
                .iter()
                .map(|&i| i as u32)
                .collect();
            assert_eq!(prepared.input_ids, expected_ids, "{name}/{image_name}: input ids");

            let pixels = pixel_reference.get(image_name).f32;
            let pixel_diff = max_slice_diff(&prepared.pixel_values[0].data, &pixels);
            assert!(
                pixel_diff <= 1e-5,
                "{name}/{image_name}: pixel values differ by {pixel_diff}"
            );

            let (logits, _) = pipeline.prefill(&prepared).expect("prefill");
            let logit_diff =
                max_slice_diff(&logits, &reference.get(&format!("logits_last.{image_name}")).f32);
            assert!(
                logit_diff <= 1e-4,
                "{name}/{image_name}: logits differ by {logit_diff}"
            );

            let mut streamed = String::new();
            let generation = pipeline
                .generate(&prepared, &greedy(20, &pipeline), |t| streamed.push_str(t))
                .expect("generate");
            let expected: Vec<u32> = reference
                .get(&format!("generated_ids.{image_name}"))
                .i64
                .iter()
                .map(|&i| i as u32)
                .collect();
            let identical = generation.token_ids == expected;
            println!(
                "{name}/{image_name}: pixel max|diff| {pixel_diff:.1e}, logits max|diff| {logit_diff:.1e}, greedy tokens identical: {identical} ({} tokens, {:?})",
                generation.token_ids.len(),
                generation.stop_reason
            );
            assert!(
                identical,
                "{name}/{image_name}: {:?} != {expected:?}",
                generation.token_ids
            );
            let gen_json: Value = serde_json::from_str(
                &std::fs::read_to_string(fixture(name).join("generation_reference.json")).expect("json"),
            )
            .expect("json");
            assert_eq!(
                generation.text,
                gen_json["images"][image_name]["text"].as_str().expect("text")
            );
            assert_eq!(
                streamed, generation.text,
                "{name}/{image_name}: streamed text differs"
            );
        }
    }
}

#[test]
fn cli_generate_json_and_streaming_agree() {
    let dir = fixture("tiny-gqa-f16");
    let image = fixture("images/chelsea.png");
    let inputs = inputs();
    let question = inputs["images"]["chelsea"]["question"]
        .as_str()
        .expect("question");
    let base = [
        "generate",
        "--model",
        dir.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        question,
        "--max-new-tokens",
        "20",
    ];
    let out = run_cli(&[&base[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let last = stdout.lines().last().expect("a line");
    let v: Value = serde_json::from_str(last).expect("json line");
    for key in [
        "token_ids",
        "text",
        "stop_reason",
        "prompt_tokens",
        "load_ms",
        "prefill_ms",
        "decode_tokens_per_s",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {last}");
    }
    let reference = Reference::open_file(&dir.join("generation_reference.safetensors"));
    let expected: Vec<i64> = reference.get("generated_ids.chelsea").i64;
    let ids: Vec<i64> = v["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(v["stop_reason"], "eos");
    assert_eq!(
        v["prompt_tokens"].as_u64(),
        Some(reference.get("input_ids.chelsea").shape[1] as u64)
    );

    let out = run_cli(&base);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let streamed = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(streamed, format!("{}\n", v["text"].as_str().expect("text")));
}

fn read_npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("npy");
    let npy = npyz::NpyFile::new(&bytes[..]).expect("npy header");
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f32>().expect("f32 data"))
}

#[test]
fn cli_preprocess_and_logits_write_npy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = fixture("tiny-hub-tied-dynamic");
    let image = fixture("images/coffee_wide.png");
    let out = tmp.path().join("pixels.npy");
    let run = run_cli(&[
        "preprocess",
        "--model",
        dir.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (shape, data) = read_npy(&out);
    assert_eq!(shape, vec![1, 3, 56, 56]);
    let expected = Reference::open_file(&fixture("images/pixel_values.safetensors"))
        .get("coffee_wide")
        .f32;
    assert!(max_slice_diff(&data, &expected) <= 1e-5);

    let question = inputs()["images"]["coffee_wide"]["question"]
        .as_str()
        .expect("q")
        .to_string();
    let out = tmp.path().join("logits.npy");
    let run = run_cli(&[
        "logits",
        "--model",
        dir.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        &question,
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (shape, data) = read_npy(&out);
    assert_eq!(shape, vec![512]);
    let expected = Reference::open_file(&dir.join("generation_reference.safetensors"))
        .get("logits_last.coffee_wide")
        .f32;
    let diff = max_slice_diff(&data, &expected);
    assert!(diff <= 1e-4, "logits differ by {diff}");
}

#[test]
fn pipeline_errors_are_clear() {
    let device = Device::flex();
    let pipeline =
        Pipeline::load(&fixture("tiny-5x-f32"), &device, &LoadOptions::default()).expect("pipeline");
    let image = load_image(&fixture("images/astronaut.png")).expect("image");

    let err = pipeline
        .prepare(
            std::slice::from_ref(&image),
            &Prompt::Raw("<image><image> two tags".into()),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            PipelineError::Text(TextError::ImageTagMismatch {
                tags: 2,
                images: 1,
                ..
            })
        ),
        "{err}"
    );
    let err = pipeline
        .prepare(std::slice::from_ref(&image), &Prompt::Raw("no tag".into()))
        .unwrap_err();
    assert!(err.to_string().contains("<image>"), "{err}");
    let err = pipeline
        .prepare(std::slice::from_ref(&image), &Prompt::User("  ".into()))
        .unwrap_err();
    assert!(matches!(err, PipelineError::EmptyPrompt), "{err}");
    let err = pipeline
        .prepare(&[], &Prompt::Raw("<image> tag without image".into()))
        .unwrap_err();
    assert!(
        err.to_string().contains("1 `<image>` tag(s) but 0 image(s)"),
        "{err}"
    );

    let prepared = pipeline
        .prepare(&[image], &Prompt::User("What is this?".into()))
        .expect("prepare");
    let bad = GenerationOptions {
        do_sample: true,
        temperature: 0.0,
        ..pipeline.generation_defaults().clone()
    };
    let err = pipeline.generate(&prepared, &bad, |_| {}).unwrap_err();
    assert!(err.to_string().contains("temperature"), "{err}");

    // Stop strings end generation and report it.
    let expected = pipeline
        .generate(&prepared, &greedy(20, &pipeline), |_| {})
        .expect("generate");
    let text = expected.text.clone();
    if let Some(stop) = text
        .chars()
        .nth(3)
        .filter(|c| !c.is_whitespace() && *c != '\u{FFFD}')
    {
        let options = GenerationOptions {
            stop_strings: vec![stop.to_string()],
            ..greedy(20, &pipeline)
        };
        let stopped = pipeline.generate(&prepared, &options, |_| {}).expect("generate");
        assert_eq!(stopped.stop_reason, vipllava::StopReason::StopString);
        assert!(stopped.text.contains(stop) && stopped.token_ids.len() <= expected.token_ids.len());
    }

    // Sampling is reproducible with a seed.
    let sampled = |seed| {
        let options = GenerationOptions {
            do_sample: true,
            temperature: 0.8,
            seed,
            ..greedy(8, &pipeline)
        };
        pipeline
            .generate(&prepared, &options, |_| {})
            .expect("sample")
            .token_ids
    };
    assert_eq!(sampled(3), sampled(3));
}

#[test]
fn cli_errors_are_one_line_and_nonzero() {
    let dir = fixture("tiny-5x-f32");
    let missing = run_cli(&[
        "generate",
        "--model",
        dir.to_str().expect("utf8"),
        "--image",
        "/definitely/not/here.png",
        "--prompt",
        "hi",
    ]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.starts_with("error:") && err.contains("not/here.png"), "{err}");

    // A hub id that is not cached, offline: says what to do.
    let home = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_vipllava"))
        .args(["info", "--model", "llava-hf/vip-llava-7b-hf"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("local directory"),
        "{err}"
    );
}
