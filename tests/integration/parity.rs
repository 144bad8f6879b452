//! Logits parity with transformers 5.x for every fixture (layouts, dtypes, GQA, biases,
//! rope scaling types, tied embeddings), stage by stage, and KV-cache decoding.

use crate::common::{FIXTURES, Reference, fixture, max_abs_diff};
use burn::tensor::{Device, Tensor};
use vipllava::{ForwardInput, KvCache, LoadOptions, LogitsMode, load_model};
use vipllava_model::RopeScaling;
use vipllava_model::llama::Rope;

/// f32 tolerance on every stage (transformers' own eager vs sdpa paths differ by ~1e-5).
const TOL: f32 = 1e-4;

#[test]
fn stages_and_logits_match_transformers() {
    let device = Device::flex();
    for name in FIXTURES {
        let loaded = load_model(&fixture(name), &device, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = &loaded.model;
        let reference = Reference::open(name);
        let pixels: Tensor<4> = reference.float("pixel_values", &device);

        let states = model.vision_hidden_states(pixels.clone()).expect("vision");
        assert_eq!(states.len(), loaded.config.vision_feature_layers.len());
        for (k, state) in states.into_iter().enumerate() {
            let expected: Tensor<3> = reference.float(&format!("vision_hidden_state.{k}"), &device);
            let diff = max_abs_diff(state, expected);
            println!("{name}: vision hidden state {k} max|diff| = {diff:.3e}");
            assert!(diff <= TOL, "{name}: vision hidden state {k} differs by {diff}");
        }

        let features = model.image_features(pixels.clone()).expect("features");
        let diff = max_abs_diff(features, reference.float("image_features", &device));
        println!("{name}: projector output max|diff| = {diff:.3e}");
        assert!(diff <= TOL, "{name}: projector output differs by {diff}");

        let ids = reference.ids(&device);
        let mut cache = KvCache::new();
        let logits = model
            .forward(
                ForwardInput::new(ids.clone()).with_pixels(pixels.clone()),
                &mut cache,
            )
            .expect("forward");
        let expected: Tensor<3> = reference.float("logits", &device);
        let diff = max_abs_diff(logits, expected);
        println!("{name}: full-sequence logits max|diff| = {diff:.3e}");
        assert!(diff <= TOL, "{name}: logits differ by {diff}");

        let mut cache = KvCache::new();
        let last = model
            .forward(
                ForwardInput::new(ids)
                    .with_pixels(pixels)
                    .with_logits(LogitsMode::LastOnly),
                &mut cache,
            )
            .expect("forward last");
        let [b, _, v] = last.dims();
        let diff = max_abs_diff(last.reshape([b, v]), reference.float("logits_last", &device));
        println!("{name}: last-position logits max|diff| = {diff:.3e}");
        assert!(diff <= TOL, "{name}: last logits differ by {diff}");
    }
}

#[test]
fn rope_frequencies_match_transformers() {
    for name in FIXTURES {
        let loaded = vipllava_convert::read_config(&fixture(name)).expect("config");
        let reference = Reference::open(name);
        let seq = reference.get("input_ids").shape[1];
        let expected = reference.get("rope_inv_freq").f32;
        let rope = Rope::new(&loaded.text);
        let ours = rope.inv_freq(seq - 1);
        let diff = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| ((*a as f32 - b) / b).abs())
            .fold(0.0f32, f32::max);
        println!("{name}: rope inv_freq max relative diff = {diff:.3e}");
        assert_eq!(ours.len(), expected.len());
        assert!(diff <= 1e-6, "{name}: inv_freq differs (relative {diff})");
    }
}

#[test]
fn kv_cache_decoding_equals_full_run() {
    let device = Device::flex();
    for name in FIXTURES {
        let loaded = load_model(&fixture(name), &device, &LoadOptions::default()).expect("load");
        let model = &loaded.model;
        let reference = Reference::open(name);
        let pixels: Tensor<4> = reference.float("pixel_values", &device);
        let ids = reference.ids(&device);
        let seq = ids.dims()[1];
        let mut cache = KvCache::new();
        let full = model
            .forward(
                ForwardInput::new(ids.clone()).with_pixels(pixels.clone()),
                &mut cache,
            )
            .expect("full");

        // Prefill everything up to and including the image tokens, then one token at a time.
        let prefill = seq - 8;
        let mut cache = KvCache::new();
        let first = model
            .forward(
                ForwardInput::new(ids.clone().slice([0..1, 0..prefill])).with_pixels(pixels),
                &mut cache,
            )
            .expect("prefill");
        // Dynamic NTK rope derives frequencies from the longest position of each call while
        // cached keys keep their rotation (transformers does the same), so only there do a
        // prefix and cached steps legitimately differ from a full re-run; transformers'
        // own cached steps are the reference then.
        let dynamic = matches!(loaded.config.text.rope_scaling, RopeScaling::Dynamic { .. });
        let prefill_diff = max_abs_diff(first, full.clone().slice([0..1, 0..prefill]));
        if !dynamic {
            assert!(
                prefill_diff <= 1e-5,
                "{name}: prefill differs from the full run by {prefill_diff}"
            );
        }
        let cached_reference = fixture(name).join("cached_reference.safetensors");
        let mut worst_full = 0.0f32;
        let mut worst_reference = 0.0f32;
        for (step_index, t) in (prefill..seq).enumerate() {
            let step = model
                .forward(ForwardInput::new(ids.clone().slice([0..1, t..t + 1])), &mut cache)
                .expect("decode");
            worst_full = worst_full.max(max_abs_diff(step.clone(), full.clone().slice([0..1, t..t + 1])));
            if cached_reference.is_file() {
                let expected: Tensor<2> =
                    Reference::open_file(&cached_reference).float("cached_step_logits", &device);
                let vocab = expected.dims()[1];
                let row = expected
                    .slice([step_index..step_index + 1, 0..vocab])
                    .reshape([1, 1, vocab]);
                worst_reference = worst_reference.max(max_abs_diff(step, row));
            }
        }
        assert_eq!(cache.len(), seq);
        println!(
            "{name}: cached decoding vs full run max|diff| = {worst_full:.3e}, vs transformers' cached steps = {worst_reference:.3e}"
        );
        if !dynamic {
            assert!(
                worst_full <= 1e-5,
                "{name}: cached decoding differs by {worst_full}"
            );
        }
        assert!(
            cached_reference.is_file() || !dynamic,
            "{name}: dynamic rope needs transformers' cached reference"
        );
        assert!(
            worst_reference <= TOL,
            "{name}: cached steps differ from transformers by {worst_reference}"
        );
    }
}
