//! Precision: every fixture loaded as f32, f16 and bf16 (weights and activations; norms,
//! softmax and the attention scores stay f32 as in transformers). For each, the max |diff|
//! of the last-position logits against f32 and how many of 10 greedy tokens agree with f32.
//!
//! Our bf16 runs are also compared with transformers' own bf16 runs
//! (`scripts/make_bf16_fixtures.py` -> `bf16_reference.*`), which is what a bf16 user compares
//! us with: there the greedy tokens must agree further than with f32.
//!
//! `cargo test --release --test integration dtype:: -- --nocapture` prints the tables. The bounds below are
//! the measured values with margin (the fixtures are tiny random models whose logits are
//! O(1) and whose top-2 margins can be small, so a low-precision token can flip).

use crate::common::{FIXTURES, Reference, fixture, max_slice_diff};
use burn::tensor::{DType, Device};
use serde_json::Value;
use vipllava::LoadOptions;
use vipllava::generation::GenerationOptions;
use vipllava::model::Precision;
use vipllava::pipeline::{Pipeline, Prompt};
use vipllava::processor::image::load_image;

const NEW_TOKENS: usize = 10;

struct Row {
    fixture: &'static str,
    dtype: &'static str,
    max_diff: f32,
    max_logit: f32,
    same_prefix: usize,
}

fn run(name: &str, dtype: DType) -> (Vec<f32>, Vec<u32>) {
    let device = Device::flex();
    let pipeline = Pipeline::load(
        &fixture(name),
        &device,
        &LoadOptions {
            precision: Precision::from_dtype(dtype).expect("float dtype"),
            quantize: None,
            quantize_lm_head: None,
        },
    )
    .expect("pipeline");
    let inputs: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("images/inputs.json")).expect("inputs"))
            .expect("json");
    let info = &inputs["images"]["astronaut"];
    let image = load_image(&fixture(info["file"].as_str().expect("file"))).expect("image");
    let prepared = pipeline
        .prepare(
            &[image],
            &Prompt::User(info["question"].as_str().expect("question").into()),
        )
        .expect("prepare");
    let (logits, _) = pipeline.prefill(&prepared).expect("prefill");
    let options = GenerationOptions {
        max_new_tokens: NEW_TOKENS,
        eos_token_ids: Vec::new(),
        ..pipeline.generation_defaults().clone()
    };
    let generation = pipeline.generate(&prepared, &options, |_| {}).expect("generate");
    (logits, generation.token_ids)
}

/// Max |diff| of logits vs f32 and the number of leading greedy tokens equal to f32's:
/// the measured values (table in BENCHMARKS.md) with margin. Low-precision runs are
/// deterministic (the CPU kernels' summation order does not depend on the thread count).
fn bound(fixture: &str, dtype: &str) -> (f32, usize) {
    match (fixture, dtype) {
        (_, "f16") => (0.06, 8),
        ("tiny-5x-f32", "bf16") => (0.4, 8),
        // f32's second greedy step is a near tie (gap 0.014, under one bf16 step there, 0.031):
        // transformers' bf16 run keeps f32's token by two bf16 steps, ours (rounding where
        // PyTorch rounds) by none; `bf16_logits_and_greedy_tokens_follow_transformers_bf16`
        // allows a difference only at such a step.
        ("tiny-hub-bf16-sharded", "bf16") => (0.4, 1),
        ("tiny-gqa-f16", "bf16") => (0.4, 8),
        ("tiny-hub-tied-dynamic", "bf16") => (0.4, 3),
        _ => (0.0, NEW_TOKENS),
    }
}

#[test]
fn low_precision_logits_and_greedy_tokens_stay_close_to_f32() {
    let mut rows = Vec::new();
    for name in FIXTURES {
        let (ref_logits, ref_tokens) = run(name, DType::F32);
        assert_eq!(
            ref_tokens.len(),
            NEW_TOKENS,
            "{name}: f32 generated {ref_tokens:?}"
        );
        let max_logit = ref_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (dtype, label) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
            let (logits, tokens) = run(name, dtype);
            assert_eq!(logits.len(), ref_logits.len());
            assert!(
                logits.iter().all(|v| v.is_finite()),
                "{name} {label}: non-finite logits"
            );
            let same_prefix = tokens.iter().zip(&ref_tokens).take_while(|(a, b)| a == b).count();
            rows.push(Row {
                fixture: name,
                dtype: label,
                max_diff: max_slice_diff(&logits, &ref_logits),
                max_logit,
                same_prefix,
            });
        }
    }
    println!(
        "| fixture | dtype | max abs logit (f32) | max abs diff vs f32 | greedy tokens equal to f32 (of {NEW_TOKENS}) |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.4} | {} |",
            r.fixture, r.dtype, r.max_logit, r.max_diff, r.same_prefix
        );
    }
    for r in &rows {
        let (max_diff, min_prefix) = bound(r.fixture, r.dtype);
        assert!(
            r.max_diff <= max_diff,
            "{} {}: max |diff| {} > {}",
            r.fixture,
            r.dtype,
            r.max_diff,
            max_diff
        );
        assert!(
            r.same_prefix >= min_prefix,
            "{} {}: only {} greedy tokens equal to f32 (expected >= {})",
            r.fixture,
            r.dtype,
            r.same_prefix,
            min_prefix
        );
    }
}

/// Max |diff| of the last-position logits against transformers' bf16 run (measured 0.07-0.14:
/// both round to bf16 after each operation, but the products' summation orders differ, oneDNN's
/// against ours, so a value can land a bf16 step away).
const BF16_LOGIT_BOUND: f32 = 0.25;

/// A greedy step whose two best logits are this close in transformers' bf16 run (two bf16
/// steps for the fixtures' top logits, 4 to 8) is a coin toss between two bf16 runs.
const NEAR_TIE: f64 = 0.0625;

/// Our bf16 runs against transformers' own bf16 runs: logits within [`BF16_LOGIT_BOUND`], and
/// the greedy tokens equal until the end or until a step where transformers' top-2 gap is a
/// near tie (after which the two sequences go separate ways and nothing more is compared).
#[test]
fn bf16_logits_and_greedy_tokens_follow_transformers_bf16() {
    println!(
        "| fixture | max abs diff vs transformers bf16 | greedy tokens equal to transformers bf16 (of {NEW_TOKENS}) | its top-2 gap there | transformers bf16 equal to its f32 |"
    );
    println!("|---|---|---|---|---|");
    let mut failures = Vec::new();
    for name in FIXTURES {
        let dir = fixture(name);
        let info: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("bf16_reference.json")).expect("bf16_reference.json"),
        )
        .expect("json");
        let list = |key: &str| -> Vec<f64> {
            info[key]
                .as_array()
                .unwrap_or_else(|| panic!("{key}"))
                .iter()
                .map(|v| v.as_f64().expect("number"))
                .collect()
        };
        let expected_tokens: Vec<u32> = list("bf16_tokens").iter().map(|&t| t as u32).collect();
        let margins = list("bf16_top2_margins");
        let expected_logits = Reference::open_file(&dir.join("bf16_reference.safetensors"))
            .get("logits_last")
            .f32;
        let (logits, tokens) = run(name, DType::BF16);
        let diff = max_slice_diff(&logits, &expected_logits);
        let same = tokens
            .iter()
            .zip(&expected_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let gap = margins.get(same).copied();
        println!(
            "| {name} | {diff:.4} | {same} | {} | {} |",
            gap.map_or("-".to_string(), |g| format!("{g:.4}")),
            info["bf16_tokens_equal_to_f32_leading"]
        );
        let tokens_ok = same == NEW_TOKENS || gap.is_some_and(|g| g <= NEAR_TIE);
        if diff > BF16_LOGIT_BOUND || !tokens_ok {
            failures.push(format!(
                "{name}: max |diff| {diff} (bound {BF16_LOGIT_BOUND}), {same} leading tokens equal, \
                 transformers' top-2 gap at the first difference {gap:?} (near tie <= {NEAR_TIE}): \
                 ours {tokens:?}, transformers {expected_tokens:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
