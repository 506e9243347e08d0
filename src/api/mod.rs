//! The HTTP API (axum): jobs, batches, queue control, health, stats and metrics.
//! Handlers stay thin: parse the request, call the queue, map the result.

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod input;
pub mod interactive;
pub mod jobs;
pub mod openai;
pub mod openapi;
pub mod serve;
pub mod station;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::{Json, Router, middleware};

pub use error::ApiError;

use crate::blobs::BlobStore;
use crate::library::ModelIdentity;
use crate::queue::{JobEvents, StateCounts, Store, Wakeup, now_ms};
use crate::vision::SkillSettings;
use crate::vision::image::DecodeLimits;
use crate::workers::governor::{Governor, GovernorSnapshot};
use crate::workers::{PoolStats, WorkerPool};

/// Everything a handler needs, shared by all requests.
#[derive(Clone)]
pub struct AppState {
    /// The queue database.
    pub store: Store,
    /// Wakes the dispatcher after inserts, retries and resumes.
    pub wakeup: Wakeup,
    /// Terminal-state announcements.
    pub events: JobEvents,
    /// Uploaded images.
    pub blobs: BlobStore,
    /// The worker pool, once the model is loaded.
    pub pool: Arc<OnceLock<WorkerPool>>,
    /// The loaded model, for its decode-batching figures.
    pub captioner: Arc<OnceLock<Arc<dyn crate::vision::Captioner>>>,
    /// The adaptive concurrency controller, when enabled.
    pub governor: Arc<OnceLock<Governor>>,
    /// Whether the model is loaded.
    pub ready: Arc<AtomicBool>,
    /// Canonical library roots for path inputs.
    pub roots: Arc<Vec<PathBuf>>,
    /// Required bearer token.
    pub api_token: Option<Arc<str>>,
    /// Image decode limits.
    pub limits: DecodeLimits,
    /// Default generation settings.
    pub skill_defaults: SkillSettings,
    /// Default attempts per job.
    pub max_attempts: i64,
    /// Process start.
    pub started: Instant,
    /// The model the settings select (library results are keyed by it).
    pub model: ModelIdentity,
    /// How long an interactive request (skills, chat) waits for its result.
    pub request_timeout: std::time::Duration,
    /// Process start, Unix milliseconds.
    pub started_unix_ms: i64,
    /// The dashboard's live feed (`/v1/events`).
    pub hub: events::EventHub,
    /// Thumbnails made for the dashboard.
    pub thumbs: Arc<dashboard::Thumbnails>,
}

/// Builds the router with auth, body-size limits and a deadline for receiving a body.
pub fn router(state: AppState, body_limit: usize, body_timeout: std::time::Duration) -> Router {
    let mut router = Router::new();
    for (doc, method_router) in openapi::table() {
        router = router.route(doc.path, method_router);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), vram_headers))
        .layer(middleware::from_fn(move |req, next| {
            read_body(body_limit, body_timeout, req, next)
        }))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// Turns any error answered without a JSON body (an extractor's plain-text
/// rejection, for instance) into the API's `{"error": {"code", "message"}}`.
async fn json_errors(
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let shape = openapi::error_shape(req.uri().path());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let mut out = openapi::shaped_error(shape, ApiError::new(status, code, message));
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method (see /openapi.json)",
    )
}

/// Reads the whole request body within `timeout` (408 otherwise) and `limit` (413),
/// so a client trickling a body (slow-loris) cannot hold a request open for long.
async fn read_body(
    limit: usize,
    timeout: std::time::Duration,
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let shape = openapi::error_shape(parts.uri.path());
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {} MiB", limit >> 20),
        )
    };
    // A declared length over the limit is refused before reading any of it.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return openapi::shaped_error(shape, too_large());
    }
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Err(_) => {
            return openapi::shaped_error(
                shape,
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the request body did not arrive within {} s",
                        timeout.as_secs()
                    ),
                ),
            );
        }
        Ok(Err(e)) => {
            let over = format!("{e:?}").contains("LengthLimitError")
                || e.to_string().contains("length limit");
            let e = if over {
                too_large()
            } else {
                ApiError::bad_request("invalid_body", format!("cannot read the request body: {e}"))
            };
            return openapi::shaped_error(shape, e);
        }
        Ok(Ok(b)) => b,
    };
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Adds `X-VRAM-Used`/`X-VRAM-Total` (MiB, when a GPU probe is active) and
/// `X-Captiond-Concurrency` (the current target) to every `/v1` response.
async fn vram_headers(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let v1 = req.uri().path().starts_with("/v1");
    let mut resp = next.run(req).await;
    if !v1 {
        return resp;
    }
    let headers = resp.headers_mut();
    if let Some((used, total)) = state.governor.get().and_then(|g| g.vram_mib()) {
        headers.insert("x-vram-used", used.into());
        headers.insert("x-vram-total", total.into());
    }
    if let Some(pool) = state.pool.get() {
        headers.insert("x-captiond-concurrency", pool.stats().target.into());
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, Json(serde_json::json!({"ready": true})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({"ready": false, "error": {"code": "loading", "message": "the model is still loading"}}),
            ),
        )
    }
}

/// The figures behind `/v1/stats` and `/metrics`.
#[derive(Debug, serde::Serialize)]
pub struct Stats {
    /// Jobs per state.
    pub jobs: StateCounts,
    /// Jobs that succeeded per second over the last minute.
    pub images_per_second: f64,
    /// Worker figures (absent while the model loads).
    pub workers: Option<PoolStats>,
    /// Whether claiming is paused.
    pub paused: bool,
    /// Whether the model is loaded.
    pub ready: bool,
    /// The adaptive controller (absent when disabled or loading).
    pub concurrency: Option<GovernorSnapshot>,
    /// Batched decoding: passes, sequences per pass (absent while loading).
    pub decode: Option<crate::vision::engine::EngineStats>,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// The model and revision results are produced with.
    pub model: ModelIdentity,
    /// The dashboard feed's own work: streams open, ticks, queries.
    pub feed: events::FeedStats,
}

/// Database queries one `collect_stats` runs.
pub const STATS_QUERIES: u64 = 3;

async fn collect_stats(state: &AppState) -> Result<Stats, ApiError> {
    let jobs = state.store.counts(None).await?;
    let recent = state.store.succeeded_since(now_ms() - 60_000, None).await?;
    let uptime = state.started.elapsed().as_secs_f64();
    Ok(Stats {
        jobs,
        images_per_second: recent as f64 / uptime.clamp(1.0, 60.0),
        workers: state.pool.get().map(|p| p.stats()),
        paused: state.store.is_paused().await?,
        ready: state.ready.load(Ordering::SeqCst),
        concurrency: state.governor.get().map(|g| g.snapshot()),
        decode: state.captioner.get().and_then(|c| c.decode_stats()),
        uptime_seconds: uptime,
        model: state.model.clone(),
        feed: state.hub.stats(),
    })
}

async fn stats(State(state): State<AppState>) -> Result<Json<Stats>, ApiError> {
    Ok(Json(collect_stats(&state).await?))
}

async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    use std::fmt::Write;
    let s = collect_stats(&state).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP captiond_jobs Jobs in the queue by state.\n# TYPE captiond_jobs gauge"
    );
    for (name, n) in [
        ("queued", s.jobs.queued),
        ("scheduled", s.jobs.scheduled),
        ("running", s.jobs.running),
        ("succeeded", s.jobs.succeeded),
        ("failed", s.jobs.failed),
        ("cancelled", s.jobs.cancelled),
    ] {
        let _ = writeln!(out, "captiond_jobs{{state=\"{name}\"}} {n}");
    }
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        &mut out,
        "captiond_images_per_second",
        "Jobs succeeded per second over the last minute.",
        s.images_per_second,
    );
    gauge(
        &mut out,
        "captiond_ready",
        "1 when the model is loaded.",
        f64::from(u8::from(s.ready)),
    );
    gauge(
        &mut out,
        "captiond_paused",
        "1 when claiming is paused.",
        f64::from(u8::from(s.paused)),
    );
    if let Some(d) = &s.decode {
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "captiond_decode_steps_total",
            "Batched decode passes run.",
            d.steps,
        );
        counter(
            &mut out,
            "captiond_decode_sequence_steps_total",
            "Sequence-steps in them (tokens decoded).",
            d.sequence_steps,
        );
        gauge(
            &mut out,
            "captiond_decode_batch_largest",
            "Most sequences decoded in one pass so far.",
            d.largest_batch as f64,
        );
        counter(
            &mut out,
            "captiond_encode_passes_total",
            "Batched encode passes (vision and prefix prefill) run.",
            d.encode_passes,
        );
        counter(
            &mut out,
            "captiond_images_encoded_total",
            "Images encoded in them.",
            d.images_encoded,
        );
        gauge(
            &mut out,
            "captiond_encode_batch_largest",
            "Most images encoded in one pass so far.",
            d.largest_encode as f64,
        );
    }
    if let Some(w) = &s.workers {
        gauge(
            &mut out,
            "captiond_workers_busy",
            "Jobs running now.",
            w.busy as f64,
        );
        gauge(
            &mut out,
            "captiond_workers_target",
            "Concurrency target.",
            w.target as f64,
        );
        let _ = writeln!(
            out,
            "# HELP captiond_jobs_completed_total Jobs this process completed.\n# TYPE captiond_jobs_completed_total counter\ncaptiond_jobs_completed_total {}",
            w.completed
        );
    }
    if let Some(c) = &s.concurrency {
        gauge(
            &mut out,
            "captiond_concurrency_ceiling",
            "Ceiling of the adaptive controller.",
            c.ceiling as f64,
        );
        if let Some(r) = c.last {
            gauge(
                &mut out,
                "captiond_memory_used_bytes",
                "Device (or host) memory in use.",
                r.used as f64,
            );
            gauge(
                &mut out,
                "captiond_memory_total_bytes",
                "Device (or host) memory in total.",
                r.total as f64,
            );
        }
        let _ = writeln!(
            out,
            "# HELP captiond_concurrency_decisions Decisions kept in the history.\n# TYPE captiond_concurrency_decisions gauge\ncaptiond_concurrency_decisions {}",
            c.decisions.len()
        );
    }
    if let Some(w) = &s.workers {
        let _ = writeln!(
            out,
            "# HELP captiond_out_of_memory_total Out-of-memory errors seen.\n# TYPE captiond_out_of_memory_total counter\ncaptiond_out_of_memory_total {}",
            w.out_of_memory
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
