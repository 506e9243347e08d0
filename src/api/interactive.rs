//! Interactive requests (the Station skills and OpenAI chat): each becomes a job at
//! a priority above batch work; the request waits for it (or streams its text), and
//! a client that goes away cancels it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::input::{INTERACTIVE_PRIORITY, store_upload};
use super::jobs::wait_for_terminal;
use super::{ApiError, AppState};
use crate::queue::{CancelOutcome, Job, JobState, NewJob, TaskKind};
use crate::vision::{SkillResult, Usage};
use crate::workers::caption::TaskParams;

/// Cancels its job when dropped while armed: the request's future (or its stream)
/// is dropped when the client disconnects.
pub struct CancelOnDrop {
    state: AppState,
    id: Uuid,
    armed: bool,
}

impl CancelOnDrop {
    /// The job finished (or the request answered); nothing to cancel.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let state = self.state.clone();
        let id = self.id;
        tracing::info!(job = %id, "client went away; cancelling its job");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { cancel(&state, id).await });
        }
    }
}

/// Cancels a job: at once when waiting, at its next token when running.
pub async fn cancel(state: &AppState, id: Uuid) {
    match state.store.cancel(id).await {
        Ok(Some(CancelOutcome::Cancelled(_))) => state.events.publish(id),
        Ok(Some(CancelOutcome::Requested(_))) => {
            if let Some(pool) = state.pool.get() {
                pool.cancel_running(id);
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(job = %id, error = %e, "cancelling failed"),
    }
}

/// A started interactive job.
pub struct Started {
    /// The job id (the response's `request_id`).
    pub id: Uuid,
    /// Cancels the job if the request goes away first.
    pub guard: CancelOnDrop,
    /// Text deltas as they are generated (when streaming).
    pub deltas: Option<mpsc::UnboundedReceiver<String>>,
}

/// Enqueues one interactive job on uploaded image bytes; 503 while the model loads or
/// the queue is paused.
pub async fn start(
    state: &AppState,
    task: TaskKind,
    params: TaskParams,
    image: &[u8],
    stream: bool,
) -> Result<Started, ApiError> {
    let Some(pool) = state
        .pool
        .get()
        .filter(|_| state.ready.load(Ordering::SeqCst))
    else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "loading",
            "the model is still loading; try again shortly",
        ));
    };
    if state.store.is_paused().await? {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "paused",
            "the queue is paused (POST /v1/queue/resume)",
        ));
    }
    params
        .to_skill(task, &state.skill_defaults)
        .map_err(|m| ApiError::bad_request("invalid_params", m))?;
    let st = state.clone();
    let bytes = image.to_vec();
    let source = tokio::task::spawn_blocking(move || store_upload(&st, &bytes))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "upload check crashed",
            )
        })??;
    let new = NewJob {
        task,
        params: serde_json::to_value(&params)
            .map_err(|e| ApiError::bad_request("invalid_params", e.to_string()))?,
        source,
        priority: INTERACTIVE_PRIORITY,
        max_attempts: state.max_attempts,
        idempotency_key: None,
    };
    let id = Uuid::now_v7();
    let deltas = stream.then(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        pool.subscribe(id, tx);
        rx
    });
    state.store.insert_job_as(id, &new).await?;
    state.wakeup.wake();
    Ok(Started {
        id,
        guard: CancelOnDrop {
            state: state.clone(),
            id,
            armed: true,
        },
        deltas,
    })
}

/// A finished interactive job's output.
pub struct Finished {
    /// The job.
    pub job: Job,
    /// The skill's result.
    pub result: SkillResult,
}

impl Finished {
    /// Station's `_stats`: generated tokens, seconds and tokens per second.
    pub fn stats(&self) -> serde_json::Value {
        stats(&self.result.usage)
    }
}

/// Station-style token statistics of a run.
pub fn stats(u: &Usage) -> serde_json::Value {
    let duration = u.encode_seconds + u.generate_seconds;
    let tps = if u.generate_seconds > 0.0 {
        u.completion_tokens as f64 / u.generate_seconds
    } else {
        0.0
    };
    serde_json::json!({
        "tokens": u.completion_tokens,
        "prompt_tokens": u.prompt_tokens,
        "duration": (duration * 100.0).round() / 100.0,
        "tokens_per_sec": (tps * 10.0).round() / 10.0,
    })
}

/// Waits for the job's result: 504 (and the job cancelled) after `timeout`; a
/// failed job becomes 400 for bad input, 500 otherwise.
pub async fn finish(state: &AppState, id: Uuid, timeout: Duration) -> Result<Finished, ApiError> {
    let job = wait_for_terminal(state, id, timeout).await?;
    match job.state {
        JobState::Succeeded => {
            let stored = state.store.get_result(id).await?.ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "result missing",
                )
            })?;
            let result: SkillResult = serde_json::from_value(stored.output).map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
            Ok(Finished { job, result })
        }
        JobState::Failed | JobState::Cancelled => {
            let (code, message) = job
                .error
                .map(|e| (e.code, e.message))
                .unwrap_or_else(|| ("failed".into(), "the job failed".into()));
            let status = match code.as_str() {
                "image_unreadable" | "image_missing" | "invalid_params" => StatusCode::BAD_REQUEST,
                "cancelled" => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(
                status,
                leak_code(&code),
                message.trim().to_string(),
            ))
        }
        _ => {
            cancel(state, id).await;
            Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "no result within {} s; the job was cancelled",
                    timeout.as_secs()
                ),
            ))
        }
    }
}

/// Maps a stored error code onto the API's static codes.
fn leak_code(code: &str) -> &'static str {
    match code {
        "image_unreadable" => "image_unreadable",
        "image_missing" => "image_missing",
        "invalid_params" => "invalid_params",
        "cancelled" => "cancelled",
        "out_of_memory" => "out_of_memory",
        "device_fault" => "device_fault",
        "model_error" => "model_error",
        _ => "job_failed",
    }
}

/// The text of a caption or an answer (empty for boxes and points).
pub fn text_of(r: &SkillResult) -> String {
    match &r.output {
        crate::vision::SkillOutput::Caption { caption } => caption.clone(),
        crate::vision::SkillOutput::Answer { answer, .. } => answer.clone(),
        _ => String::new(),
    }
}

/// How one client family frames a streamed job as Server-Sent Events `data:` payloads.
pub trait StreamFormat: Send + 'static {
    /// Events before any text.
    fn opening(&self) -> Vec<String> {
        Vec::new()
    }
    /// One piece of text (whole words).
    fn chunk(&self, text: &str) -> String;
    /// Events after the text of a finished job.
    fn done(&self, done: &Finished) -> Vec<String>;
    /// Events after a failure.
    fn failed(&self, e: &ApiError) -> Vec<String>;
}

/// Streams a started job's text as it is generated, in whole words, framed by
/// `format`. The stream ends after the job's last events; a client that goes away
/// drops the stream, and the job is cancelled.
pub fn stream<F: StreamFormat>(
    state: AppState,
    started: Started,
    mut deltas: mpsc::UnboundedReceiver<String>,
    timeout: Duration,
    format: F,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, Sse};
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let id = started.id;
    let mut guard = started.guard;
    tokio::spawn(async move {
        let send = |data: String| {
            let tx = tx.clone();
            async move { tx.send(Event::default().data(data)).await.is_ok() }
        };
        for e in format.opening() {
            if !send(e).await {
                return; // the client left: `guard` cancels the job
            }
        }
        let mut words = WordChunker::default();
        let finished = finish(&state, id, timeout);
        tokio::pin!(finished);
        let outcome = loop {
            tokio::select! {
                d = deltas.recv() => match d {
                    Some(d) => if let Some(w) = words.push(&d)
                        && !send(format.chunk(&w)).await {
                        return; // the client left: `guard` cancels the job
                    },
                    None => break (&mut finished).await,
                },
                r = &mut finished => break r,
                _ = tx.closed() => return, // the client left: `guard` cancels the job
            }
        };
        guard.disarm();
        let events = match outcome {
            Ok(done) => {
                let mut events: Vec<String> = words
                    .finish(&text_of(&done.result))
                    .map(|rest| format.chunk(&rest))
                    .into_iter()
                    .collect();
                events.extend(format.done(&done));
                events
            }
            Err(e) => format.failed(&e),
        };
        for e in events {
            send(e).await;
        }
    });
    Sse::new(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(Ok))
    }))
}

/// Collects streamed text and hands it out in whole words: a chunk always ends
/// after whitespace, and the rest waits for the next delta (or the end).
#[derive(Debug, Default)]
pub struct WordChunker {
    pending: String,
    sent: String,
}

impl WordChunker {
    /// Adds a delta; returns the complete words it finishes, if any.
    pub fn push(&mut self, delta: &str) -> Option<String> {
        self.pending.push_str(delta);
        let cut = self
            .pending
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map(|(i, c)| i + c.len_utf8())?;
        let chunk: String = self.pending.drain(..cut).collect();
        self.sent.push_str(&chunk);
        Some(chunk)
    }

    /// The rest at the end: whatever is pending, plus any part of the final text
    /// that was never streamed (e.g. when a retry ran after a rescue).
    pub fn finish(&mut self, final_text: &str) -> Option<String> {
        let mut rest = std::mem::take(&mut self.pending);
        let streamed = format!("{}{}", self.sent, rest);
        if let Some(tail) = final_text.strip_prefix(streamed.as_str()) {
            rest.push_str(tail);
        }
        self.sent.push_str(&rest);
        (!rest.is_empty()).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::WordChunker;

    #[test]
    fn words_are_never_split_across_chunks() {
        let mut w = WordChunker::default();
        assert_eq!(w.push("A pho"), Some("A ".into()));
        assert_eq!(w.push("to"), None);
        assert_eq!(w.push("graph of a"), Some("photograph of ".into()));
        assert_eq!(w.push(" dog"), Some("a ".into()));
        assert_eq!(w.finish("A photograph of a dog."), Some("dog.".into()));
        assert_eq!(w.finish("A photograph of a dog."), None);
    }
}
