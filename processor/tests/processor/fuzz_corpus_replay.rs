//! Replays the fuzz seed corpora (`fuzz/corpus/<target>/`) through the same code paths
//! as the `cargo fuzz` targets, so CI exercises them without a nightly toolchain.

use std::path::{Path, PathBuf};

use vipllava_processor::image::{ImageProcessorConfig, decode_image_with_limit, preprocess};
use vipllava_processor::{ChatMessage, ChatTemplate, TextTokenizer};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.expect("entry").path();
            let bytes = std::fs::read(&path).expect("read");
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {target}");
    files
}

#[test]
fn image_preprocess_corpus() {
    let config = ImageProcessorConfig::from_json_str(
        r#"{"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}"#,
    )
    .expect("config");
    let mut decoded = 0;
    for (_, data) in corpus("image_preprocess") {
        if let Ok(img) = decode_image_with_limit(&data, 4_000_000) {
            decoded += 1;
            let _ = preprocess(&img, &config);
        }
    }
    assert!(decoded > 0);
}

#[test]
fn chat_template_corpus() {
    let vip = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-5x-f32/chat_template.jinja"),
    )
    .expect("template");
    let messages = [ChatMessage::user_with_images(1, "What is in the red box?")];
    for (_, data) in corpus("chat_template") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let _ = ChatTemplate::new(text).render(&messages, true);
        if let Ok(serde_json::Value::Array(list)) = serde_json::from_str::<serde_json::Value>(text) {
            let _ = ChatTemplate::new(vip.as_str()).render(&list, true);
        }
    }
}

#[test]
fn tokenizer_roundtrip_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-5x-f32");
    let tok = TextTokenizer::from_model_dir(&dir).expect("tokenizer");
    for (path, data) in corpus("tokenizer_roundtrip") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let ids = tok.encode(text, false).expect("encode");
        let back = tok.decode(&ids, false).expect("decode");
        let special = ["<image>", "<pad>", "<s>", "</s>", "<unk>"]
            .iter()
            .any(|t| text.contains(t));
        if !text.starts_with(' ') && !special && !text.contains('\u{2581}') {
            assert_eq!(back, text, "{}", path.display());
        }
    }
}

#[test]
fn processor_config_corpus() {
    let mut parsed = 0;
    for (_, data) in corpus("processor_config") {
        if let Ok(text) = std::str::from_utf8(&data)
            && ImageProcessorConfig::from_json_str(text).is_ok()
        {
            parsed += 1;
        }
    }
    assert!(parsed > 0);
}
