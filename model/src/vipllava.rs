//! The full VipLlava model: vision tower, multi-modal projector, Llama, and the merge of
//! image features into the token embeddings.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::clip::ClipVisionTower;
use crate::config::{Activation, VipLlavaConfig};
use crate::dispatch::{LinearForward, project_transposed};
use crate::input::{ForwardInput, LogitsMode};
use crate::layers::{ParamInit, activate, layer_norm_f32, linear};
use crate::llama::{DecoderStep, LlamaModel};

pub use crate::error::ForwardError;

/// LayerNorm -> Linear -> activation -> Linear over the concatenated vision states.
#[derive(Module, Debug)]
pub struct VipLlavaProjector {
    /// Norm over `layers x vision hidden` channels.
    pub projector_layernorm: LayerNorm,
    /// To the text hidden size.
    pub linear_1: Linear,
    /// Text hidden to text hidden.
    pub linear_2: Linear,
    /// Activation between the linears.
    #[module(skip)]
    pub act: Activation,
    /// `projector_layernorm`'s epsilon (Burn keeps a `LayerNorm`'s private).
    #[module(skip)]
    pub layernorm_eps: f64,
}

impl VipLlavaProjector {
    /// `[B, P, layers x vision hidden]` to `[B, P, text hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self
            .linear_1
            .project(layer_norm_f32(&self.projector_layernorm, self.layernorm_eps, x));
        self.linear_2.project(activate(self.act, h))
    }
}

/// `VipLlavaForConditionalGeneration` in Burn. Module paths follow HF names
/// (`vision_tower.*`, `multi_modal_projector.*`, `language_model.*`, `lm_head.*`) so
/// checkpoints map one to one.
#[derive(Module, Debug)]
pub struct VipLlava {
    /// CLIP tower (truncated to the layers used).
    pub vision_tower: ClipVisionTower,
    /// Projector.
    pub multi_modal_projector: VipLlavaProjector,
    /// Decoder.
    pub language_model: LlamaModel,
    /// Output head; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    /// Image token id.
    pub image_token_index: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Resolved, non-negative vision hidden-state indices, in projector order.
    pub feature_indices: Vec<usize>,
}

impl VipLlava {
    /// Builds the model from a resolved config with lazily initialised placeholder (zero)
    /// parameters; load weights with `vipllava-convert`.
    pub fn new(config: &VipLlavaConfig, device: &Device) -> Self {
        Self::with_init(config, ParamInit::Placeholder, device)
    }

    /// A model with random Normal(0, 0.02) weights (benchmarks without a checkpoint).
    pub fn new_random(config: &VipLlavaConfig, device: &Device) -> Self {
        Self::with_init(config, ParamInit::Random, device)
    }

    /// Builds the model with the given parameter fill (lazily initialised).
    pub fn with_init(config: &VipLlavaConfig, init: ParamInit, device: &Device) -> Self {
        let t = &config.text;
        let width = config.projector_input_width();
        Self {
            vision_tower: ClipVisionTower::with_init(
                &config.vision,
                config.vision_layers_used(),
                init,
                device,
            ),
            multi_modal_projector: VipLlavaProjector {
                projector_layernorm: LayerNormConfig::new(width)
                    .with_epsilon(config.projector_layernorm_eps)
                    .init(device),
                linear_1: linear(width, t.hidden_size, true, init, device),
                linear_2: linear(t.hidden_size, t.hidden_size, true, init, device),
                act: config.projector_hidden_act,
                layernorm_eps: config.projector_layernorm_eps,
            },
            language_model: LlamaModel::with_init(t, init, device),
            lm_head: (!t.tie_word_embeddings)
                .then(|| linear(t.hidden_size, t.vocab_size, false, init, device)),
            image_token_index: config.image_token_index,
            vocab_size: t.vocab_size,
            feature_indices: config.resolved_feature_indices(),
        }
    }

    /// The selected vision hidden states (CLS included), in config order.
    pub fn vision_hidden_states(&self, pixel_values: Tensor<4>) -> Result<Vec<Tensor<3>>, ForwardError> {
        self.check_pixels(&pixel_values)?;
        // Activations follow the weights' dtype (pixels come in as f32).
        let dtype = self.vision_tower.embeddings.patch_embedding.weight.val().dtype();
        let pixel_values = if pixel_values.dtype() == dtype {
            pixel_values
        } else {
            pixel_values.cast(dtype)
        };
        let built = self.vision_tower.encoder.layers.len();
        self.vision_tower
            .hidden_states(pixel_values, &self.feature_indices)
            .ok_or_else(|| {
                ForwardError::BadInput(format!(
                    "vision feature layers {:?} need more than the {built} encoder layers built",
                    self.feature_indices
                ))
            })
    }

    /// Projected image features `[images, patches, text hidden]` (HF `get_image_features`).
    pub fn image_features(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>, ForwardError> {
        let states = self.vision_hidden_states(pixel_values)?;
        let without_cls: Vec<Tensor<3>> = states
            .into_iter()
            .map(|s| {
                let [b, t, d] = s.dims();
                s.slice([0..b, 1..t, 0..d])
            })
            .collect();
        Ok(self.multi_modal_projector.forward(Tensor::cat(without_cls, 2)))
    }

    fn check_pixels(&self, pixel_values: &Tensor<4>) -> Result<(), ForwardError> {
        let dims = pixel_values.dims();
        let channels = self.vision_tower.embeddings.patch_embedding.weight.dims()[1];
        let size = self.vision_tower.image_size;
        if dims[1] != channels || dims[2] != size || dims[3] != size || dims[0] == 0 {
            return Err(ForwardError::PixelShape {
                channels,
                size,
                found: dims.to_vec(),
            });
        }
        Ok(())
    }

    /// Checks host token ids against the vocabulary and returns the flat (row-major)
    /// positions of the image tokens among them.
    pub fn image_token_positions(&self, ids: &[i64]) -> Result<Vec<usize>, ForwardError> {
        let mut positions = Vec::new();
        for (position, &id) in ids.iter().enumerate() {
            if id < 0 || id as usize >= self.vocab_size {
                return Err(ForwardError::TokenOutOfVocab {
                    id,
                    position,
                    vocab_size: self.vocab_size,
                });
            }
            if id == self.image_token_index as i64 {
                positions.push(position);
            }
        }
        Ok(positions)
    }

    /// Token embeddings with image features written at `image_positions` (flat, from
    /// [`VipLlava::image_token_positions`]), in row-major order (batch, then sequence), as
    /// transformers' `masked_scatter`.
    pub fn merged_embeddings(
        &self,
        input_ids: Tensor<2, Int>,
        image_positions: &[usize],
        image_features: Option<Tensor<3>>,
    ) -> Result<Tensor<3>, ForwardError> {
        let [b, t] = input_ids.dims();
        if let Some(&pos) = image_positions.iter().find(|&&p| p >= b * t) {
            return Err(ForwardError::BadInput(format!(
                "image position {pos} is outside the {b} x {t} input"
            )));
        }
        let embeds = self.language_model.embed(input_ids);
        let (images, per_image, d) = match &image_features {
            Some(f) => {
                let [n, p, d] = f.dims();
                (n, p, d)
            }
            None => (0, 0, 0),
        };
        if image_positions.len() != images * per_image {
            return Err(ForwardError::ImageTokenMismatch {
                tokens: image_positions.len(),
                features: images * per_image,
                images,
                per_image,
            });
        }
        let Some(features) = image_features.filter(|_| !image_positions.is_empty()) else {
            return Ok(embeds);
        };
        let device = embeds.device();
        let hidden = embeds.dims()[2];
        let flat = embeds.reshape([b * t, hidden]);
        let feats = features.reshape([images * per_image, d]);
        // Gather from [text rows; feature rows]: image positions take the next feature.
        let mut index: Vec<i64> = (0..(b * t) as i64).collect();
        for (k, &pos) in image_positions.iter().enumerate() {
            index[pos] = (b * t + k) as i64;
        }
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [b * t]), &device);
        Ok(Tensor::cat(vec![flat, feats], 0)
            .select(0, index)
            .reshape([b, t, hidden]))
    }

    /// Logits from final hidden states.
    pub fn lm_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.project(hidden),
            // `[vocab, hidden]`: the embedding matrix read as a transposed `Linear`.
            None => project_transposed(hidden, self.language_model.embed_tokens.weight.val()),
        }
    }

    /// One forward pass over new tokens, appending to `cache`. On the prefill pass give
    /// the pixel values; decode steps pass ids only.
    pub fn forward(&self, input: ForwardInput, cache: &mut KvCache) -> Result<Tensor<3>, ForwardError> {
        let [b, t] = input.input_ids.dims();
        if b == 0 || t == 0 {
            return Err(ForwardError::BadInput("empty input_ids".into()));
        }
        let features = match input.pixel_values {
            Some(p) => Some(self.image_features(p)?),
            None => None,
        };
        let image_positions = match &input.host_ids {
            Some(ids) if ids.len() == b * t => self.image_token_positions(ids)?,
            Some(ids) => {
                return Err(ForwardError::BadInput(format!(
                    "host_ids hold {} ids, input_ids {b} x {t}",
                    ids.len()
                )));
            }
            // Ids only on the device: one read-back (a sync on GPU backends).
            None => self.image_token_positions(&device_ids(&input.input_ids)?)?,
        };
        let embeds = self.merged_embeddings(input.input_ids, &image_positions, features)?;
        let positions = match input.positions {
            Some(p) => {
                if p.len() != b || p.iter().any(|r| r.len() != t) {
                    return Err(ForwardError::BadInput(format!("positions must be [{b}][{t}]")));
                }
                p
            }
            None => {
                let start = cache.len() as i64;
                vec![(start..start + t as i64).collect(); b]
            }
        };
        if let Some(mask) = &input.key_mask {
            let total = cache.len() + t;
            if mask.len() != b || mask.iter().any(|r| r.len() != total) {
                return Err(ForwardError::BadInput(format!("key mask must be [{b}][{total}]")));
            }
        }
        let step = DecoderStep {
            positions: &positions,
            key_mask: input.key_mask.as_deref(),
        };
        let hidden = self.language_model.forward(embeds, &step, cache);
        let hidden = match input.logits {
            LogitsMode::All => hidden,
            LogitsMode::LastOnly => {
                let d = hidden.dims()[2];
                hidden.slice([0..b, t - 1..t, 0..d])
            }
        };
        Ok(self.lm_logits(hidden))
    }
}

/// The ids of a device tensor, read back to the host.
fn device_ids(input_ids: &Tensor<2, Int>) -> Result<Vec<i64>, ForwardError> {
    input_ids
        .to_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| ForwardError::BadInput(format!("{e:?}")))
}
