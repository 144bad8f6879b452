//! CLIP ViT vision tower, returning the hidden states VipLlava selects.
//!
//! `hidden_states[0]` is the output of `pre_layrnorm` and `hidden_states[i]` the output
//! of encoder layer `i` (HF numbering, 25 entries for 24 layers). Layers deeper than the
//! deepest selected state are neither built nor run, and `post_layernorm` is never used.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

use crate::config::{Activation, ClipVisionConfig};
use crate::dispatch::{LinearForward, project_each};
use crate::kernels;
use crate::layers::{ParamInit, activate, layer_norm_f32, linear};

/// Patch convolution, CLS token and learned position embeddings.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings {
    /// `[hidden, channels, patch, patch]`, no bias.
    pub patch_embedding: Conv2d,
    /// `[hidden]`, prepended to the patch sequence.
    pub class_embedding: Param<Tensor<1>>,
    /// `[num_patches + 1, hidden]`.
    pub position_embedding: Embedding,
}

/// CLIP self-attention (q/k/v/out with bias, no mask).
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    /// Heads.
    pub num_heads: usize,
}

/// CLIP MLP: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp {
    /// Up projection.
    pub fc1: Linear,
    /// Down projection.
    pub fc2: Linear,
    /// Activation between them.
    #[module(skip)]
    pub act: Activation,
}

/// One pre-norm encoder layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    /// Attention block.
    pub self_attn: ClipAttention,
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// MLP block.
    pub mlp: ClipMlp,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
    /// Both norms' epsilon (Burn keeps a `LayerNorm`'s private).
    #[module(skip)]
    pub layer_norm_eps: f64,
}

/// The encoder's layer stack (HF path `encoder.layers.N`).
#[derive(Module, Debug)]
pub struct ClipEncoder {
    /// The layers that are run (up to the deepest selected hidden state).
    pub layers: Vec<ClipEncoderLayer>,
}

/// The CLIP vision tower, truncated to the layers VipLlava uses.
#[derive(Module, Debug)]
pub struct ClipVisionTower {
    /// Stem.
    pub embeddings: ClipVisionEmbeddings,
    /// Norm applied before the encoder (its output is `hidden_states[0]`).
    pub pre_layrnorm: LayerNorm,
    /// Encoder layers.
    pub encoder: ClipEncoder,
    /// Patch size of the stem, for input checks.
    pub patch_size: usize,
    /// Expected input side length.
    pub image_size: usize,
    /// `pre_layrnorm`'s epsilon (Burn keeps a `LayerNorm`'s private).
    #[module(skip)]
    pub layer_norm_eps: f64,
}

impl ClipVisionTower {
    /// Builds a tower with `layers_used` encoder layers (lazily initialised parameters).
    pub fn new(config: &ClipVisionConfig, layers_used: usize, device: &Device) -> Self {
        Self::with_init(config, layers_used, ParamInit::Placeholder, device)
    }

    /// [`ClipVisionTower::new`] with the given parameter fill.
    pub fn with_init(
        config: &ClipVisionConfig,
        layers_used: usize,
        init: ParamInit,
        device: &Device,
    ) -> Self {
        let d = config.hidden_size;
        let ln = |device: &Device| {
            LayerNormConfig::new(d)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let embeddings = ClipVisionEmbeddings {
            patch_embedding: Conv2dConfig::new(
                [config.num_channels, d],
                [config.patch_size, config.patch_size],
            )
            .with_stride([config.patch_size, config.patch_size])
            .with_bias(false)
            .with_initializer(init.weights())
            .init(device),
            class_embedding: init.weights().init([d], device),
            position_embedding: EmbeddingConfig::new(config.num_patches() + 1, d)
                .with_initializer(init.weights())
                .init(device),
        };
        let layers = (0..layers_used)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: linear(d, d, true, init, device),
                    k_proj: linear(d, d, true, init, device),
                    v_proj: linear(d, d, true, init, device),
                    out_proj: linear(d, d, true, init, device),
                    num_heads: config.num_attention_heads,
                },
                layer_norm1: ln(device),
                mlp: ClipMlp {
                    fc1: linear(d, config.intermediate_size, true, init, device),
                    fc2: linear(config.intermediate_size, d, true, init, device),
                    act: config.hidden_act,
                },
                layer_norm2: ln(device),
                layer_norm_eps: config.layer_norm_eps,
            })
            .collect();
        Self {
            embeddings,
            pre_layrnorm: ln(device),
            encoder: ClipEncoder { layers },
            patch_size: config.patch_size,
            image_size: config.image_size,
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// Runs the tower and returns `hidden_states[i]` for each requested index, in the
    /// order requested, each `[batch, num_patches + 1, hidden]` (CLS included).
    ///
    /// `None` if an index is deeper than the layers built.
    pub fn hidden_states(&self, pixel_values: Tensor<4>, indices: &[usize]) -> Option<Vec<Tensor<3>>> {
        let deepest = indices.iter().copied().max().unwrap_or(0);
        let mut h = layer_norm_f32(
            &self.pre_layrnorm,
            self.layer_norm_eps,
            self.embeddings.forward(pixel_values),
        );
        let mut states: Vec<Option<Tensor<3>>> = vec![None; deepest + 1];
        states[0] = Some(h.clone());
        for (i, layer) in self.encoder.layers.iter().take(deepest).enumerate() {
            h = layer.forward(h);
            if indices.contains(&(i + 1)) {
                states[i + 1] = Some(h.clone());
            }
        }
        if deepest > self.encoder.layers.len() {
            return None;
        }
        indices.iter().map(|&i| states[i].clone()).collect()
    }
}

impl ClipVisionEmbeddings {
    /// `[B, C, H, W]` pixels to `[B, patches + 1, hidden]` embeddings.
    pub fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let patches = self.patch_embedding.forward(pixel_values); // [B, D, h, w]
        let [b, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2); // [B, P, D]
        let cls = self.class_embedding.val().reshape([1, 1, d]).expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1);
        let pos = self.position_embedding.weight.val().unsqueeze::<3>();
        x + pos
    }
}

impl ClipAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let hd = d / self.num_heads;
        let split = |y: Tensor<3>| y.reshape([b, t, self.num_heads, hd]).swap_dims(1, 2);
        let [q, k, v] = project_each([&self.q_proj, &self.k_proj, &self.v_proj], x).map(split);
        let options = AttentionModuleOptions::default();
        let fast = kernels::fast_paths_enabled()
            .then(|| kernels::attention::prefill_attention(&q, &k, &v, None, &options))
            .flatten();
        let out = fast.unwrap_or_else(|| attention(q, k, v, None, None, options));
        self.out_proj.project(out.swap_dims(1, 2).reshape([b, t, d]))
    }
}

impl ClipMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.project(activate(self.act, self.fc1.project(x)))
    }
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let a = self
            .self_attn
            .forward(layer_norm_f32(&self.layer_norm1, self.layer_norm_eps, x.clone()));
        let h = kernels::residual::add(x, a);
        let m = self
            .mlp
            .forward(layer_norm_f32(&self.layer_norm2, self.layer_norm_eps, h.clone()));
        kernels::residual::add(h, m)
    }
}
