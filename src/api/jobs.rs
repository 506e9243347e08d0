//! Job, batch and queue routes: thin handlers that parse, call the store, and map.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::input::JobRequest;
use super::{ApiError, AppState};
use crate::queue::{
    CancelOutcome, ImageSource, Job, JobErrorInfo, JobState, ListQuery, NewJob, RetryOutcome,
    StateCounts, now_ms,
};

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobView {
    /// Job id (UUIDv7).
    pub id: Uuid,
    /// Task kind.
    pub task: String,
    /// Task parameters.
    pub params: serde_json::Value,
    /// Image source: `{"path": ...}` or `{"upload": <blake3>}`.
    pub image: serde_json::Value,
    /// State.
    pub state: JobState,
    /// Lower runs first.
    pub priority: i64,
    /// Attempts started.
    pub attempt: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
    /// Out-of-memory requeues.
    pub oom_count: i64,
    /// Last error.
    pub error: Option<JobErrorInfo>,
    /// Output of the skill, when succeeded.
    pub result: Option<serde_json::Value>,
    /// Model that produced the result.
    pub model: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// First start.
    pub started_at: Option<String>,
    /// Terminal time.
    pub finished_at: Option<String>,
    /// Earliest next run (for scheduled jobs).
    pub run_at: String,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Batch.
    pub batch_id: Option<Uuid>,
}

/// Formats Unix milliseconds as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

async fn view(state: &AppState, job: Job) -> Result<JobView, ApiError> {
    let result = if job.state == JobState::Succeeded {
        state.store.get_result(job.id).await?
    } else {
        None
    };
    Ok(view_with(job, result))
}

/// The API's view of a job whose result (if any) is already read.
pub fn view_with(job: Job, result: Option<crate::queue::JobResult>) -> JobView {
    JobView {
        id: job.id,
        task: job.task.as_str().into(),
        params: job.params,
        image: match job.source {
            ImageSource::Path(p) => serde_json::json!({"path": p}),
            ImageSource::Blob(b) => serde_json::json!({"upload": b}),
        },
        state: job.state,
        priority: job.priority,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        oom_count: job.oom_count,
        error: job.error,
        model: result.as_ref().map(|r| r.model.clone()),
        result: result.map(|r| r.output),
        created_at: rfc3339(job.created_at),
        started_at: job.started_at.map(rfc3339),
        finished_at: job.finished_at.map(rfc3339),
        run_at: rfc3339(job.run_at),
        idempotency_key: job.idempotency_key,
        batch_id: job.batch_id,
    }
}

/// Parses an id path segment.
pub fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request("invalid_id", format!("{raw:?} is not a job id (UUID)")))
}

/// Reads a JSON body, mapping every rejection to a JSON error.
pub async fn json_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    req: Request,
) -> Result<T, ApiError> {
    let Json(v) = Json::<T>::from_request(req, state).await?;
    Ok(v)
}

async fn job_from_request(state: &AppState, req: Request) -> Result<NewJob, ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let idem_header = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (mut job_req, upload) = if is_multipart {
        let mut mp = Multipart::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
        let mut fields = serde_json::Map::new();
        let mut upload = None;
        while let Some(field) = mp.next_field().await? {
            let name = field.name().unwrap_or_default().to_string();
            match name.as_str() {
                "image" | "file" => upload = Some(field.bytes().await?.to_vec()),
                "job" => {
                    let text = field.text().await?;
                    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        ApiError::bad_request("invalid_json", format!("field job: {e}"))
                    })?;
                    if let serde_json::Value::Object(m) = v {
                        fields.extend(m);
                    }
                }
                "task" | "length" | "question" | "object" | "idempotency_key" => {
                    fields.insert(name, serde_json::Value::String(field.text().await?));
                }
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_multipart",
                        format!("unknown form field {other:?}"),
                    ));
                }
            }
        }
        let req: JobRequest = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| ApiError::bad_request("invalid_params", e.to_string()))?;
        (req, upload)
    } else {
        (json_body::<JobRequest>(state, req).await?, None)
    };
    if job_req.idempotency_key.is_none() {
        job_req.idempotency_key = idem_header;
    }
    let state = state.clone();
    tokio::task::spawn_blocking(move || job_req.into_new_job(&state, upload))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "request validation crashed",
            )
        })?
}

/// `POST /v1/jobs`: enqueue one job → 202 (or 200 with the existing job for a known idempotency key).
pub async fn create_job(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let new = job_from_request(&state, req).await?;
    let (job, created) = state.store.insert_job(&new).await?;
    if created {
        state.wakeup.wake();
    }
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&state, job).await?)).into_response())
}

/// Body of `POST /v1/batches`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BatchRequest {
    /// Up to 10,000 jobs.
    pub jobs: Vec<JobRequest>,
}

/// Most jobs in one batch request.
pub const MAX_BATCH: usize = 10_000;

/// `POST /v1/batches`: enqueue many jobs in one transaction → 202 with the batch id.
pub async fn create_batch(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let body: BatchRequest = json_body(&state, req).await?;
    if body.jobs.is_empty() || body.jobs.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_batch",
            format!(
                "a batch holds 1 to {MAX_BATCH} jobs, got {}",
                body.jobs.len()
            ),
        ));
    }
    let st = state.clone();
    let news = tokio::task::spawn_blocking(move || {
        body.jobs
            .into_iter()
            .enumerate()
            .map(|(i, j)| {
                j.into_new_job(&st, None).map_err(|mut e| {
                    e.message = format!("jobs[{i}]: {}", e.message);
                    e
                })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "batch validation crashed",
        )
    })??;
    let (batch, ids) = state.store.insert_batch(&news).await?;
    state.wakeup.wake();
    let found = state.store.job_states(&ids).await?;
    let states: Vec<Option<JobState>> = ids.iter().map(|id| found.get(id).copied()).collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "batch_id": batch, "job_ids": ids, "states": states, "count": ids.len()
        })),
    )
        .into_response())
}

/// Jobs to look up at once (`POST /v1/jobs/lookup`), by id and by idempotency key.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LookupRequest {
    /// Job ids.
    #[serde(default)]
    pub ids: Vec<Uuid>,
    /// Idempotency keys: the jobs that hold them are answered with their `key`. Up to
    /// 10,000 ids and keys together.
    #[serde(default)]
    pub keys: Vec<String>,
}

/// The state and error of many jobs at once (`POST /v1/jobs/lookup`): how a client
/// follows a large run without one request per job, and finds the jobs that hold
/// idempotency keys. Unknown ids and keys are left out.
pub async fn lookup_jobs(
    State(state): State<AppState>,
    req: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: LookupRequest = json_body(&state, req).await?;
    if body.ids.len() + body.keys.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_params",
            format!("look up at most {MAX_BATCH} ids and keys at once"),
        ));
    }
    let states = state.store.job_states(&body.ids).await?;
    let mut jobs = Vec::with_capacity(states.len());
    for id in &body.ids {
        let Some(st) = states.get(id) else { continue };
        let error = if matches!(st, JobState::Failed | JobState::Cancelled) {
            state.store.get_job(*id).await?.and_then(|j| j.error)
        } else {
            None
        };
        jobs.push(serde_json::json!({"id": id, "state": st, "error": error}));
    }
    if !body.keys.is_empty() {
        let held = state.store.jobs_by_keys(&body.keys).await?;
        for key in &body.keys {
            let Some(j) = held.get(key) else { continue };
            let error = j
                .error
                .as_ref()
                .filter(|_| matches!(j.state, JobState::Failed | JobState::Cancelled));
            jobs.push(
                serde_json::json!({"id": j.id, "state": j.state, "error": error, "key": key}),
            );
        }
    }
    Ok(Json(serde_json::json!({ "jobs": jobs })))
}

/// Progress of a batch.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchView {
    /// Batch id.
    pub id: Uuid,
    /// Jobs in it.
    pub total: i64,
    /// Jobs per state.
    pub counts: StateCounts,
    /// Images per second over the last minute.
    pub images_per_second: f64,
    /// Seconds until the pending jobs are done at that rate.
    pub eta_seconds: Option<f64>,
    /// Whether every job reached a terminal state.
    pub done: bool,
    /// Creation time.
    pub created_at: String,
}

/// `GET /v1/batches/{id}`.
pub async fn get_batch(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BatchView>, ApiError> {
    let id = parse_id(&id)?;
    let (created_at, total) = state
        .store
        .batch(id)
        .await?
        .ok_or_else(|| ApiError::not_found("batch"))?;
    let counts = state.store.counts(Some(id)).await?;
    let window_ms = 60_000.min((now_ms() - created_at).max(1_000));
    let recent = state
        .store
        .succeeded_since(now_ms() - window_ms, Some(id))
        .await?;
    let rate = recent as f64 / (window_ms as f64 / 1000.0);
    let pending = counts.pending();
    Ok(Json(BatchView {
        id,
        total,
        eta_seconds: eta_seconds(pending, rate),
        images_per_second: rate,
        done: pending == 0,
        counts,
        created_at: rfc3339(created_at),
    }))
}

/// Seconds until `pending` jobs are done at `rate` per second: 0 when none wait,
/// unknown while nothing completes.
pub fn eta_seconds(pending: i64, rate: f64) -> Option<f64> {
    if pending == 0 {
        Some(0.0)
    } else if rate > 0.0 {
        Some(pending as f64 / rate)
    } else {
        None
    }
}

/// Query of `GET /v1/jobs/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WaitQuery {
    /// Long-poll up to this long for a terminal state (`30s`, `500ms`; at most 120 s).
    pub wait: Option<String>,
}

/// `GET /v1/jobs/{id}[?wait=30s]`.
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobView>, ApiError> {
    let Query(q) = query?;
    let id = parse_id(&id)?;
    let wait = match q.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => parse_wait(w)?,
    };
    let job = wait_for_terminal(&state, id, wait).await?;
    Ok(Json(view(&state, job).await?))
}

/// Parses a long-poll duration: `30s`, `1500ms`, or plain seconds.
pub fn parse_wait(w: &str) -> Result<Duration, ApiError> {
    let d = match w.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(w)
            .map_err(|e| ApiError::bad_request("invalid_query", format!("wait={w}: {e}")))?,
    };
    Ok(d.min(Duration::from_secs(120)))
}

/// Returns the job once terminal, or as it is when `wait` runs out.
pub async fn wait_for_terminal(
    state: &AppState,
    id: Uuid,
    wait: Duration,
) -> Result<Job, ApiError> {
    let deadline = Instant::now() + wait;
    let mut events = state.events.subscribe();
    loop {
        let job = state
            .store
            .get_job(id)
            .await?
            .ok_or_else(|| ApiError::not_found("job"))?;
        let left = deadline.saturating_duration_since(Instant::now());
        if job.state.is_terminal() || left.is_zero() {
            return Ok(job);
        }
        // Wake on this job's event, and re-check at least every second.
        let until = Instant::now() + left.min(Duration::from_secs(1));
        loop {
            match tokio::time::timeout_at(until.into(), events.recv()).await {
                Ok(Ok(ev)) if ev != id => continue,
                _ => break,
            }
        }
    }
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListParams {
    /// Only this state.
    pub state: Option<String>,
    /// Only this batch.
    pub batch: Option<String>,
    /// Ids after this one (the previous page's `next_after`).
    pub after: Option<String>,
    /// Page size (1..=1000, default 100).
    pub limit: Option<i64>,
}

/// `GET /v1/jobs?state=&batch=&after=&limit=` with keyset pagination.
pub async fn list_jobs(
    State(state): State<AppState>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(p) = query?;
    let st = match p.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request("invalid_query", format!("unknown state {s:?}"))
        })?),
    };
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "limit must be between 1 and 1000",
        ));
    }
    let q = ListQuery {
        state: st,
        batch: p.batch.as_deref().map(parse_id).transpose()?,
        after: p.after.as_deref().map(parse_id).transpose()?,
        limit,
    };
    let jobs = state.store.list_jobs(&q).await?;
    let next_after = if jobs.len() as i64 == limit {
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    let mut views = Vec::with_capacity(jobs.len());
    for j in jobs {
        views.push(view(&state, j).await?);
    }
    Ok(Json(
        serde_json::json!({"jobs": views, "next_after": next_after}),
    ))
}

/// `POST /v1/jobs/{id}/cancel`.
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id)?;
    let outcome = state
        .store
        .cancel(id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let (job, note) = match outcome {
        CancelOutcome::Cancelled(j) => {
            state.events.publish(id);
            (j, "cancelled")
        }
        CancelOutcome::Requested(j) => {
            if let Some(pool) = state.pool.get() {
                pool.cancel_running(id);
            }
            (j, "cancellation requested; the job stops at its next token")
        }
        CancelOutcome::AlreadyFinished(j) => (j, "the job had already finished"),
    };
    Ok(Json(
        serde_json::json!({"job": view(&state, job).await?, "note": note}),
    ))
}

/// `POST /v1/jobs/{id}/retry`: failed or cancelled → queued.
pub async fn retry_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&id)?;
    match state
        .store
        .retry(id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?
    {
        RetryOutcome::Queued(j) => {
            state.wakeup.wake();
            Ok(Json(view(&state, j).await?))
        }
        RetryOutcome::NotRetryable(j) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_retryable",
            format!(
                "job is {}; only failed or cancelled jobs can be retried",
                j.state.as_str()
            ),
        )),
    }
}

/// `POST /v1/queue/pause`: stop claiming (persisted across restarts).
pub async fn pause_queue(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_paused(&state, true).await
}

/// `POST /v1/queue/resume`.
pub async fn resume_queue(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    set_paused(&state, false).await
}

async fn set_paused(state: &AppState, paused: bool) -> Result<Json<serde_json::Value>, ApiError> {
    state.store.set_paused(paused).await?;
    if let Some(pool) = state.pool.get() {
        pool.set_paused(paused);
    }
    state.wakeup.wake();
    Ok(Json(serde_json::json!({"paused": paused})))
}
