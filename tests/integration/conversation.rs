//! Multi-turn conversations: a follow-up reuses the KV cache (no image re-encoding, no
//! re-run of earlier turns) and gives the same logits as a fresh prefill of the whole
//! conversation; multi-image prompts.

use crate::common::{FIXTURES, Reference, fixture, max_slice_diff};
use burn::tensor::Device;
use vipllava::generation::GenerationOptions;
use vipllava::pipeline::{Pipeline, Prompt};
use vipllava::processor::ChatMessage;
use vipllava::processor::image::load_image;
use vipllava::{Conversation, LoadOptions};

#[test]
fn follow_up_reuses_cache_and_matches_fresh_prefill() {
    let device = Device::flex();
    for name in FIXTURES {
        let pipeline = Pipeline::load(&fixture(name), &device, &LoadOptions::default()).expect("pipeline");
        let image = load_image(&fixture("images/chelsea.png")).expect("image");
        let mut chat = Conversation::new(&pipeline, vec![image.clone()]);
        let options = GenerationOptions {
            max_new_tokens: 6,
            ..pipeline.generation_defaults().clone()
        };
        let first = chat.ask("What is this?", &options, |_| {}).expect("first turn");
        let follow_up = chat.logits_after("What colour is it?").expect("follow-up");
        let reused = chat.last_turn_new_tokens();

        let messages = vec![
            ChatMessage::user_with_images(1, "What is this?"),
            ChatMessage::text("assistant", first.text.clone()),
            ChatMessage::text("user", "What colour is it?"),
        ];
        let fresh = pipeline
            .prepare(&[image], &Prompt::Messages(messages))
            .expect("prepare");
        let (expected, _) = pipeline.prefill(&fresh).expect("prefill");
        let diff = max_slice_diff(&follow_up, &expected);
        println!(
            "{name}: follow-up computed {reused} of {} positions, logits max|diff| vs fresh prefill {diff:.2e}",
            fresh.input_ids.len()
        );
        assert!(
            reused < fresh.input_ids.len() - 16,
            "{name}: the image tokens were recomputed"
        );
        // Dynamic rope rescales with the sequence length, so a reused prefix legitimately
        // differs from a fresh run once the conversation is longer than max positions.
        let dynamic = matches!(
            pipeline.config().text.rope_scaling,
            vipllava::model::RopeScaling::Dynamic { .. }
        );
        if !dynamic {
            assert!(diff <= 1e-4, "{name}: follow-up logits differ by {diff}");
        }
    }
}

#[test]
fn replayed_transcript_matches_transformers_multi_turn_reference() {
    let device = Device::flex();
    for name in FIXTURES {
        let path = fixture(name).join("batch_reference.safetensors");
        if !path.is_file() {
            panic!("{name}: missing {}", path.display());
        }
        let reference = Reference::open_file(&path);
        let pipeline = Pipeline::load(&fixture(name), &device, &LoadOptions::default()).expect("pipeline");
        let image = load_image(&fixture("images/chelsea.png")).expect("image");
        let expected = reference.get("multi_turn_logits_last").f32;
        // A fresh prefill of the whole conversation.
        let messages = vec![
            ChatMessage::user_with_images(1, "What is this?"),
            ChatMessage::text("assistant", "A cat."),
            ChatMessage::text("user", "What colour is it?"),
        ];
        let fresh = pipeline
            .prepare(std::slice::from_ref(&image), &Prompt::Messages(messages))
            .expect("prepare");
        let (logits, _) = pipeline.prefill(&fresh).expect("prefill");
        let fresh_diff = max_slice_diff(&logits, &expected);
        assert!(
            fresh_diff <= 1e-4,
            "{name}: multi-turn prefill differs by {fresh_diff}"
        );
        // The same through a conversation that reuses the first turn's cache (dynamic rope
        // rescales with length, so only a fresh run can match there: see above).
        let mut chat = Conversation::new(&pipeline, vec![image]);
        chat.logits_after("What is this?").expect("prime");
        chat.push_exchange("What is this?", "A cat.");
        let logits = chat.logits_after("What colour is it?").expect("follow-up");
        assert!(
            chat.last_turn_new_tokens() < fresh.input_ids.len() - 16,
            "{name}: cache not reused"
        );
        let dynamic = matches!(
            pipeline.config().text.rope_scaling,
            vipllava::model::RopeScaling::Dynamic { .. }
        );
        let diff = if dynamic {
            fresh_diff
        } else {
            max_slice_diff(&logits, &expected)
        };
        println!(
            "{name}: multi-turn logits max|diff| vs transformers: fresh {fresh_diff:.2e}, cached {diff:.2e}"
        );
        assert!(diff <= 1e-4, "{name}: multi-turn logits differ by {diff}");
    }
}
