//! Moondream Station's skill endpoints (`/v1/caption`, `/v1/query`, `/v1/detect`,
//! `/v1/point`) with its request and response shapes, SSE streaming and top-level
//! `"error"` strings, so Station clients work by changing the URL.

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::input::decode_base64_image;
use super::interactive::{self, Finished};
use super::jobs::json_body;
use super::{ApiError, AppState};
use crate::queue::TaskKind;
use crate::vision::{CaptionLength, SkillOutput};
use crate::workers::caption::TaskParams;

/// An error in Station's shape: the status code, and `{"error": "...", "code": "..."}`.
#[derive(Debug)]
pub struct StationError(pub ApiError);

impl From<ApiError> for StationError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for StationError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.0.message, "code": self.0.code});
        (bad_input_is_400(self.0.status), Json(body)).into_response()
    }
}

/// Station and OpenAI clients expect 400 for any bad input, where axum's JSON
/// extractor says 422.
pub fn bad_input_is_400(status: axum::http::StatusCode) -> axum::http::StatusCode {
    if status == axum::http::StatusCode::UNPROCESSABLE_ENTITY {
        axum::http::StatusCode::BAD_REQUEST
    } else {
        status
    }
}

/// Generation settings as Station clients send them.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct StationSettings {
    /// Token cap.
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
}

/// A skill request (`/v1/caption`, `/v1/query`, `/v1/detect`, `/v1/point`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SkillRequest {
    /// The image: a `data:image/...;base64,` URI or raw base64.
    pub image_url: String,
    /// Caption length (caption): short, normal or long.
    #[serde(default)]
    pub length: Option<CaptionLength>,
    /// The question (query).
    #[serde(default)]
    pub question: Option<String>,
    /// Run the reasoning phase first (query).
    #[serde(default)]
    pub reasoning: bool,
    /// What to find (detect, point).
    #[serde(default)]
    pub object: Option<String>,
    /// Stream the text as Server-Sent Events (caption, query).
    #[serde(default)]
    pub stream: bool,
    /// Generation settings.
    #[serde(default)]
    pub settings: Option<StationSettings>,
}

fn params_of(task: TaskKind, r: &SkillRequest) -> TaskParams {
    let s = r.settings.as_ref();
    TaskParams {
        length: (task == TaskKind::Caption).then(|| r.length.unwrap_or_default()),
        question: r.question.clone(),
        reasoning: r.reasoning,
        object: r.object.clone(),
        max_tokens: s.and_then(|s| s.max_tokens),
        temperature: s.and_then(|s| s.temperature),
        top_p: s.and_then(|s| s.top_p),
        ..TaskParams::default()
    }
}

/// `POST /v1/caption`.
pub async fn caption(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, StationError> {
    skill(state, TaskKind::Caption, req).await
}

/// `POST /v1/query`.
pub async fn query(State(state): State<AppState>, req: Request) -> Result<Response, StationError> {
    skill(state, TaskKind::Query, req).await
}

/// `POST /v1/detect`.
pub async fn detect(State(state): State<AppState>, req: Request) -> Result<Response, StationError> {
    skill(state, TaskKind::Detect, req).await
}

/// `POST /v1/point`.
pub async fn point(State(state): State<AppState>, req: Request) -> Result<Response, StationError> {
    skill(state, TaskKind::Point, req).await
}

async fn skill(state: AppState, task: TaskKind, req: Request) -> Result<Response, StationError> {
    let body: SkillRequest = json_body(&state, req).await?;
    let image = decode_base64_image(&body.image_url)?;
    let stream = body.stream && matches!(task, TaskKind::Caption | TaskKind::Query);
    let mut started =
        interactive::start(&state, task, params_of(task, &body), &image, stream).await?;
    let timeout = state.request_timeout;
    if let Some(deltas) = started.deltas.take() {
        let format = StationStream { id: started.id };
        return Ok(interactive::stream(state, started, deltas, timeout, format).into_response());
    }
    let done = interactive::finish(&state, started.id, timeout).await;
    started.guard.disarm();
    let done = done?;
    Ok(Json(body_of(&done, started.id)).into_response())
}

fn body_of(done: &Finished, id: uuid::Uuid) -> serde_json::Value {
    let mut v = match &done.result.output {
        SkillOutput::Caption { caption } => serde_json::json!({ "caption": caption }),
        SkillOutput::Answer { answer, reasoning } => {
            let mut v = serde_json::json!({ "answer": answer });
            if let Some(r) = reasoning {
                v["reasoning"] = serde_json::json!({ "text": r });
            }
            v
        }
        SkillOutput::Objects { objects } => serde_json::json!({ "objects": objects }),
        SkillOutput::Points { points } => {
            serde_json::json!({ "points": points, "count": points.len() })
        }
    };
    v["request_id"] = serde_json::json!(id);
    v["_stats"] = done.stats();
    v["usage"] = serde_json::json!({
        "prompt_tokens": done.result.usage.prompt_tokens,
        "completion_tokens": done.result.usage.completion_tokens,
    });
    v
}

/// Station's stream: `{"chunk"}` events in whole words, then `{"stats"}`, then
/// `{"completed": true}`; `{"error"}` when the job fails.
struct StationStream {
    id: uuid::Uuid,
}

impl interactive::StreamFormat for StationStream {
    fn chunk(&self, text: &str) -> String {
        serde_json::json!({ "chunk": text }).to_string()
    }

    fn done(&self, done: &Finished) -> Vec<String> {
        vec![
            serde_json::json!({"stats": done.stats(), "request_id": self.id}).to_string(),
            serde_json::json!({"completed": true}).to_string(),
        ]
    }

    fn failed(&self, e: &ApiError) -> Vec<String> {
        vec![
            serde_json::json!({"error": e.message, "code": e.code}).to_string(),
            serde_json::json!({"completed": true}).to_string(),
        ]
    }
}
