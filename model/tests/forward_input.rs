//! Host-side token ids: the same logits and the same errors as ids read back from the
//! device, and none of the checks lost.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use burn::tensor::{Device, Int, Tensor, TensorData};
use vipllava_model::{ForwardError, ForwardInput, KvCache, LogitsMode, VipLlava, VipLlavaConfig};

const IMAGE: i64 = 60;

fn tiny() -> (VipLlava, Device) {
    let config = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "image_token_index": 60, "vision_feature_layers": [-2, 1],
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 3, "image_size": 28, "patch_size": 14},
            "text_config": {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64}}"#,
    )
    .unwrap();
    let device = Device::flex();
    (VipLlava::new_random(&config, &device), device)
}

fn pixels(device: &Device) -> Tensor<4> {
    let data: Vec<f32> = (0..3 * 28 * 28).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    Tensor::from_data(TensorData::new(data, [1, 3, 28, 28]), device)
}

fn values(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn host_ids_match_device_ids_for_prefill_and_decode() {
    let (model, device) = tiny();
    let ids: Vec<i64> = vec![1, 5, IMAGE, IMAGE, IMAGE, IMAGE, 7, 9];
    let on_device = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, 8]), &device);

    let mut cache_a = KvCache::new();
    let a = model
        .forward(
            ForwardInput::new(on_device).with_pixels(pixels(&device)),
            &mut cache_a,
        )
        .unwrap();
    let mut cache_b = KvCache::new();
    let b = model
        .forward(
            ForwardInput::from_ids(ids, 1, &device)
                .unwrap()
                .with_pixels(pixels(&device)),
            &mut cache_b,
        )
        .unwrap();
    assert_eq!(values(a), values(b));

    for next in [3i64, 11] {
        let step = Tensor::<2, Int>::from_data(TensorData::new(vec![next], [1, 1]), &device);
        let a = model
            .forward(
                ForwardInput::new(step).with_logits(LogitsMode::LastOnly),
                &mut cache_a,
            )
            .unwrap();
        let b = model
            .forward(
                ForwardInput::from_ids(vec![next], 1, &device)
                    .unwrap()
                    .with_logits(LogitsMode::LastOnly),
                &mut cache_b,
            )
            .unwrap();
        assert_eq!(values(a), values(b));
    }
    assert_eq!(cache_a.len(), 10);
    assert_eq!(cache_b.len(), 10);
}

#[test]
fn host_ids_keep_the_input_checks() {
    let (model, device) = tiny();
    let err = |ids: Vec<i64>| {
        model
            .forward(
                ForwardInput::from_ids(ids, 1, &device).unwrap(),
                &mut KvCache::new(),
            )
            .unwrap_err()
    };
    assert!(matches!(
        err(vec![1, 64]),
        ForwardError::TokenOutOfVocab {
            id: 64,
            position: 1,
            ..
        }
    ));
    assert!(matches!(
        err(vec![-1]),
        ForwardError::TokenOutOfVocab { id: -1, .. }
    ));
    assert!(matches!(
        err(vec![1, IMAGE]),
        ForwardError::ImageTokenMismatch {
            tokens: 1,
            features: 0,
            ..
        }
    ));
    assert!(matches!(
        ForwardInput::from_ids(vec![1, 2, 3], 2, &device),
        Err(ForwardError::BadInput(_))
    ));
    let mut input = ForwardInput::from_ids(vec![1, 2], 1, &device).unwrap();
    input.host_ids = Some(vec![1]);
    assert!(matches!(
        model.forward(input, &mut KvCache::new()),
        Err(ForwardError::BadInput(_))
    ));
}
