//! Chat messages and the checkpoint's Jinja chat template, rendered as transformers
//! renders it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::tokenizer_config::{
    RawChatTemplate, RawChatTemplateFile, RawTokenizerConfig, SPECIAL_TOKEN_NAMES,
};
use super::{TextError, read, read_raw};

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
        let tokenizer_config: RawTokenizerConfig = read_raw(&dir.join("tokenizer_config.json"))?;
        let special = SPECIAL_TOKEN_NAMES
            .iter()
            .filter_map(|&name| {
                tokenizer_config
                    .special_token(name)
                    .map(|s| (name.to_string(), s.to_string()))
            })
            .collect();
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        let source = if jinja.is_file() {
            Some(read(&jinja)?)
        } else if json.is_file() {
            let file: RawChatTemplateFile = read_raw(&json)?;
            let source = file.chat_template.as_ref().and_then(RawChatTemplate::source);
            Some(
                source
                    .ok_or(TextError::NoTemplateString { path: json })?
                    .to_string(),
            )
        } else {
            tokenizer_config
                .chat_template
                .as_ref()
                .and_then(RawChatTemplate::source)
                .map(str::to_string)
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
            return Err(TextError::EmptyConversation);
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

fn describe(e: &minijinja::Error) -> String {
    match (e.detail(), e.line()) {
        (Some(d), Some(l)) => format!("{} (line {l}): {d}", e.kind()),
        (Some(d), None) => format!("{}: {d}", e.kind()),
        _ => e.to_string(),
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
}
