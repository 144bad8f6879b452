//! LLaVA-format training data and the labelling rule.
//!
//! # Data
//!
//! A JSON list (or JSONL, one object a line) of
//! `{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}`
//! with `<image>` in the first human turn. Image paths are relative to the data file's
//! folder, or to `image_folder` when given. Optional `"visual_prompts"`:
//! `[{"shape": "box", "spec": "x0,y0,x1,y1[:colour]", "alpha": 200}, ...]` (the CLI's
//! `--shape` syntax, see `vipllava_processor::visual_prompt::MarkSpec`) are drawn on the
//! image before preprocessing, the way ViP-LLaVA's training code draws them.
//!
//! # Labelling rule
//!
//! 1. The conversation becomes chat messages: `human` -> `user`, `gpt` -> `assistant`,
//!    `system` -> `system`. The `<image>` tag is removed from the first human turn (with
//!    one adjacent newline: `<image>\n` or `\n<image>`, then the text is trimmed) and the
//!    image becomes an image content entry of that message.
//! 2. The whole conversation is rendered with the checkpoint's chat template,
//!    `add_generation_prompt = false`.
//! 3. `<image>` is expanded to the image's token count as the processor does, the text is
//!    tokenized with BOS, and EOS is appended.
//! 4. A token is a target when its character span in the expanded text overlaps an
//!    assistant message's text (located after the rendering of the messages before it);
//!    the appended EOS is a target; every other token, and every image token, is ignored
//!    (label `-100`).
//! 5. The loss is the mean cross-entropy over target tokens with next-token shift, as
//!    transformers' causal-LM loss (`logits[:, :-1]` predicts `labels[:, 1:]`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use vipllava_processor::image::{
    ImageMode, ImageProcessorConfig, PixelValues, load_image, preprocess_with_mode,
};
use vipllava_processor::visual_prompt::{DrawOptions, MarkSpec, draw_image};
use vipllava_processor::{
    ChatMessage, ChatTemplate, ContentPart, ImageTokenConfig, TextTokenizer, VisionInput,
};

pub use crate::error::{BadSample, SampleError};
use crate::error::{DataError, SetupError, TrainError};

/// Label of an ignored position (transformers' `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One conversation turn as stored in the data file.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct Turn {
    /// `human`, `gpt` or `system`.
    pub from: String,
    /// The text.
    pub value: String,
}

/// A visual prompt to draw on the sample's image: `{"shape": "box", "spec":
/// "x0,y0,x1,y1:red"}` with optional `"alpha"` and `"line_width"`, as `--batch` lines and
/// the server take them (the processor's [`MarkSpec`]).
pub type VisualPromptField = MarkSpec;

/// One sample as stored in the data file.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RawSample {
    /// Sample id (string or number in the file; reported with errors).
    #[serde(default)]
    pub id: Value,
    /// Image path.
    #[serde(default)]
    pub image: Option<String>,
    /// Turns.
    #[serde(default)]
    pub conversations: Vec<Turn>,
    /// Optional visual prompts drawn on the image.
    #[serde(default)]
    pub visual_prompts: Vec<VisualPromptField>,
}

impl RawSample {
    /// The id as text.
    pub fn id_text(&self) -> String {
        match &self.id {
            Value::String(s) => s.clone(),
            Value::Null => "<no id>".into(),
            v => v.to_string(),
        }
    }
}

/// Reads a JSON list or a JSONL file of samples, in file order.
pub fn read_samples(path: &Path) -> Result<Vec<RawSample>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |line: Option<usize>, source: serde_json::Error| TrainError::BadData {
        path: path.to_path_buf(),
        reason: match line {
            Some(line) => DataError::JsonLine { line, source },
            None => DataError::Json(source),
        },
    };
    if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| bad(None, e))
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| bad(Some(i + 1), e)))
            .collect()
    }
}

/// What to do with a sample that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OnBadSample {
    /// Report it (id and reason) and leave it out.
    #[default]
    Skip,
    /// Stop with an error naming it.
    Fail,
}

/// A sample ready for the model.
#[derive(Debug, Clone)]
pub struct EncodedSample {
    /// Sample id.
    pub id: String,
    /// Token ids (BOS first, EOS last, image tokens expanded).
    pub input_ids: Vec<u32>,
    /// Per-token labels: the id for targets, [`IGNORE_INDEX`] otherwise (not shifted).
    pub labels: Vec<i64>,
    /// The preprocessed image.
    pub pixel_values: PixelValues,
}

impl EncodedSample {
    /// Number of target tokens the loss sees after the shift.
    pub fn num_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Everything needed to turn raw samples into model inputs.
#[derive(Debug, Clone)]
pub struct SampleEncoder {
    /// Chat template.
    pub template: ChatTemplate,
    /// Tokenizer.
    pub tokenizer: TextTokenizer,
    /// `<image>` expansion settings.
    pub image_tokens: ImageTokenConfig,
    /// Image preprocessing.
    pub image_config: ImageProcessorConfig,
    /// Crop or pad.
    pub image_mode: ImageMode,
    /// Image token id in the vocabulary.
    pub image_token_id: u32,
    /// EOS id appended to every sample.
    pub eos_token_id: u32,
    /// Image tokens per image (checked against the vision tower by the caller).
    pub image_seq_len: usize,
}

impl SampleEncoder {
    /// Loads the tokenizer, template and processor settings of a model directory.
    pub fn from_model_dir(dir: &Path, config: &vipllava_model::VipLlavaConfig) -> Result<Self, TrainError> {
        let tokenizer = TextTokenizer::from_model_dir(dir)?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let image_config = ImageProcessorConfig::from_model_dir(dir)?;
        let image_tokens = ImageTokenConfig::from_model_dir(
            dir,
            config.vision.patch_size,
            config.vision_feature_select_strategy.as_str(),
        )?;
        let eos_token_id = tokenizer.eos_token_id.ok_or(SetupError::NoEosToken)?;
        let image_token_id = config.image_token_index as u32;
        let crop = image_config.crop_size;
        let vision = VisionInput {
            image_size: config.vision.image_size,
            features: config.image_seq_len(),
        };
        let image_seq_len =
            image_tokens.checked_seq_len(crop.height as usize, crop.width as usize, vision)?;
        Ok(Self {
            template,
            tokenizer,
            image_tokens,
            image_config,
            image_mode: ImageMode::Crop,
            image_token_id,
            eos_token_id,
            image_seq_len,
        })
    }

    /// Chat messages of a conversation (labelling rule, step 1).
    pub fn messages(turns: &[Turn], image_tag: &str) -> Result<Vec<ChatMessage>, SampleError> {
        if turns.is_empty() {
            return Err(SampleError::NoConversations);
        }
        let first_human = turns
            .iter()
            .position(|t| t.from == "human")
            .ok_or(SampleError::NoHumanTurn)?;
        let tags: usize = turns.iter().map(|t| t.value.matches(image_tag).count()).sum();
        let first_tags = turns[first_human].value.matches(image_tag).count();
        if first_tags == 0 {
            return Err(SampleError::NoImageTag {
                tag: image_tag.to_string(),
            });
        }
        if tags != 1 {
            return Err(SampleError::ImageTagCount {
                count: tags,
                tag: image_tag.to_string(),
            });
        }
        if !turns.iter().any(|t| t.from == "gpt") {
            return Err(SampleError::NoAnswer);
        }
        turns
            .iter()
            .enumerate()
            .map(|(i, t)| match t.from.as_str() {
                "human" if i == first_human => {
                    let text = strip_image_tag(&t.value, image_tag);
                    Ok(ChatMessage {
                        role: "user".into(),
                        content: vec![ContentPart::Image, ContentPart::Text { text }],
                    })
                }
                "human" => Ok(ChatMessage::text("user", t.value.clone())),
                "gpt" => {
                    if t.value.trim().is_empty() {
                        Err(SampleError::EmptyAnswer { turn: i + 1 })
                    } else {
                        Ok(ChatMessage::text("assistant", t.value.clone()))
                    }
                }
                "system" => Ok(ChatMessage::text("system", t.value.clone())),
                other => Err(SampleError::UnknownRole {
                    role: other.to_string(),
                    turn: i + 1,
                }),
            })
            .collect()
    }

    /// Token ids and labels of a conversation (labelling rule, steps 2 to 4).
    pub fn encode_text(&self, turns: &[Turn]) -> Result<(Vec<u32>, Vec<i64>), SampleError> {
        let tag = self.image_tokens.image_token.as_str();
        let messages = Self::messages(turns, tag)?;
        let render = |m: &[ChatMessage]| -> Result<String, SampleError> {
            if m.is_empty() {
                return Ok(String::new());
            }
            self.template
                .render(m, false)
                .map_err(|e| SampleError::Template(Arc::new(e)))
        };
        let full = render(&messages)?;
        // Assistant text spans in the rendered (unexpanded) text.
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prefix = render(&messages[..i])?;
            let text = match &m.content[0] {
                ContentPart::Text { text } => text.as_str(),
                ContentPart::Image => continue,
            };
            let from = if full.starts_with(&prefix) {
                prefix.len()
            } else {
                0
            };
            let start = full[from..]
                .find(text)
                .map(|p| p + from)
                .ok_or(SampleError::AnswerNotVerbatim {
                    answer: spans.len() + 1,
                })?;
            spans.push((start, start + text.len()));
        }
        // Expansion shifts every offset after an image tag.
        let extra = tag.len() * (self.image_seq_len.saturating_sub(1));
        let shift = |pos: usize| pos + full[..pos].matches(tag).count() * extra;
        let spans: Vec<(usize, usize)> = spans.into_iter().map(|(a, b)| (shift(a), shift(b))).collect();
        let expanded = self
            .image_tokens
            .expand(&full, 1, self.image_seq_len)
            .map_err(|e| SampleError::ExpandImageTokens(Arc::new(e)))?;
        let enc = self
            .tokenizer
            .inner()
            .encode(expanded.as_str(), true)
            .map_err(|e| SampleError::Tokenize(Arc::from(e)))?;
        let mut ids: Vec<u32> = enc.get_ids().to_vec();
        let mut labels: Vec<i64> = ids
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(s, e))| {
                let target = id != self.image_token_id && spans.iter().any(|&(a, b)| s < b && a < e);
                if target { id as i64 } else { IGNORE_INDEX }
            })
            .collect();
        let image_tokens = ids.iter().filter(|&&i| i == self.image_token_id).count();
        if image_tokens != self.image_seq_len {
            return Err(SampleError::ImageTokenCount {
                found: image_tokens,
                expected: self.image_seq_len,
            });
        }
        ids.push(self.eos_token_id);
        labels.push(self.eos_token_id as i64);
        Ok((ids, labels))
    }

    /// Encodes one sample: validates it, reads and preprocesses its image (drawing any
    /// visual prompts), and labels its tokens.
    pub fn encode(&self, sample: &RawSample, image_root: &Path) -> Result<EncodedSample, SampleError> {
        let (mut encoded, job) = self.encode_deferred(sample, image_root)?;
        encoded.pixel_values = self.pixels(&job)?;
        Ok(encoded)
    }

    /// Encodes one sample but its pixels: validates it (the image file exists, the visual
    /// prompts parse) and labels its tokens; the returned sample's `pixel_values` are empty
    /// and [`SampleEncoder::pixels`] of the returned job makes them.
    pub fn encode_deferred(
        &self,
        sample: &RawSample,
        image_root: &Path,
    ) -> Result<(EncodedSample, ImageJob), SampleError> {
        let image = sample.image.as_deref().ok_or(SampleError::NoImage)?;
        let path = image_root.join(image);
        if !path.is_file() {
            return Err(SampleError::ImageNotFound { path });
        }
        let (input_ids, labels) = self.encode_text(&sample.conversations)?;
        let job = ImageJob {
            path,
            prompts: sample.visual_prompts.clone(),
        };
        job.parsed_prompts()?;
        let encoded = EncodedSample {
            id: sample.id_text(),
            input_ids,
            labels,
            pixel_values: PixelValues {
                data: Vec::new(),
                channels: 0,
                height: 0,
                width: 0,
            },
        };
        Ok((encoded, job))
    }

    /// Reads an image, draws its visual prompts and preprocesses it.
    pub fn pixels(&self, job: &ImageJob) -> Result<PixelValues, SampleError> {
        let img = load_image(&job.path).map_err(|e| SampleError::LoadImage(Arc::new(e)))?;
        let prompts = job.parsed_prompts()?;
        let img = if prompts.is_empty() {
            img
        } else {
            draw_image(&img, &prompts, &DrawOptions::default())
                .map_err(|e| SampleError::DrawVisualPrompts(Arc::new(e)))?
        };
        preprocess_with_mode(&img, &self.image_config, self.image_mode)
            .map_err(|e| SampleError::Preprocess(Arc::new(e)))
    }
}

/// Where a sample's pixels come from: its image file and the visual prompts drawn on it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageJob {
    /// The image file (joined to the image folder).
    pub path: PathBuf,
    /// Visual prompts to draw.
    pub prompts: Vec<VisualPromptField>,
}

impl ImageJob {
    fn parsed_prompts(&self) -> Result<Vec<vipllava_processor::visual_prompt::VisualPrompt>, SampleError> {
        self.prompts
            .iter()
            .map(MarkSpec::to_prompt)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SampleError::VisualPrompt(Arc::new(e)))
    }
}

/// `<image>` removed with one adjacent newline, then trimmed (labelling rule, step 1).
pub fn strip_image_tag(value: &str, tag: &str) -> String {
    let with_nl_after = format!("{tag}\n");
    let with_nl_before = format!("\n{tag}");
    let s = if value.contains(&with_nl_after) {
        value.replacen(&with_nl_after, "", 1)
    } else if value.contains(&with_nl_before) {
        value.replacen(&with_nl_before, "", 1)
    } else {
        value.replacen(tag, "", 1)
    };
    s.trim().to_string()
}

/// Encodes every sample of a data file; bad samples are returned (skip) or stop the load
/// with [`TrainError::BadSample`] (fail).
pub fn load_dataset(
    encoder: &SampleEncoder,
    data: &Path,
    image_folder: Option<&Path>,
    on_bad: OnBadSample,
) -> Result<(Vec<EncodedSample>, Vec<BadSample>), TrainError> {
    load_with(data, image_folder, on_bad, |s, root| encoder.encode(s, root))
}

/// Usable samples without pixels, their image jobs, and the samples left out.
pub type DeferredDataset = (Vec<EncodedSample>, Vec<ImageJob>, Vec<BadSample>);

/// [`load_dataset`] without decoding the images: the samples' `pixel_values` are empty, and
/// the image jobs (one per usable sample) make them ([`SampleEncoder::pixels`]). An image
/// that exists but does not decode is found only when its job runs.
pub fn load_dataset_deferred(
    encoder: &SampleEncoder,
    data: &Path,
    image_folder: Option<&Path>,
    on_bad: OnBadSample,
) -> Result<DeferredDataset, TrainError> {
    let (pairs, bad) = load_with(data, image_folder, on_bad, |s, root| {
        encoder.encode_deferred(s, root)
    })?;
    let (samples, jobs) = pairs.into_iter().unzip();
    Ok((samples, jobs, bad))
}

fn load_with<T>(
    data: &Path,
    image_folder: Option<&Path>,
    on_bad: OnBadSample,
    encode: impl Fn(&RawSample, &Path) -> Result<T, SampleError>,
) -> Result<(Vec<T>, Vec<BadSample>), TrainError> {
    let samples = read_samples(data)?;
    let root: PathBuf = match image_folder {
        Some(f) => f.to_path_buf(),
        None => data.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (index, s) in samples.iter().enumerate() {
        match encode(s, &root) {
            Ok(e) => good.push(e),
            Err(reason) => {
                let b = BadSample {
                    id: s.id_text(),
                    index,
                    reason,
                };
                if on_bad == OnBadSample::Fail {
                    return Err(TrainError::BadSample(b));
                }
                bad.push(b);
            }
        }
    }
    if good.is_empty() {
        return Err(TrainError::BadData {
            path: data.to_path_buf(),
            reason: DataError::NoUsableSamples { bad: bad.len() },
        });
    }
    Ok((good, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(from: &str, value: &str) -> Turn {
        Turn {
            from: from.into(),
            value: value.into(),
        }
    }

    #[test]
    fn image_tag_is_removed_with_one_newline() {
        assert_eq!(strip_image_tag("<image>\nWhat?", "<image>"), "What?");
        assert_eq!(strip_image_tag("What?\n<image>", "<image>"), "What?");
        assert_eq!(strip_image_tag("<image> What?", "<image>"), "What?");
        assert_eq!(strip_image_tag("A <image> B", "<image>"), "A  B");
    }

    #[test]
    fn conversations_become_messages_or_say_why_not() {
        let m = SampleEncoder::messages(
            &[
                turn("system", "S"),
                turn("human", "<image>\nQ"),
                turn("gpt", "A"),
                turn("human", "Q2"),
                turn("gpt", "A2"),
            ],
            "<image>",
        )
        .unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
        assert_eq!(m[1].content[0], ContentPart::Image);
        assert_eq!(m[1].content[1], ContentPart::Text { text: "Q".into() });
        let err = |turns: &[Turn]| SampleEncoder::messages(turns, "<image>").unwrap_err().to_string();
        assert!(err(&[]).contains("no conversations"));
        assert!(err(&[turn("human", "Q"), turn("gpt", "A")]).contains("no `<image>`"));
        assert!(err(&[turn("human", "<image>Q"), turn("gpt", " ")]).contains("empty answer"));
        assert!(err(&[turn("human", "<image>Q")]).contains("no gpt answer"));
        assert!(err(&[turn("human", "<image>Q"), turn("gpt", "A <image>")]).contains("2 `<image>` tags"));
        assert!(
            err(&[turn("human", "<image>Q"), turn("bot", "A"), turn("gpt", "B")])
                .contains("unknown role `bot`")
        );
        assert!(err(&[turn("gpt", "A"), turn("gpt", "B")]).contains("no human turn"));
    }
}
