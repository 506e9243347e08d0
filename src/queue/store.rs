//! Every SQL statement of the queue: connection pragmas, migrations, and one guarded
//! statement per state transition. Writes go through one connection; reads use a pool.
//! Workers' finishing writes are grouped into shared commits by a finisher task.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::job::{ImageSource, Job, JobErrorInfo, JobResult, JobState, NewJob, TaskKind, now_ms};

/// How durable each commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`: a commit survives power loss (the default).
    #[default]
    Full,
    /// `synchronous=NORMAL`: faster; may lose the last commits on power loss.
    Normal,
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            other => Err(format!("unknown durability {other:?}; use full or normal")),
        }
    }
}

/// One migration file of `migrations/`, embedded at build time: its version and
/// description (the file name `NNNN_description.sql`) and its SQL.
type MigrationFile = (i64, &'static str, &'static str);

/// The SQLite schema, in order (`migrations/sqlite/`).
const SQLITE_MIGRATIONS: &[MigrationFile] = &[
    (
        1,
        "jobs",
        include_str!("../../migrations/sqlite/0001_jobs.sql"),
    ),
    (
        2,
        "calibrations",
        include_str!("../../migrations/sqlite/0002_calibrations.sql"),
    ),
    (
        3,
        "library",
        include_str!("../../migrations/sqlite/0003_library.sql"),
    ),
];

/// The PostgreSQL schema, in order (`migrations/postgres/`).
const POSTGRES_MIGRATIONS: &[MigrationFile] = &[(
    1,
    "queue",
    include_str!("../../migrations/postgres/0001_queue.sql"),
)];

/// The migrator `sqlx::migrate!` would build from the files' folder (same versions,
/// descriptions and checksums, so a database migrated by either accepts the other),
/// without sqlx's compile-time macros and their second SQLite build.
fn migrator(files: &[MigrationFile]) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(version, description, sql)| {
                let no_tx = sql.starts_with("-- no-transaction");
                let sql = sqlx::SqlSafeStr::into_sql_str(sql);
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql,
                    no_tx,
                )
            })
            .collect(),
    )
}

/// Queue store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk holding the database is full.
    #[error("the database disk is full; free space and retry")]
    DiskFull,
    /// Another process holds the database.
    #[error("the database is locked by another process")]
    Locked,
    /// The database file is not a usable SQLite database.
    #[error("database {path} is unreadable or corrupt: {message}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What SQLite said.
        message: String,
    },
    /// A stored row could not be interpreted.
    #[error("invalid stored row: {0}")]
    InvalidRow(String),
    /// The database server cannot be reached (PostgreSQL restarting, network down).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The finisher task is gone (shutting down).
    #[error("the queue store is shutting down")]
    Closed,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if matches!(
            e,
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
        ) {
            return StoreError::Unavailable(e.to_string());
        }
        if let Some(db) = e.as_database_error() {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // PostgreSQL SQLSTATEs: disk full; serialization failure, deadlock; the
            // server shutting down or not yet accepting connections.
            match code.as_str() {
                "53100" => return StoreError::DiskFull,
                "40001" | "40P01" => return StoreError::Locked,
                "57P01" | "57P02" | "57P03" | "08006" | "08003" | "08001" => {
                    return StoreError::Unavailable(db.message().to_string());
                }
                _ => {}
            }
            let msg = db.message().to_ascii_lowercase();
            // SQLITE_FULL = 13; extended codes keep the primary code in the low byte.
            let primary = code.parse::<i64>().map(|c| c & 0xff).unwrap_or(-1);
            if primary == 13 || msg.contains("disk is full") {
                return StoreError::DiskFull;
            }
            if primary == 5 || primary == 6 || msg.contains("database is locked") {
                return StoreError::Locked;
            }
        }
        StoreError::Database(e)
    }
}

/// Result type of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// How a worker finishes an attempt; each kind is one guarded, set-based statement of the
/// group commit.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Store the result and succeed.
    Succeeded {
        /// Model id and revision.
        model: String,
        /// Skill output.
        output: serde_json::Value,
    },
    /// Fail for good.
    Failed(JobErrorInfo),
    /// Retry at `run_at` (ms), or fail when attempts are exhausted.
    Retry {
        /// When to run again.
        run_at: i64,
        /// Why.
        error: JobErrorInfo,
    },
    /// Out of memory: requeue without counting the attempt, unless `max_oom` is reached.
    OutOfMemory {
        /// Cap on OOM requeues.
        max_oom: i64,
        /// Why.
        error: JobErrorInfo,
    },
    /// Cancelled while running.
    Cancelled,
    /// Given back on shutdown without counting the attempt.
    Released,
}

/// One attempt's finishing write.
#[derive(Debug, Clone)]
pub struct FinishOp {
    /// Job id.
    pub id: Uuid,
    /// Lease owner that claimed it.
    pub owner: String,
    /// Attempt number it claimed.
    pub attempt: i64,
    /// What happened.
    pub finish: Finish,
    /// Claim the slot's next job in the same commit, under a lease this long.
    pub claim_next: Option<Duration>,
}

/// Result of a finishing write.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishOutcome {
    /// Whether the lease was still held and the transition was written.
    pub applied: bool,
    /// The next job claimed in the same commit, when asked for and available.
    pub next: Option<Job>,
}

/// A lease still held after a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Job id.
    pub id: Uuid,
    /// Attempt holding the lease.
    pub attempt: i64,
    /// Whether cancellation was requested.
    pub cancel: bool,
}

/// Outcome of a cancel request.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// A queued or scheduled job was cancelled at once.
    Cancelled(Job),
    /// A running job will stop at its next token.
    Requested(Job),
    /// The job had already finished.
    AlreadyFinished(Job),
}

/// Outcome of a retry request.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    /// Failed or cancelled job queued again.
    Queued(Job),
    /// The job is not failed or cancelled.
    NotRetryable(Job),
}

/// Counts per state.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct StateCounts {
    /// Waiting.
    pub queued: i64,
    /// Waiting for a retry time.
    pub scheduled: i64,
    /// Running.
    pub running: i64,
    /// Done.
    pub succeeded: i64,
    /// Failed.
    pub failed: i64,
    /// Cancelled.
    pub cancelled: i64,
}

impl StateCounts {
    fn add(&mut self, state: JobState, n: i64) {
        match state {
            JobState::Queued => self.queued += n,
            JobState::Scheduled => self.scheduled += n,
            JobState::Running => self.running += n,
            JobState::Succeeded => self.succeeded += n,
            JobState::Failed => self.failed += n,
            JobState::Cancelled => self.cancelled += n,
        }
    }

    /// All jobs counted.
    pub fn total(&self) -> i64 {
        self.queued + self.scheduled + self.running + self.succeeded + self.failed + self.cancelled
    }

    /// Jobs not yet in a terminal state.
    pub fn pending(&self) -> i64 {
        self.queued + self.scheduled + self.running
    }
}

/// A warm-up calibration of the concurrency controller for one device and model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Calibration {
    /// Device identity (GPU name and UUID, or `host`).
    pub device: String,
    /// Model id and revision.
    pub model: String,
    /// Most concurrent generations that fit the free memory minus the reserve.
    pub max_concurrency: usize,
    /// Memory one generation adds at its peak.
    pub per_generation_bytes: u64,
    /// Memory in use before the warm-up.
    pub baseline_used_bytes: u64,
    /// Device memory in total.
    pub total_bytes: u64,
    /// When it was measured (ms).
    pub measured_at: i64,
}

/// Filter and page of a job listing (keyset pagination on id).
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this batch.
    pub batch: Option<Uuid>,
    /// Ids strictly after this one.
    pub after: Option<Uuid>,
    /// Page size.
    pub limit: i64,
}

/// A batch with its jobs counted per state (the dashboard's batch list).
#[derive(Debug, Clone, Serialize)]
pub struct BatchSummary {
    /// Batch id.
    pub id: Uuid,
    /// Creation time, Unix milliseconds.
    pub created_at: i64,
    /// Jobs in it.
    pub total: i64,
    /// Jobs per state.
    pub counts: StateCounts,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Commit durability.
    pub durability: Durability,
    /// How long a statement waits for a lock.
    pub busy_timeout: Duration,
    /// Read connections.
    pub read_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Full,
            busy_timeout: Duration::from_secs(5),
            read_connections: 4,
        }
    }
}

/// The job columns in the order `job_from_row` reads them by name.
macro_rules! job_columns {
    () => {
        "id, task, params, source_kind, source, priority, state, attempt, max_attempts, oom_count, run_at, lease_owner, lease_expires_at, cancel_requested, error_code, error_message, created_at, started_at, finished_at, idempotency_key, batch_id"
    };
}

mod library;
pub(crate) mod postgres;
pub use library::{LibraryFile, ResultSettings};

const SQL_INSERT_JOB: &str = concat!(
    "INSERT INTO jobs (id, task, params, source_kind, source, priority, state, max_attempts, run_at, created_at, idempotency_key, batch_id) ",
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?8, ?9, NULL) ON CONFLICT(idempotency_key) DO NOTHING ",
    "RETURNING ",
    job_columns!()
);
const SQL_INSERT_MANY: &str = concat!(
    "INSERT INTO jobs (id, task, params, source_kind, source, priority, state, max_attempts, run_at, created_at, idempotency_key, batch_id) ",
    "SELECT j ->> 'id', j ->> 'task', j ->> 'params', j ->> 'kind', j ->> 'source', j ->> 'priority', 'queued', j ->> 'max_attempts', ?2, ?2, j ->> 'key', ?3 ",
    "FROM (SELECT value AS j FROM json_each(?1)) WHERE true ON CONFLICT(idempotency_key) DO NOTHING"
);
const SQL_IDS_BY_KEYS: &str = "SELECT idempotency_key, id FROM jobs WHERE idempotency_key IN (SELECT value FROM json_each(?1))";
const SQL_JOB_BY_ID: &str = concat!("SELECT ", job_columns!(), " ", "FROM jobs WHERE id = ?1");
const SQL_JOB_BY_KEY: &str = concat!(
    "SELECT ",
    job_columns!(),
    " ",
    "FROM jobs WHERE idempotency_key = ?1"
);
const SQL_LIST: &str = concat!(
    "SELECT ",
    job_columns!(),
    " ",
    "FROM jobs WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR batch_id = ?2) AND (?3 IS NULL OR id > ?3) ORDER BY id LIMIT ?4"
);
const SQL_HEARTBEAT: &str = "UPDATE jobs SET lease_expires_at = ?2 WHERE lease_owner = ?1 AND state = 'running' RETURNING id, attempt, cancel_requested";
/// Finishing ops of one kind (a JSON array, bound positionally) joined to their jobs under
/// the lease guard: same owner, same attempt, still running.
macro_rules! finishing {
    () => {
        concat!(
            "FROM (SELECT value ->> 'id' AS fid, value ->> 'owner' AS fowner, value ->> 'attempt' AS fattempt, ",
            "value ->> 'run_at' AS frun_at, value ->> 'code' AS fcode, value ->> 'message' AS fmessage, ",
            "value ->> 'max_oom' AS fmax_oom FROM jsonb_each(?)) AS f ",
            "WHERE jobs.id = f.fid AND jobs.lease_owner = f.fowner AND jobs.attempt = f.fattempt ",
            "AND jobs.state = 'running';"
        )
    };
}

/// One group commit in one round trip: which ops still hold their lease (one JSON row),
/// results, the guarded transition of each finishing kind, then the claim of the slots'
/// next jobs. Parameters are positional, bound in text order by `group_commit` (sqlx
/// skips numbered parameters after a gap in multi-statement queries). `$end` is
/// `COMMIT;`, or empty when more claims follow.
macro_rules! finish_group {
    ($end:literal) => {
        concat!(
            "BEGIN IMMEDIATE;",
            // The ops whose lease is still held: exactly those the statements below apply.
            "SELECT json_group_array(json_array(jobs.id, jobs.attempt)) FROM jsonb_each(?) AS f ",
            "JOIN jobs ON jobs.id = f.value ->> 'id' AND jobs.lease_owner = f.value ->> 'owner' ",
            "AND jobs.attempt = f.value ->> 'attempt' AND jobs.state = 'running';",
            // Results first, under the same guard the success transition checks below.
            "INSERT INTO results (job_id, attempt, model, output, created_at) ",
            "SELECT f.value ->> 'id', f.value ->> 'attempt', f.value ->> 'model', f.value ->> 'output', ? ",
            "FROM jsonb_each(?) AS f JOIN jobs ON jobs.id = f.value ->> 'id' AND jobs.lease_owner = f.value ->> 'owner' ",
            "AND jobs.attempt = f.value ->> 'attempt' AND jobs.state = 'running' WHERE true ",
            "ON CONFLICT(job_id) DO UPDATE SET attempt = excluded.attempt, model = excluded.model, output = excluded.output, ",
            "created_at = excluded.created_at;",
            "UPDATE jobs SET state = 'succeeded', finished_at = ?, lease_owner = NULL, lease_expires_at = NULL, ",
            "error_code = NULL, error_message = NULL ",
            finishing!(),
            "UPDATE jobs SET state = 'failed', finished_at = ?, lease_owner = NULL, lease_expires_at = NULL, ",
            "error_code = f.fcode, error_message = f.fmessage ",
            finishing!(),
            "UPDATE jobs SET state = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'scheduled' END, ",
            "finished_at = CASE WHEN attempt >= max_attempts THEN ? ELSE NULL END, run_at = f.frun_at, ",
            "lease_owner = NULL, lease_expires_at = NULL, error_code = f.fcode, error_message = f.fmessage ",
            finishing!(),
            "UPDATE jobs SET oom_count = oom_count + 1, attempt = attempt - 1, ",
            "state = CASE WHEN oom_count + 1 >= f.fmax_oom THEN 'failed' ELSE 'queued' END, ",
            "finished_at = CASE WHEN oom_count + 1 >= f.fmax_oom THEN ? ELSE NULL END, run_at = ? + 1000 * (oom_count + 1), ",
            "lease_owner = NULL, lease_expires_at = NULL, error_code = f.fcode, error_message = f.fmessage ",
            finishing!(),
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, lease_owner = NULL, lease_expires_at = NULL, ",
            "error_code = 'cancelled', error_message = 'cancelled on request' ",
            finishing!(),
            "UPDATE jobs SET state = 'queued', attempt = attempt - 1, run_at = ?, lease_owner = NULL, lease_expires_at = NULL ",
            finishing!(),
            claim!("?", "?", "?", "?"),
            ";",
            $end
        )
    };
}

/// Claims up to `$limit` due jobs for `$owner` with lease expiry `$expires` at time `$now`.
macro_rules! claim {
    ($owner:literal, $expires:literal, $now:literal, $limit:literal) => {
        concat!(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_owner = ",
            $owner,
            ", lease_expires_at = ",
            $expires,
            ", started_at = COALESCE(started_at, ",
            $now,
            "), cancel_requested = 0 ",
            "WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_runnable WHERE state IN ('queued', 'scheduled') AND run_at <= ",
            $now,
            // `+ 0`: a bare parameter as LIMIT makes SQLite re-prepare the statement
            // whenever its value changes; an expression is evaluated at run time instead.
            " ORDER BY priority, run_at LIMIT ",
            $limit,
            " + 0) RETURNING ",
            job_columns!()
        )
    };
}
const SQL_CLAIM: &str = claim!("?1", "?2", "?3", "?4");
const SQL_FINISH_GROUP: &str = finish_group!("COMMIT;");
const SQL_FINISH_GROUP_OPEN: &str = finish_group!("");
const SQL_CANCEL_WAITING: &str = "UPDATE jobs SET state = 'cancelled', finished_at = ?2, error_code = 'cancelled', error_message = 'cancelled on request' WHERE id = ?1 AND state IN ('queued', 'scheduled')";
const SQL_CANCEL_RUNNING: &str =
    "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1 AND state = 'running'";
const SQL_RETRY: &str = "UPDATE jobs SET state = 'queued', attempt = 0, oom_count = 0, run_at = ?2, finished_at = NULL, error_code = NULL, error_message = NULL, cancel_requested = 0 WHERE id = ?1 AND state IN ('failed', 'cancelled')";
const SQL_RESCUE: &str = concat!(
    "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 'cancelled' WHEN attempt >= max_attempts THEN 'failed' ELSE 'queued' END, ",
    "finished_at = CASE WHEN cancel_requested OR attempt >= max_attempts THEN ?1 ELSE NULL END, run_at = ?1, ",
    "error_code = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'lease_expired' END, ",
    "error_message = CASE WHEN cancel_requested THEN 'cancelled on request' ELSE 'the worker stopped heartbeating (crash or hang); attempt ' || attempt || ' of ' || max_attempts END, ",
    "lease_owner = NULL, lease_expires_at = NULL ",
    "WHERE state = 'running' AND (?2 OR lease_expires_at < ?1)"
);
const SQL_NEXT_RUN_AT: &str =
    "SELECT MIN(run_at) FROM jobs INDEXED BY jobs_due WHERE state IN ('queued', 'scheduled')";
const SQL_DUE_COUNT: &str = "SELECT COUNT(*) FROM jobs INDEXED BY jobs_due WHERE state IN ('queued', 'scheduled') AND run_at <= ?1";
const SQL_COUNTS: &str = "SELECT state, COUNT(*) FROM jobs GROUP BY state";
const SQL_BATCH_COUNTS: &str =
    "SELECT state, COUNT(*) FROM jobs WHERE batch_id = ?1 GROUP BY state";
const SQL_BATCH: &str = "SELECT created_at, total FROM batches WHERE id = ?1";
const SQL_INSERT_BATCH: &str = "INSERT INTO batches (id, created_at, total) VALUES (?1, ?2, ?3)";
const SQL_FINISHED_SINCE: &str = "SELECT COUNT(*) FROM jobs WHERE finished_at >= ?1 AND state = 'succeeded' AND (?2 IS NULL OR batch_id = ?2)";
/// Jobs finished at or after a time, with their result, oldest first (keyset on
/// `finished_at, id`); the dashboard's event feed pages through it.
const SQL_FINISHED_PAGE: &str = concat!(
    "SELECT j.*, r.attempt AS r_attempt, r.model AS r_model, r.output AS r_output, r.created_at AS r_created_at ",
    "FROM (SELECT ",
    job_columns!(),
    " FROM jobs INDEXED BY jobs_finished ",
    "WHERE finished_at IS NOT NULL AND (finished_at > ?1 OR (finished_at = ?1 AND id > ?2)) ",
    "ORDER BY finished_at, id LIMIT ?3) j LEFT JOIN results r ON r.job_id = j.id ORDER BY j.finished_at, j.id"
);
/// The newest finished jobs first, optionally of one state and batch, before a time.
const SQL_RECENT: &str = concat!(
    "SELECT j.*, r.attempt AS r_attempt, r.model AS r_model, r.output AS r_output, r.created_at AS r_created_at ",
    "FROM (SELECT ",
    job_columns!(),
    " FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1 AND (?2 IS NULL OR state = ?2) ",
    "AND (?3 IS NULL OR batch_id = ?3) ORDER BY finished_at DESC, id DESC LIMIT ?4) j ",
    "LEFT JOIN results r ON r.job_id = j.id ORDER BY j.finished_at DESC, j.id DESC"
);
const SQL_RETRY_BATCH: &str = "UPDATE jobs SET state = 'queued', attempt = 0, oom_count = 0, run_at = ?2, finished_at = NULL, error_code = NULL, error_message = NULL, cancel_requested = 0 WHERE batch_id = ?1 AND state = 'failed'";
/// The newest batches with their jobs counted per state (one row per batch and state).
const SQL_RECENT_BATCHES: &str = concat!(
    "SELECT b.id, b.created_at, b.total, j.state, COUNT(j.id) ",
    "FROM (SELECT id, created_at, total FROM batches ORDER BY created_at DESC, id DESC LIMIT ?1) b ",
    "LEFT JOIN jobs j ON j.batch_id = b.id GROUP BY b.id, j.state ORDER BY b.created_at DESC, b.id DESC"
);
const SQL_RESULT: &str = "SELECT attempt, model, output, created_at FROM results WHERE job_id = ?1";
const SQL_SET_SETTING: &str = "INSERT INTO queue_settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value";
const SQL_GET_SETTING: &str = "SELECT value FROM queue_settings WHERE key = ?1";
const SQL_GET_CALIBRATION: &str = "SELECT max_concurrency, per_generation_bytes, baseline_used_bytes, total_bytes, measured_at FROM calibrations WHERE device = ?1 AND model = ?2";
const SQL_PUT_CALIBRATION: &str = concat!(
    "INSERT INTO calibrations (device, model, max_concurrency, per_generation_bytes, baseline_used_bytes, total_bytes, measured_at) ",
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(device, model) DO UPDATE SET max_concurrency = excluded.max_concurrency, ",
    "per_generation_bytes = excluded.per_generation_bytes, baseline_used_bytes = excluded.baseline_used_bytes, ",
    "total_bytes = excluded.total_bytes, measured_at = excluded.measured_at"
);
const SQL_CHECKPOINT: &str = "PRAGMA wal_checkpoint(TRUNCATE)";
/// The upload digests jobs refer to.
// ?1: uploads of jobs that succeeded before it are no longer needed (i64::MIN: every upload still is).
const SQL_BLOBS_IN_USE: &str = "SELECT DISTINCT source FROM jobs WHERE source_kind = 'blob' AND NOT (state = 'succeeded' AND COALESCE(finished_at, ?1) < ?1)";
const SQL_INTEGRITY: &str = "PRAGMA integrity_check";

/// The queue's database: SQLite (the embedded default) or PostgreSQL (several hosts on
/// one queue). Each backend keeps its own SQL and migrations; callers see one interface.
#[derive(Debug, Clone)]
pub struct Store(Backend);

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(postgres::PgStore),
}

/// Calls the same method on whichever backend is in use.
macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match &$self.0 {
            Backend::Sqlite($s) => $e,
            Backend::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens (creating if missing) the SQLite database at `path`, applies pragmas on
    /// every connection and runs migrations. An existing file that is not a SQLite
    /// database is an error, never silently replaced.
    pub async fn open(path: &Path, opts: &StoreOptions) -> StoreResult<Self> {
        Ok(Self(Backend::Sqlite(SqliteStore::open(path, opts).await?)))
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://…`) and runs its
    /// migrations under an advisory lock, so several hosts may start at once.
    pub async fn connect_postgres(url: &str, opts: &StoreOptions) -> StoreResult<Self> {
        Ok(Self(Backend::Postgres(
            postgres::PgStore::connect(url, opts).await?,
        )))
    }

    /// Opens the database `url` names: `postgres://…`/`postgresql://…`, `sqlite:PATH`,
    /// or (none or empty) the SQLite file at `default_path`.
    pub async fn open_url(
        url: Option<&str>,
        default_path: &Path,
        opts: &StoreOptions,
    ) -> StoreResult<Self> {
        match url.map(str::trim).filter(|u| !u.is_empty()) {
            None => Self::open(default_path, opts).await,
            Some(u) if Self::is_postgres_url(u) => Self::connect_postgres(u, opts).await,
            Some(u) => match u
                .strip_prefix("sqlite://")
                .or_else(|| u.strip_prefix("sqlite:"))
            {
                Some(path) if !path.is_empty() => Self::open(Path::new(path), opts).await,
                _ => Err(StoreError::Unavailable(format!(
                    "unsupported database URL {u:?}: use sqlite:PATH or postgres://user:password@host/database"
                ))),
            },
        }
    }

    /// Whether `url` names a PostgreSQL database.
    pub fn is_postgres_url(url: &str) -> bool {
        let u = url.trim();
        u.starts_with("postgres://") || u.starts_with("postgresql://")
    }

    /// At start: returns the jobs this instance's previous process held to the queue.
    /// On SQLite (one host) that is every running job; on PostgreSQL only the leases
    /// whose owner starts with `own_prefix` (this host's earlier runs) and expired ones,
    /// never another live host's.
    pub async fn rescue_on_start(&self, own_prefix: Option<&str>) -> StoreResult<u64> {
        match &self.0 {
            Backend::Sqlite(s) => s.rescue(true).await,
            Backend::Postgres(s) => s.rescue_owned(false, own_prefix).await,
        }
    }

    /// On PostgreSQL, follows `NOTIFY` from every host: work inserted or freed anywhere
    /// wakes `wakeup`, and pause/resume anywhere calls `on_pause`, until `stop`. Returns
    /// false (and does nothing) on SQLite, where one process owns the queue.
    pub fn spawn_listener(
        &self,
        wakeup: super::Wakeup,
        stop: tokio_util::sync::CancellationToken,
        on_pause: impl Fn(bool) + Send + Sync + 'static,
    ) -> bool {
        match &self.0 {
            Backend::Postgres(s) => {
                s.spawn_listener(wakeup, stop, on_pause);
                true
            }
            Backend::Sqlite(_) => false,
        }
    }

    /// The PostgreSQL store, when that is the backend (for `LISTEN` and uploads).
    pub(crate) fn postgres(&self) -> Option<&postgres::PgStore> {
        match &self.0 {
            Backend::Postgres(s) => Some(s),
            Backend::Sqlite(_) => None,
        }
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match &self.0 {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Path of the SQLite database file (none on PostgreSQL).
    pub fn path(&self) -> Option<&Path> {
        match &self.0 {
            Backend::Sqlite(s) => Some(s.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// Checkpoints and truncates SQLite's WAL so it cannot grow without bound (nothing
    /// to do on PostgreSQL).
    pub async fn checkpoint(&self) -> StoreResult<()> {
        match &self.0 {
            Backend::Sqlite(s) => s.checkpoint().await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// SQLite's `PRAGMA integrity_check` ("ok" when the file is sound); "ok" on
    /// PostgreSQL, which checks itself.
    pub async fn integrity_check(&self) -> StoreResult<String> {
        match &self.0 {
            Backend::Sqlite(s) => s.integrity_check().await,
            Backend::Postgres(_) => Ok("ok".into()),
        }
    }

    /// Closes the connections after pending writes.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    /// Inserts one job (in a batch when `batch` is set). With an idempotency key that
    /// already exists, returns the existing job and `false`.
    pub async fn insert_job(&self, new: &NewJob) -> StoreResult<(Job, bool)> {
        dispatch!(self, s => s.insert_job(new).await)
    }

    /// `insert_job` under an id chosen by the caller (a UUIDv7), so that a
    /// stream can be subscribed to before any worker can claim the job.
    pub async fn insert_job_as(&self, id: Uuid, new: &NewJob) -> StoreResult<(Job, bool)> {
        dispatch!(self, s => s.insert_job_as(id, new).await)
    }

    /// Inserts many jobs and their batch in one transaction and one statement. Jobs
    /// whose idempotency key exists already are not inserted again; their existing ids
    /// are returned in their place. Returns the batch id and the job ids in order.
    pub async fn insert_batch(&self, jobs: &[NewJob]) -> StoreResult<(Uuid, Vec<Uuid>)> {
        dispatch!(self, s => s.insert_batch(jobs).await)
    }

    /// One job by id.
    pub async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        dispatch!(self, s => s.get_job(id).await)
    }

    /// The stored result of a succeeded job.
    pub async fn get_result(&self, id: Uuid) -> StoreResult<Option<JobResult>> {
        dispatch!(self, s => s.get_result(id).await)
    }

    /// A page of jobs ordered by id.
    pub async fn list_jobs(&self, q: &ListQuery) -> StoreResult<Vec<Job>> {
        dispatch!(self, s => s.list_jobs(q).await)
    }

    /// Claims up to `n` due jobs for `owner` in one statement, highest priority first.
    pub async fn claim(&self, owner: &str, n: usize, lease: Duration) -> StoreResult<Vec<Job>> {
        dispatch!(self, s => s.claim(owner, n, lease).await)
    }

    /// Extends every lease `owner` holds, in one statement; returns the jobs still
    /// held (id, attempt, cancel requested). A running job missing from the answer
    /// has lost its lease.
    pub async fn heartbeat(&self, owner: &str, lease: Duration) -> StoreResult<Vec<Heartbeat>> {
        dispatch!(self, s => s.heartbeat(owner, lease).await)
    }

    /// Finishes an attempt through the group-committing finisher (and claims the next
    /// job when asked); `applied` is false when the lease was no longer held.
    pub async fn finish(&self, op: FinishOp) -> StoreResult<FinishOutcome> {
        dispatch!(self, s => s.finish(op).await)
    }

    /// Cancels a waiting job at once, or flags a running one.
    pub async fn cancel(&self, id: Uuid) -> StoreResult<Option<CancelOutcome>> {
        dispatch!(self, s => s.cancel(id).await)
    }

    /// Queues a failed or cancelled job again with fresh attempts.
    pub async fn retry(&self, id: Uuid) -> StoreResult<Option<RetryOutcome>> {
        dispatch!(self, s => s.retry(id).await)
    }

    /// Returns running jobs to the queue: those whose lease expired, or (`all`) every
    /// running job, as at start-up after a crash. Counts the attempt.
    pub async fn rescue(&self, all: bool) -> StoreResult<u64> {
        dispatch!(self, s => s.rescue(all).await)
    }

    /// Earliest `run_at` of a waiting job.
    pub async fn next_run_at(&self) -> StoreResult<Option<i64>> {
        dispatch!(self, s => s.next_run_at().await)
    }

    /// Jobs waiting that are due now (the backlog the concurrency controller sees).
    pub async fn due_count(&self) -> StoreResult<i64> {
        dispatch!(self, s => s.due_count().await)
    }

    /// Jobs per state, over everything or one batch.
    pub async fn counts(&self, batch: Option<Uuid>) -> StoreResult<StateCounts> {
        dispatch!(self, s => s.counts(batch).await)
    }

    /// The upload digests that jobs still need: every job's but those of jobs that
    /// succeeded before `succeeded_before_ms` (`None`: every job's). One pass over the jobs.
    pub async fn blobs_in_use(
        &self,
        succeeded_before_ms: Option<i64>,
    ) -> StoreResult<HashSet<String>> {
        dispatch!(self, s => s.blobs_in_use(succeeded_before_ms).await)
    }

    /// A batch's creation time and size.
    pub async fn batch(&self, id: Uuid) -> StoreResult<Option<(i64, i64)>> {
        dispatch!(self, s => s.batch(id).await)
    }

    /// Jobs that succeeded since `since_ms` (optionally in one batch).
    pub async fn succeeded_since(&self, since_ms: i64, batch: Option<Uuid>) -> StoreResult<i64> {
        dispatch!(self, s => s.succeeded_since(since_ms, batch).await)
    }

    /// Jobs that finished after `(since_ms, after_id)` in `(finished_at, id)` order,
    /// each with its result when it succeeded: a page of at most `limit`.
    pub async fn finished_after(
        &self,
        since_ms: i64,
        after_id: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<(Job, Option<JobResult>)>> {
        dispatch!(self, s => s.finished_after(since_ms, after_id, limit).await)
    }

    /// The newest finished jobs first (optionally of one state and batch), finished
    /// before `before_ms`: at most `limit`.
    pub async fn recently_finished(
        &self,
        state: Option<JobState>,
        batch: Option<Uuid>,
        before_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<(Job, Option<JobResult>)>> {
        dispatch!(self, s => s.recently_finished(state, batch, before_ms, limit).await)
    }

    /// Queues every failed job of a batch again (attempts reset); returns how many.
    pub async fn retry_failed_in_batch(&self, batch: Uuid) -> StoreResult<u64> {
        dispatch!(self, s => s.retry_failed_in_batch(batch).await)
    }

    /// The newest `limit` batches with their counts per state.
    pub async fn recent_batches(&self, limit: i64) -> StoreResult<Vec<BatchSummary>> {
        dispatch!(self, s => s.recent_batches(limit).await)
    }

    /// Persists the queue pause switch.
    pub async fn set_paused(&self, paused: bool) -> StoreResult<()> {
        dispatch!(self, s => s.set_paused(paused).await)
    }

    /// Reads the queue pause switch.
    pub async fn is_paused(&self) -> StoreResult<bool> {
        dispatch!(self, s => s.is_paused().await)
    }

    /// The stored calibration of `model` on `device`.
    pub async fn calibration(&self, device: &str, model: &str) -> StoreResult<Option<Calibration>> {
        dispatch!(self, s => s.calibration(device, model).await)
    }

    /// Stores (replacing) a calibration.
    pub async fn put_calibration(&self, c: &Calibration) -> StoreResult<()> {
        dispatch!(self, s => s.put_calibration(c).await)
    }

    /// Recorded files whose canonical path starts with `prefix` (a folder path ending
    /// in a separator, or one file's path).
    pub async fn library_files_under(&self, prefix: &str) -> StoreResult<Vec<LibraryFile>> {
        dispatch!(self, s => s.library_files_under(prefix).await)
    }

    /// Records (or updates) what the walk learnt about these files.
    pub async fn put_library_files(&self, files: &[LibraryFile]) -> StoreResult<()> {
        dispatch!(self, s => s.put_library_files(files).await)
    }

    /// Forgets files the walk no longer finds (deleted or moved away).
    pub async fn forget_library_files(&self, paths: &[String]) -> StoreResult<()> {
        dispatch!(self, s => s.forget_library_files(paths).await)
    }

    /// The jobs holding these idempotency keys, by key.
    pub async fn jobs_by_keys(&self, keys: &[String]) -> StoreResult<HashMap<String, Job>> {
        dispatch!(self, s => s.jobs_by_keys(keys).await)
    }

    /// Succeeded jobs whose idempotency key starts with `key_prefix` (superseded keys
    /// left out), counted per task, parameters, model and the keys' last 16 characters;
    /// most first.
    pub async fn result_settings(&self, key_prefix: &str) -> StoreResult<Vec<ResultSettings>> {
        dispatch!(self, s => s.result_settings(key_prefix).await)
    }

    /// Current states of these jobs (missing ids are left out).
    pub async fn job_states(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, JobState>> {
        dispatch!(self, s => s.job_states(ids).await)
    }

    /// Frees these idempotency keys from jobs in one of `states` (the key gets the
    /// job id appended), so new jobs can take them; the old jobs and results stay.
    pub async fn supersede_keys(&self, keys: &[String], states: &[JobState]) -> StoreResult<u64> {
        dispatch!(self, s => s.supersede_keys(keys, states).await)
    }

    /// Stored results of these jobs, by job id.
    pub async fn results_of(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, JobResult>> {
        dispatch!(self, s => s.results_of(ids).await)
    }

    /// BLAKE3 of what `captiond export` last wrote to `path`, if it wrote there.
    pub async fn export_record(&self, path: &str) -> StoreResult<Option<String>> {
        dispatch!(self, s => s.export_record(path).await)
    }

    /// Remembers what `captiond export` wrote to `path`.
    pub async fn put_export_record(&self, path: &str, content_hash: &str) -> StoreResult<()> {
        dispatch!(self, s => s.put_export_record(path, content_hash).await)
    }
}

/// The queue's SQLite database (the embedded default backend).
#[derive(Debug, Clone)]
struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    finisher: mpsc::Sender<(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path`, applies pragmas on every
    /// connection and runs migrations. An existing file that is not a SQLite database
    /// is an error, never silently replaced.
    pub async fn open(path: &Path, opts: &StoreOptions) -> StoreResult<Self> {
        let corrupt = |message: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let base = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true)
            .synchronous(match opts.durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            });
        let write_opts = base
            .clone()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(write_opts)
            .await
            .map_err(|e| classify_open_error(e, &corrupt))?;
        let check: Result<String, sqlx::Error> = sqlx::query_scalar("PRAGMA quick_check")
            .fetch_one(&write)
            .await;
        match check {
            Ok(s) if s == "ok" => {}
            Ok(s) => return Err(corrupt(s)),
            Err(e) => return Err(classify_open_error(e, &corrupt)),
        }
        migrator(SQLITE_MIGRATIONS).run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(opts.read_connections.max(1))
            .connect_with(base.read_only(true))
            .await?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run_finisher(write.clone(), rx));
        Ok(Self {
            write,
            read,
            finisher: tx,
            path: path.to_path_buf(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inserts one job (in a batch when `batch` is set). With an idempotency key that
    /// already exists, returns the existing job and `false`.
    pub async fn insert_job(&self, new: &NewJob) -> StoreResult<(Job, bool)> {
        self.insert_job_as(Uuid::now_v7(), new).await
    }

    /// `insert_job` under an id chosen by the caller (a UUIDv7), so that a
    /// stream can be subscribed to before any worker can claim the job.
    pub async fn insert_job_as(&self, id: Uuid, new: &NewJob) -> StoreResult<(Job, bool)> {
        let inserted = bind_insert(sqlx::query(SQL_INSERT_JOB), id, new, now_ms())
            .fetch_optional(&self.write)
            .await?;
        if let Some(row) = inserted {
            return Ok((job_from_row(&row)?, true));
        }
        let key = new.idempotency_key.clone().unwrap_or_default();
        let row = sqlx::query(SQL_JOB_BY_KEY)
            .bind(key)
            .fetch_one(&self.write)
            .await?;
        Ok((job_from_row(&row)?, false))
    }

    /// Inserts many jobs and their batch in one transaction and one statement. Jobs
    /// whose idempotency key exists already are not inserted again; their existing ids
    /// are returned in their place. Returns the batch id and the job ids in order.
    pub async fn insert_batch(&self, jobs: &[NewJob]) -> StoreResult<(Uuid, Vec<Uuid>)> {
        let batch = Uuid::now_v7();
        let now = now_ms();
        let mut ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
        let rows: Vec<serde_json::Value> = jobs
            .iter()
            .zip(&ids)
            .map(|(new, id)| {
                let (kind, source) = source_columns(&new.source);
                serde_json::json!({
                    "id": id.to_string(),
                    "task": new.task.as_str(),
                    "params": new.params,
                    "kind": kind,
                    "source": source,
                    "priority": new.priority,
                    "max_attempts": new.max_attempts,
                    "key": new.idempotency_key,
                })
            })
            .collect();
        let keys: Vec<&str> = jobs
            .iter()
            .filter_map(|j| j.idempotency_key.as_deref())
            .collect();
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(SQL_INSERT_BATCH)
            .bind(batch.to_string())
            .bind(now)
            .bind(jobs.len() as i64)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(SQL_INSERT_MANY)
            .bind(serde_json::Value::Array(rows).to_string())
            .bind(now)
            .bind(batch.to_string())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() as usize != jobs.len() && !keys.is_empty() {
            let existing: Vec<(String, String)> = sqlx::query_as(SQL_IDS_BY_KEYS)
                .bind(
                    serde_json::to_string(&keys)
                        .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
                )
                .fetch_all(&mut *tx)
                .await?;
            let by_key: std::collections::HashMap<String, String> = existing.into_iter().collect();
            for (new, id) in jobs.iter().zip(ids.iter_mut()) {
                if let Some(found) = new.idempotency_key.as_ref().and_then(|k| by_key.get(k)) {
                    *id = parse_uuid(found)?;
                }
            }
        }
        tx.commit().await?;
        Ok((batch, ids))
    }

    async fn get_job_from(&self, pool: &SqlitePool, id: Uuid) -> StoreResult<Option<Job>> {
        let row = sqlx::query(SQL_JOB_BY_ID)
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    /// One job by id.
    pub async fn get_job(&self, id: Uuid) -> StoreResult<Option<Job>> {
        self.get_job_from(&self.read, id).await
    }

    /// The stored result of a succeeded job.
    pub async fn get_result(&self, id: Uuid) -> StoreResult<Option<JobResult>> {
        let row = sqlx::query(SQL_RESULT)
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| {
            let output: String = r.try_get(2)?;
            Ok(JobResult {
                attempt: r.try_get(0)?,
                model: r.try_get(1)?,
                output: serde_json::from_str(&output)
                    .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
                created_at: r.try_get(3)?,
            })
        })
        .transpose()
    }

    /// A page of jobs ordered by id.
    pub async fn list_jobs(&self, q: &ListQuery) -> StoreResult<Vec<Job>> {
        let rows = sqlx::query(SQL_LIST)
            .bind(q.state.map(|s| s.as_str()))
            .bind(q.batch.map(|b| b.to_string()))
            .bind(q.after.map(|a| a.to_string()))
            .bind(q.limit)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Claims up to `n` due jobs for `owner` in one statement, highest priority first.
    pub async fn claim(&self, owner: &str, n: usize, lease: Duration) -> StoreResult<Vec<Job>> {
        let now = now_ms();
        let rows = sqlx::query(SQL_CLAIM)
            .bind(owner)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .bind(n as i64)
            .fetch_all(&self.write)
            .await?;
        if !rows.is_empty() {
            crate::failpoint::hit("claim");
        }
        claimed_in_order(&rows)
    }

    /// Extends every lease `owner` holds, in one statement; returns the jobs still
    /// held (id, attempt, cancel requested). A running job missing from the answer
    /// has lost its lease.
    pub async fn heartbeat(&self, owner: &str, lease: Duration) -> StoreResult<Vec<Heartbeat>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(SQL_HEARTBEAT)
            .bind(owner)
            .bind(now_ms() + lease.as_millis() as i64)
            .fetch_all(&self.write)
            .await?;
        if !rows.is_empty() {
            crate::failpoint::hit("heartbeat");
        }
        rows.into_iter()
            .map(|(id, attempt, cancel)| {
                Ok(Heartbeat {
                    id: parse_uuid(&id)?,
                    attempt,
                    cancel: cancel != 0,
                })
            })
            .collect()
    }

    /// Finishes an attempt through the group-committing finisher (and claims the next
    /// job when asked); `applied` is false when the lease was no longer held.
    pub async fn finish(&self, op: FinishOp) -> StoreResult<FinishOutcome> {
        let (tx, rx) = oneshot::channel();
        self.finisher
            .send((op, tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Cancels a waiting job at once, or flags a running one.
    pub async fn cancel(&self, id: Uuid) -> StoreResult<Option<CancelOutcome>> {
        let sid = id.to_string();
        let waiting = sqlx::query(SQL_CANCEL_WAITING)
            .bind(&sid)
            .bind(now_ms())
            .execute(&self.write)
            .await?;
        let running = if waiting.rows_affected() == 0 {
            sqlx::query(SQL_CANCEL_RUNNING)
                .bind(&sid)
                .execute(&self.write)
                .await?
                .rows_affected()
        } else {
            0
        };
        if waiting.rows_affected() + running > 0 {
            crate::failpoint::hit("cancel");
        }
        let Some(job) = self.get_job_from(&self.write, id).await? else {
            return Ok(None);
        };
        Ok(Some(if waiting.rows_affected() == 1 {
            CancelOutcome::Cancelled(job)
        } else if running == 1 {
            CancelOutcome::Requested(job)
        } else {
            CancelOutcome::AlreadyFinished(job)
        }))
    }

    /// Queues a failed or cancelled job again with fresh attempts.
    pub async fn retry(&self, id: Uuid) -> StoreResult<Option<RetryOutcome>> {
        let done = sqlx::query(SQL_RETRY)
            .bind(id.to_string())
            .bind(now_ms())
            .execute(&self.write)
            .await?;
        let Some(job) = self.get_job_from(&self.write, id).await? else {
            return Ok(None);
        };
        Ok(Some(if done.rows_affected() == 1 {
            RetryOutcome::Queued(job)
        } else {
            RetryOutcome::NotRetryable(job)
        }))
    }

    /// Returns running jobs to the queue: those whose lease expired, or (`all`) every
    /// running job, as at start-up after a crash. Counts the attempt.
    pub async fn rescue(&self, all: bool) -> StoreResult<u64> {
        let done = sqlx::query(SQL_RESCUE)
            .bind(now_ms())
            .bind(all)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    /// Earliest `run_at` of a waiting job.
    pub async fn next_run_at(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(SQL_NEXT_RUN_AT)
            .fetch_one(&self.read)
            .await?)
    }

    /// Jobs waiting that are due now (the backlog the concurrency controller sees).
    pub async fn due_count(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(SQL_DUE_COUNT)
            .bind(now_ms())
            .fetch_one(&self.read)
            .await?)
    }

    /// The upload digests that jobs still need (see [`Store::blobs_in_use`]).
    async fn blobs_in_use(&self, succeeded_before_ms: Option<i64>) -> StoreResult<HashSet<String>> {
        let found: Vec<String> = sqlx::query_scalar(SQL_BLOBS_IN_USE)
            .bind(succeeded_before_ms.unwrap_or(i64::MIN))
            .fetch_all(&self.read)
            .await?;
        Ok(found.into_iter().collect())
    }

    /// Jobs per state, over everything or one batch.
    pub async fn counts(&self, batch: Option<Uuid>) -> StoreResult<StateCounts> {
        let rows = match batch {
            None => sqlx::query(SQL_COUNTS).fetch_all(&self.read).await?,
            Some(b) => {
                sqlx::query(SQL_BATCH_COUNTS)
                    .bind(b.to_string())
                    .fetch_all(&self.read)
                    .await?
            }
        };
        let mut counts = StateCounts::default();
        for r in rows {
            let state: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            let st = JobState::parse(&state)
                .ok_or_else(|| StoreError::InvalidRow(format!("state {state}")))?;
            counts.add(st, n);
        }
        Ok(counts)
    }

    /// A batch's creation time and size.
    pub async fn batch(&self, id: Uuid) -> StoreResult<Option<(i64, i64)>> {
        let row = sqlx::query(SQL_BATCH)
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    /// Jobs that succeeded since `since_ms` (optionally in one batch).
    pub async fn succeeded_since(&self, since_ms: i64, batch: Option<Uuid>) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(SQL_FINISHED_SINCE)
            .bind(since_ms)
            .bind(batch.map(|b| b.to_string()))
            .fetch_one(&self.read)
            .await?)
    }

    /// Jobs that finished after `(since_ms, after_id)` in `(finished_at, id)` order,
    /// each with its result when it succeeded: a page of at most `limit`.
    pub async fn finished_after(
        &self,
        since_ms: i64,
        after_id: Option<Uuid>,
        limit: i64,
    ) -> StoreResult<Vec<(Job, Option<JobResult>)>> {
        let rows = sqlx::query(SQL_FINISHED_PAGE)
            .bind(since_ms)
            .bind(after_id.map(|a| a.to_string()).unwrap_or_default())
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(job_with_result).collect()
    }

    /// The newest finished jobs first (optionally of one state and batch), finished
    /// before `before_ms`: at most `limit`.
    pub async fn recently_finished(
        &self,
        state: Option<JobState>,
        batch: Option<Uuid>,
        before_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<(Job, Option<JobResult>)>> {
        let rows = sqlx::query(SQL_RECENT)
            .bind(before_ms)
            .bind(state.map(|s| s.as_str()))
            .bind(batch.map(|b| b.to_string()))
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(job_with_result).collect()
    }

    /// Queues every failed job of a batch again (attempts reset); returns how many.
    pub async fn retry_failed_in_batch(&self, batch: Uuid) -> StoreResult<u64> {
        let done = sqlx::query(SQL_RETRY_BATCH)
            .bind(batch.to_string())
            .bind(now_ms())
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    /// The newest `limit` batches with their counts per state.
    pub async fn recent_batches(&self, limit: i64) -> StoreResult<Vec<BatchSummary>> {
        let rows: Vec<BatchRow> = sqlx::query_as(SQL_RECENT_BATCHES)
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        fold_batch_rows(rows)
    }

    /// Persists the queue pause switch.
    pub async fn set_paused(&self, paused: bool) -> StoreResult<()> {
        sqlx::query(SQL_SET_SETTING)
            .bind("paused")
            .bind(if paused { "1" } else { "0" })
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Reads the queue pause switch.
    pub async fn is_paused(&self) -> StoreResult<bool> {
        let v: Option<String> = sqlx::query_scalar(SQL_GET_SETTING)
            .bind("paused")
            .fetch_optional(&self.read)
            .await?;
        Ok(v.as_deref() == Some("1"))
    }

    /// The stored calibration of `model` on `device`.
    pub async fn calibration(&self, device: &str, model: &str) -> StoreResult<Option<Calibration>> {
        let row: Option<(i64, i64, i64, i64, i64)> = sqlx::query_as(SQL_GET_CALIBRATION)
            .bind(device)
            .bind(model)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.map(|(max, per, base, total, at)| Calibration {
            device: device.to_string(),
            model: model.to_string(),
            max_concurrency: max.max(1) as usize,
            per_generation_bytes: per.max(0) as u64,
            baseline_used_bytes: base.max(0) as u64,
            total_bytes: total.max(0) as u64,
            measured_at: at,
        }))
    }

    /// Stores (replacing) a calibration.
    pub async fn put_calibration(&self, c: &Calibration) -> StoreResult<()> {
        sqlx::query(SQL_PUT_CALIBRATION)
            .bind(&c.device)
            .bind(&c.model)
            .bind(c.max_concurrency as i64)
            .bind(c.per_generation_bytes as i64)
            .bind(c.baseline_used_bytes as i64)
            .bind(c.total_bytes as i64)
            .bind(c.measured_at)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Checkpoints and truncates the WAL so it cannot grow without bound.
    pub async fn checkpoint(&self) -> StoreResult<()> {
        sqlx::query(SQL_CHECKPOINT).execute(&self.write).await?;
        Ok(())
    }

    /// `PRAGMA integrity_check`: "ok" when the file is sound.
    pub async fn integrity_check(&self) -> StoreResult<String> {
        Ok(sqlx::query_scalar(SQL_INTEGRITY)
            .fetch_one(&self.write)
            .await?)
    }

    /// Closes both pools after pending writes.
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

fn classify_open_error(e: sqlx::Error, corrupt: &dyn Fn(String) -> StoreError) -> StoreError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("not a database")
        || lower.contains("malformed")
        || lower.contains("unable to open")
        || lower.contains("readonly")
        || lower.contains("permission")
    {
        return corrupt(text);
    }
    StoreError::from(e)
}

/// The `source_kind` and `source` column values of an image source.
fn source_columns(source: &ImageSource) -> (&'static str, String) {
    match source {
        ImageSource::Path(p) => ("path", p.clone()),
        ImageSource::Blob(h) => ("blob", h.clone()),
    }
}

fn bind_insert<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    id: Uuid,
    new: &NewJob,
    now: i64,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let (kind, source) = source_columns(&new.source);
    q.bind(id.to_string())
        .bind(new.task.as_str())
        .bind(new.params.to_string())
        .bind(kind)
        .bind(source)
        .bind(new.priority)
        .bind(new.max_attempts)
        .bind(now)
        .bind(new.idempotency_key.clone())
}

/// How often a finisher yields to the runtime after answering a group, before taking the
/// next one. The workers it just answered often finish again at once (a claimed job that
/// fails fast, a no-op); letting them run first puts their ops into the next commit
/// instead of a second, half-sized group that alternates with it (measured on
/// PostgreSQL at concurrency 16: groups of 8 became 16, and 4.8k jobs/s about 7k).
const COALESCE_YIELDS: usize = 4;

/// Writes finishing ops in shared transactions: whatever arrived while the previous
/// commit ran goes into the next one.
async fn run_finisher(
    pool: SqlitePool,
    mut rx: mpsc::Receiver<(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)>,
) {
    let mut pending = Vec::with_capacity(256);
    while rx.recv_many(&mut pending, 256).await > 0 {
        let outcome = apply_finishes(&pool, &pending).await;
        reply_all(&mut pending, outcome);
        for _ in 0..COALESCE_YIELDS {
            tokio::task::yield_now().await;
        }
    }
}

/// Answers every op of a group with its outcome, or all of them with the group's error.
fn reply_all(
    pending: &mut Vec<(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)>,
    outcome: StoreResult<Vec<FinishOutcome>>,
) {
    match outcome {
        Ok(outcomes) => {
            for ((_, reply), outcome) in pending.drain(..).zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (_, reply) in pending.drain(..) {
                let err = match &e {
                    StoreError::DiskFull => StoreError::DiskFull,
                    StoreError::Locked => StoreError::Locked,
                    StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                    _ => StoreError::InvalidRow(msg.clone()),
                };
                let _ = reply.send(Err(err));
            }
        }
    }
}

async fn apply_finishes(
    pool: &SqlitePool,
    ops: &[(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)],
) -> StoreResult<Vec<FinishOutcome>> {
    let now = now_ms();
    let kinds = by_kind(ops);
    let claims = claim_groups(ops);
    let mut conn = pool.acquire().await?;
    // The script begins its own transaction; on any error it is rolled back here, so the
    // connection goes back to the pool outside a transaction.
    let rows = match group_commit(&mut conn, &kinds, now, &claims).await {
        Ok(rows) => rows,
        Err(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            return Err(e);
        }
    };
    let (applied_ids, claimed) = rows;
    Ok(outcomes(ops, &claims, &applied_ids, claimed))
}

/// One row of the recent-batches query: id, created_at, total, state, count.
type BatchRow = (String, i64, i64, Option<String>, i64);

/// Folds (batch, state, count) rows, newest batch first, into one summary per batch.
fn fold_batch_rows(rows: Vec<BatchRow>) -> StoreResult<Vec<BatchSummary>> {
    let mut out: Vec<BatchSummary> = Vec::new();
    for (id, created_at, total, state, n) in rows {
        let id = parse_uuid(&id)?;
        if out.last().is_none_or(|b| b.id != id) {
            out.push(BatchSummary {
                id,
                created_at,
                total,
                counts: StateCounts::default(),
            });
        }
        if let (Some(state), Some(b)) = (state, out.last_mut()) {
            let st = JobState::parse(&state)
                .ok_or_else(|| StoreError::InvalidRow(format!("state {state}")))?;
            b.counts.add(st, n);
        }
    }
    Ok(out)
}

/// A group's finishing ops paired with their reply channels.
type PendingOps = [(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)];

/// Slots asking for their next job, grouped by (owner, lease); one pool asks as one.
fn claim_groups(ops: &PendingOps) -> Vec<(&str, Duration, Vec<usize>)> {
    let mut claims: Vec<(&str, Duration, Vec<usize>)> = Vec::new();
    for (i, (op, _)) in ops.iter().enumerate() {
        let Some(lease) = op.claim_next else { continue };
        match claims.iter_mut().find(|c| c.0 == op.owner && c.1 == lease) {
            Some(c) => c.2.push(i),
            None => claims.push((op.owner.as_str(), lease, vec![i])),
        }
    }
    claims
}

/// Each op's outcome from what the group commit applied and claimed (and the crash
/// failpoints after a commit).
fn outcomes(
    ops: &PendingOps,
    claims: &[(&str, Duration, Vec<usize>)],
    applied_ids: &std::collections::HashSet<(String, i64)>,
    claimed: Vec<Vec<Job>>,
) -> Vec<FinishOutcome> {
    let mut next: Vec<Option<Job>> = vec![None; ops.len()];
    for ((_, _, slots), jobs) in claims.iter().zip(claimed) {
        for (slot, job) in slots.iter().zip(jobs) {
            next[*slot] = Some(job);
        }
    }
    let applied: Vec<bool> = ops
        .iter()
        .map(|(op, _)| applied_ids.contains(&(op.id.to_string(), op.attempt)))
        .collect();
    for ((op, _), applied) in ops.iter().zip(&applied) {
        match (&op.finish, applied) {
            (Finish::Succeeded { .. }, true) => crate::failpoint::hit("complete"),
            (Finish::Failed(_), true) => crate::failpoint::hit("fail"),
            (Finish::Retry { .. }, true) => crate::failpoint::hit("retry"),
            _ => {}
        }
    }
    if next.iter().any(Option::is_some) {
        crate::failpoint::hit("claim");
    }
    applied
        .into_iter()
        .zip(next)
        .map(|(applied, next)| FinishOutcome { applied, next })
        .collect()
}

/// The (id, attempt) pairs whose transition applied, and each claim group's jobs in order.
type GroupRows = (std::collections::HashSet<(String, i64)>, Vec<Vec<Job>>);

/// Runs the group script; the rare claims for a second owner or lease follow it inside
/// the same transaction, then COMMIT.
async fn group_commit(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
    kinds: &[String; 7],
    now: i64,
    claims: &[(&str, Duration, Vec<usize>)],
) -> StoreResult<GroupRows> {
    let (script, owner, lease, slots) = match claims {
        [] => (SQL_FINISH_GROUP, "", Duration::ZERO, 0),
        [(owner, lease, slots)] => (SQL_FINISH_GROUP, *owner, *lease, slots.len()),
        [(owner, lease, slots), ..] => (SQL_FINISH_GROUP_OPEN, *owner, *lease, slots.len()),
    };
    // In the script's text order: the lease check, results, one transition per kind, the claim.
    let query = sqlx::query(script)
        .bind(&kinds[ALL])
        .bind(now)
        .bind(&kinds[SUCCEEDED])
        .bind(now)
        .bind(&kinds[SUCCEEDED])
        .bind(now)
        .bind(&kinds[FAILED])
        .bind(now)
        .bind(&kinds[RETRY])
        .bind(now)
        .bind(now)
        .bind(&kinds[OOM])
        .bind(now)
        .bind(&kinds[CANCELLED])
        .bind(now)
        .bind(&kinds[RELEASED])
        .bind(owner)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(now)
        .bind(slots as i64);
    // Every row is read before any is parsed: dropping the stream early would stop the
    // script before its COMMIT.
    let rows: Vec<SqliteRow> = query.fetch_all(&mut **conn).await?;
    let mut applied = std::collections::HashSet::new();
    let mut first = Vec::new();
    for row in &rows {
        // The applied ops come as one JSON array of [id, attempt]; claims as whole jobs.
        if row.len() == 1 {
            let pairs: Vec<(String, i64)> = serde_json::from_str(&row.try_get::<String, _>(0)?)
                .map_err(|e| StoreError::InvalidRow(format!("applied ops: {e}")))?;
            applied.extend(pairs);
        } else {
            first.push(row);
        }
    }
    let mut claimed = vec![claimed_in_order(first)?];
    if claims.len() > 1 {
        for (owner, lease, slots) in &claims[1..] {
            let rows = sqlx::query(SQL_CLAIM)
                .bind(*owner)
                .bind(now + lease.as_millis() as i64)
                .bind(now)
                .bind(slots.len() as i64)
                .fetch_all(&mut **conn)
                .await?;
            claimed.push(claimed_in_order(&rows)?);
        }
        sqlx::query("COMMIT").execute(&mut **conn).await?;
    }
    Ok((applied, claimed))
}

const SUCCEEDED: usize = 0;
const FAILED: usize = 1;
const RETRY: usize = 2;
const OOM: usize = 3;
const CANCELLED: usize = 4;
const RELEASED: usize = 5;
const ALL: usize = 6;

/// The group's finishing ops as one JSON array per kind, indexed by the constants above.
fn by_kind(ops: &[(FinishOp, oneshot::Sender<StoreResult<FinishOutcome>>)]) -> [String; 7] {
    let mut kinds: [Vec<serde_json::Value>; 7] = Default::default();
    for (op, _) in ops {
        let base =
            serde_json::json!({"id": op.id.to_string(), "owner": op.owner, "attempt": op.attempt});
        let mut v = base.clone();
        let (kind, extra) = match &op.finish {
            Finish::Succeeded { model, output } => (
                SUCCEEDED,
                serde_json::json!({"model": model, "output": output}),
            ),
            Finish::Failed(e) => (
                FAILED,
                serde_json::json!({"code": e.code, "message": e.message}),
            ),
            Finish::Retry { run_at, error } => (
                RETRY,
                serde_json::json!({"run_at": run_at, "code": error.code, "message": error.message}),
            ),
            Finish::OutOfMemory { max_oom, error } => (
                OOM,
                serde_json::json!({"max_oom": max_oom, "code": error.code, "message": error.message}),
            ),
            Finish::Cancelled => (CANCELLED, serde_json::json!({})),
            Finish::Released => (RELEASED, serde_json::json!({})),
        };
        if let (Some(map), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            map.extend(extra);
        }
        kinds[ALL].push(base);
        kinds[kind].push(v);
    }
    kinds.map(|k| serde_json::Value::Array(k).to_string())
}

/// Claimed rows in claim order: `RETURNING` follows table order, not the subquery's.
fn claimed_in_order<'a>(rows: impl IntoIterator<Item = &'a SqliteRow>) -> StoreResult<Vec<Job>> {
    let mut jobs = rows
        .into_iter()
        .map(job_from_row)
        .collect::<StoreResult<Vec<_>>>()?;
    jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
    Ok(jobs)
}

fn parse_uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::InvalidRow(format!("id {s}: {e}")))
}

/// A job row joined with its (optional) result columns `r_*`.
fn job_with_result(r: &SqliteRow) -> StoreResult<(Job, Option<JobResult>)> {
    let job = job_from_row(r)?;
    let output: Option<String> = r.try_get("r_output")?;
    let result = match output {
        None => None,
        Some(output) => Some(JobResult {
            attempt: r.try_get("r_attempt")?,
            model: r.try_get("r_model")?,
            output: serde_json::from_str(&output)
                .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
            created_at: r.try_get("r_created_at")?,
        }),
    };
    Ok((job, result))
}

/// Reads a job from a row of either backend (the columns of `job_columns!`).
macro_rules! read_job {
    ($r:expr) => {{
        let r = $r;
        let id: String = r.try_get("id")?;
        let task: String = r.try_get("task")?;
        let params: String = r.try_get("params")?;
        let kind: String = r.try_get("source_kind")?;
        let source: String = r.try_get("source")?;
        let state: String = r.try_get("state")?;
        let code: Option<String> = r.try_get("error_code")?;
        let message: Option<String> = r.try_get("error_message")?;
        let batch: Option<String> = r.try_get("batch_id")?;
        let cancel: i64 = r.try_get("cancel_requested")?;
        Ok(Job {
            id: parse_uuid(&id)?,
            task: TaskKind::parse(&task)
                .ok_or_else(|| StoreError::InvalidRow(format!("task {task}")))?,
            params: serde_json::from_str(&params)
                .map_err(|e| StoreError::InvalidRow(e.to_string()))?,
            source: if kind == "blob" {
                ImageSource::Blob(source)
            } else {
                ImageSource::Path(source)
            },
            priority: r.try_get("priority")?,
            state: JobState::parse(&state)
                .ok_or_else(|| StoreError::InvalidRow(format!("state {state}")))?,
            attempt: r.try_get("attempt")?,
            max_attempts: r.try_get("max_attempts")?,
            oom_count: r.try_get("oom_count")?,
            run_at: r.try_get("run_at")?,
            lease_owner: r.try_get("lease_owner")?,
            lease_expires_at: r.try_get("lease_expires_at")?,
            cancel_requested: cancel != 0,
            error: code.map(|code| JobErrorInfo {
                code,
                message: message.unwrap_or_default(),
            }),
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            idempotency_key: r.try_get("idempotency_key")?,
            batch_id: batch.map(|b| parse_uuid(&b)).transpose()?,
        })
    }};
}
pub(crate) use read_job;

fn job_from_row(r: &SqliteRow) -> StoreResult<Job> {
    read_job!(r)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS, migrator};

    /// The embedded migrations are exactly what sqlx resolves from each folder, so
    /// databases made by earlier builds (`sqlx::migrate!`) keep their checksums.
    #[tokio::test]
    async fn the_embedded_migrations_equal_the_migrations_folders() {
        for (folder, files) in [
            ("sqlite", SQLITE_MIGRATIONS),
            ("postgres", POSTGRES_MIGRATIONS),
        ] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(folder);
            let want = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
            let got = migrator(files);
            let key = |m: &sqlx::migrate::Migration| {
                (
                    m.version,
                    m.description.to_string(),
                    m.migration_type,
                    m.checksum.to_vec(),
                    m.no_tx,
                    m.sql.as_str().to_owned(),
                )
            };
            let want: Vec<_> = want.iter().map(key).collect();
            let got: Vec<_> = got.iter().map(key).collect();
            assert_eq!(got, want, "migrations/{folder}");
        }
    }
}
