use super::*;

const HUB_7B: &str = r#"{"architectures": ["VipLlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000, "model_type": "vipllava", "pad_token_id": 32001, "projector_hidden_act": "gelu", "projector_layernorm": false, "projector_layernorm_eps": 1e-05,
 "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
 "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
 "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
 "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}"#;

#[test]
fn hub_7b_resolves_defaults_and_layers() {
    let c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
    assert_eq!(c.vision_feature_layers, vec![-2, -5, -8, -11, 6]);
    assert_eq!(
        c.vision_feature_layers_source,
        FeatureLayerSource::StrayScalar(-2)
    );
    assert_eq!(c.text.hidden_size, 4096);
    assert_eq!(c.text.num_hidden_layers, 32);
    assert_eq!(c.text.intermediate_size, 11008);
    assert_eq!(c.text.num_key_value_heads, 32);
    assert_eq!(c.text.rms_norm_eps, 1e-5);
    assert_eq!(c.text.rope_theta, 10000.0);
    assert_eq!(c.text.vocab_size, 32064);
    assert_eq!(c.image_seq_len(), 576);
    assert_eq!(c.num_parameters(), 7_080_214_528);
    assert_eq!(c.resolved_feature_indices(), vec![23, 20, 17, 14, 6]);
    assert_eq!(c.vision_layers_used(), 23);
}

#[test]
fn stray_scalar_is_decided_by_projector_width() {
    let mut c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
    c.reconcile_projector_width(5 * 1024).unwrap();
    assert_eq!(c.vision_feature_layers, vec![-2, -5, -8, -11, 6]);
    let mut c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
    c.reconcile_projector_width(1024).unwrap();
    assert_eq!(c.vision_feature_layers, vec![-2]);
    let mut c = VipLlavaConfig::from_json_str(HUB_7B).unwrap();
    let err = c.reconcile_projector_width(3 * 1024).unwrap_err();
    assert!(err.to_string().contains("width 3072"), "{err}");
}

fn with_text(text: &str) -> Result<VipLlavaConfig, ConfigError> {
    VipLlavaConfig::from_json_str(&format!(
        r#"{{"model_type": "vipllava", "vision_config": {{"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 12, "image_size": 56, "patch_size": 14}}, "text_config": {text}, "image_token_index": 5}}"#
    ))
}

#[test]
fn five_x_dialect() {
    let c = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "dtype": "bfloat16", "vision_feature_layer": [-1, 3],
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4, "image_size": 56, "patch_size": 14},
            "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 512,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
            "image_token_index": 500}"#,
    )
    .unwrap();
    assert_eq!(c.vision_feature_layers, vec![-1, 3]);
    assert_eq!(c.vision_feature_layers_source, FeatureLayerSource::SingularList);
    assert_eq!(c.text.rope_theta, 500000.0);
    assert_eq!(c.text.head_dim, 24);
    assert!(matches!(
        c.text.rope_scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 64,
            ..
        }
    ));
    assert_eq!(c.declared_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(c.vision_layers_used(), 4);
}

#[test]
fn four_x_rope_scaling_forms() {
    let c = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}"#).unwrap();
    assert_eq!(c.text.rope_theta, 1000.0);
    assert_eq!(c.text.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let c = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}"#).unwrap();
    assert_eq!(c.text.rope_scaling, RopeScaling::Dynamic { factor: 4.0 });
}

#[test]
fn unsupported_values_are_errors() {
    let e = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"type": "yarn", "factor": 4.0}}"#).unwrap_err();
    assert!(
        e.to_string().contains("unsupported rope scaling type \"yarn\""),
        "{e}"
    );
    let e = with_text(
        r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "hidden_act": "mish"}"#,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("text_config.hidden_act") && e.to_string().contains("mish"),
        "{e}"
    );
    let e = with_text(r#"{"hidden_size": 65, "num_attention_heads": 4, "vocab_size": 512}"#).unwrap_err();
    assert!(matches!(e, ConfigError::HeadsDoNotDivide { .. }), "{e}");
    let e = with_text(
        r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 512}"#,
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::KvHeadsDoNotDivide { .. }), "{e}");
    let e = with_text(r#"{"hidden_size": 0, "num_attention_heads": 4, "vocab_size": 512}"#).unwrap_err();
    assert!(
        e.to_string().contains("text_config.hidden_size") && e.to_string().contains("positive"),
        "{e}"
    );
    let e = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 4}"#).unwrap_err();
    assert!(matches!(e, ConfigError::ImageTokenOutOfVocab { .. }), "{e}");
    let e = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"type": "linear"}}"#).unwrap_err();
    assert!(matches!(e, ConfigError::MissingRopeParameter { .. }), "{e}");
    let e = VipLlavaConfig::from_json_str(r#"{"model_type": "llava"}"#).unwrap_err();
    assert!(e.to_string().contains("\"llava\""), "{e}");
    let e = VipLlavaConfig::from_json_str("{not json").unwrap_err();
    assert!(matches!(e, ConfigError::Json(_)), "{e}");
    let e = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "text_config": {"vocab_size": 32064}, "vision_feature_layers": [30]}"#,
    )
    .unwrap_err();
    assert!(
        matches!(e, ConfigError::FeatureLayerOutOfRange { layer: 30, .. }),
        "{e}"
    );
}

#[test]
fn feature_select_strategy_is_typed() {
    let c = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512}"#).unwrap();
    assert_eq!(c.vision_feature_select_strategy, FeatureSelectStrategy::Default);
    assert_eq!(c.image_seq_len(), 16);
    let full = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "vision_feature_select_strategy": "full", "text_config": {"vocab_size": 32064}}"#,
    )
    .unwrap();
    assert_eq!(full.vision_feature_select_strategy, FeatureSelectStrategy::Full);
    assert_eq!(full.image_seq_len(), 577);
    let e = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "vision_feature_select_strategy": "cls", "text_config": {"vocab_size": 32064}}"#,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("vision_feature_select_strategy") && e.to_string().contains("\"cls\""),
        "{e}"
    );
    for s in [FeatureSelectStrategy::Default, FeatureSelectStrategy::Full] {
        assert_eq!(s.to_string().parse::<FeatureSelectStrategy>(), Ok(s));
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
    }
    assert!("Full".parse::<FeatureSelectStrategy>().is_err());
}

#[test]
fn type_errors_name_the_field_path() {
    let e = with_text(r#"{"hidden_size": 64.5, "num_attention_heads": 4, "vocab_size": 512}"#).unwrap_err();
    assert!(matches!(e, ConfigError::Json(_)), "{e}");
    assert!(e.to_string().contains("`text_config.hidden_size`"), "{e}");
    let e =
        with_text(r#"{"vocab_size": 512, "rope_scaling": {"type": "linear", "factor": "2"}}"#).unwrap_err();
    assert!(e.to_string().contains("`text_config.rope_scaling.factor`"), "{e}");
    let e = with_text(r#"{"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 512, "rope_scaling": {"type": "linear", "factor": -2.0}}"#).unwrap_err();
    assert!(
        matches!(&e, ConfigError::BadFloat { field, .. } if field == "text_config.rope_scaling.factor"),
        "{e}"
    );
    // Sections and the top level must be objects, not lists filled by position.
    let e =
        VipLlavaConfig::from_json_str(r#"{"model_type": "vipllava", "vision_config": [1024]}"#).unwrap_err();
    assert!(e.to_string().contains("`vision_config`"), "{e}");
    assert!(VipLlavaConfig::from_json_str(r#"["vipllava"]"#).is_err());
    let e = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "vision_feature_layer": "last", "text_config": {"vocab_size": 32064}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("vision_feature_layer"), "{e}");
}

#[test]
fn both_spellings_of_a_key_may_appear() {
    let c = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "dtype": "bfloat16", "torch_dtype": "float16", "image_token_index": 7, "image_token_id": 9,
            "text_config": {"vocab_size": 512, "rope_scaling": {"type": "linear", "rope_type": "dynamic", "factor": 2.0}}}"#,
    )
    .unwrap();
    assert_eq!(c.declared_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(c.declared_precision(), Some(crate::Precision::Bf16));
    assert_eq!(c.image_token_index, 7);
    assert_eq!(c.text.rope_scaling, RopeScaling::Dynamic { factor: 2.0 });
    // `null` reads as absent; a non-integer pad token reads as unset.
    let c = VipLlavaConfig::from_json_str(
        r#"{"model_type": "vipllava", "pad_token_id": "x", "image_token_id": 11, "vision_feature_layers": null, "text_config": {"vocab_size": 512, "hidden_size": null}}"#,
    )
    .unwrap();
    assert_eq!(c.pad_token_id, None);
    assert_eq!(c.image_token_index, 11);
    assert_eq!(c.vision_feature_layers_source, FeatureLayerSource::Default);
    assert_eq!(c.text.hidden_size, 4096);
}
