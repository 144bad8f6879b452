//! Chat-template and tokenizer vectors recorded with transformers 5.24
//! (`scripts/make_fixtures.py`): rendering, encoding, decoding and prefix decodes.

use std::path::PathBuf;

use serde_json::Value;
use vipllava_processor::{ChatTemplate, TextTokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("vector file");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn chat_templates_render_like_transformers() {
    let vectors = json("chat_template_vectors.json");
    let cases = vectors.as_array().expect("list");
    assert!(cases.len() >= 8);
    // Both file sets: chat_template.jinja (5.x) and chat_template.json (hub 4.x).
    for fixture in ["tiny-5x-f32", "tiny-hub-bf16-sharded"] {
        let template = ChatTemplate::from_model_dir(&fixtures().join(fixture)).expect("template");
        for case in cases {
            let description = case["description"].as_str().unwrap_or("?");
            let messages = case["messages"].as_array().expect("messages");
            let add = case["add_generation_prompt"].as_bool().unwrap_or(false);
            let ours = template.render(messages, add);
            match case.get("rendered").and_then(Value::as_str) {
                Some(expected) => {
                    let ours = ours.unwrap_or_else(|e| panic!("{fixture}/{description}: {e}"));
                    assert_eq!(ours, expected, "{fixture}/{description}");
                }
                None => assert!(
                    ours.is_err(),
                    "{fixture}/{description}: transformers raises, we rendered"
                ),
            }
        }
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let vectors = json("tokenizer_vectors.json");
    let tokenizer = TextTokenizer::from_model_dir(&fixtures().join("tiny-5x-f32")).expect("tokenizer");
    assert_eq!(tokenizer.bos_token_id, Some(1));
    assert_eq!(tokenizer.eos_token_id, Some(2));
    assert_eq!(tokenizer.token_id("<image>").expect("image token"), 500);
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let cases = vectors["vectors"].as_array().expect("vectors");
    assert!(cases.len() >= 15);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            tokenizer.encode(text, true).expect("encode"),
            ids(&case["input_ids"]),
            "{text:?}"
        );
        assert_eq!(
            tokenizer.encode(text, false).expect("encode"),
            ids(&case["input_ids_no_special"]),
            "{text:?}"
        );
        let all = ids(&case["input_ids"]);
        assert_eq!(
            tokenizer.decode(&all, false).expect("decode"),
            case["decode"].as_str().expect("d"),
            "{text:?}"
        );
        assert_eq!(
            tokenizer.decode(&all, true).expect("decode"),
            case["decode_skip_special"].as_str().expect("d"),
            "{text:?}"
        );
        for (n, expected) in case["prefix_decodes_skip_special"]
            .as_array()
            .expect("prefixes")
            .iter()
            .enumerate()
        {
            let got = tokenizer
                .decode(&all[..=n.min(all.len() - 1)], true)
                .expect("decode");
            let expected = expected.as_str().expect("prefix");
            if n < all.len() {
                assert_eq!(got, expected, "{text:?} prefix {n}");
            }
        }
    }
    for case in vectors["decode_only"].as_array().expect("decode_only") {
        let all = ids(&case["ids"]);
        assert_eq!(
            tokenizer.decode(&all, false).expect("decode"),
            case["decode"].as_str().expect("d")
        );
        assert_eq!(
            tokenizer.decode(&all, true).expect("decode"),
            case["decode_skip_special"].as_str().expect("d")
        );
    }
}

#[test]
fn legacy_hub_tokenizer_pipeline_is_followed_as_written() {
    let vectors = json("tokenizer_vectors.json");
    let legacy = &vectors["legacy_4x_pipeline"];
    let tokenizer =
        TextTokenizer::from_model_dir(&fixtures().join("tokenizer-legacy-4x")).expect("legacy tokenizer");
    let cases = legacy["vectors"].as_array().expect("legacy vectors");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let expected: Vec<u32> = case["input_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(
            tokenizer.encode(text, true).expect("encode"),
            expected,
            "{text:?}"
        );
    }
}
