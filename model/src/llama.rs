//! Llama decoder (HF `LlamaModel` + `lm_head`) with a KV cache.
//!
//! RoPE uses HF's half-split `rotate_half` convention (not Burn's interleaved
//! `RotaryEncoding`), GQA shares each key/value head among `heads / kv_heads` query heads,
//! and RMSNorm and softmax run in f32.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::config::{Activation, LlamaConfig, RopeScaling};
use crate::dispatch::{LinearForward, grouped_attention, project_each};
use crate::layers::{LlamaRmsNorm, ParamInit, activate_times, linear};

/// Attention projections of one decoder layer.
#[derive(Module, Debug)]
pub struct LlamaAttention {
    /// `[hidden, heads * head_dim]`.
    pub q_proj: Linear,
    /// `[hidden, kv_heads * head_dim]`.
    pub k_proj: Linear,
    /// `[hidden, kv_heads * head_dim]`.
    pub v_proj: Linear,
    /// `[heads * head_dim, hidden]`.
    pub o_proj: Linear,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
    /// Gate activation.
    #[module(skip)]
    pub act: Activation,
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    /// Attention.
    pub self_attn: LlamaAttention,
    /// MLP.
    pub mlp: LlamaMlp,
    /// Norm before attention.
    pub input_layernorm: LlamaRmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: LlamaRmsNorm,
}

/// The decoder stack (HF `LlamaModel`, path `language_model.*`).
#[derive(Module, Debug)]
pub struct LlamaModel {
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<LlamaDecoderLayer>,
    /// Final norm.
    pub norm: LlamaRmsNorm,
    /// RoPE settings.
    #[module(skip)]
    pub rope: Rope,
}

/// RoPE inverse frequencies and their scaling rule.
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: usize,
}

impl Rope {
    /// From the text config.
    pub fn new(config: &LlamaConfig) -> Self {
        Self {
            head_dim: config.head_dim,
            theta: config.rope_theta,
            scaling: config.rope_scaling.clone(),
            max_position_embeddings: config.max_position_embeddings,
        }
    }

    /// Inverse frequencies (`head_dim / 2` of them) for a forward pass whose largest
    /// position id is `max_position`.
    ///
    /// Dynamic NTK follows transformers' stateless reading of `dynamic_rope_update`: the
    /// base is recomputed from `max_position + 1` once it exceeds
    /// `max_position_embeddings`, and only then.
    pub fn inv_freq(&self, max_position: usize) -> Vec<f64> {
        let dim = self.head_dim as f64;
        let base_freq = |base: f64| -> Vec<f64> {
            (0..self.head_dim / 2)
                .map(|i| 1.0 / base.powf((2 * i) as f64 / dim))
                .collect()
        };
        match &self.scaling {
            RopeScaling::None => base_freq(self.theta),
            RopeScaling::Linear { factor } => base_freq(self.theta).into_iter().map(|f| f / factor).collect(),
            RopeScaling::Dynamic { factor } => {
                let max = self.max_position_embeddings as f64;
                let seq_len = (max_position + 1) as f64;
                if seq_len > max {
                    let base =
                        self.theta * ((factor * seq_len / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
                    base_freq(base)
                } else {
                    base_freq(self.theta)
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base_freq(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth =
                                (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// `cos` and `sin` of shape `[batch, 1, seq, head_dim]` for the given positions,
    /// computed in f32 like transformers (`inv_freq` is an f32 buffer there).
    pub fn cos_sin(&self, positions: &[Vec<i64>], device: &Device) -> (Tensor<4>, Tensor<4>) {
        let batch = positions.len();
        let seq = positions.first().map_or(0, Vec::len);
        let max_position = positions.iter().flatten().copied().max().unwrap_or(0).max(0) as usize;
        let inv: Vec<f32> = self
            .inv_freq(max_position)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let half = inv.len();
        let mut cos = Vec::with_capacity(batch * seq * half * 2);
        let mut sin = Vec::with_capacity(batch * seq * half * 2);
        for row in positions {
            for &p in row {
                // f32 product, as torch computes `inv_freq @ position_ids` in float32.
                let freqs: Vec<f32> = inv.iter().map(|&f| f * p as f32).collect();
                for _ in 0..2 {
                    cos.extend(freqs.iter().map(|x| x.cos()));
                    sin.extend(freqs.iter().map(|x| x.sin()));
                }
            }
        }
        let shape = [batch, 1, seq, half * 2];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// HF `rotate_half`: `[-x2, x1]` for the two halves of the last dimension.
fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// HF `apply_rotary_pos_emb` of `x [b, heads, t, d]`: one pass on the CPU
/// ([`crate::kernels::norm_rope::rope`]), the tensor operations of [`apply_rope_ops`]
/// elsewhere (the same bits).
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    crate::kernels::norm_rope::rope(&x, cos, sin).unwrap_or_else(|| apply_rope_ops(x, cos, sin))
}

/// `x * cos + rotate_half(x) * sin` with `cos` and `sin` cast to `x`'s dtype.
pub(crate) fn apply_rope_ops(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let dtype = x.dtype();
    let (cos, sin) = if dtype == DType::F32 {
        (cos.clone(), sin.clone())
    } else {
        (cos.clone().cast(dtype), sin.clone().cast(dtype))
    };
    x.clone() * cos + rotate_half(x) * sin
}

/// Inputs of one decoder forward pass besides the embeddings.
pub struct DecoderStep<'a> {
    /// Position ids `[batch][seq]` of the new tokens (for RoPE).
    pub positions: &'a [Vec<i64>],
    /// Optional padding mask over all positions (cached + new), `[batch][total]`, `true`
    /// where the position is a real token. `None` means no padding.
    pub key_mask: Option<&'a [Vec<bool>]>,
}

/// Causal + padding mask `[batch, 1, seq, total]` (`true` = masked) for new tokens that
/// start at absolute position `past`. Real queries never see padding; padding queries see
/// every earlier key so that no row is fully masked (a fully masked row would produce NaN
/// keys/values at pad positions, and NaN times a zero weight still poisons real rows).
fn padding_mask(key_mask: &[Vec<bool>], past: usize, seq: usize, device: &Device) -> Tensor<4, Bool> {
    let batch = key_mask.len();
    let total = past + seq;
    let mut data = Vec::with_capacity(batch * seq * total);
    for row in key_mask {
        for i in 0..seq {
            let q = past + i;
            let query_real = row.get(q).copied().unwrap_or(true);
            for j in 0..total {
                let key_real = row.get(j).copied().unwrap_or(true);
                data.push(j > q || (query_real && !key_real));
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [batch, 1, seq, total]), device)
}

impl LlamaModel {
    /// Builds the decoder (lazily initialised parameters).
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        Self::with_init(config, ParamInit::Placeholder, device)
    }

    /// [`LlamaModel::new`] with the given parameter fill.
    pub fn with_init(config: &LlamaConfig, init: ParamInit, device: &Device) -> Self {
        let h = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim;
        let kv = config.num_key_value_heads * config.head_dim;
        let layers = (0..config.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: linear(h, q, config.attention_bias, init, device),
                    k_proj: linear(h, kv, config.attention_bias, init, device),
                    v_proj: linear(h, kv, config.attention_bias, init, device),
                    o_proj: linear(q, h, config.attention_bias, init, device),
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                mlp: LlamaMlp {
                    gate_proj: linear(h, config.intermediate_size, config.mlp_bias, init, device),
                    up_proj: linear(h, config.intermediate_size, config.mlp_bias, init, device),
                    down_proj: linear(config.intermediate_size, h, config.mlp_bias, init, device),
                    act: config.hidden_act,
                },
                input_layernorm: LlamaRmsNorm::new(h, config.rms_norm_eps, device),
                post_attention_layernorm: LlamaRmsNorm::new(h, config.rms_norm_eps, device),
            })
            .collect();
        Self {
            embed_tokens: EmbeddingConfig::new(config.vocab_size, h)
                .with_initializer(init.weights())
                .init(device),
            layers,
            norm: LlamaRmsNorm::new(h, config.rms_norm_eps, device),
            rope: Rope::new(config),
        }
    }

    /// Token embeddings for `[batch, seq]` ids.
    pub fn embed(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.embed_tokens.forward(input_ids)
    }

    /// Runs the decoder over new embeddings `[batch, seq, hidden]`, appending to `cache`;
    /// returns the final-normed hidden states `[batch, seq, hidden]`.
    pub fn forward(&self, embeds: Tensor<3>, step: &DecoderStep<'_>, cache: &mut KvCache) -> Tensor<3> {
        let device = embeds.device();
        let (cos, sin) = self.rope.cos_sin(step.positions, &device);
        let mut h = embeds;
        let seq = h.dims()[1];
        let mask = step.key_mask.map(|m| padding_mask(m, cache.len(), seq, &device));
        for (i, layer) in self.layers.iter().enumerate() {
            let context = LayerContext {
                index: i,
                cos: &cos,
                sin: &sin,
                mask: mask.clone(),
            };
            h = layer.forward(h, context, cache);
        }
        cache.advance(seq);
        self.norm.forward(h)
    }
}

/// What every decoder layer of one forward call shares besides its input.
struct LayerContext<'a> {
    /// The layer's index (its slot in the KV cache).
    index: usize,
    /// RoPE cosines and sines for the new positions.
    cos: &'a Tensor<4>,
    sin: &'a Tensor<4>,
    /// Causal + padding mask, when rows are padded.
    mask: Option<Tensor<4, Bool>>,
}

impl LlamaDecoderLayer {
    fn forward(&self, x: Tensor<3>, context: LayerContext<'_>, cache: &mut KvCache) -> Tensor<3> {
        let a = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), context, cache);
        let h = crate::kernels::residual::add(x, a);
        let n = self.post_attention_layernorm.forward(h.clone());
        crate::kernels::residual::add(h, self.mlp.forward(n))
    }
}

impl LlamaMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [gate, up] = project_each([&self.gate_proj, &self.up_proj], x);
        self.down_proj.project(activate_times(self.act, gate, up))
    }
}

impl LlamaAttention {
    fn forward(&self, x: Tensor<3>, context: LayerContext<'_>, cache: &mut KvCache) -> Tensor<3> {
        let LayerContext {
            index,
            cos,
            sin,
            mask,
        } = context;
        let [b, t, _] = x.dims();
        let hd = self.head_dim;
        let [q, k, v] = project_each([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let q = q.reshape([b, t, self.num_heads, hd]).swap_dims(1, 2);
        let k = k.reshape([b, t, self.num_kv_heads, hd]).swap_dims(1, 2);
        let v = v.reshape([b, t, self.num_kv_heads, hd]).swap_dims(1, 2);
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);
        let (k, v) = cache.append(index, k, v);
        // With padding the explicit mask already holds the causal part.
        let options = AttentionModuleOptions {
            is_causal: mask.is_none(),
            ..Default::default()
        };
        let out = grouped_attention(q, k, v, mask, options);
        self.o_proj
            .project(out.swap_dims(1, 2).reshape([b, t, self.num_heads * hd]))
    }
}
