//! `LlavaProcessor`'s image-token settings (`processor_config.json`): how many times
//! `<image>` is repeated for one image.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{TextError, read_raw};
use crate::json::LenientString;

/// Which vision features the projector receives, and so how many image tokens one image
/// needs (`vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VisionFeatureSelectStrategy {
    /// `"default"`: the CLS feature is dropped, one token fewer per image.
    #[default]
    Default,
    /// `"full"`: every feature, CLS included.
    Full,
}

impl VisionFeatureSelectStrategy {
    /// The name as HF configs spell it (`default`, `full`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Full => "full",
        }
    }
}

impl FromStr for VisionFeatureSelectStrategy {
    type Err = TextError;

    /// `default` or `full` (exactly, as transformers compares them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(Self::Default),
            "full" => Ok(Self::Full),
            other => Err(TextError::UnknownStrategy {
                value: other.to_string(),
                path: None,
            }),
        }
    }
}

impl fmt::Display for VisionFeatureSelectStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `processor_config.json` settings of `LlavaProcessor` that decide the image-token count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageTokenConfig {
    /// The placeholder text (`<image>`).
    pub image_token: String,
    /// Vision patch size.
    pub patch_size: usize,
    /// Extra tokens per image (the CLS token: 1 in the llava-hf repos).
    pub num_additional_image_tokens: usize,
    /// `default` drops the CLS token from the count, `full` keeps it.
    pub vision_feature_select_strategy: VisionFeatureSelectStrategy,
}

/// The keys of `processor_config.json` read here (hub 4.x and 5.x both keep them at its
/// top level; 5.x also nests the image processor there, read by the image module).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawProcessorConfig {
    image_token: Option<LenientString>,
    patch_size: Option<u64>,
    num_additional_image_tokens: Option<u64>,
    vision_feature_select_strategy: Option<LenientString>,
}

impl ImageTokenConfig {
    /// Reads `processor_config.json` (hub 4.x and 5.x both keep these keys at its top
    /// level); absent values fall back to the model's vision config (`patch_size`,
    /// strategy) and one additional token, which is what the llava-hf repos publish.
    ///
    /// A strategy other than `default` / `full` (in the file, or the fallback when the
    /// file has none) is a [`TextError::UnknownStrategy`].
    pub fn from_model_dir(
        dir: &Path,
        fallback_patch_size: usize,
        fallback_strategy: &str,
    ) -> Result<Self, TextError> {
        let path = dir.join("processor_config.json");
        let raw: RawProcessorConfig = read_raw(&path)?;
        let patch_size = raw.patch_size.map_or(fallback_patch_size, |n| n as usize);
        if patch_size == 0 {
            return Err(TextError::BadField {
                path,
                field: "patch_size".into(),
                problem: "must be positive".into(),
            });
        }
        let strategy = match raw
            .vision_feature_select_strategy
            .as_ref()
            .and_then(LenientString::as_str)
        {
            Some(s) => s.parse().map_err(|_| TextError::UnknownStrategy {
                value: s.to_string(),
                path: Some(path.clone()),
            })?,
            None => fallback_strategy.parse()?,
        };
        Ok(Self {
            image_token: raw
                .image_token
                .as_ref()
                .and_then(LenientString::as_str)
                .unwrap_or("<image>")
                .to_string(),
            patch_size,
            num_additional_image_tokens: raw.num_additional_image_tokens.map_or(1, |n| n as usize),
            vision_feature_select_strategy: strategy,
        })
    }

    /// Tokens one image of `height x width` pixels (after crop) expands to:
    /// `(h / patch) * (w / patch) + additional - (1 if strategy == "default")`.
    pub fn image_seq_len(&self, height: usize, width: usize) -> usize {
        let n = (height / self.patch_size) * (width / self.patch_size) + self.num_additional_image_tokens;
        match self.vision_feature_select_strategy {
            VisionFeatureSelectStrategy::Default => n.saturating_sub(1),
            VisionFeatureSelectStrategy::Full => n,
        }
    }

    /// [`ImageTokenConfig::image_seq_len`] checked against the vision tower: the processed
    /// image must be its input size and expand to exactly as many tokens as it yields
    /// features. The one place where processor and model settings are reconciled (the
    /// pipeline at load and per image, the fine-tuning data encoder).
    pub fn checked_seq_len(
        &self,
        height: usize,
        width: usize,
        vision: VisionInput,
    ) -> Result<usize, TextError> {
        let tokens = self.image_seq_len(height, width);
        if tokens != vision.features || height != vision.image_size || width != vision.image_size {
            return Err(TextError::ImageFeatureMismatch {
                tokens,
                features: vision.features,
                height,
                width,
            });
        }
        Ok(tokens)
    }

    /// Replaces each `<image>` with `seq_len` copies, checking there is exactly one tag
    /// per image.
    pub fn expand(&self, prompt: &str, num_images: usize, seq_len: usize) -> Result<String, TextError> {
        let tags = prompt.matches(&self.image_token).count();
        if tags != num_images {
            return Err(TextError::ImageTagMismatch {
                tags,
                images: num_images,
                token: self.image_token.clone(),
            });
        }
        Ok(prompt.replace(&self.image_token, &self.image_token.repeat(seq_len)))
    }
}

/// What the vision tower takes and yields per image (from the model's config), for
/// [`ImageTokenConfig::checked_seq_len`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionInput {
    /// Side of the square input image, in pixels.
    pub image_size: usize,
    /// Feature vectors per image after the feature-select strategy.
    pub features: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_counts_and_checks_tags() {
        let cfg = ImageTokenConfig {
            image_token: "<image>".into(),
            patch_size: 14,
            num_additional_image_tokens: 1,
            vision_feature_select_strategy: VisionFeatureSelectStrategy::Default,
        };
        assert_eq!(cfg.image_seq_len(336, 336), 576);
        let vision = VisionInput {
            image_size: 336,
            features: 576,
        };
        assert_eq!(cfg.checked_seq_len(336, 336, vision).unwrap(), 576);
        let e = cfg
            .checked_seq_len(
                336,
                336,
                VisionInput {
                    features: 577,
                    ..vision
                },
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("576 image tokens per image (336x336 px) but the vision tower yields 577"),
            "{e}"
        );
        // 340 px gives the same patch count but is not the tower's input size.
        assert!(cfg.checked_seq_len(340, 340, vision).is_err());
        assert_eq!(
            cfg.expand("a <image> b", 1, 3).unwrap(),
            "a <image><image><image> b"
        );
        let e = cfg.expand("no tag", 1, 3).unwrap_err();
        assert!(e.to_string().contains("0 `<image>` tag(s) but 1 image(s)"), "{e}");
        let e = cfg.expand("<image><image>", 1, 3).unwrap_err();
        assert!(matches!(
            e,
            TextError::ImageTagMismatch {
                tags: 2,
                images: 1,
                ..
            }
        ));
    }

    #[test]
    fn strategies_parse_and_print() {
        for s in [
            VisionFeatureSelectStrategy::Default,
            VisionFeatureSelectStrategy::Full,
        ] {
            assert_eq!(s.to_string().parse::<VisionFeatureSelectStrategy>().unwrap(), s);
        }
        let e = "Default".parse::<VisionFeatureSelectStrategy>().unwrap_err();
        assert!(e.to_string().contains("vision_feature_select_strategy"), "{e}");
        let full = ImageTokenConfig {
            image_token: "<image>".into(),
            patch_size: 14,
            num_additional_image_tokens: 1,
            vision_feature_select_strategy: VisionFeatureSelectStrategy::Full,
        };
        assert_eq!(full.image_seq_len(336, 336), 577);
        assert_eq!(
            serde_json::to_value(&full).unwrap()["vision_feature_select_strategy"],
            "full"
        );
    }

    #[test]
    fn strategy_comes_from_the_file_or_the_fallback() {
        let dir = std::env::temp_dir().join(format!("vipllava-image-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = ImageTokenConfig::from_model_dir(&dir, 14, "full").unwrap();
        assert_eq!(
            cfg.vision_feature_select_strategy,
            VisionFeatureSelectStrategy::Full
        );
        let e = ImageTokenConfig::from_model_dir(&dir, 14, "cls").unwrap_err();
        assert!(matches!(e, TextError::UnknownStrategy { path: None, .. }), "{e}");
        let file = dir.join("processor_config.json");
        std::fs::write(
            &file,
            r#"{"vision_feature_select_strategy": "default", "patch_size": 7}"#,
        )
        .unwrap();
        let cfg = ImageTokenConfig::from_model_dir(&dir, 14, "full").unwrap();
        assert_eq!(
            cfg.vision_feature_select_strategy,
            VisionFeatureSelectStrategy::Default
        );
        assert_eq!(cfg.patch_size, 7);
        std::fs::write(&file, r#"{"vision_feature_select_strategy": "patch"}"#).unwrap();
        let e = ImageTokenConfig::from_model_dir(&dir, 14, "default").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("vision_feature_select_strategy") && msg.contains("processor_config.json"),
            "{msg}"
        );
        std::fs::write(&file, r#"{"patch_size": "14"}"#).unwrap();
        let msg = ImageTokenConfig::from_model_dir(&dir, 14, "default")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`patch_size`") && msg.contains("processor_config.json"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
