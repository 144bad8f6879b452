//! Hostile and broken inputs, table-driven: each case must fail with a clear, typed error
//! whose message names the problem (or, where PIL accepts the input, succeed like PIL) —
//! never panic, hang or allocate unboundedly.

use std::path::Path;

use crate::common::{copy_fixture, fixture};
use burn::tensor::Device;
use vipllava::generation::GenerationOptions;
use vipllava::pipeline::{Pipeline, PipelineError, Prompt};
use vipllava::processor::image::{ImageProcessorConfig, decode_image, load_image, preprocess};
use vipllava::{LoadOptions, load_model};

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(path, v.to_string()).expect("write");
}

type Setup = fn(&Path);

/// (case, how to break a copy of tiny-5x-f32, words the error must contain)
const MODEL_DIR_CASES: &[(&str, Setup, &[&str])] = &[
    (
        "safetensors truncated",
        |d| {
            let p = d.join("model.safetensors");
            let bytes = std::fs::read(&p).expect("read");
            std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("write");
        },
        &["model.safetensors", "past the end"],
    ),
    (
        "safetensors header length beyond the file",
        |d| std::fs::write(d.join("model.safetensors"), u64::MAX.to_le_bytes()).expect("write"),
        &["model.safetensors", "beyond the file"],
    ),
    (
        "safetensors header not JSON",
        |d| {
            let mut b = 4u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"{{{{");
            std::fs::write(d.join("model.safetensors"), b).expect("write");
        },
        &["model.safetensors", "not JSON"],
    ),
    (
        "config.json missing",
        |d| std::fs::remove_file(d.join("config.json")).expect("rm"),
        &["no config.json"],
    ),
    (
        "config.json not JSON",
        |d| std::fs::write(d.join("config.json"), "{ nope").expect("write"),
        &["config.json", "not a valid VipLlava config"],
    ),
    (
        "wrong model_type",
        |d| edit_json(&d.join("config.json"), |v| v["model_type"] = "llava".into()),
        &["model_type", "\"llava\""],
    ),
    (
        "zero hidden size",
        |d| {
            edit_json(&d.join("config.json"), |v| {
                v["text_config"]["hidden_size"] = 0.into()
            })
        },
        &["text_config.hidden_size", "positive"],
    ),
    (
        "negative layer count",
        |d| {
            edit_json(&d.join("config.json"), |v| {
                v["vision_config"]["num_hidden_layers"] = (-3).into()
            })
        },
        &["vision_config.num_hidden_layers", "positive"],
    ),
    (
        "heads do not divide hidden size",
        |d| {
            edit_json(&d.join("config.json"), |v| {
                let text = &mut v["text_config"];
                text["num_attention_heads"] = 5.into();
                text["num_key_value_heads"] = serde_json::Value::Null;
                text["head_dim"] = serde_json::Value::Null;
            })
        },
        &["not divisible by 5 attention heads"],
    ),
    (
        "kv heads do not divide heads",
        |d| {
            edit_json(&d.join("config.json"), |v| {
                v["text_config"]["num_key_value_heads"] = 3.into()
            })
        },
        &["num_key_value_heads (3)"],
    ),
    (
        "unknown activation",
        |d| {
            edit_json(&d.join("config.json"), |v| {
                v["text_config"]["hidden_act"] = "swiglu9".into()
            })
        },
        &["text_config.hidden_act", "swiglu9"],
    ),
    (
        "unknown rope type",
        |d| {
            edit_json(&d.join("config.json"), |v| {
                v["text_config"]["rope_parameters"] =
                    serde_json::json!({"rope_type": "longrope", "factor": 2.0})
            })
        },
        &["unsupported rope scaling type \"longrope\""],
    ),
    (
        "vocab smaller than the image token id",
        |d| {
            edit_json(&d.join("config.json"), |v| {
                v["text_config"]["vocab_size"] = 100.into()
            })
        },
        &["image_token_index 500", "vocab_size 100"],
    ),
    (
        "tokenizer.json missing",
        |d| std::fs::remove_file(d.join("tokenizer.json")).expect("rm"),
        &["tokenizer.json"],
    ),
    (
        "tokenizer.json corrupt",
        |d| std::fs::write(d.join("tokenizer.json"), "{\"model\": 7}").expect("write"),
        &["tokenizer.json", "not a valid tokenizer"],
    ),
    (
        "processor config with a bad value",
        |d| {
            edit_json(&d.join("processor_config.json"), |v| {
                v["image_processor"]["crop_size"] = "huge".into()
            })
        },
        &["crop_size"],
    ),
];

#[test]
fn broken_model_directories_fail_clearly() {
    for (case, setup, needles) in MODEL_DIR_CASES {
        let dir = copy_fixture("tiny-5x-f32");
        setup(dir.path());
        let err = match Pipeline::load(dir.path(), &Device::flex(), &LoadOptions::default()) {
            Ok(_) => panic!("{case}: loaded"),
            Err(e) => e.to_string(),
        };
        for needle in *needles {
            assert!(err.contains(needle), "{case}: {err:?} lacks {needle:?}");
        }
    }
}

#[test]
fn broken_sharded_checkpoints_fail_clearly() {
    let dir = copy_fixture("tiny-hub-bf16-sharded");
    std::fs::remove_file(dir.path().join("model-00001-of-00002.safetensors")).expect("rm");
    let err = load_model(dir.path(), &Device::flex(), &LoadOptions::default()).expect_err("missing shard");
    assert!(
        err.to_string().contains("model-00001-of-00002.safetensors"),
        "{err}"
    );

    let dir = copy_fixture("tiny-hub-bf16-sharded");
    edit_json(&dir.path().join("model.safetensors.index.json"), |v| {
        v["weight_map"]["language_model.model.norm.weight"] = "../../etc/passwd".into()
    });
    let err = load_model(dir.path(), &Device::flex(), &LoadOptions::default()).expect_err("escape");
    assert!(err.to_string().contains("outside the model directory"), "{err}");
}

#[test]
fn chat_template_errors_fail_clearly() {
    let device = Device::flex();
    for (template, needle) in [
        ("{% for m in messages %}", "chat template"),
        ("{{ raise_exception('no system role') }}", "no system role"),
    ] {
        let dir = copy_fixture("tiny-5x-f32");
        std::fs::write(dir.path().join("chat_template.jinja"), template).expect("write");
        let pipeline = Pipeline::load(dir.path(), &device, &LoadOptions::default()).expect("load");
        let image = load_image(&fixture("images/chelsea.png")).expect("image");
        let err = pipeline
            .prepare(&[image], &Prompt::User("hi".into()))
            .expect_err("template");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

/// A PNG header claiming `w x h` pixels with no data behind it.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in &ihdr {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&(!crc).to_be_bytes());
    out
}

#[test]
fn broken_and_unusual_images() {
    let png = std::fs::read(fixture("images/chelsea.png")).expect("png");
    let errors: [(&str, Vec<u8>, &[&str]); 5] = [
        (
            "not an image",
            b"hello, world".to_vec(),
            &["not a recognised image"],
        ),
        ("empty file", Vec::new(), &["empty"]),
        ("truncated PNG", png[..png.len() / 3].to_vec(), &["decod"]),
        ("zero width", png_header(0, 10), &[]),
        ("decompression bomb header", png_header(30000, 30000), &["pixels"]),
    ];
    for (case, bytes, needles) in errors {
        let err = decode_image(&bytes).expect_err(case).to_string();
        for needle in needles {
            assert!(
                err.to_lowercase().contains(needle),
                "{case}: {err:?} lacks {needle:?}"
            );
        }
    }
    let config = ImageProcessorConfig::clip_336();
    // Accepted like PIL: 1x1, CMYK JPEG, animated GIF (first frame), palette with alpha, 16-bit.
    let one = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(1, 1, image::Rgb([9, 8, 7])));
    let pixels = preprocess(&one, &config).expect("1x1");
    assert_eq!((pixels.height, pixels.width), (336, 336));

    let cmyk = load_image(&fixture("bad/cmyk.jpg")).expect("CMYK JPEG decodes");
    assert_eq!((cmyk.width(), cmyk.height()), (24, 16));
    preprocess(&cmyk, &config).expect("CMYK preprocesses");

    let gif = load_image(&fixture("bad/animated.gif")).expect("animated GIF decodes");
    let first = gif.to_rgb8();
    assert_eq!(first.dimensions(), (20, 12));
    assert_eq!(first.get_pixel(0, 0).0, [255, 0, 0], "the first frame, as PIL");
}

#[test]
fn prompts_beyond_the_context_or_with_wrong_tags_fail_clearly() {
    let device = Device::flex();
    let pipeline = Pipeline::load(&fixture("tiny-5x-f32"), &device, &LoadOptions::default()).expect("load");
    let image = load_image(&fixture("images/chelsea.png")).expect("image");
    let input = pipeline
        .prepare(std::slice::from_ref(&image), &Prompt::User("hi".into()))
        .expect("prepare");
    let options = GenerationOptions {
        max_new_tokens: 10_000,
        ..pipeline.generation_defaults().clone()
    };
    let err = pipeline.generate(&input, &options, |_| {}).expect_err("too long");
    assert!(
        matches!(err, PipelineError::ContextTooLong { max: 256, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");

    let err = pipeline
        .prepare(&[image.clone(), image], &Prompt::User("two".into()))
        .map(|_| ());
    // Two images, one user message with two tags: fine for the template; the model takes it.
    assert!(err.is_ok());
    let err = pipeline
        .prepare(&[], &Prompt::Raw("<image>".into()))
        .expect_err("no image");
    assert!(
        err.to_string().contains("1 `<image>` tag(s) but 0 image(s)"),
        "{err}"
    );
}
