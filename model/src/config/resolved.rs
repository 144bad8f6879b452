//! The resolved configuration types the model is built from, and the sizes derived
//! from them.

use serde::{Deserialize, Serialize};

use crate::precision::Precision;

use super::{Activation, ConfigError, FeatureLayerSource, FeatureSelectStrategy, RopeScaling};

/// The CLIP vision tower configuration (resolved, with transformers' defaults applied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers in the checkpoint.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input resolution (square).
    pub image_size: usize,
    /// Patch size of the convolutional stem.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches per image (without the CLS token).
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The CLIP ViT-L/14-336 tower VipLlava uses when `vision_config` is absent.
    pub fn vipllava_default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// The Llama text model configuration (resolved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (may differ from hidden / heads).
    pub head_dim: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Bias on q/k/v/o projections.
    pub attention_bias: bool,
    /// Bias on gate/up/down projections.
    pub mlp_bias: bool,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

/// The resolved VipLlava configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipLlavaConfig {
    /// Vision tower.
    pub vision: ClipVisionConfig,
    /// Language model.
    pub text: LlamaConfig,
    /// Token id that `<image>` placeholders carry (32000 in the hub checkpoints).
    pub image_token_index: usize,
    /// Padding token id, if set.
    pub pad_token_id: Option<i64>,
    /// Activation between the projector's two linears.
    pub projector_hidden_act: Activation,
    /// Epsilon of the projector's layernorm.
    pub projector_layernorm_eps: f64,
    /// Vision hidden states fed to the projector, in order (negative counts from the end).
    pub vision_feature_layers: Vec<i64>,
    /// Which config key the layers were resolved from.
    pub vision_feature_layers_source: FeatureLayerSource,
    /// `vision_feature_select_strategy` (only the image-token count depends on it; the
    /// projector always drops CLS).
    pub vision_feature_select_strategy: FeatureSelectStrategy,
    /// dtype the checkpoint declares (`torch_dtype` or `dtype`), informational.
    pub declared_dtype: Option<String>,
}

impl VipLlavaConfig {
    pub(super) fn check_feature_layers(&self) -> Result<(), ConfigError> {
        if self.vision_feature_layers.is_empty() {
            return Err(ConfigError::NoFeatureLayers);
        }
        let num_states = self.vision.num_hidden_layers + 1;
        for &layer in &self.vision_feature_layers {
            let ok = if layer < 0 {
                layer.unsigned_abs() as usize <= num_states
            } else {
                (layer as usize) < num_states
            };
            if !ok {
                return Err(ConfigError::FeatureLayerOutOfRange { layer, num_states });
            }
        }
        Ok(())
    }

    /// The selected hidden-state indices, made non-negative (0 = output of `pre_layrnorm`).
    pub fn resolved_feature_indices(&self) -> Vec<usize> {
        let num_states = (self.vision.num_hidden_layers + 1) as i64;
        self.vision_feature_layers
            .iter()
            .map(|&l| {
                if l < 0 {
                    (num_states + l) as usize
                } else {
                    l as usize
                }
            })
            .collect()
    }

    /// Encoder layers that must run: up to the deepest selected hidden state.
    pub fn vision_layers_used(&self) -> usize {
        self.resolved_feature_indices().into_iter().max().unwrap_or(0)
    }

    /// Input width of the projector: selected layers x vision hidden size.
    pub fn projector_input_width(&self) -> usize {
        self.vision_feature_layers.len() * self.vision.hidden_size
    }

    /// Checks (and, for the stray scalar key, decides) the feature layers against the
    /// projector layernorm width found in the weights.
    pub fn reconcile_projector_width(&mut self, found: usize) -> Result<(), ConfigError> {
        if let FeatureLayerSource::StrayScalar(scalar) = self.vision_feature_layers_source
            && found == self.vision.hidden_size
        {
            // A one-layer projector: the scalar meant what it says (5.x single layer).
            self.vision_feature_layers = vec![scalar];
            self.check_feature_layers()?;
        }
        let expected = self.projector_input_width();
        if expected != found {
            return Err(ConfigError::ProjectorWidthMismatch {
                layers: self.vision_feature_layers.clone(),
                num_layers: self.vision_feature_layers.len(),
                hidden: self.vision.hidden_size,
                expected,
                found,
            });
        }
        Ok(())
    }

    /// The declared dtype as a [`Precision`] (`None` when absent or not f32/f16/bf16,
    /// e.g. `auto`).
    pub fn declared_precision(&self) -> Option<Precision> {
        self.declared_dtype.as_deref()?.parse().ok()
    }

    /// `<image>` expands to this many tokens (`(image/patch)^2 + 1 - 1` for the
    /// `default` strategy, one more for `full`).
    pub fn image_seq_len(&self) -> usize {
        self.vision.num_patches() + self.vision_feature_select_strategy.extra_tokens()
    }

    /// Parameter count exactly as transformers' `model.num_parameters()` counts it: every
    /// vision layer and `post_layernorm` included (they exist in the module even though the
    /// forward pass never uses them), a tied `lm_head` counted once.
    pub fn num_parameters(&self) -> u64 {
        let v = &self.vision;
        let (d, i) = (v.hidden_size as u64, v.intermediate_size as u64);
        let patches = v.num_patches() as u64;
        let embeddings = (v.num_channels * v.patch_size * v.patch_size) as u64 * d + d + (patches + 1) * d;
        let layer = 4 * (d * d + d) + 2 * (2 * d) + (d * i + i) + (i * d + d);
        let vision = embeddings + 2 * d /* pre */ + v.num_hidden_layers as u64 * layer + 2 * d /* post */;

        let t = &self.text;
        let (h, m, vocab) = (
            t.hidden_size as u64,
            t.intermediate_size as u64,
            t.vocab_size as u64,
        );
        let q = (t.num_attention_heads * t.head_dim) as u64;
        let kv = (t.num_key_value_heads * t.head_dim) as u64;
        let attn_bias = if t.attention_bias { q + 2 * kv + h } else { 0 };
        let mlp_bias = if t.mlp_bias { 2 * m + h } else { 0 };
        let text_layer = h * q + 2 * h * kv + q * h + attn_bias + 3 * h * m + mlp_bias + 2 * h;
        let lm_head = if t.tie_word_embeddings { 0 } else { vocab * h };
        let text = vocab * h + t.num_hidden_layers as u64 * text_layer + h + lm_head;

        let w = self.projector_input_width() as u64;
        let projector = 2 * w + (w * h + h) + (h * h + h);
        vision + projector + text
    }
}
