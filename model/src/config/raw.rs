//! `config.json` as written, field for field: serde-derived structs covering both
//! dialects (transformers 4.x hub files and 5.x `save_pretrained` files). Nothing here
//! applies a default or checks a value; [`super::resolve`] does, naming the field.
//!
//! Where the dialects spell one setting two ways, both keys are fields and the resolver
//! picks (`dtype`/`torch_dtype`, `image_token_index`/`image_token_id`,
//! `rope_type`/`type`, `rope_parameters`/`rope_scaling`, plural `vision_feature_layers`/
//! singular `vision_feature_layer`): real files carry both spellings at once, which a
//! `#[serde(alias)]` would refuse as a duplicate field.
//!
//! Every field is optional, and `null` reads as absent, as in transformers. A declared
//! key of the wrong type is an error naming its path even where the resolver would then
//! not use it (say `text_config.tie_word_embeddings: "x"` beside a top-level boolean);
//! the only keys read loosely are those marked [`Loose`] or [`FeatureLayerKey::Invalid`].

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The one key read before anything else, so that another architecture's config is
/// reported as such rather than by its first unexpected field.
#[derive(Debug, Deserialize)]
pub(super) struct RawHeader {
    pub model_type: Option<String>,
}

/// The top level of a VipLlava `config.json`.
#[derive(Debug, Deserialize)]
pub(super) struct RawVipLlavaConfig {
    pub vision_config: Option<Object<RawClipVisionConfig>>,
    pub text_config: Option<Object<RawLlamaConfig>>,
    /// Outer `Some` when the key is present: a `null` here means the default and does not
    /// fall back to `image_token_id`.
    #[serde(default, deserialize_with = "present")]
    pub image_token_index: Option<Option<i64>>,
    /// 5.x spelling; read only when `image_token_index` is absent.
    pub image_token_id: Option<Loose<i64>>,
    /// 5.x ties `lm_head` by this top-level key (it overrides `text_config`'s).
    pub tie_word_embeddings: Option<bool>,
    /// 4.x plural key.
    pub vision_feature_layers: Option<Vec<i64>>,
    /// 5.x singular key holding the list, or the 7B hub file's stray LLaVA scalar; read
    /// only when the plural key is absent.
    pub vision_feature_layer: Option<FeatureLayerKey>,
    pub vision_feature_select_strategy: Option<String>,
    pub projector_hidden_act: Option<String>,
    pub projector_layernorm_eps: Option<f64>,
    /// 5.x spelling; wins over `torch_dtype`.
    pub dtype: Option<String>,
    /// 4.x spelling.
    pub torch_dtype: Option<String>,
    /// Informational; a value that is not an integer reads as unset.
    pub pad_token_id: Option<Loose<i64>>,
}

/// `vision_config` (transformers' `CLIPVisionConfig`).
#[derive(Debug, Deserialize)]
pub(super) struct RawClipVisionConfig {
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub num_hidden_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub num_channels: Option<i64>,
    pub image_size: Option<i64>,
    pub patch_size: Option<i64>,
    pub hidden_act: Option<String>,
    pub layer_norm_eps: Option<f64>,
}

/// `text_config` (transformers' `LlamaConfig`).
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawLlamaConfig {
    pub vocab_size: Option<i64>,
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub num_hidden_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<i64>,
    pub rms_norm_eps: Option<f64>,
    /// 4.x RoPE base (5.x: inside `rope_parameters`, defaulting to this).
    pub rope_theta: Option<f64>,
    /// 4.x scaling section.
    pub rope_scaling: Option<Object<RawRope>>,
    /// 5.x section: base and scaling together; wins over `rope_scaling`.
    pub rope_parameters: Option<Object<RawRope>>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
}

/// A RoPE section: 4.x `rope_scaling` or 5.x `rope_parameters` (only the latter's
/// `rope_theta` is read).
///
/// For the factors the outer `Some` means the key is present: a present `null` factor
/// reads as 1.0, an absent one is an error for the rope types that need it.
#[derive(Debug, Deserialize)]
pub(super) struct RawRope {
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    pub factor: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub low_freq_factor: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub high_freq_factor: Option<Option<f64>>,
    pub original_max_position_embeddings: Option<i64>,
}

/// The singular `vision_feature_layer` in either of its meanings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum FeatureLayerKey {
    /// 5.x: the list of layers.
    List(Vec<i64>),
    /// LLaVA's single layer (the 7B hub file's stray key).
    Scalar(i64),
    /// Anything else: an error unless the plural key makes it irrelevant.
    Invalid(IgnoredAny),
}

/// A value of type `T`, or a note that the key held something else: for keys whose type
/// only matters when they are used.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Loose<T> {
    /// The expected type.
    Valid(T),
    /// Any other JSON value.
    Invalid(IgnoredAny),
}

impl<T: Copy> Loose<T> {
    /// The value, if it had the expected type.
    pub fn valid(&self) -> Option<T> {
        match self {
            Self::Valid(v) => Some(*v),
            Self::Invalid(_) => None,
        }
    }
}

/// A JSON object read as `T`. A plain derived struct would also accept a JSON list and
/// fill its fields by position; a config section must be an object.
#[derive(Debug)]
pub(super) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(ObjectVisitor(PhantomData))
            .map(Object)
    }
}

/// For `#[serde(default, deserialize_with = "present")]`: `Some` when the key is
/// present, holding `None` for `null`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}
