//! The OpenAI Chat Completions wire format: requests as clients send them, the error
//! shape `{"error": {"message", "type", "param", "code"}}`, and response bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// An error as OpenAI reports it, with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable reason.
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: &'static str,
}

impl ApiError {
    /// 400 about `param`.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(str::to_string),
            code: "invalid_request",
        }
    }

    /// Any status with a code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 405 | 408 | 413 => "invalid_request_error",
            401 => "authentication_error",
            429 => "rate_limit_error",
            503 | 504 => "server_overloaded",
            _ => "server_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// A JSON body with `status`.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.body());
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// `POST /v1/chat/completions` as sent. Fields OpenAI has but this server cannot honour
/// are refused when set to something other than their neutral value.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Ignored (one model is served); echoed back when given.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Deprecated name of `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Upper bound on generated tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// 0: greedy; absent: the checkpoint's generation_config.json.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Sampler seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Choices; only 1.
    #[serde(default)]
    pub n: Option<u32>,
    /// Server-Sent Events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `include_usage`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Refused unless 0.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Refused unless 0.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Refused when true.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Refused when set.
    #[serde(default)]
    pub tools: Option<Value>,
    /// Refused unless `{"type": "text"}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Refused unless empty.
    #[serde(default)]
    pub logit_bias: Option<Value>,
}

/// `stop`: a string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// system, developer, user or assistant.
    pub role: String,
    /// Text or parts; may be null for assistant messages.
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<Part>),
}

/// A content part.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// `{"type": "text", "text": ...}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image_url", "image_url": {"url": ...}}` plus the extension fields, on the
    /// part (or inside `image_url`).
    ImageUrl {
        /// The image.
        image_url: ImageUrl,
        /// Marks drawn on the image before preprocessing.
        #[serde(default)]
        visual_prompts: Option<Vec<VisualPromptSpec>>,
        /// `crop` or `pad`.
        #[serde(default)]
        image_mode: Option<String>,
    },
}

/// `image_url`.
#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    /// data:, file:// (below --media-dir) or http(s) (refused).
    pub url: String,
    /// The extension, also accepted here.
    #[serde(default)]
    pub visual_prompts: Option<Vec<VisualPromptSpec>>,
    /// The extension, also accepted here.
    #[serde(default)]
    pub image_mode: Option<String>,
}

/// One mark: `{"shape": "box", "spec": "45,15,115,95:red", "alpha": 128, "line_width": 3}`,
/// the JSON form that `--batch` lines and training data use too.
pub type VisualPromptSpec = vipllava::processor::visual_prompt::MarkSpec;

/// What a request asks of the sampler, checked against OpenAI's ranges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingRequest {
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<usize>,
    /// Temperature (0: greedy).
    pub temperature: Option<f32>,
    /// Top-p.
    pub top_p: Option<f32>,
    /// Seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<Vec<String>>,
}

impl ChatRequest {
    /// Parses a body, mapping JSON errors to a 400 that names the problem.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
    }

    /// Refuses what cannot be honoured and returns the sampling fields.
    pub fn sampling(&self) -> Result<SamplingRequest, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
        }
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_request(
                    format!("{name} is not supported"),
                    Some(name),
                ));
            }
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::bad_request(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::bad_request("tools are not supported", Some("tools")));
        }
        if let Some(format) = &self.response_format
            && !format.is_null()
            && format.get("type").and_then(Value::as_str) != Some("text")
        {
            return Err(ApiError::bad_request(
                "only response_format {\"type\": \"text\"} is supported",
                Some("response_format"),
            ));
        }
        if let Some(bias) = &self.logit_bias
            && !(bias.is_null() || bias.as_object().is_some_and(|o| o.is_empty()))
        {
            return Err(ApiError::bad_request(
                "logit_bias is not supported",
                Some("logit_bias"),
            ));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::bad_request(
                format!("temperature must be in [0, 2], got {t}"),
                Some("temperature"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::bad_request(
                format!("top_p must be in (0, 1], got {p}"),
                Some("top_p"),
            ));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            return Err(ApiError::bad_request(
                "max_completion_tokens must be at least 1",
                Some("max_completion_tokens"),
            ));
        }
        let stop = match &self.stop {
            None => None,
            Some(Stop::One(s)) => Some(vec![s.clone()]),
            Some(Stop::Many(v)) => Some(v.clone()),
        };
        if let Some(stop) = &stop {
            if stop.len() > 4 {
                return Err(ApiError::bad_request("at most 4 stop strings", Some("stop")));
            }
            if stop.iter().any(String::is_empty) {
                return Err(ApiError::bad_request("a stop string is empty", Some("stop")));
            }
        }
        Ok(SamplingRequest {
            max_tokens: max_tokens.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.map(|s| s as u64),
            stop,
        })
    }

    /// `stream: true`.
    pub fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// `stream_options.include_usage`.
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// `usage`.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// A non-streaming response.
pub fn completion(id: &str, created: u64, model: &str, text: &str, finish: &str, usage: Value) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": Value::Null},
            "logprobs": Value::Null,
            "finish_reason": finish,
        }],
        "usage": usage,
    })
}

/// A streaming chunk with `delta` and `finish_reason`; `usage: null` when the client asked
/// for usage (the last chunk then carries it with empty `choices`).
pub fn chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish: Option<&str>,
    with_usage: bool,
) -> Value {
    let mut value = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [{"index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish}],
    });
    if with_usage {
        value["usage"] = Value::Null;
    }
    value
}

/// The usage chunk.
pub fn usage_chunk(id: &str, created: u64, model: &str, usage: Value) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": Value::Null,
        "choices": [],
        "usage": usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_string_and_part_contents_and_checks_options() {
        let body = br#"{"model": "m", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="},
                 "visual_prompts": [{"shape": "box", "spec": "1,2,3,4:red", "alpha": 100}],
                 "image_mode": "pad"},
                {"type": "text", "text": "What is in the box?"}]}],
            "max_tokens": 5, "temperature": 0, "stop": "x", "stream": true,
            "stream_options": {"include_usage": true}, "user": "ignored"}"#;
        let r = ChatRequest::parse(body).unwrap();
        assert_eq!(r.messages.len(), 2);
        assert!(r.streaming() && r.include_usage());
        let s = r.sampling().unwrap();
        assert_eq!(s.max_tokens, Some(5));
        assert_eq!(s.stop, Some(vec!["x".to_string()]));
        match &r.messages[1].content {
            Some(Content::Parts(parts)) => match &parts[0] {
                Part::ImageUrl {
                    visual_prompts: Some(v),
                    image_mode: Some(m),
                    ..
                } => {
                    assert_eq!(v[0].alpha, Some(100));
                    assert_eq!(m, "pad");
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        for bad in [
            r#"{"messages": [], "n": 2}"#,
            r#"{"messages": [], "temperature": 3}"#,
            r#"{"messages": [], "top_p": 0}"#,
            r#"{"messages": [], "presence_penalty": 1}"#,
            r#"{"messages": [], "max_tokens": 0}"#,
        ] {
            let e = ChatRequest::parse(bad.as_bytes())
                .unwrap()
                .sampling()
                .unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let e = ChatRequest::parse(b"{not json").unwrap_err();
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }
}
