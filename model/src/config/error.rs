//! Why a `config.json` cannot be used, naming the field.

/// A configuration value that cannot be used, with the field it came from.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConfigError {
    /// The JSON text is not valid JSON or has a field of the wrong type.
    #[error("config.json is not a valid VipLlava config: {0}")]
    Json(String),
    /// `model_type` names another architecture.
    #[error("config.json has model_type {found:?}, expected \"vipllava\"")]
    WrongModelType {
        /// The `model_type` found in the file.
        found: String,
    },
    /// A size that must be positive is zero or negative.
    #[error("config field `{field}` must be a positive integer, found {value}")]
    NotPositive {
        /// Dotted path of the field.
        field: String,
        /// The value found.
        value: i64,
    },
    /// Heads do not divide a hidden size and no explicit `head_dim` is given.
    #[error(
        "config field `{field}`: hidden size {hidden} is not divisible by {heads} attention heads (set `head_dim` explicitly)"
    )]
    HeadsDoNotDivide {
        /// Dotted path of the hidden size field.
        field: String,
        /// Hidden size.
        hidden: usize,
        /// Number of heads.
        heads: usize,
    },
    /// `num_key_value_heads` does not divide `num_attention_heads`.
    #[error("text_config.num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})")]
    KvHeadsDoNotDivide {
        /// Number of attention heads.
        heads: usize,
        /// Number of key/value heads.
        kv_heads: usize,
    },
    /// An activation function this port does not implement.
    #[error(
        "config field `{field}` has unsupported activation {value:?} (supported: gelu, quick_gelu, gelu_pytorch_tanh, gelu_new, silu, relu)"
    )]
    UnknownActivation {
        /// Dotted path of the field.
        field: String,
        /// The activation name.
        value: String,
    },
    /// A rope scaling type this port does not implement.
    #[error("unsupported rope scaling type {value:?} (supported: default, linear, dynamic, llama3)")]
    UnknownRopeType {
        /// The rope type name.
        value: String,
    },
    /// A rope scaling section is missing a parameter it needs.
    #[error("rope scaling {rope_type:?} is missing the parameter `{field}`")]
    MissingRopeParameter {
        /// The rope type.
        rope_type: String,
        /// The missing field.
        field: String,
    },
    /// A vision feature layer index outside the vision tower's hidden states.
    #[error(
        "vision feature layer {layer} is out of range: the vision tower has {num_states} hidden states (indices -{num_states}..{max})",
        max = num_states - 1
    )]
    FeatureLayerOutOfRange {
        /// The offending index.
        layer: i64,
        /// Number of hidden states (layers + 1).
        num_states: usize,
    },
    /// `vision_feature_layers` is empty.
    #[error("vision_feature_layers is empty")]
    NoFeatureLayers,
    /// The image token id is outside the text vocabulary.
    #[error("image_token_index {image_token_index} is outside the text vocabulary (vocab_size {vocab_size})")]
    ImageTokenOutOfVocab {
        /// The image token id.
        image_token_index: i64,
        /// The text vocabulary size.
        vocab_size: usize,
    },
    /// The projector layernorm width in the weights disagrees with the resolved layers.
    #[error(
        "the projector layernorm in the weights has width {found}, but {num_layers} vision feature layers {layers:?} x vision hidden size {hidden} = {expected}"
    )]
    ProjectorWidthMismatch {
        /// The resolved layers.
        layers: Vec<i64>,
        /// Their count.
        num_layers: usize,
        /// Vision hidden size.
        hidden: usize,
        /// Width implied by the config.
        expected: usize,
        /// Width found in the weights.
        found: usize,
    },
    /// `vision_feature_select_strategy` names a strategy transformers does not have.
    #[error(
        "config field `vision_feature_select_strategy` has unsupported value {value:?} (supported: default, full)"
    )]
    UnknownFeatureSelectStrategy {
        /// The value found.
        value: String,
    },
    /// A floating point field that must be positive and finite is not.
    #[error("config field `{field}` must be a positive finite number, found {value}")]
    BadFloat {
        /// Dotted path of the field.
        field: String,
        /// The value found.
        value: f64,
    },
}
