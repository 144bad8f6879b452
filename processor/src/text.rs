//! Text side of the processor: the checkpoint's tokenizer, its Jinja chat template
//! rendered as transformers renders it, and the `<image>` placeholder expansion.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// Errors of tokenizer, chat template and prompt handling.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer.json` is absent.
    #[error("no tokenizer.json in {dir}")]
    NoTokenizer {
        /// The model directory.
        dir: PathBuf,
    },
    /// `tokenizer.json` cannot be parsed.
    #[error("{path} is not a valid tokenizer: {reason}")]
    BadTokenizer {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A JSON side file (`tokenizer_config.json`, `processor_config.json`, ...) is invalid.
    #[error("{path} is not valid: {reason}")]
    BadJson {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The model directory ships no chat template.
    #[error(
        "no chat template in {dir} (looked for chat_template.jinja, chat_template.json and tokenizer_config.json); use a pre-formatted prompt"
    )]
    NoChatTemplate {
        /// The model directory.
        dir: PathBuf,
    },
    /// The template does not compile or raised while rendering.
    #[error("chat template: {0}")]
    Template(String),
    /// Tokenizing or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// The prompt's `<image>` count differs from the number of images.
    #[error(
        "the prompt has {tags} `{token}` tag(s) but {images} image(s) were given; each image needs exactly one tag"
    )]
    ImageTagMismatch {
        /// Tags found.
        tags: usize,
        /// Images given.
        images: usize,
        /// The tag text.
        token: String,
    },
    /// A required special token is not in the vocabulary.
    #[error("the tokenizer has no token {token:?}")]
    MissingToken {
        /// The token text.
        token: String,
    },
}

fn read(path: &Path) -> Result<String, TextError> {
    std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Option<Value>, TextError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TextError::BadJson {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// One part of a message's content, serialised as transformers expects:
/// `{"type": "image"}` or `{"type": "text", "text": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentPart {
    /// An image placeholder (rendered as `<image>` by the vip-llava template).
    Image,
    /// Text.
    Text {
        /// The text.
        text: String,
    },
}

/// A chat message with a role (`system`, `user`, `assistant`) and content parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Content parts in order.
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    /// A user message with `images` image parts followed by the text.
    pub fn user_with_images(images: usize, text: impl Into<String>) -> Self {
        let mut content = vec![ContentPart::Image; images];
        content.push(ContentPart::Text { text: text.into() });
        Self {
            role: "user".into(),
            content,
        }
    }

    /// A message with text only.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: vec![ContentPart::Text { text: text.into() }],
        }
    }
}

/// The checkpoint's Jinja chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    special_tokens: BTreeMap<String, String>,
}

impl ChatTemplate {
    /// Wraps template source.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            special_tokens: BTreeMap::new(),
        }
    }

    /// Finds the template the way transformers does: `chat_template.jinja` (5.x), then
    /// `chat_template.json` (`{"chat_template": ...}`, hub 4.x processors), then the
    /// `chat_template` field of `tokenizer_config.json`. Special tokens named in
    /// `tokenizer_config.json` (`bos_token`, ...) are passed to the template.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TextError> {
        let mut special = BTreeMap::new();
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        if let Some(Value::Object(map)) = &tokenizer_config {
            for name in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                match map.get(name) {
                    Some(Value::String(s)) => {
                        special.insert(name.to_string(), s.clone());
                    }
                    Some(Value::Object(o)) => {
                        if let Some(Value::String(s)) = o.get("content") {
                            special.insert(name.to_string(), s.clone());
                        }
                    }
                    _ => {}
                }
            }
        }
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(read(&jinja)?)
        } else if let Some(v) = read_json(&dir.join("chat_template.json"))? {
            Some(template_field(&v).ok_or_else(|| TextError::BadJson {
                path: dir.join("chat_template.json"),
                reason: "no `chat_template` string".into(),
            })?)
        } else {
            tokenizer_config.as_ref().and_then(template_field)
        };
        let source = source.ok_or_else(|| TextError::NoChatTemplate {
            dir: dir.to_path_buf(),
        })?;
        Ok(Self {
            source,
            special_tokens: special,
        })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders messages like transformers' `apply_chat_template(..., tokenize=False)`:
    /// jinja2 with `trim_blocks` and `lstrip_blocks`, Python string methods available,
    /// `raise_exception` raising an error.
    ///
    /// `messages` is anything that serialises like transformers' message dicts
    /// ([`ChatMessage`], or `serde_json::Value` for arbitrary shapes). An empty
    /// conversation is an error, as in transformers.
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        if messages.is_empty() {
            return Err(TextError::Template("the conversation has no messages".into()));
        }
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TextError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        // Templates must not run forever: bound the work a render may do.
        env.set_recursion_limit(200);
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| TextError::Template(describe(&e)))?;
        let mut ctx: BTreeMap<String, minijinja::Value> = BTreeMap::new();
        ctx.insert(
            "messages".into(),
            minijinja::Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), v.clone().into());
        }
        template
            .render(ctx)
            .map_err(|e| TextError::Template(describe(&e)))
    }
}

fn template_field(v: &Value) -> Option<String> {
    match v.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: transformers picks "default".
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn describe(e: &minijinja::Error) -> String {
    match (e.detail(), e.line()) {
        (Some(d), Some(l)) => format!("{} (line {l}): {d}", e.kind()),
        (Some(d), None) => format!("{}: {d}", e.kind()),
        _ => e.to_string(),
    }
}

/// The checkpoint's tokenizer (`tokenizer.json`) with its special tokens.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_token_id: Option<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (and special-token names from `tokenizer_config.json`).
    pub fn from_model_dir(dir: &Path) -> Result<Self, TextError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TextError::NoTokenizer {
                dir: dir.to_path_buf(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| TextError::Io {
            path: path.clone(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TextError::BadTokenizer {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let name = |key: &str, default: &str| -> String {
            match config.as_ref().and_then(|c| c.get(key)) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            }
        };
        let bos_token_id = inner.token_to_id(&name("bos_token", "<s>"));
        let eos_token_id = inner.token_to_id(&name("eos_token", "</s>"));
        let pad_token_id = inner.token_to_id(&name("pad_token", "<pad>"));
        Ok(Self {
            inner,
            bos_token_id,
            eos_token_id,
            pad_token_id,
        })
    }

    /// Ids of `text`, with the tokenizer's special tokens (BOS) when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TextError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Tokenize(e.to_string()))
    }

    /// Id of a token string.
    pub fn token_id(&self, token: &str) -> Result<u32, TextError> {
        self.inner
            .token_to_id(token)
            .ok_or_else(|| TextError::MissingToken { token: token.into() })
    }

    /// True for SentencePiece byte-fallback tokens (`<0x00>`..`<0xFF>`).
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| {
            t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
        })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
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
    pub vision_feature_select_strategy: String,
}

impl ImageTokenConfig {
    /// Reads `processor_config.json` (hub 4.x and 5.x both keep these keys at its top
    /// level); absent values fall back to the model's vision config (`patch_size`,
    /// strategy) and one additional token, which is what the llava-hf repos publish.
    pub fn from_model_dir(
        dir: &Path,
        fallback_patch_size: usize,
        fallback_strategy: &str,
    ) -> Result<Self, TextError> {
        let path = dir.join("processor_config.json");
        let v = read_json(&path)?.unwrap_or(Value::Null);
        let get_usize = |key: &str| -> Result<Option<usize>, TextError> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| TextError::BadJson {
                        path: path.clone(),
                        reason: format!("`{key}` must be a non-negative integer, found {x}"),
                    }),
            }
        };
        let patch_size = get_usize("patch_size")?.unwrap_or(fallback_patch_size);
        if patch_size == 0 {
            return Err(TextError::BadJson {
                path,
                reason: "`patch_size` must be positive".into(),
            });
        }
        Ok(Self {
            image_token: v
                .get("image_token")
                .and_then(Value::as_str)
                .unwrap_or("<image>")
                .to_string(),
            patch_size,
            num_additional_image_tokens: get_usize("num_additional_image_tokens")?.unwrap_or(1),
            vision_feature_select_strategy: v
                .get("vision_feature_select_strategy")
                .and_then(Value::as_str)
                .unwrap_or(fallback_strategy)
                .to_string(),
        })
    }

    /// Tokens one image of `height x width` pixels (after crop) expands to:
    /// `(h / patch) * (w / patch) + additional - (1 if strategy == "default")`.
    pub fn image_seq_len(&self, height: usize, width: usize) -> usize {
        let n = (height / self.patch_size) * (width / self.patch_size) + self.num_additional_image_tokens;
        if self.vision_feature_select_strategy == "default" {
            n.saturating_sub(1)
        } else {
            n
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const VIP_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}{% elif message['role'] == 'user' %}{{ '###Human: '}}{% else %}{{ '###' + message['role'].title() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ '###Assistant:' }}{% endif %}";

    #[test]
    fn vip_template_single_turn() {
        let t = ChatTemplate::new(VIP_TEMPLATE);
        let out = t
            .render(
                &[ChatMessage::user_with_images(1, "What is in the red box?")],
                true,
            )
            .unwrap();
        assert_eq!(out, "###Human: <image>\nWhat is in the red box?###Assistant:");
    }

    #[test]
    fn template_errors_are_reported() {
        let one = [ChatMessage::text("user", "hi")];
        let e = ChatTemplate::new("{% for x in %}")
            .render(&one, false)
            .unwrap_err();
        assert!(e.to_string().contains("chat template"), "{e}");
        let e = ChatTemplate::new("{{ raise_exception('only user roles') }}")
            .render(&one, false)
            .unwrap_err();
        assert!(e.to_string().contains("only user roles"), "{e}");
    }

    #[test]
    fn expansion_counts_and_checks_tags() {
        let cfg = ImageTokenConfig {
            image_token: "<image>".into(),
            patch_size: 14,
            num_additional_image_tokens: 1,
            vision_feature_select_strategy: "default".into(),
        };
        assert_eq!(cfg.image_seq_len(336, 336), 576);
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
}
