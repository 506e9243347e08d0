//! Jobs, their states and the allowed transitions between them: the one place where
//! the queue's state machine is written down.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting to be claimed.
    Queued,
    /// Waiting for its retry time (`run_at`).
    Scheduled,
    /// Claimed by a worker under a lease.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished without a result; `error` says why.
    Failed,
    /// Stopped on request.
    Cancelled,
}

/// Every allowed transition and what causes it. The store's guarded statements
/// implement exactly these; the README reproduces the table.
pub const TRANSITIONS: &[(JobState, JobState, &str)] = &[
    (JobState::Queued, JobState::Running, "claim"),
    (
        JobState::Scheduled,
        JobState::Running,
        "claim once run_at has passed",
    ),
    (JobState::Queued, JobState::Cancelled, "cancel"),
    (JobState::Scheduled, JobState::Cancelled, "cancel"),
    (
        JobState::Running,
        JobState::Succeeded,
        "complete (lease owner and attempt checked)",
    ),
    (
        JobState::Running,
        JobState::Failed,
        "permanent error, or attempts/OOM retries exhausted",
    ),
    (
        JobState::Running,
        JobState::Scheduled,
        "transient error: retry after backoff",
    ),
    (
        JobState::Running,
        JobState::Queued,
        "out of memory (attempt not counted), lease expired, shutdown release",
    ),
    (
        JobState::Running,
        JobState::Cancelled,
        "cancel observed by the worker",
    ),
    (JobState::Failed, JobState::Queued, "retry"),
    (JobState::Cancelled, JobState::Queued, "retry"),
];

impl JobState {
    /// All states, for counting and documentation.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the job will not change again without a retry.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether `self → to` is in [`TRANSITIONS`].
    pub fn can_become(self, to: JobState) -> bool {
        TRANSITIONS.iter().any(|(f, t, _)| *f == self && *t == to)
    }
}

/// The task a job performs, as stored in the `task` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Describe the image.
    Caption,
    /// Answer a question.
    Query,
    /// Find boxes.
    Detect,
    /// Find points.
    Point,
}

impl TaskKind {
    /// Column value.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Caption => "caption",
            TaskKind::Query => "query",
            TaskKind::Detect => "detect",
            TaskKind::Point => "point",
        }
    }

    /// Parses a column value.
    pub fn parse(s: &str) -> Option<Self> {
        [
            TaskKind::Caption,
            TaskKind::Query,
            TaskKind::Detect,
            TaskKind::Point,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// Where a job's image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum ImageSource {
    /// A canonical absolute path inside a library root.
    Path(String),
    /// Uploaded bytes stored under the data dir by their BLAKE3 hex digest.
    Blob(String),
}

/// A job's last error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobErrorInfo {
    /// Stable machine-readable code (`image_unreadable`, `lease_expired`, ...).
    pub code: String,
    /// What happened, for people.
    pub message: String,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// UUIDv7.
    pub id: Uuid,
    /// Task kind.
    pub task: TaskKind,
    /// Task parameters and generation settings (JSON object).
    pub params: serde_json::Value,
    /// Image source.
    pub source: ImageSource,
    /// Lower runs first.
    pub priority: i64,
    /// Current state.
    pub state: JobState,
    /// Attempts started so far (OOM requeues excluded).
    pub attempt: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
    /// Out-of-memory requeues so far.
    pub oom_count: i64,
    /// Earliest time (ms) it may run.
    pub run_at: i64,
    /// Worker holding the lease.
    pub lease_owner: Option<String>,
    /// When the lease runs out (ms).
    pub lease_expires_at: Option<i64>,
    /// Whether cancellation was requested while running.
    pub cancel_requested: bool,
    /// Last error.
    pub error: Option<JobErrorInfo>,
    /// Creation time (ms).
    pub created_at: i64,
    /// First start (ms).
    pub started_at: Option<i64>,
    /// Terminal time (ms).
    pub finished_at: Option<i64>,
    /// Client-chosen key that makes enqueueing idempotent.
    pub idempotency_key: Option<String>,
    /// Batch it belongs to.
    pub batch_id: Option<Uuid>,
}

/// What the client asks to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Task kind.
    pub task: TaskKind,
    /// Task parameters (JSON object).
    pub params: serde_json::Value,
    /// Image source.
    pub source: ImageSource,
    /// Lower runs first.
    pub priority: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
    /// Optional idempotency key.
    pub idempotency_key: Option<String>,
}

/// A stored result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The attempt that produced it.
    pub attempt: i64,
    /// Model id and revision.
    pub model: String,
    /// The skill output (JSON).
    pub output: serde_json::Value,
    /// When it was stored (ms).
    pub created_at: i64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_only_leave_through_retry() {
        for (from, to, why) in TRANSITIONS {
            if from.is_terminal() {
                assert_eq!(*to, JobState::Queued, "{from:?} → {to:?} ({why})");
            }
        }
        assert!(!JobState::Succeeded.can_become(JobState::Queued));
        assert!(JobState::Running.can_become(JobState::Succeeded));
    }

    #[test]
    fn state_names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
    }
}
