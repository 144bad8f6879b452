//! `vipllava info`: what a model directory holds, resolved from `config.json` alone, plus
//! weight-file facts when weights are present (headers only, no tensor data is read).

use std::path::Path;

use clap::Args;
use serde::Serialize;
use vipllava::convert::{Checkpoint, ConvertError, reconcile_config};
use vipllava::model::{FeatureLayerSource, VipLlavaConfig};

use crate::cli::args::ModelArgs;

/// Show a model's architecture, resolved from config.json (weights optional).
#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs the command.
pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = args.model.dir()?;
    let info = model_info(&dir).with_context(|| format!("reading model {}", dir.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info.render());
    }
    Ok(())
}

/// Facts about the weight files.
#[derive(Debug, Clone, Serialize)]
pub struct WeightsInfo {
    /// Detected key layout.
    pub layout: String,
    /// On-disk float dtypes (`F32`, `F16`, `BF16`).
    pub dtypes: Vec<String>,
    /// Number of safetensors files.
    pub files: usize,
    /// Number of tensors in them.
    pub tensors: usize,
}

/// The architecture of a model directory.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The resolved config.
    pub config: VipLlavaConfig,
    /// Parameter count as transformers' `num_parameters()` counts it.
    pub num_parameters: u64,
    /// Vision feature layers after resolution.
    pub vision_feature_layers: Vec<i64>,
    /// How they were resolved.
    pub vision_feature_layers_note: String,
    /// Vision encoder layers actually run.
    pub vision_layers_used: usize,
    /// Tokens one `<image>` expands to.
    pub image_tokens: usize,
    /// Weight files, when present.
    pub weights: Option<WeightsInfo>,
}

/// Reads a model directory's config and, if present, its weight headers.
pub fn model_info(dir: &Path) -> Result<ModelInfo, ConvertError> {
    let mut config = vipllava::convert::read_config(dir)?;
    let weights = match Checkpoint::open(dir) {
        Ok(checkpoint) => {
            let layout = reconcile_config(dir, &mut config, &checkpoint)?;
            Some(WeightsInfo {
                layout: layout.name().to_string(),
                dtypes: checkpoint
                    .float_dtypes()
                    .iter()
                    .map(|d| d.name().to_string())
                    .collect(),
                files: checkpoint.files.len(),
                tensors: checkpoint.tensors.len(),
            })
        }
        // A config-only directory is fine for `info`.
        Err(ConvertError::NoWeights { .. }) => None,
        Err(e) => return Err(e),
    };
    let note = match config.vision_feature_layers_source {
        FeatureLayerSource::PluralKey => "from `vision_feature_layers`".to_string(),
        FeatureLayerSource::SingularList => "from `vision_feature_layer` (transformers 5.x)".to_string(),
        FeatureLayerSource::StrayScalar(v) => format!(
            "VipLlava default: the file has only the stray LLaVA key `vision_feature_layer: {v}`, which transformers 4.x ignored{}",
            if weights.is_some() {
                " (confirmed by the projector width)"
            } else {
                ""
            }
        ),
        FeatureLayerSource::Default => "VipLlava default (no key in config.json)".to_string(),
    };
    Ok(ModelInfo {
        num_parameters: config.num_parameters(),
        vision_feature_layers: config.vision_feature_layers.clone(),
        vision_feature_layers_note: note,
        vision_layers_used: config.vision_layers_used(),
        image_tokens: config.image_seq_len(),
        weights,
        config,
    })
}

/// `1234567` -> `"1,234,567"`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl ModelInfo {
    /// Human-readable report.
    pub fn render(&self) -> String {
        let v = &self.config.vision;
        let t = &self.config.text;
        let mut s = String::new();
        let mut line = |k: &str, val: String| s.push_str(&format!("{k:<24}{val}\n"));
        line("architecture", "VipLlavaForConditionalGeneration".into());
        line("parameters", thousands(self.num_parameters));
        line(
            "vision tower",
            format!(
                "CLIP ViT: hidden {}, intermediate {}, {} layers ({} run), {} heads, {:?}",
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
                self.vision_layers_used,
                v.num_attention_heads,
                v.hidden_act
            ),
        );
        line(
            "image",
            format!(
                "{}x{} px, patch {}, {} image tokens per <image>",
                v.image_size, v.image_size, v.patch_size, self.image_tokens
            ),
        );
        line(
            "vision_feature_layers",
            format!(
                "{:?} ({})",
                self.vision_feature_layers, self.vision_feature_layers_note
            ),
        );
        line(
            "projector",
            format!(
                "LayerNorm({}) -> Linear({} -> {}) -> {:?} -> Linear({} -> {})",
                self.config.projector_input_width(),
                self.config.projector_input_width(),
                t.hidden_size,
                self.config.projector_hidden_act,
                t.hidden_size,
                t.hidden_size
            ),
        );
        line(
            "language model",
            format!(
                "Llama: hidden {}, intermediate {}, {} layers, {} heads, {} kv heads, head_dim {}",
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads,
                t.head_dim
            ),
        );
        line(
            "text details",
            format!(
                "vocab {}, max positions {}, rms eps {:e}, rope theta {} ({}), attention_bias {}, mlp_bias {}, tied lm_head {}",
                t.vocab_size,
                t.max_position_embeddings,
                t.rms_norm_eps,
                t.rope_theta,
                t.rope_scaling.name(),
                t.attention_bias,
                t.mlp_bias,
                t.tie_word_embeddings
            ),
        );
        line("image_token_index", self.config.image_token_index.to_string());
        match &self.weights {
            Some(w) => line(
                "weights",
                format!(
                    "{} layout, {} file(s), {} tensors, dtype {}",
                    w.layout,
                    w.files,
                    w.tensors,
                    w.dtypes.join("+")
                ),
            ),
            None => line("weights", "none (config only)".into()),
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(7_080_214_528), "7,080,214,528");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}
