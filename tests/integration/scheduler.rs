//! Continuous batching (`vipllava::generation::DecodeBatch`): requests that join a running
//! batch at different steps, with different prompt lengths, each get what they would get
//! alone; a removed row leaves the others undisturbed.

use vipllava::generation::{DecodeBatch, GenerationOptions, RowId, StopReason};
use vipllava::pipeline::{Pipeline, PreparedInput, Prompt};
use vipllava::processor::image::load_image;

use crate::common::fixture;

fn inputs(pipeline: &Pipeline) -> Vec<PreparedInput> {
    let astronaut = load_image(&fixture("images/astronaut.png")).unwrap();
    let coffee = load_image(&fixture("images/coffee.png")).unwrap();
    vec![
        pipeline
            .prepare(
                std::slice::from_ref(&astronaut),
                &Prompt::User("What is in the red box?".into()),
            )
            .unwrap(),
        pipeline
            .prepare(
                &[coffee],
                &Prompt::User("Describe the cup, its colour, its handle and the table it stands on.".into()),
            )
            .unwrap(),
        pipeline
            .prepare(&[astronaut], &Prompt::User("Who?".into()))
            .unwrap(),
    ]
}

/// Runs `batch` until every row in `wanted` finished; collects each row's tokens and text.
fn drain(
    pipeline: &Pipeline,
    batch: &mut DecodeBatch,
    out: &mut std::collections::HashMap<RowId, (Vec<u32>, String, Option<StopReason>)>,
) {
    for event in batch.step(pipeline).unwrap() {
        let entry = out.entry(event.row).or_default();
        entry.0.extend(event.token);
        if let Some(t) = &event.text {
            entry.1.push_str(t);
        }
        if let Some(f) = event.finished {
            assert_eq!(f.token_ids, entry.0);
            assert_eq!(f.text, entry.1);
            entry.2 = Some(f.stop_reason);
        }
    }
}

#[test]
fn rows_joining_at_different_steps_match_generate_alone() {
    let pipeline = Pipeline::load(
        &fixture("tiny-5x-f32"),
        &burn::tensor::Device::flex(),
        &Default::default(),
    )
    .unwrap();
    let inputs = inputs(&pipeline);
    let greedy = GenerationOptions {
        max_new_tokens: 12,
        ..pipeline.generation_defaults().clone()
    };
    let sampled = GenerationOptions {
        do_sample: true,
        temperature: 0.9,
        seed: 7,
        max_new_tokens: 9,
        ..pipeline.generation_defaults().clone()
    };
    let plan = [
        (0usize, greedy.clone(), 0usize),
        (1, sampled.clone(), 2),
        (2, greedy.clone(), 5),
    ];
    let alone: Vec<_> = plan
        .iter()
        .map(|(i, o, _)| pipeline.generate(&inputs[*i], o, |_| {}).unwrap())
        .collect();

    let mut batch = DecodeBatch::new();
    let mut ids = Vec::new();
    let mut out = std::collections::HashMap::new();
    for step in 0..40 {
        for (i, o, at) in &plan {
            if *at == step {
                ids.push(batch.add(&pipeline, &inputs[*i], o.clone()).unwrap());
            }
        }
        if batch.is_empty() && ids.len() == plan.len() {
            break;
        }
        drain(&pipeline, &mut batch, &mut out);
    }
    assert!(batch.is_empty());
    assert_eq!(batch.cached_len(), 0);
    for (id, want) in ids.iter().zip(&alone) {
        let (tokens, text, stop) = &out[id];
        assert_eq!(tokens, &want.token_ids, "row {id}");
        assert_eq!(text, &want.text, "row {id}");
        assert_eq!(stop, &Some(want.stop_reason));
    }
}

#[test]
fn a_removed_row_leaves_the_others_undisturbed() {
    let pipeline = Pipeline::load(
        &fixture("tiny-5x-f32"),
        &burn::tensor::Device::flex(),
        &Default::default(),
    )
    .unwrap();
    let inputs = inputs(&pipeline);
    let options = GenerationOptions {
        max_new_tokens: 10,
        ..pipeline.generation_defaults().clone()
    };
    let want = pipeline.generate(&inputs[0], &options, |_| {}).unwrap();
    let mut batch = DecodeBatch::new();
    // The long prompt joins first, so the short one is padded; removing the long one
    // must cut the padding away.
    let long = batch.add(&pipeline, &inputs[1], options.clone()).unwrap();
    let short = batch.add(&pipeline, &inputs[0], options.clone()).unwrap();
    let mut out = std::collections::HashMap::new();
    drain(&pipeline, &mut batch, &mut out);
    assert!(batch.remove(long).unwrap());
    assert!(!batch.remove(long).unwrap());
    assert_eq!(batch.cached_len(), inputs[0].input_ids.len() + 1);
    for _ in 0..20 {
        if batch.is_empty() {
            break;
        }
        drain(&pipeline, &mut batch, &mut out);
    }
    assert_eq!(out[&short].0, want.token_ids);
    // A request for no tokens finishes at its first step without a token.
    let none = GenerationOptions {
        max_new_tokens: 0,
        ..options
    };
    let id = batch.add(&pipeline, &inputs[2], none).unwrap();
    let events = batch.step(&pipeline).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].row, id);
    assert_eq!(events[0].token, None);
    assert_eq!(
        events[0].finished.as_ref().unwrap().stop_reason,
        StopReason::MaxNewTokens
    );
    // Over the context: refused before any work.
    let huge = GenerationOptions {
        max_new_tokens: 100_000,
        ..pipeline.generation_defaults().clone()
    };
    assert!(batch.add(&pipeline, &inputs[0], huge).is_err());
    assert!(batch.is_empty());
}
