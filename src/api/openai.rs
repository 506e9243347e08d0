//! OpenAI-shaped endpoints: `POST /v1/chat/completions` (string or parts content,
//! an `image_url` data URI, streaming chunks ending in `[DONE]`, real `usage`) and
//! `GET /v1/models`, answering both OpenAI and Station clients.

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::input::decode_base64_image;
use super::interactive;
use super::jobs::json_body;
use super::{ApiError, AppState};
use crate::queue::{TaskKind, now_ms};
use crate::vision::{CaptionLength, SkillResult};
use crate::workers::caption::TaskParams;

/// An error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let kind = if self.0.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let body = serde_json::json!({"error": {
            "message": self.0.message, "type": kind, "code": self.0.code, "param": null
        }});
        (super::station::bad_input_is_400(self.0.status), Json(body)).into_response()
    }
}

/// An image part's URL: `{"url": ...}` or a bare string.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ImageUrl {
    /// `{"url": "data:image/png;base64,..."}`.
    Object {
        /// The data URI (or raw base64).
        url: String,
    },
    /// The data URI itself.
    Plain(String),
}

/// One part of a message's content.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image.
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
    },
}

/// A message's content: a string, or a list of parts.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts.
    Parts(Vec<Part>),
}

/// A chat message.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Message {
    /// system, user or assistant.
    pub role: String,
    /// Its content.
    #[serde(default)]
    pub content: Option<Content>,
}

/// Streaming options.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions` body (unknown fields are ignored, as OpenAI SDKs send many).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ChatRequest {
    /// Model name (informational: captiond serves one model).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation; the last user message's image and text are used.
    pub messages: Vec<Message>,
    /// Token cap.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Token cap (newer name).
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Stream chunks as Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// What a chat turns into: the image, and a caption or a question.
fn plan(req: &ChatRequest) -> Result<(Vec<u8>, TaskKind, TaskParams), ApiError> {
    let last = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .ok_or_else(|| ApiError::bad_request("missing_message", "messages has no user message"))?;
    let mut text = String::new();
    let mut image = None;
    match &last.content {
        Some(Content::Text(t)) => text.push_str(t),
        Some(Content::Parts(parts)) => {
            for p in parts {
                match p {
                    Part::Text { text: t } => {
                        if !text.is_empty() {
                            text.push(' ');
                        }
                        text.push_str(t);
                    }
                    Part::ImageUrl { image_url } => {
                        let url = match image_url {
                            ImageUrl::Object { url } | ImageUrl::Plain(url) => url,
                        };
                        image.get_or_insert(url.clone());
                    }
                }
            }
        }
        None => {}
    }
    let Some(url) = image else {
        return Err(ApiError::bad_request(
            "missing_image",
            "no image: put the image in the last user message as an image_url part with a data URI (data:image/jpeg;base64,...)",
        ));
    };
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad_request(
            "invalid_image",
            "image URLs are not fetched; send the image as a data URI",
        ));
    }
    let bytes = decode_base64_image(&url)?;
    let text = text.trim().to_string();
    let lower = text.to_lowercase();
    let caption_request = text.is_empty()
        || (lower.len() <= 120
            && ["caption", "describe", "description"]
                .iter()
                .any(|w| lower.contains(w)));
    let mut params = TaskParams {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        ..TaskParams::default()
    };
    let task = if caption_request {
        params.length = Some(
            if ["short", "brief", "one sentence"]
                .iter()
                .any(|w| lower.contains(w))
            {
                CaptionLength::Short
            } else if ["detail", "long", "thorough"]
                .iter()
                .any(|w| lower.contains(w))
            {
                CaptionLength::Long
            } else {
                CaptionLength::Normal
            },
        );
        TaskKind::Caption
    } else {
        params.question = Some(text);
        TaskKind::Query
    };
    Ok((bytes, task, params))
}

fn usage(r: &SkillResult) -> serde_json::Value {
    let u = r.usage;
    serde_json::json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, OpenAiError> {
    let body: ChatRequest = json_body(&state, req).await?;
    let (image, task, params) = plan(&body)?;
    let model = state.model.name.clone();
    let mut started = interactive::start(&state, task, params, &image, body.stream).await?;
    let timeout = state.request_timeout;
    let created = now_ms() / 1000;
    let cid = format!("chatcmpl-{}", started.id.simple());
    if let Some(deltas) = started.deltas.take() {
        let format = OpenAiStream {
            cid,
            model,
            created,
            include_usage: body.stream_options.is_some_and(|o| o.include_usage),
        };
        return Ok(interactive::stream(state, started, deltas, timeout, format).into_response());
    }
    let done = interactive::finish(&state, started.id, timeout).await;
    started.guard.disarm();
    let done = done?;
    Ok(Json(serde_json::json!({
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": interactive::text_of(&done.result)},
            "finish_reason": if done.result.truncated { "length" } else { "stop" },
        }],
        "usage": usage(&done.result),
        "request_id": started.id,
    }))
    .into_response())
}

/// OpenAI's stream: a role chunk, content chunks in whole words, a chunk with the
/// finish reason (and one with `usage` when asked), then `[DONE]`.
struct OpenAiStream {
    cid: String,
    model: String,
    created: i64,
    include_usage: bool,
}

impl OpenAiStream {
    fn chunk_with(&self, delta: serde_json::Value, finish: Option<&str>) -> String {
        serde_json::json!({
            "id": self.cid, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
        .to_string()
    }
}

impl interactive::StreamFormat for OpenAiStream {
    fn opening(&self) -> Vec<String> {
        vec![self.chunk_with(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        )]
    }

    fn chunk(&self, text: &str) -> String {
        self.chunk_with(serde_json::json!({ "content": text }), None)
    }

    fn done(&self, done: &interactive::Finished) -> Vec<String> {
        let reason = if done.result.truncated {
            "length"
        } else {
            "stop"
        };
        let mut events = vec![self.chunk_with(serde_json::json!({}), Some(reason))];
        if self.include_usage {
            events.push(
                serde_json::json!({
                    "id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [], "usage": usage(&done.result),
                })
                .to_string(),
            );
        }
        events.push("[DONE]".into());
        events
    }

    fn failed(&self, e: &ApiError) -> Vec<String> {
        vec![
            serde_json::json!({"error": {"message": e.message, "type": "server_error", "code": e.code}})
                .to_string(),
            "[DONE]".into(),
        ]
    }
}

/// `GET /v1/models`: OpenAI's list and Station's `models` in one body.
pub async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let m = &state.model;
    let created = (state.started_unix_ms / 1000).max(0);
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": m.name, "object": "model", "created": created, "owned_by": "captiond"}],
        "models": [{
            "id": m.name,
            "name": m.name,
            "description": "Moondream2 run natively by captiond (caption, query, detect, point)",
            "version": m.revision,
        }],
    }))
}
